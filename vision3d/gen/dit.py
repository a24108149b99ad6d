"""A small class-conditional Diffusion Transformer trained by flow matching, and procedural shapes to train it on.

The model follows DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", arXiv:2212.09748,
https://github.com/facebookresearch/DiT, CC-BY-NC code; nothing of it is copied here): patchify
with a strided convolution, fixed 2-D sin-cos position embedding, a sinusoidal timestep embedding
and a class-embedding table (one extra "null" class for classifier-free guidance) summed into the
conditioning vector ``c``, blocks with adaLN-Zero modulation (``c`` -> shift/scale/gate for the
attention and the FFN, gates initialised to zero so every block starts as the identity), a
modulated final layer, unpatchify. The FFN is timm's ``Mlp`` (GELU-tanh), which Dense2MoE splits
into experts (``vision3d/gen/dense2moe.py``).

Objective: rectified flow / flow matching (Lipman et al., arXiv:2210.02747; Liu et al.,
arXiv:2209.03003), the objective of FLUX and SD3: ``x_t = (1 - t) x_0 + t eps`` with ``t ~ U(0, 1)``
(``eps`` Gaussian noise, ``x_0`` an image in [-1, 1]), the network predicts the velocity
``v = eps - x_0``. :func:`sample` integrates the ODE ``dx/dt = v`` from ``t = 1`` (noise) to
``t = 0`` with Euler steps, with optional classifier-free guidance.

:func:`procedural_shapes` draws the training set: 16x16 RGB images of one of a few classes
(disc, square, cross, horizontal stripes, ring, triangle), random colours, sizes and positions,
deterministic in the seed. Written for vision3d, Apache-2.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor

from vision3d.layers.attention import attention, merge_heads, split_heads

__all__ = ["DiTConfig", "DiT", "DiTBlock", "flow_matching_loss", "sample", "procedural_shapes", "SHAPE_CLASSES"]

SHAPE_CLASSES = ("disc", "square", "cross", "stripes", "ring", "triangle")


# ------------------------------------------------------------------------------------------------ data
def procedural_shapes(
    num: int, *, size: int = 16, num_classes: int = 4, seed: int = 0
) -> tuple[Tensor, Tensor]:  # -> images [num, 3, size, size] in [0, 1], labels [num] long
    """``num`` images of procedural shapes, the class cycling through the first ``num_classes`` kinds.

    Each image: a dark random background colour, one shape of class ``labels[i]`` (see
    :data:`SHAPE_CLASSES`) in a bright random colour, random centre (kept inside) and size.
    """
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"procedural_shapes: num_classes must be in [1, {len(SHAPE_CLASSES)}], got {num_classes}")
    if size < 8:
        raise ValueError(f"procedural_shapes: size must be >= 8 pixels, got {size}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % num_classes
    labels = labels[torch.randperm(num, generator=g)]
    r = size * (0.22 + 0.16 * torch.rand(num, generator=g))  # half-size in pixels
    margin = r + 1
    cx = margin + (size - 2 * margin) * torch.rand(num, generator=g)
    cy = margin + (size - 2 * margin) * torch.rand(num, generator=g)
    fg = 0.55 + 0.45 * torch.rand(num, 3, generator=g)
    bg = 0.25 * torch.rand(num, 3, generator=g)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xs[None] - cx[:, None, None], ys[None] - cy[:, None, None]  # [num, H, W]
    rr = r[:, None, None]
    dist = (dx.square() + dy.square()).sqrt()
    masks = torch.stack(
        [
            dist <= rr,  # disc
            (dx.abs() <= rr * 0.85) & (dy.abs() <= rr * 0.85),  # square
            ((dx.abs() <= rr * 0.3) | (dy.abs() <= rr * 0.3)) & (dx.abs() <= rr) & (dy.abs() <= rr),  # cross
            (torch.floor((dy + rr) / (rr * 0.5)) % 2 == 0) & (dx.abs() <= rr) & (dy.abs() <= rr),  # stripes
            (dist <= rr) & (dist >= rr * 0.55),  # ring
            (dy <= rr * 0.8) & (dy >= -rr) & (dx.abs() <= (dy + rr) * 0.55),  # triangle (apex up)
        ],
        1,
    )  # [num, K, H, W]
    mask = masks[torch.arange(num), labels].float()[:, None]  # [num, 1, H, W]
    images = bg[:, :, None, None] * (1 - mask) + fg[:, :, None, None] * mask
    return images.clamp(0, 1), labels


# ------------------------------------------------------------------------------------------------ model
@dataclass
class DiTConfig:
    """Size of a :class:`DiT`."""

    image_size: int = 16
    """Input height = width in pixels."""
    in_channels: int = 3
    """Image channels."""
    patch_size: int = 2
    """Patch side; ``image_size`` must be a multiple."""
    dim: int = 96
    """Token width."""
    depth: int = 6
    """Number of DiT blocks."""
    num_heads: int = 4
    """Attention heads (``dim`` must be a multiple)."""
    mlp_ratio: float = 4.0
    """FFN hidden width / ``dim``."""
    num_classes: int = 4
    """Class labels ``0..num_classes-1``; label ``num_classes`` is the null (unconditional) class."""
    class_dropout: float = 0.1
    """Training probability of replacing the label by the null class (enables guidance)."""

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"DiTConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig: dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if self.dim % 4:
            raise ValueError(f"DiTConfig: dim {self.dim} must be a multiple of 4 (2-D sin-cos position embedding)")


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:  # t [B] -> [B, dim]
    """Sinusoidal embedding of ``t`` (scaled by 1000 so ``t`` in [0, 1] spans the usual range)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, dim % 2))


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:  # -> [grid * grid, dim]
    """Fixed 2-D sin-cos embedding: half the channels encode the row, half the column."""
    pos = torch.arange(grid, dtype=torch.float32)
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    ang = pos[:, None] * omega[None]  # [grid, dim/4]
    e1 = torch.cat([ang.sin(), ang.cos()], -1)  # [grid, dim/2]
    rows = e1[:, None].expand(grid, grid, dim // 2)
    cols = e1[None].expand(grid, grid, dim // 2)
    return torch.cat([rows, cols], -1).reshape(grid * grid, dim)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:  # x [B, N, C], shift/scale [B, C]
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention through :func:`vision3d.layers.attention.attention`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, C]
        q, k, v = self.qkv(x).chunk(3, -1)
        h = self.num_heads
        out = attention(split_heads(q, h), split_heads(k, h), split_heads(v, h))
        return self.proj(merge_heads(out))


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x += g1 * attn(mod(norm(x))); x += g2 * mlp(mod(norm(x)))``, modulation from ``c``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x [B, N, C], c [B, C]
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, -1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT predicting the flow-matching velocity.

    ``forward(x, t, y)``: ``x`` ``[B, C, H, W]`` noisy image (in the [-1, 1] data scale), ``t`` ``[B]``
    in [0, 1] (1 = pure noise), ``y`` ``[B]`` long labels (``num_classes`` = null) -> velocity
    ``[B, C, H, W]``. ``self.blocks`` is the list Dense2MoE's Mixture of Blocks routes over; each
    block is called as ``block(x, c)`` with ``c = self.condition(t, y)``.
    """

    def __init__(self, cfg: Optional[DiTConfig] = None):
        super().__init__()
        self.cfg = cfg = cfg or DiTConfig()
        p, d = cfg.patch_size, cfg.dim
        self.grid = cfg.image_size // p
        self.x_embed = nn.Conv2d(cfg.in_channels, d, p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(d, self.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final = FinalLayer(d, p * p * cfg.in_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(xavier)
        w = self.x_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for m in self.t_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def condition(self, t: Tensor, y: Tensor) -> Tensor:  # t [B] in [0, 1], y [B] -> c [B, dim]
        return self.t_embed(timestep_embedding(t, self.cfg.dim)) + self.y_embed(y)

    def embed(self, x: Tensor) -> Tensor:  # [B, C, H, W] -> tokens [B, N, dim]
        if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
            raise ValueError(f"DiT: expected {self.cfg.image_size}x{self.cfg.image_size} images, got {tuple(x.shape)}")
        return self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed

    def unpatchify(self, tokens: Tensor) -> Tensor:  # [B, N, p*p*C] -> [B, C, H, W]
        B, p, C, g = tokens.shape[0], self.cfg.patch_size, self.cfg.in_channels, self.grid
        x = tokens.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, C, g * p, g * p)

    def forward_blocks(self, x: Tensor, c: Tensor) -> Tensor:  # tokens [B, N, dim], c [B, dim]
        for blk in self.blocks:
            x = blk(x, c)
        return x

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        c = self.condition(t, y)
        tokens = self.forward_blocks(self.embed(x), c)
        return self.unpatchify(self.final(tokens, c))


# ------------------------------------------------------------------------------------------------ objective, sampler
def to_model_space(images: Tensor) -> Tensor:  # [B, C, H, W] in [0, 1] -> [-1, 1]
    return images * 2 - 1


def from_model_space(x: Tensor) -> Tensor:  # [-1, 1] -> [0, 1] (clamped)
    return ((x + 1) / 2).clamp(0, 1)


def flow_matching_inputs(
    images: Tensor, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor, Tensor]:  # images [B, C, H, W] in [0, 1] -> (x_t, t [B], velocity target)
    """Draw ``t ~ U(0, 1)`` and noise; return the interpolant ``x_t`` and the velocity ``eps - x_0``."""
    x0 = to_model_space(images)
    t = torch.rand(x0.shape[0], generator=generator, device="cpu" if generator is not None else x0.device).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device="cpu" if generator is not None else x0.device).to(x0.device)
    tt = t[:, None, None, None]
    return (1 - tt) * x0 + tt * eps, t, eps - x0


def flow_matching_loss(
    model: nn.Module,
    images: Tensor,  # [B, C, H, W] in [0, 1]
    labels: Tensor,  # [B] long
    *,
    class_dropout: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Mean squared error between the predicted and the true velocity (one draw of ``t`` and noise)."""
    x_t, t, target = flow_matching_inputs(images, generator)
    if class_dropout > 0:
        null = model_num_classes(model)
        drop = torch.rand(labels.shape, generator=generator).to(labels.device) < class_dropout
        labels = torch.where(drop, torch.full_like(labels, null), labels)
    return (model(x_t, t, labels) - target).square().mean()


def model_num_classes(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "num_classes"):
        raise TypeError(f"{type(model).__name__}: expected a DiT with cfg.num_classes")
    return cfg.num_classes


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: Tensor,  # [B] long class ids
    *,
    steps: int = 20,
    guidance: float = 1.0,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,  # [B, C, H, W] starting noise (default: drawn from generator)
) -> Tensor:  # -> [B, C, H, W] in [0, 1]
    """Euler integration of the flow ODE from noise (``t = 1``) to data (``t = 0``).

    ``guidance > 1`` applies classifier-free guidance ``v_null + w (v_cond - v_null)`` (one batched
    call on ``[cond; null]``).
    """
    if steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}")
    cfg = model.cfg
    device = labels.device
    shape = (labels.shape[0], cfg.in_channels, cfg.image_size, cfg.image_size)
    x = noise if noise is not None else torch.randn(shape, generator=generator).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
    null = torch.full_like(labels, cfg.num_classes)
    for i in range(steps):
        t = ts[i].expand(labels.shape[0])
        if guidance != 1.0:
            v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
            v_c, v_u = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        else:
            v = model(x, t, labels)
        x = x + (ts[i + 1] - ts[i]) * v
    return from_model_space(x)
