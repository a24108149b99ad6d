"""Scaled dot-product attention with selectable backends.

One function, :func:`attention`, used by every model in vision3d. Inputs are laid out as
``[B, heads, N, D]`` (the layout of :func:`torch.nn.functional.scaled_dot_product_attention`).

Backends:

* ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient
  kernels where PyTorch has them);
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (optional extra ``[xformers]``;
  imported on first use, never at import time);
* ``"math"``: the explicit ``softmax(q k^T / sqrt(D) + mask) v``, the exact slow twin used as the
  test oracle;
* ``"auto"``: ``"sdpa"``.

A boolean mask is ``True`` where attention is *allowed* (SDPA's convention); a float mask is added
to the logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "xformers", "math")


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention: q, k, v must be [B, heads, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in [B, heads, N]")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in [B, heads] or D")


def attention_math(
    q: Tensor,  # [B, H, Nq, D]
    k: Tensor,  # [B, H, Nk, D]
    v: Tensor,  # [B, H, Nk, Dv]
    attn_mask: Tensor | None = None,  # broadcastable to [B, H, Nq, Nk]; bool (True = keep) or additive float
    dropout_p: float = 0.0,
) -> Tensor:  # [B, H, Nq, Dv]
    """Reference attention written out: softmax(q k^T / sqrt(D) + mask) v, computed in float32."""
    dtype = q.dtype
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = torch.matmul(q.float() * scale, k.float().transpose(-2, -1))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.float()
    weights = logits.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v.float()).to(dtype)


def _attention_xformers(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    from vision3d.utils.optional import require

    xops = require("xformers.ops", "xformers attention")
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        else:
            bias = attn_mask.to(q.dtype)
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    # xformers wants [B, N, H, D]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
    )
    return out.transpose(1, 2)


def attention(
    q: Tensor,  # [B, H, Nq, D]
    k: Tensor,  # [B, H, Nk, D]
    v: Tensor,  # [B, H, Nk, Dv]
    *,
    attn_mask: Tensor | None = None,  # broadcastable to [B, H, Nq, Nk]; bool (True = attend) or additive float
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:  # [B, H, Nq, Dv]
    """Multi-head scaled dot-product attention (scale ``1/sqrt(D)``).

    Args:
        q, k, v: queries, keys, values laid out ``[B, heads, N, D]``.
        attn_mask: optional mask, boolean (``True`` = attend) or additive float.
        dropout_p: dropout on the attention weights (pass 0 in eval).
        backend: ``"auto"`` (= ``"sdpa"``), ``"sdpa"``, ``"xformers"`` or ``"math"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    _check(q, k, v)
    if backend == "math":
        return attention_math(q, k, v, attn_mask, dropout_p)
    if backend == "xformers":
        return _attention_xformers(q, k, v, attn_mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def split_heads(x: Tensor, num_heads: int) -> Tensor:  # [B, N, H*D] -> [B, H, N, D]
    """Reshape ``[B, N, heads * D]`` to ``[B, heads, N, D]``."""
    b, n, c = x.shape
    if c % num_heads:
        raise ValueError(f"split_heads: width {c} is not divisible by {num_heads} heads")
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:  # [B, H, N, D] -> [B, N, H*D]
    """Inverse of :func:`split_heads`."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
