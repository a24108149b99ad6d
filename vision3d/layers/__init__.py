"""Shared blocks: attention (SDPA, optional xformers), RoPE, MLP/GLU, MoE, patch embed, DPT head."""
