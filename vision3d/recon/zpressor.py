"""ZPressor: compress many context views into a fixed number of anchor views (a module inside a host).

Source: W. Wang, D. Y. Chen, Z. Zhang, D. Shi, A. Liu, B. Zhuang, "ZPressor: Bottleneck-Aware
Compression for Scalable Feed-Forward 3DGS", arXiv 2505.23734 (2025). Authors' code:
github.com/ziplab/ZPressor, commit eb7fe824e97b826aaffe5bb1a63f30aa85ec8cf6 (``zpressor/zpressor.py``,
``zpressor/attention.py``; hosts in ``depthsplat/``, ``mvsplat/``, ``pixelsplat/``), MIT licence
(code and released weights). This file is an independent implementation, checked against the
authors' module by the fixture ``tests/fixtures/zpressor/public``.

What it does, as released:

- **Anchor views** (:func:`select_anchors`): farthest-point sampling on the camera centres
  (the translation of ``cam_to_world``; rotations are not used). The first anchor is the view
  farthest from the centres' mean; each next one is the view whose squared distance to its
  nearest chosen anchor is largest. Squared distances in float32 (at least), running minimum
  initialised to ``1e10``. Ties go to the lowest view index. Chosen views (and views standing
  exactly on a chosen one) have distance 0, so when ``num_anchors`` exceeds the number of distinct
  camera positions (in particular ``num_anchors > V``) the remaining picks are view 0 again (the
  first index of an all-zero row): anchors may repeat. This is the authors' behaviour, kept so
  every call their hosts make gives their result.
- **Supports** (:func:`assign_to_anchors`): every view goes to its nearest anchor (squared
  distance; ties to the earliest anchor in selection order). The supports of an anchor are its
  views other than the anchor view itself, in ascending view index. A repeated anchor, or one whose
  cluster holds only itself, has no supports.
- **Compression**: ``num_layers`` blocks. In block ``l`` each anchor's tokens (the anchor view's
  own tokens for ``l = 0``, the previous block's output after) cross-attend to the *input* tokens of
  all its supports (never updated across blocks): ``z + proj(attn(q(LN(z)), kv(LN(s))))`` with
  ``q``, ``kv`` without bias, ``k`` the first and ``v`` the last ``C`` channels of ``kv``. An anchor
  without supports skips the cross-attention (and its MLP) and passes unchanged. Then (default,
  ``no_self_attn=False``) each anchor view attends to its own ``H*W`` tokens, ``y = z +
  out(attn(qkv(LN(z))))`` (``qkv`` without bias; ``out`` is the identity for one head, a linear
  layer otherwise), followed by ``y + fc2(GELU(fc1(LN(y))))`` (hidden ``4C``, exact GELU). With
  ``no_self_attn=True`` there is no self-attention and the cross-attention gets that MLP instead.
  LayerNorm eps is 1e-5 everywhere.
- **Precision**: the authors' default attention (``implementation="flash_attn"``) casts the
  cross-attention q, k, v to bfloat16 on every device and runs the self-attention under CUDA
  bf16 autocast (so in bf16 on a GPU and float32 on the CPU); the released checkpoints were
  trained and evaluated that way. ``precision="bf16"`` reproduces it; ``precision="fp32"`` (our
  default) is their float32 ``"default"`` path, the exact twin the fixture pins.
- **Several feature levels**: ``embed_dim`` may be a sequence (one width per level); ``x`` is then a
  list of ``[B, V, C_i, H_i, W_i]`` maps compressed with the same anchors, each by its own blocks.

Implementation: one batched cross-attention per block over all anchors of all batch elements,
supports gathered into a padded ``[B*K, S*H*W]`` key set with a boolean mask (``S`` the largest
support count), so there is no Python loop over batch elements, anchors or tokens.

**Token clustering** (the hosts' ``use_clstoken`` / ``use_avg_token`` options, :func:`cluster_by_tokens`,
``forward(..., cluster_tokens=...)``): instead of camera centres, scikit-learn's
``KMeans(n_clusters=K, random_state=42, n_init=10)`` clusters one token per view (a DINOv2 class
token, or the mean of the view's features) on the CPU, per batch element; the views are assigned
by its labels and the anchor of cluster ``j`` is its member nearest (Euclidean, ties to the lowest
view index) to the k-means centre, anchors in label order. Needs ``scikit-learn`` (extra
``[sklearn]``); the result is scikit-learn's, so it can differ between its releases.

State dict: the authors' keys (``cross_attn_layers.{level}.{block}.*``,
``self_attn_layers.{level}.{block}.*``), found bare or under a host prefix
(``encoder.depth_predictor.zipmatch.`` DepthSplat, ``encoder.backbone.zipmatch.`` MVSplat,
``encoder.zipmatch.`` pixelSplat), are mapped to ours by :func:`convert_zpressor_state`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision3d.layers.attention import BACKENDS, attention, merge_heads, split_heads

PRECISIONS = ("fp32", "bf16")

# host checkpoints keep the module under one of these prefixes (DepthSplat, MVSplat, pixelSplat)
HOST_PREFIXES = ("encoder.depth_predictor.zipmatch.", "encoder.backbone.zipmatch.", "encoder.zipmatch.")


@dataclass
class ZPressorConfig:
    num_anchors: int = 6
    """K, the number of anchor views the host sees (released: 6 for DepthSplat/MVSplat, 4 for pixelSplat)."""
    embed_dim: int | tuple[int, ...] = 128
    """Channel width C of the feature maps; a tuple gives one width per feature level."""
    num_heads: int = 1
    """Attention heads (must divide every width)."""
    num_layers: int = 6
    """Number of [cross-attention, self-attention] blocks."""
    no_self_attn: bool = False
    """Drop the per-anchor self-attention; the cross-attention then carries the MLP."""
    precision: str = "fp32"
    """Attention precision: "fp32" (authors' "default" path, exact) or "bf16" (authors' default
    "flash_attn" path: cross-attention q/k/v in bfloat16 everywhere, self-attention in bfloat16 on CUDA)."""
    backend: str = "auto"
    """Attention backend of vision3d.layers.attention: "auto", "sdpa", "xformers" or "math"."""

    def __post_init__(self) -> None:
        if not isinstance(self.num_anchors, int) or self.num_anchors < 1:
            raise ValueError(f"ZPressorConfig.num_anchors: expected a positive int, got {self.num_anchors!r}")
        _check_module_args(self.embed_dim, self.num_heads, self.num_layers, self.precision, self.backend)


def _check_module_args(embed_dim, num_heads: int, num_layers: int, precision: str, backend: str) -> tuple[int, ...]:
    dims = (embed_dim,) if isinstance(embed_dim, int) else tuple(embed_dim)
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ValueError(f"ZPressor: embed_dim must be a positive int or a sequence of them, got {embed_dim!r}")
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"ZPressor: num_heads must be a positive int, got {num_heads!r}")
    bad = [d for d in dims if d % num_heads]
    if bad:
        raise ValueError(f"ZPressor: embed_dim {bad} not divisible by num_heads={num_heads}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"ZPressor: num_layers must be a positive int, got {num_layers!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"ZPressor: precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"ZPressor: backend must be one of {BACKENDS}, got {backend!r}")
    return dims


# ---------------------------------------------------------------------------------------------
# anchor selection and assignment


def _check_centres(centres: Tensor, name: str) -> Tensor:
    if centres.ndim != 3 or centres.shape[-1] != 3:
        raise ValueError(f"{name}: camera centres must be [B, V, 3], got {tuple(centres.shape)}")
    if centres.shape[1] < 1:
        raise ValueError(f"{name}: need at least one view, got V=0")
    if not torch.isfinite(centres).all():
        raise ValueError(f"{name}: camera centres contain NaN or inf")
    return centres.float() if centres.dtype in (torch.float16, torch.bfloat16) else centres


def select_anchors(
    centres: Tensor,  # [B, V, 3] camera centres, world units
    k: int,
) -> Tensor:  # [B, k] long, view indices in selection order
    """Farthest-point sampling of ``k`` anchor views from the camera centres (see module docstring:
    start farthest from the mean, ties to the lowest index, repeats once positions run out)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"select_anchors: k must be a positive int, got {k!r}")
    p = _check_centres(centres, "select_anchors")
    B, V, _ = p.shape
    rows = torch.arange(B, device=p.device)
    mean = p.sum(1, keepdim=True) / V
    pick = ((p - mean) ** 2).sum(-1).argmax(-1)  # [B]
    nearest = torch.full((B, V), 1e10, dtype=p.dtype, device=p.device)
    chosen = torch.zeros(B, V, dtype=torch.bool, device=p.device)
    picks = []
    for _ in range(k):
        picks.append(pick)
        chosen[rows, pick] = True
        d = ((p - p[rows, pick].unsqueeze(1)) ** 2).sum(-1).masked_fill(chosen, 0.0)
        nearest = torch.minimum(nearest, d)
        pick = nearest.argmax(-1)
    return torch.stack(picks, 1)


