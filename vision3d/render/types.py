"""Output type of :func:`vision3d.render.rasterize`."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class RenderOutput:
    """What one call of ``rasterize`` returns. Batch shape ``[...]`` is the cameras' batch shape.

    Images are channels-first like vision3d's image type (``[B, V, 3, H, W]``).
    """

    colors: Tensor | None  # [..., 3, H, W] in [0, 1] (+ background), None unless mode has RGB
    alphas: Tensor  # [..., 1, H, W] accumulated opacity in [0, 1]
    depths: Tensor | None  # [..., 1, H, W] "D": sum_i w_i z_i; "ED": that / alpha; None unless asked
    means2d: Tensor  # [..., N, 2] projected centres in pixels (retain_grad-able for densification)
    radii: Tensor  # [..., N, 2] int pixel radii (x, y); 0 for culled Gaussians
    depths_gauss: Tensor  # [..., N] camera-space z of each Gaussian centre
    info: dict = field(default_factory=dict)  # backend-specific extras (gsplat's meta dict, tile stats)
