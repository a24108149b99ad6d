"""Generation: DiT and the Dense2MoE path."""