def assign_to_anchors(
    centres: Tensor,  # [B, V, 3] camera centres
    anchor_idx: Tensor,  # [B, K] long, from select_anchors
) -> Tensor:  # [B, V] long in [0, K): position of each view's nearest anchor
    """Nearest anchor of every view (squared distance; ties to the earliest anchor)."""
    p = _check_centres(centres, "assign_to_anchors")
    if anchor_idx.ndim != 2 or anchor_idx.shape[0] != p.shape[0] or anchor_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"assign_to_anchors: anchor_idx must be an integer [B={p.shape[0]}, K] tensor, "
            f"got {anchor_idx.dtype} {tuple(anchor_idx.shape)}"
        )
    V = p.shape[1]
    if anchor_idx.numel() and (anchor_idx.min() < 0 or anchor_idx.max() >= V):
        raise ValueError(f"assign_to_anchors: anchor_idx must lie in [0, {V}), got {anchor_idx.tolist()}")
    anchors = torch.gather(p, 1, anchor_idx.long().unsqueeze(-1).expand(-1, -1, 3))  # [B, K, 3]
    d = ((p.unsqueeze(2) - anchors.unsqueeze(1)) ** 2).sum(-1)  # [B, V, K]
    return d.argmin(-1)


def cluster_by_tokens(
    tokens: Tensor,  # [B, V, F] one token per view
    k: int,
) -> tuple[Tensor, Tensor]:  # anchor_idx [B, K] long (label order), clusters [B, V] long labels
    """The authors' token clustering: scikit-learn k-means (seed 42, 10 restarts) per batch element;
    the anchor of each cluster is its member nearest to the centre (see the module docstring)."""
    if tokens.ndim != 3:
        raise ValueError(f"cluster_by_tokens: tokens must be [B, V, F], got {tuple(tokens.shape)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"cluster_by_tokens: k must be a positive int, got {k!r}")
    B, V, _ = tokens.shape
    if V < k:
        raise ValueError(f"cluster_by_tokens: {V} views cannot form {k} k-means clusters (need V >= num_anchors)")
    if not torch.isfinite(tokens).all():
        raise ValueError("cluster_by_tokens: tokens contain NaN or inf")
    from vision3d.utils.optional import require

    KMeans = require("sklearn.cluster", "ZPressor token clustering").KMeans
    t = tokens.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    anchors = torch.zeros(B, k, dtype=torch.long)
    clusters = torch.zeros(B, V, dtype=torch.long)
    for b in range(B):
        km = KMeans(n_clusters=k, random_state=42, n_init=10)
        labels = torch.as_tensor(km.fit_predict(t[b].cpu().numpy()), dtype=torch.long)
        centres = torch.as_tensor(km.cluster_centers_)
        clusters[b] = labels
        for j in range(k):
            members = torch.nonzero(labels == j).flatten()
            if len(members):  # scikit-learn relocates empty clusters; the authors' fallback is view 0
                d = torch.linalg.vector_norm(t[b].cpu()[members] - centres[j].to(t.dtype), dim=1)
                anchors[b, j] = members[d.argmin()]
    return anchors.to(tokens.device), clusters.to(tokens.device)


def support_index(
    anchor_idx: Tensor,  # [B, K] long
    clusters: Tensor,  # [B, V] long, from assign_to_anchors
) -> tuple[Tensor, Tensor]:  # [B, K, S] long view indices (ascending, padded), [B, K, S] bool valid
    """The supports of every anchor (its cluster minus the anchor view), padded to the largest count
    ``S`` (at least 1; padding points at view 0 and is marked invalid)."""
    B, K = anchor_idx.shape
    V = clusters.shape[1]
    member = clusters.unsqueeze(1) == torch.arange(K, device=clusters.device).view(1, K, 1)  # [B, K, V]
    member = member & (torch.arange(V, device=clusters.device).view(1, 1, V) != anchor_idx.unsqueeze(-1))
    counts = member.sum(-1)  # [B, K]
    S = max(int(counts.max()) if counts.numel() else 0, 1)
    # members first, each group in ascending view index (stable sort on "is not a member")
    order = torch.sort((~member).to(torch.uint8), dim=-1, stable=True).indices[..., :S]
    valid = torch.arange(S, device=clusters.device).view(1, 1, S) < counts.unsqueeze(-1)
    return order.masked_fill(~valid, 0), valid


# ---------------------------------------------------------------------------------------------
# blocks


class _Mlp(nn.Module):
    """Pre-norm residual MLP: ``x + fc2(GELU(fc1(LN(x))))``."""

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * ratio)
        self.fc2 = nn.Linear(dim * ratio, dim)

    def forward(self, x: Tensor) -> Tensor:  # [..., dim]
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bf16: bool, backend: str) -> Tensor:
    """Attention on [B, heads, N, D] (optionally in bfloat16, the result back in q's dtype)."""
    dtype = q.dtype
    if bf16:
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
    return attention(q, k, v, attn_mask=mask, backend=backend).to(dtype)


