"""Rasterisation of 3D Gaussians: one signature, two backends.

``backend="gsplat"`` calls gsplat's CUDA rasterizer; ``backend="torch"`` is the tiled pure-PyTorch
twin with the same math (see :mod:`vision3d.render.torch_backend`); ``auto`` picks gsplat when CUDA
and gsplat's kernels are usable, else torch.
"""

from .rasterize import rasterize
from .types import RenderOutput

__all__ = ["rasterize", "RenderOutput"]
