"""TransNeXt: aggregated attention and convolutional GLU, as timm models.

Source
------
- Paper: Dai Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024,
  arXiv:2311.17132.
- Code: https://github.com/DaiShiResearch/TransNeXt (commit c8a99743b60ac94ac8d2bf66ffe164a440dcfe21),
  ``classification/transnext.py`` + ``classification/attention_native.py`` (the PyTorch-native path,
  the numerical reference here) and ``detection/dino/transnext_native.py`` (arbitrary input sizes).
  Apache-2.0 licence for the code and the released ImageNet-1k weights (Hugging Face
  ``DaiShiResearch/transnext-*``). This file is a re-implementation on ``timm.layers``.
- Weights: ``pretrained=True`` needs a local file (vision3d never downloads):
  ``timm.create_model("transnext_micro", pretrained=True, pretrained_cfg_overlay=dict(file=path))``.
  :func:`checkpoint_filter_fn` converts the authors' key layout (``patch_embed1``/``block1``/``norm1``/
  ``head``, ``model`` wrapper, ``module.``/``_orig_mod.``/``backbone.`` prefixes).

Architecture
------------
Four stages of ``overlapping patch embed (conv + LayerNorm eps 1e-5) -> blocks -> LayerNorm (eps 1e-6)``
at strides 4, 8, 16, 32. A block is ``x + attn(norm1(x))`` then ``x + ConvGLU(norm2(x))``; ConvGLU
splits ``fc1`` into a gate half (3x3 depthwise conv, GELU) and a value half, hidden width
``int(2 * int(dim * mlp_ratio) / 3)``. Stages with ``sr_ratio > 1`` use *aggregated attention*:
every query attends, under one softmax, to its 3x3 neighbourhood (zero padded, padded positions masked)
and to ``(H // sr) x (W // sr)`` pooled tokens (1x1 conv -> GELU -> adaptive average pool -> LayerNorm
-> the same ``kv`` projection). Logits are cosine similarities scaled by
``softplus(temperature) * log(n_local_valid + n_pool)`` with a learned query embedding added to the
normalised query; the local branch has a learned bias per head and window position, the pooled branch
a continuous relative position bias (CPB: a 2-512-heads ReLU MLP on log-spaced relative coordinates
normalised by the pre-training grid). Local values are aggregated with ``softmax weights +
q_norm @ learnable_tokens + learnable_bias``. The last stage (``sr_ratio == 1``) is plain full attention
with the same cosine/length scaling and CPB.

Input sizes (how the authors' code handles them)
------------------------------------------------
``img_size`` is the size the position tables are built for; ``pretrain_size`` (default ``img_size``)
normalises the CPB coordinates (224 for the 384 fine-tuned weights). Any other input size works
(``H, W >= 32`` for the standard ``sr_ratios``); ``pos_bias`` picks how:

- ``"extrapolate"`` (default): coordinates, pool sizes (``grid // sr`` or ``fixed_pool_size``), the
  padding mask and the length scale are recomputed for the new grid, exactly as the authors'
  classification code built at ``img_size = input size`` with ``--pretrain-size`` (their multi-scale
  evaluation), and their detection code with ``is_extrapolation=True``;
- ``"interpolate"``: the CPB bias is generated at the ``img_size`` grid and resized bilinearly to the
  new grid (their detection/segmentation default, ``is_extrapolation=False``).

``fixed_pool_size`` is the authors' "linear inference mode" (pooled grid fixed, e.g. 7).

Attention implementations (``attn_impl``)
-----------------------------------------
- ``"reference"``: the authors' native formulation (``F.unfold`` of keys and values into ``[.., d, 9]``
  windows), kept as the test oracle;
- ``"fast"`` (default): an unfold-free formulation: the nine window logits and the local aggregation
  are computed from shifted views of one zero-padded key/value map, so neither the 9x unfolded
  key/value tensors nor their permuted copies exist (forward and backward); the last stage calls
  ``F.scaled_dot_product_attention`` with the CPB bias as an additive mask. Both paths agree to float
  round-off (tests compare them, values and gradients);
- ``"triton"``: a fused Triton kernel (:func:`aggregated_attention_triton`: online softmax over the
  window and pooled logits, neighbours gathered by index, no ``[B, h, N, 9 + P]`` map in memory; float32;
  backward recomputes the fast path). Runs on CUDA, or on the CPU under Triton's interpreter
  (``TRITON_INTERPRET=1``), which is how the tests check it against the reference. triton is imported on
  first use only.

Official variants (ImageNet-1k; authors' README, parameter counts computed here with 1000 classes)

=======================  ==========  =====  =======  ======  =============================
timm name                input/pre   top-1  params   FLOPs   parameters counted here
=======================  ==========  =====  =======  ======  =============================
transnext_micro          224 / 224   82.5   12.8M    2.7G    12,809,304
transnext_tiny           224 / 224   84.0   28.2M    5.7G    28,258,960
transnext_small          224 / 224   84.7   49.7M    10.3G   49,741,564
transnext_base           224 / 224   84.8   89.7M    18.4G   89,721,496
transnext_small.in1k_384 384 / 224   86.0   49.7M    32.1G   49,741,564
transnext_base.in1k_384  384 / 224   86.2   89.7M    56.3G   89,721,496
transnext_micro_aaaa     256 / 256   82.6   13.1M    3.3G    13,114,008
=======================  ==========  =====  =======  ======  =============================

The README's counts are these numbers truncated to one decimal; the authors' own ``TransNeXt``
modules have exactly these counts. ``transnext_micro_aaaa`` is the authors' ``transnext_micro_AAAA``
(aggregated attention in all four stages, ``sr_ratios (16, 8, 4, 2)``).
"""

import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, get_device_dtype, register_notrace_function, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices
from torch import Tensor

from vision3d.backbones._helpers import (
    check_converted_state_dict,
    check_input,
    is_tracing,
    factory_device,
    require_local_weights,
    unwrap_state_dict,
)

__all__ = [
    "TransNeXt",
    "AggregatedAttention",
    "FullAttention",
    "checkpoint_filter_fn",
    "cpb_coordinates",
    "aggregated_attention_reference",
    "aggregated_attention_fast",
    "aggregated_attention_triton",
]

ATTN_IMPLS = ("fast", "reference", "triton")
POS_BIAS_MODES = ("extrapolate", "interpolate")


