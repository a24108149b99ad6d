"""LayerScale: a learned per-channel gain on a residual branch.

Touvron et al., "Going deeper with Image Transformers" (CaiT), arXiv:2103.17239; the parameter is
named ``gamma`` as in DINOv2 and VGGT (github.com/facebookresearch/vggt, ``vggt/layers/layer_scale.py``)
so that their checkpoints load without renaming.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    """``x * gamma`` with ``gamma`` ``[dim]`` initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:  # [..., dim] -> [..., dim]
        return x * self.gamma
