"""Multi-view feature transformer with Swin-style windows and cross-view attention.

The feature transformer of UniMatch as DepthSplat uses it (Xu et al., arXiv 2410.13862;
github.com/cvg/depthsplat @ 2dad25a, MIT, ``src/model/encoder/unimatch/mv_transformer.py``,
``utils.py``, ``position.py``), written for vision3d. Each block is

1. window self-attention of a view on itself, then ``LayerNorm`` of the merged message, added
   to the input (no MLP);
2. window cross-attention of a view on the same window of its source views (all source tokens of
   the window form one key set; the source features are those that entered the block, before its
   self-attention), ``LayerNorm``, then an MLP on ``concat(x, message)``, another ``LayerNorm``,
   added to the input.

Attention is single-head (scale ``1/sqrt(C)``), projections have no bias. The feature map is cut
into ``splits x splits`` windows; odd blocks shift the windows by half a window (cyclic roll) and
mask attention across the seams with ``-100`` as Swin does. ``splits = 1`` attends globally.
Positions: a normalised 2-D sine embedding (DETR's) computed per window and added to the features
once, before the first block (:func:`add_window_position`).

Authors' quirk kept for checkpoint fidelity: with several source views, the keys of a window are
ordered (pixel, view) but the authors tile the shift mask as (view, pixel); key ``j`` therefore
takes the mask entry of window pixel ``j mod L``. With one source view (two-view input) the two
orders coincide.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .attention import attention


def split_windows(x: Tensor, splits: int) -> Tensor:  # [B, H, W, C] -> [B, K*K, H/K * W/K, C]
    B, H, W, C = x.shape
    if H % splits or W % splits:
        raise ValueError(f"split_windows: a {H}x{W} feature map does not split into {splits}x{splits} windows")
    x = x.view(B, splits, H // splits, splits, W // splits, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, splits * splits, (H // splits) * (W // splits), C)


def merge_windows(x: Tensor, splits: int, H: int, W: int) -> Tensor:  # [B, K*K, L, C] -> [B, H, W, C]
    B, _, _, C = x.shape
    x = x.view(B, splits, splits, H // splits, W // splits, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def shifted_window_mask(H: int, W: int, splits: int, device=None) -> Tensor:  # [K*K, L, L] additive
    """Swin's mask for the half-window shift: 0 inside a region, -100 across regions."""
    wh, ww = H // splits, W // splits
    sh, sw = wh // 2, ww // 2
    region = torch.zeros(1, H, W, 1, device=device)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            region[:, hs, ws, :] = cnt
            cnt += 1
    r = split_windows(region, splits)[0, :, :, 0]  # [K*K, L]
    diff = r[:, None, :] - r[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def sine_position(h: int, w: int, channels: int, device=None, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised sine embedding of an ``h x w`` grid: ``[channels, h, w]`` (y half, then x half)."""
    npf = channels // 2
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w)
    eps, scale = 1e-6, 2 * math.pi
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), -1).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), -1).flatten(2)
    return torch.cat((py, px), -1).permute(2, 0, 1)


def add_window_position(x: Tensor, splits: int) -> Tensor:  # [N, C, H, W] -> same
    """Add the sine embedding of one window's grid to every window of ``x``."""
    N, C, H, W = x.shape
    if H % splits or W % splits:
        raise ValueError(f"add_window_position: a {H}x{W} feature map does not split into {splits}x{splits} windows")
    pos = sine_position(H // splits, W // splits, C, device=x.device).to(x.dtype)
    return x + pos.repeat(1, splits, splits)[None]


class _Layer(nn.Module):
    def __init__(self, dim: int, ffn: bool, ffn_expansion: int, backend: str):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.merge = nn.Linear(dim, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.backend = backend
        if ffn:
            self.mlp = nn.Sequential(
                nn.Linear(2 * dim, 2 * dim * ffn_expansion, bias=False),
                nn.GELU(),
                nn.Linear(2 * dim * ffn_expansion, dim, bias=False),
            )
            self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        x: Tensor,  # [N, H, W, C] queries
        src: Tensor,  # [N, S, H, W, C] keys/values (S = 1 and src = x for self-attention)
        splits: int,
        shift: bool,
        mask: Tensor | None,  # [K*K, L, L] additive, for the shifted windows
    ) -> Tensor:  # [N, H, W, C]
        N, H, W, C = x.shape
        S = src.shape[1]
        q, k, v = self.q_proj(x), self.k_proj(src), self.v_proj(src)
        if splits > 1:
            if shift:
                sh, sw = (H // splits) // 2, (W // splits) // 2
                q = torch.roll(q, (-sh, -sw), (1, 2))
                k = torch.roll(k, (-sh, -sw), (2, 3))
                v = torch.roll(v, (-sh, -sw), (2, 3))
            qw = split_windows(q, splits)  # [N, KK, L, C]
            # keys of a window ordered (pixel, view)
            kw = split_windows(k.permute(0, 2, 3, 1, 4).reshape(N, H, W, S * C), splits)
            vw = split_windows(v.permute(0, 2, 3, 1, 4).reshape(N, H, W, S * C), splits)
            KK, L = qw.shape[1], qw.shape[2]
            kw = kw.view(N, KK, L * S, C)
            vw = vw.view(N, KK, L * S, C)
            bias = mask.repeat(1, 1, S)[None] if shift else None  # [1, KK, L, L*S]: entry j -> pixel j mod L
            out = attention(qw, kw, vw, attn_mask=bias, backend=self.backend)  # windows act as heads
            out = merge_windows(out, splits, H, W)
            if shift:
                out = torch.roll(out, (sh, sw), (1, 2))
        else:
            qf = q.reshape(N, 1, H * W, C)
            kf = k.permute(0, 2, 3, 1, 4).reshape(N, 1, H * W * S, C)
            vf = v.permute(0, 2, 3, 1, 4).reshape(N, 1, H * W * S, C)
            out = attention(qf, kf, vf, backend=self.backend).view(N, H, W, C)
        msg = self.norm1(self.merge(out))
        if self.ffn:
            msg = self.norm2(self.mlp(torch.cat([x, msg], -1)))
        return x + msg


class MultiViewBlock(nn.Module):
    """Window self-attention, then window cross-attention on the source views with an MLP."""

    def __init__(self, dim: int, ffn_expansion: int = 4, shift: bool = False, backend: str = "auto"):
        super().__init__()
        self.shift = shift
        self.self_attn = _Layer(dim, ffn=False, ffn_expansion=ffn_expansion, backend=backend)
        self.cross_attn_ffn = _Layer(dim, ffn=True, ffn_expansion=ffn_expansion, backend=backend)


def gather_sources(x: Tensor, sources: Tensor) -> Tensor:
    """``x`` ``[B, V, ...]``, ``sources`` ``[B, V, S]`` long -> ``[B, V, S, ...]`` (the source views of each view)."""
    B, V = x.shape[:2]
    idx = sources.reshape(B, -1)
    out = x[torch.arange(B, device=x.device)[:, None], idx]  # [B, V*S, ...]
    return out.view(B, V, sources.shape[2], *x.shape[2:])


def all_other_views(B: int, V: int, device=None) -> Tensor:  # [B, V, V-1] long
    """For each view, the other views in increasing order."""
    idx = torch.arange(V, device=device)
    others = torch.stack([torch.cat([idx[:i], idx[i + 1 :]]) for i in range(V)])
    return others[None].expand(B, V, V - 1)


class MultiViewTransformer(nn.Module):
    """Stack of :class:`MultiViewBlock`; odd blocks use shifted windows."""

    def __init__(self, dim: int = 128, num_layers: int = 6, ffn_expansion: int = 4, backend: str = "auto"):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList(
            [MultiViewBlock(dim, ffn_expansion, shift=i % 2 == 1, backend=backend) for i in range(num_layers)]
        )
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(
        self,
        x: Tensor,  # [B, V, C, H, W] features (positions already added)
        sources: Tensor,  # [B, V, S] long: the source views each view attends to
        splits: int = 2,
    ) -> Tensor:  # [B, V, C, H, W]
        B, V, C, H, W = x.shape
        if C != self.dim:
            raise ValueError(f"MultiViewTransformer: expected {self.dim} channels, got {C}")
        mask = shifted_window_mask(H, W, splits, device=x.device).to(x.dtype) if splits > 1 else None
        h = x.permute(0, 1, 3, 4, 2).reshape(B * V, H, W, C)
        for layer in self.layers:
            # the source views are read as they entered the block (before its self-attention)
            src = gather_sources(h.view(B, V, H, W, C), sources).flatten(0, 1)  # [B*V, S, H, W, C]
            h = layer.self_attn(h, h[:, None], splits, layer.shift, mask)
            h = layer.cross_attn_ffn(h, src, splits, layer.shift, mask)
        return h.view(B, V, H, W, C).permute(0, 1, 4, 2, 3)