class CrossBlock(nn.Module):
    """Anchor tokens attend to their supports' tokens: ``z + proj(attn(q(LN(z)), kv(LN(s))))``."""

    def __init__(self, dim: int, num_heads: int, mlp: bool):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.mlp = _Mlp(dim) if mlp else None

    def keys_values(self, tokens: Tensor) -> Tensor:  # [..., N, C] -> [..., N, 2C]
        return self.kv(self.norm_kv(tokens))

    def forward(
        self,
        z: Tensor,  # [A, N, C] anchor tokens
        kv: Tensor,  # [A, M, 2C] projected support tokens (from keys_values)
        mask: Tensor | None,  # [A, M] bool, True = a real support token; None = all real
        has_support: Tensor | None,  # [A] bool; anchors without supports pass unchanged
        bf16: bool = False,
        backend: str = "auto",
    ) -> Tensor:  # [A, N, C]
        k, v = kv.chunk(2, dim=-1)
        h = self.num_heads
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = _attend(split_heads(self.q(self.norm_q(z)), h), split_heads(k, h), split_heads(v, h), attn_mask, bf16, backend)
        out = z + self.proj(merge_heads(out))
        if self.mlp is not None:
            out = self.mlp(out)
        if has_support is not None:
            out = torch.where(has_support[:, None, None], out, z)
        return out


