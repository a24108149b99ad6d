"""2-D rotary position embedding (RoPE) for patch grids.

The 2-D variant used by CroCo v2 (Weinzaepfel et al., arXiv:2211.10408) and VGGT (Wang et al.,
arXiv:2503.11651, github.com/facebookresearch/vggt at a24d9de, ``vggt/layers/rope.py``, VGGT licence):
the head dimension is split in two halves; the first half is rotated by the token's row, the second
by its column. Within a half of width ``d``, the rotation uses the "rotate half" layout: channel
``i`` pairs with channel ``i + d/2``, at angular frequency ``base ** (-2 i / d)``.

Positions are integers; VGGT puts its special (camera, register) tokens at ``(0, 0)`` and patch
``(r, c)`` at ``(r + 1, c + 1)`` — see :func:`patch_positions`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def patch_positions(
    batch: int, rows: int, cols: int, num_special: int = 0, device: torch.device | str | None = None
) -> Tensor:  # [batch, num_special + rows * cols, 2] (row, col), int64
    """Integer (row, col) positions of a row-major patch grid, special tokens first at (0, 0).

    With ``num_special > 0`` the patches are shifted to start at (1, 1), so that no patch shares
    the special tokens' position (VGGT's layout).
    """
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    grid = torch.stack(torch.meshgrid(r, c, indexing="ij"), -1).reshape(rows * cols, 2)
    if num_special > 0:
        grid = torch.cat([torch.zeros(num_special, 2, dtype=grid.dtype, device=grid.device), grid + 1], 0)
    return grid.unsqueeze(0).expand(batch, -1, -1)


def _rotate_half(x: Tensor) -> Tensor:  # [..., d] -> [..., d]
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class RoPE2D(nn.Module):
    """Applies 2-D rotary embeddings to ``[B, heads, N, D]`` queries or keys.

    Args:
        base: frequency base (VGGT: 100).

    ``forward(x, pos)``: ``x`` ``[B, heads, N, D]`` with ``D`` divisible by 4; ``pos`` ``[B, N, 2]``
    integer (row, col). Returns a tensor of the same shape and dtype.
    """

    def __init__(self, base: float = 100.0):
        super().__init__()
        self.base = float(base)

    def _cos_sin(self, pos: Tensor, half: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # pos [B, N] -> cos, sin [B, 1, N, half]
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, 2, device=pos.device).float() / half))
        ang = pos.float()[..., None] * inv_freq  # [B, N, half/2]
        ang = torch.cat([ang, ang], -1).to(dtype)
        return ang.cos()[:, None], ang.sin()[:, None]

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:  # x [B, H, N, D], pos [B, N, 2] -> [B, H, N, D]
        if x.ndim != 4 or x.shape[-1] % 4:
            raise ValueError(f"RoPE2D: x must be [B, heads, N, D] with D divisible by 4, got {tuple(x.shape)}")
        if pos.ndim != 3 or pos.shape[-1] != 2 or pos.shape[1] != x.shape[2]:
            raise ValueError(f"RoPE2D: pos must be [B, N={x.shape[2]}, 2], got {tuple(pos.shape)}")
        half = x.shape[-1] // 2
        out = []
        for axis, xs in enumerate(x.chunk(2, dim=-1)):
            cos, sin = self._cos_sin(pos[..., axis], half, x.dtype)
            out.append(xs * cos + _rotate_half(xs) * sin)
        return torch.cat(out, -1)