# ---------------------------------------------------------------------------------------------
# position tables
# ---------------------------------------------------------------------------------------------
def _axis_offsets(n_q: int, n_k: int) -> Tuple[List[int], List[int]]:
    """Doubled query-to-pooled-key offsets along one axis, deduplicated.

    Key ``k`` is the mean of the query coordinates its adaptive-average-pool cell ``[s_k, e_k)``
    covers, ``(s_k + e_k - 1) / 2``, so ``2 * (q - key_k) = 2 q - s_k - e_k + 1`` is an integer.

    Returns ``(unique, rank)``: the sorted distinct doubled offsets, and for each pair
    ``q * n_k + k`` the position of its offset in ``unique``. Plain integer loops: TorchScript
    compiles them and ``torch.compile``/``torch.export`` evaluate them at trace time (no
    data-dependent ``torch.unique``).
    """
    lo = 1 - 2 * n_q  # doubled offsets lie in [lo, 2 n_q - 1]
    present = [0] * (4 * n_q)
    pairs: List[int] = []
    for q in range(n_q):
        for k in range(n_k):
            start = (k * n_q) // n_k
            end = ((k + 1) * n_q + n_k - 1) // n_k
            d = 2 * q - start - end + 1
            pairs.append(d - lo)
            present[d - lo] = 1
    unique: List[int] = []
    position = [0] * (4 * n_q)
    for i in range(4 * n_q):
        if present[i] == 1:
            position[i] = len(unique)
            unique.append(i + lo)
    return unique, [position[p] for p in pairs]


def cpb_coordinates(
    query_hw: Tuple[int, int],
    key_hw: Tuple[int, int],
    pretrain_hw: Tuple[int, int],
    device: Optional[torch.device] = None,
) -> Tuple[Tensor, Tensor]:
    """Log-spaced relative coordinates between a query grid and an (average-pooled) key grid.

    Key coordinates are the means of the query coordinates each adaptive-average-pool cell covers.
    Offsets are divided by ``pretrain - 1`` and multiplied by 8 per axis, then mapped through
    ``sign(r) * log2(1 + |r|) / 3``. The distinct ``(dy, dx)`` pairs are the product of the distinct
    ``dy`` and ``dx`` (the two axes vary independently), sorted like ``torch.unique(dim=0)``.

    Args:
        query_hw: query grid ``(Hq, Wq)``.
        key_hw: pooled key grid ``(Hk, Wk)``.
        pretrain_hw: the stage grid at the pre-training resolution (both >= 2).

    Returns:
        ``(index, table)``: ``index`` ``[Hq * Wq * Hk * Wk]`` long, row of ``table`` for each
        (query, key) pair in row-major order; ``table`` ``[U, 2]`` float32, the distinct (dy, dx).
    """
    uh, rank_h = _axis_offsets(query_hw[0], key_hw[0])
    uw, rank_w = _axis_offsets(query_hw[1], key_hw[1])
    dy = torch.tensor(uh, dtype=torch.float32, device=device) / 2 / (pretrain_hw[0] - 1) * 8
    dx = torch.tensor(uw, dtype=torch.float32, device=device) / 2 / (pretrain_hw[1] - 1) * 8
    table = torch.stack([dy[:, None].expand(-1, len(uw)), dx[None, :].expand(len(uh), -1)], dim=-1).reshape(-1, 2)
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0
    ih = torch.tensor(rank_h, dtype=torch.long, device=device).view(query_hw[0], 1, key_hw[0], 1)
    iw = torch.tensor(rank_w, dtype=torch.long, device=device).view(1, query_hw[1], 1, key_hw[1])
    return (ih * len(uw) + iw).reshape(-1), table