class SelfBlock(nn.Module):
    """Each anchor view attends to its own tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim) if num_heads > 1 else None  # one head: no output projection
        self.mlp = _Mlp(dim)

    def forward(self, z: Tensor, bf16: bool = False, backend: str = "auto") -> Tensor:  # [A, N, C] -> [A, N, C]
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(self.norm(z)).chunk(3, dim=-1))
        out = merge_heads(_attend(q, k, v, None, bf16, backend))
        if self.proj is not None:
            out = self.proj(out)
        return self.mlp(z + out)


class ZPressorBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, no_self_attn: bool):
        super().__init__()
        self.cross = CrossBlock(dim, num_heads, mlp=no_self_attn)
        self.self_attn = None if no_self_attn else SelfBlock(dim, num_heads)


# ---------------------------------------------------------------------------------------------
# the module


class ZPressor(nn.Module):
    """Compress ``V`` context views to ``K`` anchor views (see the module docstring).

    Args:
        embed_dim: feature width C (or one width per feature level).
        num_heads: attention heads.
        num_layers: number of blocks.
        no_self_attn: drop the per-anchor self-attention (the cross-attention carries the MLP).
        precision: ``"fp32"`` or ``"bf16"`` (the authors' default attention path).
        backend: attention backend (``vision3d.layers.attention``).
    """

    def __init__(
        self,
        embed_dim: int | Sequence[int] = 128,
        num_heads: int = 1,
        num_layers: int = 6,
        no_self_attn: bool = False,
        precision: str = "fp32",
        backend: str = "auto",
    ):
        super().__init__()
        self.dims = _check_module_args(embed_dim, num_heads, num_layers, precision, backend)
        self.multi_level = len(self.dims) > 1  # one level returns a tensor, as the authors' module does
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.no_self_attn = no_self_attn
        self.precision = precision
        self.backend = backend
        self.levels = nn.ModuleList(
            nn.ModuleList(ZPressorBlock(d, num_heads, no_self_attn) for _ in range(num_layers)) for d in self.dims
        )

    @classmethod
    def from_config(cls, cfg: ZPressorConfig) -> "ZPressor":
        return cls(cfg.embed_dim, cfg.num_heads, cfg.num_layers, cfg.no_self_attn, cfg.precision, cfg.backend)

    def forward(
        self,
        x: Tensor | Sequence[Tensor],  # [B, V, C, H, W] features (a list of them for several levels)
        cam_to_world: Tensor | None,  # [B, V, 4, 4] cam-to-world, OpenCV (only the centres are used)
        num_anchors: int,
        *,
        cluster_tokens: Tensor | None = None,  # [B, V, F]: cluster these instead of the camera centres
    ) -> tuple[Tensor | list[Tensor], Tensor]:  # features [B, K, C, H, W] (list per level), anchor_idx [B, K]
        maps = [x] if isinstance(x, Tensor) else list(x)
        if len(maps) != len(self.dims):
            raise ValueError(f"ZPressor: expected {len(self.dims)} feature level(s) for embed_dim {self.dims}, got {len(maps)}")
        if cluster_tokens is None:
            if cam_to_world is None or cam_to_world.ndim != 4 or cam_to_world.shape[-2:] != (4, 4):
                got = None if cam_to_world is None else tuple(cam_to_world.shape)
                raise ValueError(f"ZPressor: cam_to_world must be [B, V, 4, 4] (or give cluster_tokens), got {got}")
            B, V = cam_to_world.shape[:2]
        else:
            if cluster_tokens.ndim != 3:
                raise ValueError(f"ZPressor: cluster_tokens must be [B, V, F], got {tuple(cluster_tokens.shape)}")
            B, V = cluster_tokens.shape[:2]
        for i, (m, d) in enumerate(zip(maps, self.dims)):
            if m.ndim != 5 or m.shape[:3] != (B, V, d):
                raise ValueError(
                    f"ZPressor: features (level {i}) must be [B={B}, V={V}, C={d}, H, W] to match cam_to_world, "
                    f"got {tuple(m.shape)}"
                )
        if cluster_tokens is None:
            centres = cam_to_world[..., :3, 3]
            anchor_idx = select_anchors(centres, num_anchors)
            clusters = assign_to_anchors(centres, anchor_idx)
        else:
            anchor_idx, clusters = cluster_by_tokens(cluster_tokens, num_anchors)
        sup_idx, sup_valid = support_index(anchor_idx, clusters)
        outs = [self._compress(m, blocks, anchor_idx, sup_idx, sup_valid) for m, blocks in zip(maps, self.levels)]
        return (outs if self.multi_level else outs[0]), anchor_idx

    def _compress(
        self,
        x: Tensor,  # [B, V, C, H, W]
        blocks: nn.ModuleList,
        anchor_idx: Tensor,  # [B, K]
        sup_idx: Tensor,  # [B, K, S]
        sup_valid: Tensor,  # [B, K, S]
    ) -> Tensor:  # [B, K, C, H, W]
        B, V, C, H, W = x.shape
        K, S, N = anchor_idx.shape[1], sup_idx.shape[2], H * W
        tokens = x.flatten(3).transpose(2, 3)  # [B, V, N, C], row-major h then w
        z = _gather_views(tokens, anchor_idx).reshape(B * K, N, C)
        has_support = sup_valid.any(-1).reshape(B * K)
        full = bool(sup_valid.all())
        mask = None if full else sup_valid.reshape(B * K, S, 1).expand(B * K, S, N).reshape(B * K, S * N)
        if mask is not None:  # rows with nothing to attend to get a dummy key set; their output is discarded
            mask = mask | ~has_support[:, None]
        cross_bf16 = self.precision == "bf16"
        self_bf16 = cross_bf16 and x.is_cuda
        for block in blocks:
            kv = _gather_views(block.cross.keys_values(tokens), sup_idx).reshape(B * K, S * N, 2 * C)
            z = block.cross(z, kv, mask, None if full else has_support, cross_bf16, self.backend)
            if block.self_attn is not None:
                z = block.self_attn(z, self_bf16, self.backend)
        return z.reshape(B, K, H, W, C).permute(0, 1, 4, 2, 3)


def _gather_views(tokens: Tensor, idx: Tensor) -> Tensor:  # [B, V, N, C], idx [B, *I] -> [B, *I, N, C]
    B, V, N, C = tokens.shape
    flat = idx.reshape(B, -1)
    out = torch.gather(tokens, 1, flat[:, :, None, None].expand(-1, -1, N, C))
    return out.reshape(*idx.shape, N, C)


# ---------------------------------------------------------------------------------------------
# the authors' checkpoints

_RENAMES = [
    (r"^cross_attn_layers\.(\d+)\.(\d+)\.norm1\.", r"levels.\1.\2.cross.norm_q."),
    (r"^cross_attn_layers\.(\d+)\.(\d+)\.norm2\.", r"levels.\1.\2.cross.norm_kv."),
    (r"^cross_attn_layers\.(\d+)\.(\d+)\.projq\.", r"levels.\1.\2.cross.q."),
    (r"^cross_attn_layers\.(\d+)\.(\d+)\.proj_kv\.", r"levels.\1.\2.cross.kv."),
    (r"^cross_attn_layers\.(\d+)\.(\d+)\.proj\.", r"levels.\1.\2.cross.proj."),
    (r"^cross_attn_layers\.(\d+)\.(\d+)\.mlp\.(norm|fc1|fc2)\.", r"levels.\1.\2.cross.mlp.\3."),
    (r"^self_attn_layers\.(\d+)\.(\d+)\.norm\.", r"levels.\1.\2.self_attn.norm."),
    (r"^self_attn_layers\.(\d+)\.(\d+)\.to_qkv\.", r"levels.\1.\2.self_attn.qkv."),
    (r"^self_attn_layers\.(\d+)\.(\d+)\.to_out\.0\.", r"levels.\1.\2.self_attn.proj."),
    (r"^self_attn_layers\.(\d+)\.(\d+)\.mlp\.(norm|fc1|fc2)\.", r"levels.\1.\2.self_attn.mlp.\3."),
]


def convert_zpressor_state(state: Mapping[str, Tensor], prefix: str | None = None) -> dict[str, Tensor]:
    """The authors' ZPressor weights -> a :class:`ZPressor` state dict.

    ``state`` is a bare ``ZPressor.state_dict()``, or a whole host checkpoint (its ``state_dict``,
    or a Lightning ``.ckpt`` dict holding one) in which the module sits under ``prefix``; without
    ``prefix`` the known host prefixes (:data:`HOST_PREFIXES`) are tried. Only the ZPressor keys are
    returned (a host converter calls this for its sub-tree).
    """
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if prefix is None:
        prefix = next((p for p in HOST_PREFIXES if any(k.startswith(p) for k in state)), "")
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise KeyError(f"convert_zpressor_state: no key starts with '{prefix}'")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pat, rep in _RENAMES:
            new, n = re.subn(pat, rep, key)
            if n:
                out[new] = value
                break
        else:
            raise KeyError(f"convert_zpressor_state: unexpected key '{prefix}{key}' (not in the authors' ZPressor layout)")
    if not out:
        raise KeyError("convert_zpressor_state: no ZPressor weights found")
    return out


def config_from_state(state: Mapping[str, Tensor], num_heads: int = 1, **overrides) -> ZPressorConfig:
    """Widths, depth and ``no_self_attn`` of a converted state dict. The head count does not show
    in the weights beyond one-vs-many (an output projection exists only for several heads): pass it."""
    levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("levels.")})
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"config_from_state: expected levels.0.., got levels {levels}")
    dims = tuple(int(state[f"levels.{i}.0.cross.q.weight"].shape[0]) for i in levels)
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("levels.0."))
    no_self = not any(".self_attn." in k for k in state)
    has_proj = any(".self_attn.proj." in k for k in state)
    if not no_self and has_proj != (num_heads > 1):
        raise ValueError(
            f"config_from_state: num_heads={num_heads} but the weights {'have' if has_proj else 'lack'} the "
            "self-attention output projection (present exactly when num_heads > 1)"
        )
    return ZPressorConfig(
        embed_dim=dims[0] if len(dims) == 1 else dims, num_heads=num_heads, num_layers=layers,
        no_self_attn=no_self, **overrides,
    )