def local_window_mask(hw: Tuple[int, int], window: int, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """Valid-neighbour count ``[N, 1]`` (float32) and padding mask ``[N, window**2]`` (True = padded)."""
    ones = torch.ones(1, 1, hw[0], hw[1], device=device)
    valid = F.unfold(ones, window, padding=window // 2)[0]  # [L, N]
    return valid.sum(0)[:, None], valid.t() == 0


class Geometry(NamedTuple):
    """Per-stage, per-input-size tables used by the attention layers (not parameters, not saved)."""

    hw: Tuple[int, int]  # token grid (H, W)
    pool_hw: Tuple[int, int]  # pooled key grid (full attention: hw)
    index: Tensor  # [Nq_table * Nk_table] long, CPB table row per (query, key) pair
    table: Tensor  # [U, 2] float32 CPB coordinates
    seq_scale: Tensor  # [N, 1] log(valid local + pooled) (aggregated) or [1, 1] log(N) (full attention)
    padding_mask: Tensor  # [N, L] bool, True = padded neighbour ([N, 0] for full attention)
    table_hw: Tuple[int, int, int, int]  # (Ht, Wt, pHt, pWt) of the tables in 'interpolate' mode, else (0, 0, 0, 0)


@register_notrace_function  # FX: one call on the (runtime) grid size; its Python loops stay out of the graph
def stage_geometry(
    H: int,
    W: int,
    sr_ratio: int,
    window: int,
    fixed_pool_size: int,  # 0 = pooled grid follows the input (H // sr_ratio)
    pretrain_grid: int,
    table_grid: int,  # > 0: 'interpolate' mode, tables built at this grid
    device: torch.device,
) -> Geometry:
    """The :class:`Geometry` of a stage for an ``H x W`` token grid (see :class:`TransNeXtStage`)."""

    hw = (H, W)
    pool_hw = _pool_grid(H, W, sr_ratio, fixed_pool_size)
    pre = (pretrain_grid, pretrain_grid)
    if table_grid > 0:
        tp = _pool_grid(table_grid, table_grid, sr_ratio, fixed_pool_size)
        index, table = cpb_coordinates((table_grid, table_grid), tp, pre, device)
        table_hw = (table_grid, table_grid, tp[0], tp[1])
    else:
        index, table = cpb_coordinates(hw, pool_hw, pre, device)
        table_hw = (0, 0, 0, 0)
    if sr_ratio == 1:
        seq_scale = torch.log(torch.full((1, 1), float(H * W), device=device))
        mask = torch.zeros(H * W, 0, dtype=torch.bool, device=device)
    else:
        valid, mask = local_window_mask(hw, window, device)
        seq_scale = torch.log(valid + pool_hw[0] * pool_hw[1])
    return Geometry(hw, pool_hw, index, table, seq_scale, mask, table_hw)


def _gather_bias(bias: Tensor, geom: Geometry, n_query: int, n_key: int, interpolate: bool) -> Tensor:
    """CPB MLP output on the table rows ``[heads, U]`` -> ``[heads, N, n_key]`` (resized in 'interpolate' mode)."""
    if not interpolate:
        return bias[:, geom.index.view(-1)].view(-1, n_query, n_key)
    th, tw, tph, tpw = geom.table_hw[0], geom.table_hw[1], geom.table_hw[2], geom.table_hw[3]
    heads = bias.shape[0]
    bias = bias[:, geom.index.view(-1)].view(heads, th * tw, tph, tpw)
    bias = F.interpolate(bias, size=[geom.pool_hw[0], geom.pool_hw[1]], mode="bilinear")  # pooled axis
    bias = bias.reshape(heads, th * tw, n_key).transpose(1, 2).reshape(heads, n_key, th, tw)
    bias = F.interpolate(bias, size=[geom.hw[0], geom.hw[1]], mode="bilinear")  # query axis to the new grid
    return bias.reshape(heads, n_key, n_query).transpose(1, 2)


def _pool_grid(h: int, w: int, sr_ratio: int, fixed_pool_size: int) -> Tuple[int, int]:
    """Pooled key grid of a stage: the token grid (full attention), fixed, or ``grid // sr_ratio``."""
    if sr_ratio == 1:
        return h, w
    if fixed_pool_size > 0:
        return fixed_pool_size, fixed_pool_size
    return h // sr_ratio, w // sr_ratio


class _CpbCache:
    """Eval-time cache of one layer's CPB bias, exact: keyed by the grid, device, dtype and the
    identity and in-place version of the CPB weights (an optimiser step or ``load_state_dict``
    bumps the version), used only in eval mode without autograd through the CPB weights."""

    def __init__(self) -> None:
        self.key: Optional[Tuple[Any, ...]] = None
        self.value: Optional[Tensor] = None

    def get(self, layer: nn.Module, geom: Geometry, n_query: int, n_key: int) -> Tensor:
        params = (layer.cpb_fc1.weight, layer.cpb_fc1.bias, layer.cpb_fc2.weight, layer.cpb_fc2.bias)
        key = (geom.hw, geom.pool_hw, geom.table_hw, geom.index.data_ptr(), geom.index.device) + tuple(
            (p.data_ptr(), p._version, p.dtype) for p in params
        )
        if self.key != key or self.value is None:
            with torch.no_grad():
                self.value = layer.compute_position_bias(geom, n_query, n_key)
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


class _CpbAttention(nn.Module):
    """Base of the attention layers: the CPB bias of ``cpb_fc1``/``cpb_fc2``, cached in eval inference."""

    def position_bias(self, geom: Geometry, n_query: int, n_key: int) -> Tensor:  # [heads, n_query, n_key]
        """Computed on every call while training, under TorchScript/FX/``torch.compile``/``torch.export``
        and whenever autograd reaches the CPB weights; otherwise (eval inference) served from the
        layer's exact :class:`_CpbCache`."""
        if torch.jit.is_scripting():
            return self.compute_position_bias(geom, n_query, n_key)
        return self._cached_position_bias(geom, n_query, n_key)

    def compute_position_bias(self, geom: Geometry, n_query: int, n_key: int) -> Tensor:
        """The CPB MLP on the coordinate table, gathered (and in 'interpolate' mode resized) to the grid."""
        bias = self.cpb_fc2(F.relu(self.cpb_fc1(geom.table.to(self.cpb_fc1.weight.dtype)))).transpose(0, 1)
        return _gather_bias(bias, geom, n_query, n_key, self.interpolate_bias)

    @torch.jit.unused
    def _cpb_needs_grad(self) -> bool:
        weights = (self.cpb_fc1.weight, self.cpb_fc1.bias, self.cpb_fc2.weight, self.cpb_fc2.bias)
        return torch.is_grad_enabled() and any(w.requires_grad for w in weights)

    @torch.jit.unused
    def _cached_position_bias(self, geom: Geometry, n_query: int, n_key: int) -> Tensor:
        if self.training or is_tracing() or self._cpb_needs_grad():
            return self.compute_position_bias(geom, n_query, n_key)
        return self.cpb_cache.get(self, geom, n_query, n_key)


# ---------------------------------------------------------------------------------------------
# aggregated attention core: reference (unfold) and fast (shifted views) formulations
# ---------------------------------------------------------------------------------------------
def _unfold_windows(t: Tensor, H: int, W: int, window: int) -> Tensor:  # [B, h, N, d] -> [B, h, N, d, L]
    B, h, N, d = t.shape
    t = t.permute(0, 1, 3, 2).reshape(B, h * d, H, W)
    return F.unfold(t, window, padding=window // 2).reshape(B, h, d, window * window, N).permute(0, 1, 4, 2, 3)


def aggregated_attention_reference(
    q_norm: Tensor,  # [B, h, N, d] L2-normalised queries
    q_scaled: Tensor,  # [B, h, N, d] (q_norm + query_embedding) * softplus(T) * length scale
    k_local: Tensor,  # [B, h, N, d] L2-normalised per-pixel keys, N = H * W row-major
    v_local: Tensor,  # [B, h, N, d] per-pixel values
    k_pool: Tensor,  # [B, h, P, d] L2-normalised pooled keys
    v_pool: Tensor,  # [B, h, P, d] pooled values
    local_bias: Tensor,  # [h, L] learned bias per window position, L = window ** 2
    pool_bias: Tensor,  # [h, N, P] CPB bias
    tokens: Tensor,  # [h, d, L] learnable tokens
    tokens_bias: Tensor,  # [h, 1, L] learnable bias
    padding_mask: Tensor,  # [N, L] bool, True where the neighbour is zero padding
    hw: Tuple[int, int],
    window: int,
    attn_drop: float = 0.0,
) -> Tensor:  # [B, h, N, d]
    """The authors' native formulation: keys and values unfolded into ``[B, h, N, d, L]`` windows."""
    B, h, N, d = k_local.shape
    H, W = hw[0], hw[1]
    L = window * window
    k_win = _unfold_windows(k_local, H, W, window)
    v_win = _unfold_windows(v_local, H, W, window)
    attn_local = (q_scaled.unsqueeze(-2) @ k_win).squeeze(-2) + local_bias.unsqueeze(1)
    attn_local = attn_local.masked_fill(padding_mask, float("-inf"))
    attn_pool = q_scaled @ k_pool.transpose(-2, -1) + pool_bias
    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    attn = F.dropout(attn, attn_drop) if attn_drop > 0 else attn
    attn_local, attn_pool = attn.split([L, attn.shape[-1] - L], dim=-1)
    w_local = q_norm @ tokens + tokens_bias + attn_local  # [B, h, N, L]
    x_local = (w_local.unsqueeze(-2) @ v_win.transpose(-2, -1)).squeeze(-2)
    return x_local + attn_pool @ v_pool


def aggregated_attention_fast(
    q_norm: Tensor,  # [B, h, N, d]
    q_scaled: Tensor,  # [B, h, N, d]
    k_local: Tensor,  # [B, h, N, d]
    v_local: Tensor,  # [B, h, N, d]
    k_pool: Tensor,  # [B, h, P, d]
    v_pool: Tensor,  # [B, h, P, d]
    local_bias: Tensor,  # [h, L]
    pool_bias: Tensor,  # [h, N, P]
    tokens: Tensor,  # [h, d, L]
    tokens_bias: Tensor,  # [h, 1, L]
    padding_mask: Tensor,  # [N, L] bool
    hw: Tuple[int, int],
    window: int,
    attn_drop: float = 0.0,
) -> Tensor:  # [B, h, N, d]
    """Same result as :func:`aggregated_attention_reference` without unfolding keys and values.

    Keys and values are zero-padded once to ``[B, h, H + 2r, W + 2r, d]``; window position
    ``j = ky * window + kx`` (row-major, as ``F.unfold``) of pixel ``(y, x)`` is the view
    ``[ky:ky + H, kx:kx + W]`` of the padded map. The 9 logits are dot products with those views and the
    local output is the weighted sum of the value views: only ``[B, h, N, L]`` weight tensors are
    added to the activations kept for backward, instead of two ``[B, h, N, d, L]`` unfolded copies.
    """
    B, h, N, d = k_local.shape
    H, W = hw[0], hw[1]
    L = window * window
    r = window // 2
    k_pad = F.pad(k_local.view(B, h, H, W, d), (0, 0, r, r, r, r))
    v_pad = F.pad(v_local.view(B, h, H, W, d), (0, 0, r, r, r, r))
    q_grid = q_scaled.view(B, h, H, W, d)
    logits: List[Tensor] = []
    for j in range(L):
        ky, kx = j // window, j % window
        logits.append((q_grid * k_pad[:, :, ky : ky + H, kx : kx + W]).sum(-1))
    attn_local = torch.stack(logits, dim=-1).view(B, h, N, L) + local_bias.unsqueeze(1)
    attn_local = attn_local.masked_fill(padding_mask, float("-inf"))
    attn_pool = torch.matmul(q_scaled, k_pool.transpose(-2, -1)) + pool_bias
    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    attn = F.dropout(attn, attn_drop) if attn_drop > 0 else attn
    attn_local, attn_pool = attn.split([L, attn.shape[-1] - L], dim=-1)
    w_local = (torch.matmul(q_norm, tokens) + tokens_bias + attn_local).view(B, h, H, W, L)
    out = torch.matmul(attn_pool, v_pool).view(B, h, H, W, d)
    for j in range(L):
        ky, kx = j // window, j % window
        out = out + w_local[:, :, :, :, j : j + 1] * v_pad[:, :, ky : ky + H, kx : kx + W]
    return out.view(B, h, N, d)


_TRITON_KERNELS: Dict[bool, Any] = {}


def _triton_kernel() -> Any:
    """Build (once per interpreter setting) the Triton forward kernel; imports triton on first use only."""
    import os

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret in _TRITON_KERNELS:
        return _TRITON_KERNELS[interpret]
    from vision3d.utils.optional import require

    triton = require("triton", "TransNeXt attn_impl='triton'")
    tl = triton.language

    @triton.jit
    def agg_fwd(
        QN, QS, K, V, KP, VP, LB, PB, TOK, TB, OUT,
        H, W, N, P, NH,
        D: tl.constexpr, BD: tl.constexpr, WIN: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr,
    ):
        # one program: BN queries of one (batch, head); two passes (softmax statistics, then aggregation)
        pid_bh = tl.program_id(0)
        head = pid_bh % NH
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        offs_d = tl.arange(0, BD)
        mask_n = offs_n < N
        mask_d = offs_d < D
        base = pid_bh * N * D
        base_p = pid_bh * P * D
        qmask = mask_n[:, None] & mask_d[None, :]
        qs = tl.load(QS + base + offs_n[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        qn = tl.load(QN + base + offs_n[:, None] * D + offs_d[None, :], mask=qmask, other=0.0)
        y = offs_n // W
        x = offs_n % W
        L: tl.constexpr = WIN * WIN
        R: tl.constexpr = WIN // 2
        m_i = tl.full([BN], -1.0e30, tl.float32)
        l_i = tl.zeros([BN], tl.float32)
        for j in tl.static_range(L):
            yy = y + (j // WIN) - R
            xx = x + (j % WIN) - R
            valid = mask_n & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            k = tl.load(K + base + (yy * W + xx)[:, None] * D + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
            sc = tl.sum(qs * k, axis=1) + tl.load(LB + head * L + j)
            sc = tl.where(valid, sc, -1.0e30)
            m_new = tl.maximum(m_i, sc)
            l_i = l_i * tl.exp(m_i - m_new) + tl.where(valid, tl.exp(sc - m_new), 0.0)
            m_i = m_new
        for p0 in range(0, P, BP):
            offs_p = p0 + tl.arange(0, BP)
            mask_p = offs_p < P
            kp = tl.load(KP + base_p + offs_p[:, None] * D + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0)
            sc = tl.sum(qs[:, None, :] * kp[None, :, :], axis=2)
            pmask = mask_n[:, None] & mask_p[None, :]
            sc += tl.load(PB + head * N * P + offs_n[:, None] * P + offs_p[None, :], mask=pmask, other=0.0)
            sc = tl.where(pmask, sc, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.where(pmask, tl.exp(sc - m_new[:, None]), 0.0), axis=1)
            m_i = m_new
        m_i = tl.where(mask_n, m_i, 0.0)  # rows past N: keep exp() finite (their output is masked)
        inv_l = 1.0 / tl.where(mask_n, l_i, 1.0)
        acc = tl.zeros([BN, BD], tl.float32)
        for j in tl.static_range(L):
            yy = y + (j // WIN) - R
            xx = x + (j % WIN) - R
            valid = mask_n & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            nb = (yy * W + xx)[:, None] * D + offs_d[None, :]
            vmask = valid[:, None] & mask_d[None, :]
            k = tl.load(K + base + nb, mask=vmask, other=0.0)
            v = tl.load(V + base + nb, mask=vmask, other=0.0)
            sc = tl.sum(qs * k, axis=1) + tl.load(LB + head * L + j)
            prob = tl.where(valid, tl.exp(sc - m_i) * inv_l, 0.0)
            tok = tl.load(TOK + head * D * L + offs_d * L + j, mask=mask_d, other=0.0)
            wgt = prob + tl.sum(qn * tok[None, :], axis=1) + tl.load(TB + head * L + j)
            acc += wgt[:, None] * v
        for p0 in range(0, P, BP):
            offs_p = p0 + tl.arange(0, BP)
            mask_p = offs_p < P
            pd = mask_p[:, None] & mask_d[None, :]
            kp = tl.load(KP + base_p + offs_p[:, None] * D + offs_d[None, :], mask=pd, other=0.0)
            vp = tl.load(VP + base_p + offs_p[:, None] * D + offs_d[None, :], mask=pd, other=0.0)
            sc = tl.sum(qs[:, None, :] * kp[None, :, :], axis=2)
            pmask = mask_n[:, None] & mask_p[None, :]
            sc += tl.load(PB + head * N * P + offs_n[:, None] * P + offs_p[None, :], mask=pmask, other=0.0)
            prob = tl.where(pmask, tl.exp(sc - m_i[:, None]) * inv_l[:, None], 0.0)
            acc += tl.sum(prob[:, :, None] * vp[None, :, :], axis=1)
        tl.store(OUT + base + offs_n[:, None] * D + offs_d[None, :], acc, mask=qmask)

    _TRITON_KERNELS[interpret] = (triton, agg_fwd)
    return _TRITON_KERNELS[interpret]


class _AggregatedAttentionTriton(torch.autograd.Function):
    """Fused forward (Triton, online softmax, nothing but the inputs kept); backward recomputes the fast path."""

    @staticmethod
    def forward(ctx, q_norm, q_scaled, k_local, v_local, k_pool, v_pool, local_bias, pool_bias, tokens, tokens_bias, hw, window):
        triton, kernel = _triton_kernel()
        B, h, N, d = q_norm.shape
        P = k_pool.shape[2]
        ins = [t.float().contiguous() for t in (q_norm, q_scaled, k_local, v_local, k_pool, v_pool, local_bias, pool_bias, tokens, tokens_bias)]
        out = torch.empty(B, h, N, d, device=q_norm.device, dtype=torch.float32)
        BN = 16
        grid = (B * h, triton.cdiv(N, BN))
        kernel[grid](
            *ins, out, hw[0], hw[1], N, P, h,
            D=d, BD=triton.next_power_of_2(d), WIN=window, BN=BN, BP=min(16, triton.next_power_of_2(max(P, 1))),
        )
        ctx.save_for_backward(q_norm, q_scaled, k_local, v_local, k_pool, v_pool, local_bias, pool_bias, tokens, tokens_bias)
        ctx.hw, ctx.window = hw, window
        return out.to(q_norm.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        _, mask = local_window_mask(ctx.hw, ctx.window, grad_out.device)
        with torch.enable_grad():
            out = aggregated_attention_fast(*inputs[:8], inputs[8], inputs[9], mask, ctx.hw, ctx.window)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        return (*grads, None, None)


def aggregated_attention_triton(
    q_norm: Tensor,  # [B, h, N, d]
    q_scaled: Tensor,  # [B, h, N, d]
    k_local: Tensor,  # [B, h, N, d]
    v_local: Tensor,  # [B, h, N, d]
    k_pool: Tensor,  # [B, h, P, d]
    v_pool: Tensor,  # [B, h, P, d]
    local_bias: Tensor,  # [h, L]
    pool_bias: Tensor,  # [h, N, P]
    tokens: Tensor,  # [h, d, L]
    tokens_bias: Tensor,  # [h, 1, L]
    padding_mask: Tensor,  # [N, L] bool (implied by the window bounds; unused by the kernel)
    hw: Tuple[int, int],
    window: int,
    attn_drop: float = 0.0,
) -> Tensor:  # [B, h, N, d]
    """Fused Triton kernel for :func:`aggregated_attention_reference` (CUDA, or the CPU with ``TRITON_INTERPRET=1``).

    One program handles 16 queries of one (batch, head): pass 1 runs an online softmax over the 9 window
    logits (neighbours gathered from ``k_local`` by index, out-of-image ones skipped) and the pooled
    logits; pass 2 accumulates ``(softmax + q_norm . token_j + bias_j) * v_j`` and the pooled values.
    Nothing of size ``[B, h, N, L + P]`` is written to memory. Computes in float32; attention dropout is
    not supported (use ``"fast"`` for training with ``attn_drop > 0``). Backward recomputes the fast path.
    """
    import os

    if attn_drop > 0:
        raise ValueError("aggregated_attention_triton: attn_drop > 0 is not supported; use attn_impl='fast'")
    if not q_norm.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"aggregated_attention_triton: tensors on {q_norm.device} need CUDA (or TRITON_INTERPRET=1 set "
            "before triton is imported); use attn_impl='fast' on the CPU"
        )
    return _AggregatedAttentionTriton.apply(
        q_norm, q_scaled, k_local, v_local, k_pool, v_pool, local_bias, pool_bias, tokens, tokens_bias, tuple(hw), window
    )


# ---------------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------------
def _temperature_init(num_heads: int) -> Tensor:
    # softplus(t) = 1 / 0.24 at initialisation
    return torch.log(torch.expm1(torch.full((num_heads, 1, 1), 1.0 / 0.24)))


class AggregatedAttention(_CpbAttention):
    """Pixel-focused local attention + pooled attention under one softmax (stages with ``sr_ratio > 1``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 3,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str = "fast",
        interpolate_bias: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AggregatedAttention: dim {dim} is not divisible by num_heads {num_heads}")
        if window_size % 2 != 1:
            raise ValueError(f"AggregatedAttention: window_size must be odd, got {window_size}")
        self.num_heads, self.head_dim, self.window_size = num_heads, dim // num_heads, window_size
        self.local_len = window_size * window_size
        self.attn_drop = attn_drop
        self.attn_impl = attn_impl
        self.temperature = nn.Parameter(_temperature_init(num_heads))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.query_embedding = nn.Parameter(trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, as the authors'
        self.act = nn.GELU()
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_fc2 = nn.Linear(512, num_heads)
        self.interpolate_bias = interpolate_bias
        self.cpb_cache = _CpbCache()
        self.relative_pos_bias_local = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, self.local_len), std=0.0004)
        )
        self.learnable_tokens = nn.Parameter(
            trunc_normal_(torch.empty(num_heads, self.head_dim, self.local_len), std=0.02)
        )
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, self.local_len))

    def forward(self, x: Tensor, geom: Geometry) -> Tensor:  # [B, N, C] -> [B, N, C]
        B, N, C = x.shape
        H, W = geom.hw[0], geom.hw[1]
        h, d = self.num_heads, self.head_dim
        q_norm = F.normalize(self.q(x).view(B, N, h, d).transpose(1, 2), dim=-1)
        q_scaled = (q_norm + self.query_embedding) * F.softplus(self.temperature) * geom.seq_scale.to(q_norm.dtype)
        kv = self.kv(x).view(B, N, 2, h, d)
        k_local = F.normalize(kv[:, :, 0], dim=-1).transpose(1, 2)
        v_local = kv[:, :, 1].transpose(1, 2)

        pooled = self.act(self.sr(x.transpose(1, 2).reshape(B, C, H, W)))
        pooled = F.adaptive_avg_pool2d(pooled, [geom.pool_hw[0], geom.pool_hw[1]]).flatten(2).transpose(1, 2)
        P = pooled.shape[1]
        kv_pool = self.kv(self.norm(pooled)).view(B, P, 2, h, d).permute(2, 0, 3, 1, 4)
        k_pool, v_pool = F.normalize(kv_pool[0], dim=-1), kv_pool[1]
        pool_bias = self.position_bias(geom, N, P)
        drop = self.attn_drop if self.training else 0.0
        if self.attn_impl == "reference":
            out = aggregated_attention_reference(
                q_norm, q_scaled, k_local, v_local, k_pool, v_pool, self.relative_pos_bias_local, pool_bias,
                self.learnable_tokens, self.learnable_bias, geom.padding_mask, geom.hw, self.window_size, drop,
            )
        elif self.attn_impl == "triton" and not torch.jit.is_scripting():
            out = aggregated_attention_triton(
                q_norm, q_scaled, k_local, v_local, k_pool, v_pool, self.relative_pos_bias_local, pool_bias,
                self.learnable_tokens, self.learnable_bias, geom.padding_mask, geom.hw, self.window_size, drop,
            )
        else:
            out = aggregated_attention_fast(
                q_norm, q_scaled, k_local, v_local, k_pool, v_pool, self.relative_pos_bias_local, pool_bias,
                self.learnable_tokens, self.learnable_bias, geom.padding_mask, geom.hw, self.window_size, drop,
            )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class FullAttention(_CpbAttention):
    """Length-scaled cosine attention with a query embedding and CPB bias (the ``sr_ratio == 1`` stage)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str = "fast",
        interpolate_bias: bool = False,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"FullAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_drop = attn_drop
        self.attn_impl = attn_impl
        self.temperature = nn.Parameter(_temperature_init(num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.query_embedding = nn.Parameter(trunc_normal_(torch.empty(num_heads, 1, self.head_dim), std=0.02))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.cpb_fc1 = nn.Linear(2, 512)
        self.cpb_fc2 = nn.Linear(512, num_heads)
        self.interpolate_bias = interpolate_bias
        self.cpb_cache = _CpbCache()

    def forward(self, x: Tensor, geom: Geometry) -> Tensor:  # [B, N, C] -> [B, N, C]
        B, N, C = x.shape
        # output features are laid out [q heads | k heads | v heads]
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = (F.normalize(q, dim=-1) + self.query_embedding) * F.softplus(self.temperature) * geom.seq_scale.to(q.dtype)
        k = F.normalize(k, dim=-1)
        bias = self.position_bias(geom, N, N)  # [h, N, N]
        drop = self.attn_drop if self.training else 0.0
        if self.attn_impl != "reference":  # "fast" and "triton": SDPA with the bias as additive mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=drop, scale=1.0)
        else:
            attn = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            attn = F.dropout(attn, drop) if drop > 0 else attn
            out = attn @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class ConvGLU(nn.Module):
    """Convolutional GLU: ``fc2(GELU(dwconv3x3(a)) * b)`` with ``[a, b] = fc1(x)``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        hidden = int(2 * hidden / 3)
        self.fc1 = nn.Linear(dim, hidden * 2)
        self.dwconv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, hw: Tuple[int, int]) -> Tensor:  # [B, N, C] -> [B, N, C]
        B, N, _ = x.shape
        a, b = self.fc1(x).chunk(2, dim=-1)
        a = self.dwconv(a.transpose(1, 2).reshape(B, -1, hw[0], hw[1])).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(a) * b)))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        window_size: Optional[int],
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        attn_impl: str = "fast",
        interpolate_bias: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if sr_ratio == 1:
            self.attn = FullAttention(dim, num_heads, qkv_bias, attn_drop, drop, attn_impl, interpolate_bias)
        else:
            self.attn = AggregatedAttention(
                dim, num_heads, window_size, qkv_bias, attn_drop, drop, attn_impl, interpolate_bias
            )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvGLU(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, geom: Geometry) -> Tensor:  # [B, N, C]
        x = x + self.drop_path(self.attn(self.norm1(x), geom))
        return x + self.drop_path(self.mlp(self.norm2(x), geom.hw))


class PatchEmbed(nn.Module):
    """Overlapping patch embedding: strided conv, then LayerNorm (eps 1e-5) over channels."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[int, int]]:  # [B, C, H, W] -> [B, N, D], (h, w)
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class TransNeXtStage(nn.Module):
    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        window_size: Optional[int],
        stride: int,
        kernel: int,
        reduction: int,
        table_size: int,
        pretrain_size: int,
        fixed_pool_size: Optional[int],
        pos_bias: str,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        norm_eps: float,
        attn_impl: str,
    ):
        super().__init__()
        self.sr_ratio, self.window_size = sr_ratio, window_size
        self.table_grid = table_size // reduction  # grid of the position tables ('interpolate' mode)
        self.pretrain_grid = pretrain_size // reduction
        self.fixed_pool_size = fixed_pool_size if sr_ratio > 1 else None
        self.fixed_pool = int(self.fixed_pool_size or 0)  # int form (0 = none) for TorchScript
        self.window = int(window_size or 0)
        self.pos_bias = pos_bias
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(in_chans, dim, kernel, stride)
        self.blocks = nn.ModuleList(
            [
                Block(
                    dim, num_heads, mlp_ratio, sr_ratio, window_size, qkv_bias, drop, attn_drop, drop_path[j],
                    norm_eps, attn_impl, pos_bias == "interpolate",
                )
                for j in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self._geom_cache: Dict[Tuple[int, int, str], Geometry] = {}

    def pool_hw(self, hw: Tuple[int, int]) -> Tuple[int, int]:
        return _pool_grid(hw[0], hw[1], self.sr_ratio, self.fixed_pool)

    def geometry(self, hw: Tuple[int, int], device: torch.device) -> Geometry:
        """Tables for an ``hw`` token grid; cached per size and device in eager mode."""
        if torch.jit.is_scripting():
            return self._build_geometry(hw[0], hw[1], device)
        return self._cached_geometry(hw, device)

    def _build_geometry(self, H: int, W: int, device: torch.device) -> Geometry:
        return stage_geometry(
            H, W, self.sr_ratio, self.window, self.fixed_pool, self.pretrain_grid,
            self.table_grid if self.pos_bias == "interpolate" else 0, device,
        )

    @torch.jit.unused
    def _cached_geometry(self, hw: Tuple[int, int], device: torch.device) -> Geometry:
        if is_tracing():
            return self._build_geometry(hw[0], hw[1], device)
        key = (hw[0], hw[1], str(device))
        geom = self._geom_cache.get(key)
        if geom is None:
            geom = self._build_geometry(hw[0], hw[1], device)
            if len(self._geom_cache) > 16:
                self._geom_cache.clear()
            self._geom_cache[key] = geom
        return geom

    def forward(self, x: Tensor) -> Tensor:  # [B, C_in, H, W] -> [B, C, H', W']
        x, hw = self.patch_embed(x)
        geom = self.geometry(hw, x.device)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, geom, use_reentrant=False)
            else:
                x = blk(x, geom)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, hw[0], hw[1])


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
@register_notrace_function  # FX: shape checks run on the real input, outside the graph
def check_token_grids(
    x: Tensor, in_chans: int, patch_size: int, sr_ratios: List[int], fixed_pool_size: int, name: str
) -> None:
    """Raise ``ValueError`` naming the model when ``x`` is no ``[B, in_chans, H, W]`` batch or a stage's
    token grid is smaller than its pooling ratio (or not above ``fixed_pool_size``, when set)."""
    check_input(x, in_chans, name)
    h, w = x.shape[2], x.shape[3]
    for i, sr in enumerate(sr_ratios):
        div = patch_size if i == 0 else 2
        h, w = (h + div - 1) // div, (w + div - 1) // div
        if sr > 1:
            need = fixed_pool_size + 1 if fixed_pool_size > 0 else sr
            if min(h, w) < need:
                why = f"its pooling ratio {sr}"
                if fixed_pool_size > 0:
                    why = f"{why}, fixed_pool_size {fixed_pool_size} must be below the grid"
                raise ValueError(
                    f"{name}: input ({x.shape[2]}, {x.shape[3]}) gives a {h}x{w} token grid in stage {i}, "
                    f"smaller than {need} ({why})"
                )


class TransNeXt(nn.Module):
    """TransNeXt classification backbone (timm API). Feature maps are NCHW at strides 4, 8, 16, 32.

    Args:
        img_size: size the position tables are built for (square).
        pretrain_size: pre-training image size, normalises CPB coordinates (default ``img_size``).
        window_size: local window per stage (``None`` for full-attention stages).
        patch_size: stem stride (stem kernel ``2 * patch_size - 1``).
        in_chans, num_classes, global_pool: as in timm.
        embed_dims, num_heads, mlp_ratios, depths, sr_ratios: per-stage structure.
        qkv_bias: bias in q/kv/qkv projections.
        drop_rate: dropout inside blocks (after attention/MLP projections), the authors' meaning.
        attn_drop_rate, drop_path_rate: attention-weight dropout, stochastic depth (linear decay).
        norm_eps: eps of the block and stage LayerNorms (patch-embed and pooled-key norms use 1e-5).
        fixed_pool_size: pooled grid of every aggregated-attention stage ("linear inference mode").
        pos_bias: ``"extrapolate"`` or ``"interpolate"`` (see the module docstring).
        attn_impl: ``"fast"``, ``"reference"`` or ``"triton"`` (CUDA).
        device, dtype: where and in which dtype parameters are created (timm's ``create_model`` arguments).
    """

    def __init__(
        self,
        img_size: int = 224,
        pretrain_size: Optional[int] = None,
        window_size: Sequence[Optional[int]] = (3, 3, 3, None),
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: Sequence[int] = (48, 96, 192, 384),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        depths: Sequence[int] = (2, 2, 15, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        fixed_pool_size: Optional[int] = None,
        pos_bias: str = "extrapolate",
        attn_impl: str = "fast",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        with factory_device(device):
            img_size = to_2tuple(img_size)[0]
            pretrain_size = to_2tuple(pretrain_size or img_size)[0]
            n = len(depths)
            for name, seq in (("embed_dims", embed_dims), ("num_heads", num_heads), ("mlp_ratios", mlp_ratios),
                              ("sr_ratios", sr_ratios), ("window_size", window_size)):
                if len(seq) != n:
                    raise ValueError(f"TransNeXt: {name} has {len(seq)} entries, expected one per stage ({n})")
            if attn_impl not in ATTN_IMPLS:
                raise ValueError(f"TransNeXt: attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
            if pos_bias not in POS_BIAS_MODES:
                raise ValueError(f"TransNeXt: pos_bias must be one of {POS_BIAS_MODES}, got {pos_bias!r}")
            if pos_bias == "interpolate" and fixed_pool_size is not None:
                raise ValueError("TransNeXt: fixed_pool_size works with pos_bias='extrapolate' only")
            if pretrain_size // (patch_size * 2 ** (n - 1)) < 2:
                raise ValueError(
                    f"TransNeXt: pretrain_size {pretrain_size} gives a last-stage grid below 2 "
                    f"(CPB coordinates divide by grid - 1); use >= {2 * patch_size * 2 ** (n - 1)}"
                )
            for i, (sr, ws) in enumerate(zip(sr_ratios, window_size)):
                if sr > 1 and ws is None:
                    raise ValueError(f"TransNeXt: stage {i} has sr_ratio {sr} > 1 and needs a window_size")
            self.num_classes = num_classes
            self.in_chans = in_chans
            self.patch_size = patch_size
            self.sr_ratios = tuple(sr_ratios)
            self.sr_ratio_list = [int(r) for r in sr_ratios]  # List[int] for TorchScript
            self.fixed_pool_size = fixed_pool_size
            self.fixed_pool = int(fixed_pool_size or 0)  # int form (0 = none) for TorchScript
            self.img_size = img_size
            self.grad_checkpointing = False
            dpr = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]
            stages, feature_info, cur = [], [], 0
            for i in range(n):
                reduction = patch_size * 2**i
                stages.append(
                    TransNeXtStage(
                        in_chans=in_chans if i == 0 else embed_dims[i - 1],
                        dim=embed_dims[i],
                        depth=depths[i],
                        num_heads=num_heads[i],
                        mlp_ratio=mlp_ratios[i],
                        sr_ratio=sr_ratios[i],
                        window_size=window_size[i],
                        stride=patch_size if i == 0 else 2,
                        kernel=2 * patch_size - 1 if i == 0 else 3,
                        reduction=reduction,
                        table_size=img_size,
                        pretrain_size=pretrain_size,
                        fixed_pool_size=fixed_pool_size,
                        pos_bias=pos_bias,
                        qkv_bias=qkv_bias,
                        drop=drop_rate,
                        attn_drop=attn_drop_rate,
                        drop_path=dpr[cur : cur + depths[i]],
                        norm_eps=norm_eps,
                        attn_impl=attn_impl,
                    )
                )
                cur += depths[i]
                feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f"stages.{i}"))
            self.stages = nn.Sequential(*stages)
            self.feature_info = feature_info
            self.num_features = self.head_hidden_size = embed_dims[-1]
            self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool)
            self.apply(self._init_weights)
        if dtype is not None:
            self.to(dtype=dtype)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if getattr(m, "weight", None) is not None and m.weight.is_meta:
            return  # nothing to initialise on the meta device (shape-only models)
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- implementation switches ---------------------------------------------------------------
    def set_attn_impl(self, impl: str) -> None:
        """Switch every attention layer to ``"fast"``, ``"reference"`` or ``"triton"``."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"{self._name()}: attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, (AggregatedAttention, FullAttention)):
                m.attn_impl = impl

    def _name(self) -> str:
        """Variant name for error messages (``"TransNeXt"`` under TorchScript, which cannot read the cfg dict)."""
        if torch.jit.is_scripting():
            return "TransNeXt"
        return self._variant_name()

    @torch.jit.unused
    def _variant_name(self) -> str:
        cfg = getattr(self, "pretrained_cfg", None) or {}
        return cfg.get("architecture", type(self).__name__)

    def _check_input(self, x: Tensor) -> None:
        check_token_grids(x, self.in_chans, self.patch_size, self.sr_ratio_list, self.fixed_pool, self._name())

    def train(self, mode: bool = True) -> "TransNeXt":
        """timm's ``train``; entering training also drops the eval-time CPB bias caches."""
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, _CpbAttention):
                    m.cpb_cache.clear()
        return self

    # --- timm API ------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.patch_embed", (-1,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        keys = ("query_embedding", "relative_pos_bias_local", "cpb", "temperature")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))  # new head where the model is

    def forward_intermediates(
        self,
        x: Tensor,  # [B, in_chans, H, W]
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (after each stage's LayerNorm, NCHW) and, unless ``intermediates_only``, the final map.

        ``norm`` is accepted for API compatibility: every stage already ends with its own norm.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"{self._name()}: output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if (torch.jit.is_scripting() or not stop_early) else self.stages[: max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head or max_index < len(self.feature_info) - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:  # [B, in_chans, H, W] -> [B, C, ceil(H/32), ceil(W/32)]
        self._check_input(x)
        return self.stages(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """[B, C, h, w] -> [B, num_classes] logits (token mean, then the linear head), or [B, C] if ``pre_logits``."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:  # [B, in_chans, H, W] -> [B, num_classes]
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# authors' checkpoints
# ---------------------------------------------------------------------------------------------
def _convert_key(key: str) -> Optional[str]:
    import re

    m = re.match(r"^(patch_embed|block|norm)(\d+)\.(.*)$", key)
    if m:
        kind, stage, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
        if kind == "block":
            rest = rest.replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
            return f"stages.{stage}.blocks.{rest}"
        return f"stages.{stage}.{kind}.{rest}"
    if key in ("head.weight", "head.bias"):
        return "head.fc." + key[len("head.") :]
    if key.startswith("relative_pos_index") or key.startswith("relative_coords_table"):
        return None  # position tables are rebuilt for the input size
    return key


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """Convert a TransNeXt checkpoint (the authors' layout or ours) to this model's keys.

    Accepts ``model``/``state_dict`` wrappers and ``module.`` / ``_orig_mod.`` (torch.compile) /
    ``backbone.`` (mmdet/mmseg) prefixes. Raises ``ValueError`` naming the variant and keys when the
    checkpoint belongs to another variant. Non-persistent position tables, if present, are dropped.
    """
    sd = unwrap_state_dict(state_dict)
    sd = {k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    out = {}
    for k, v in sd.items():
        nk = _convert_key(k)
        if nk is None or nk.endswith(("seq_length_scale", "padding_mask")):
            continue
        out[nk] = v
    skip = ("head.fc.",)
    if getattr(model, "num_classes", 0) == 0:
        out = {k: v for k, v in out.items() if not k.startswith("head.fc.")}
    check_converted_state_dict(out, model, skip=skip)
    return out


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
_WEIGHTS_WHERE = "the Hugging Face repositories linked in https://github.com/DaiShiResearch/TransNeXt/tree/main/classification"

_ARCHS: Dict[str, Dict[str, Any]] = {
    "transnext_micro": dict(embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2)),
    "transnext_tiny": dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(2, 2, 15, 2)),
    "transnext_small": dict(embed_dims=(72, 144, 288, 576), num_heads=(3, 6, 12, 24), depths=(5, 5, 22, 5)),
    "transnext_base": dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 8, 16, 32), depths=(5, 5, 23, 5)),
    "transnext_micro_aaaa": dict(
        embed_dims=(48, 96, 192, 384), num_heads=(2, 4, 8, 16), depths=(2, 2, 15, 2),
        window_size=(3, 3, 3, 3), sr_ratios=(16, 8, 4, 2),
    ),
}

# pre-training size per (variant, tag) where it differs from the input size
_PRETRAIN_SIZE = {("transnext_small", "in1k_384"): 224, ("transnext_base", "in1k_384"): 224}


def _create_transnext(variant: str, pretrained: bool = False, **kwargs: Any) -> TransNeXt:
    require_local_weights(variant, pretrained, kwargs, _WEIGHTS_WHERE)
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get("pretrained_cfg"), pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay")
    )
    kwargs.setdefault("img_size", cfg.input_size[-1])
    if (variant, cfg.tag) in _PRETRAIN_SIZE:
        kwargs.setdefault("pretrain_size", _PRETRAIN_SIZE[(variant, cfg.tag)])
    model_args = dict(_ARCHS[variant], **kwargs)
    return build_model_with_cfg(
        TransNeXt,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **model_args,
    )


def _cfg(hf: str, size: int = 224, **kwargs: Any) -> Dict[str, Any]:
    file = hf.replace("-", "_") + ".pth"  # the authors' file names (README model zoo)
    return {
        "url": f"https://huggingface.co/DaiShiResearch/{hf}/resolve/main/{file}",
        "num_classes": 1000,
        "input_size": (3, size, size),
        "pool_size": (size // 32, size // 32),
        "crop_pct": 0.875 if size < 384 else 1.0,
        "crop_mode": "center" if size < 384 else "squash",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2311.17132",
        "paper_name": "TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
        "origin_url": "https://github.com/DaiShiResearch/TransNeXt",
        "notes": (
            "Authors' weights (their key layout, converted on load); vision3d does not download them: save the url "
            "to vision3d.backbones._helpers.local_weights_path(url) or pass pretrained_cfg_overlay=dict(file=...).",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "transnext_micro.in1k": _cfg("transnext-micro-224-1k", description="TransNeXt-Micro, 82.5% top-1"),
        "transnext_tiny.in1k": _cfg("transnext-tiny-224-1k", description="TransNeXt-Tiny, 84.0% top-1"),
        "transnext_small.in1k": _cfg("transnext-small-224-1k", description="TransNeXt-Small, 84.7% top-1"),
        "transnext_small.in1k_384": _cfg(
            "transnext-small-384-1k-ft-1k", 384, description="TransNeXt-Small fine-tuned at 384 (pretrain 224), 86.0%"
        ),
        "transnext_base.in1k": _cfg("transnext-base-224-1k", description="TransNeXt-Base, 84.8% top-1"),
        "transnext_base.in1k_384": _cfg(
            "transnext-base-384-1k-ft-1k", 384, description="TransNeXt-Base fine-tuned at 384 (pretrain 224), 86.2%"
        ),
        "transnext_micro_aaaa.in1k": _cfg(
            "transnext-micro-AAAA-256-1k", 256, description="TransNeXt-Micro A-A-A-A (authors' transnext_micro_AAAA), 82.6%"
        ),
    }
)


@register_model
def transnext_micro(pretrained: bool = False, **kwargs: Any) -> TransNeXt:
    """TransNeXt-Micro, 12.8M parameters."""
    return _create_transnext("transnext_micro", pretrained=pretrained, **kwargs)


@register_model
def transnext_tiny(pretrained: bool = False, **kwargs: Any) -> TransNeXt:
    """TransNeXt-Tiny, 28.2M parameters."""
    return _create_transnext("transnext_tiny", pretrained=pretrained, **kwargs)


@register_model
def transnext_small(pretrained: bool = False, **kwargs: Any) -> TransNeXt:
    """TransNeXt-Small, 49.7M parameters (``.in1k_384``: fine-tuned at 384, pretrain size 224)."""
    return _create_transnext("transnext_small", pretrained=pretrained, **kwargs)


@register_model
def transnext_base(pretrained: bool = False, **kwargs: Any) -> TransNeXt:
    """TransNeXt-Base, 89.7M parameters (``.in1k_384``: fine-tuned at 384, pretrain size 224)."""
    return _create_transnext("transnext_base", pretrained=pretrained, **kwargs)


@register_model
def transnext_micro_aaaa(pretrained: bool = False, **kwargs: Any) -> TransNeXt:
    """TransNeXt-Micro with aggregated attention in all four stages (256 x 256), 13.1M parameters."""
    return _create_transnext("transnext_micro_aaaa", pretrained=pretrained, **kwargs)
