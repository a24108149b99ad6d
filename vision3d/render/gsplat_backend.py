"""The CUDA backend: :func:`gsplat.rasterization` behind vision3d's types.

Source: gsplat v1.5.3 (nerfstudio-project/gsplat, Apache-2.0; arXiv 2409.06765), ``rendering.py``.
gsplat is imported inside the function: importing vision3d never loads or builds its CUDA code.

Mapping: ``viewmats = cameras.world_to_cam`` (OpenCV, as gsplat), ``Ks = cameras.K`` (pixels),
``colors = gaussians.sh`` with ``sh_degree`` (gsplat evaluates SH along ``mean - camera centre``,
adds 0.5 and clamps at 0), ``packed=False`` so per-view outputs are dense ``[..., V, N, ...]``,
``backgrounds [..., V, 3]``; gsplat's channels-last ``[..., V, H, W, C]`` images come back
channels-first ``[..., V, C, H, W]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras
from vision3d.utils.optional import require

from .types import RenderOutput


def rasterize_gsplat(
    gaussians: Gaussians,  # batch [*B], N Gaussians
    cameras: Cameras,  # batch [*B, V], OpenCV cam_to_world, K in pixels
    *,
    sh_degree: int,
    background: Tensor | None = None,  # [3] or [*B, V, 3]
    mode: str = "RGB+ED",
    rasterize_mode: str = "classic",
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    tile_size: int = 16,
) -> RenderOutput:
    """Render with gsplat's CUDA rasterizer; same signature and outputs as ``rasterize_torch``."""
    gsplat = require("gsplat")
    gb = tuple(gaussians.batch_shape)
    cb = tuple(cameras.batch_shape)
    if len(cb) != len(gb) + 1 or cb[: len(gb)] != gb:
        raise ValueError(f"rasterize: cameras batch {cb} must be the Gaussians' batch {gb} plus one view dimension")
    if tile_size < 1:
        raise ValueError(f"rasterize: tile_size must be >= 1, got {tile_size}")
    W, H = cameras.width, cameras.height
    V, N = cb[-1], gaussians.num
    lead = (*gb, V)
    dtype, dev = gaussians.dtype, gaussians.device
    cams = cameras.to(device=dev, dtype=dtype)
    bg = None
    if background is not None:
        bg = torch.as_tensor(background, dtype=dtype, device=dev)
        if bg.shape[-1] != 3:
            raise ValueError(f"rasterize: background must be [3] or [*B, V, 3], got {tuple(bg.shape)}")
        try:
            bg = torch.broadcast_to(bg, (*lead, 3)).contiguous()
        except RuntimeError as e:
            raise ValueError(f"rasterize: background {tuple(bg.shape)} does not broadcast to {(*lead, 3)}") from e
    if N == 0 or math.prod(lead) == 0:
        # gsplat's kernels are not launched for empty inputs; the result is the background
        alphas = torch.zeros(*lead, 1, H, W, dtype=dtype, device=dev)
        colors = None
        if "RGB" in mode:
            colors = torch.zeros(*lead, 3, H, W, dtype=dtype, device=dev)
            if bg is not None:
                colors = colors + bg[..., :, None, None]
        depths = torch.zeros(*lead, 1, H, W, dtype=dtype, device=dev) if "D" in mode else None
        return RenderOutput(
            colors=colors,
            alphas=alphas,
            depths=depths,
            means2d=torch.zeros(*lead, N, 2, dtype=dtype, device=dev),
            radii=torch.zeros(*lead, N, 2, dtype=torch.int32, device=dev),
            depths_gauss=torch.zeros(*lead, N, dtype=dtype, device=dev),
            info={"backend": "gsplat"},
        )
    render, alpha, meta = gsplat.rasterization(
        means=gaussians.means,
        quats=gaussians.quats,
        scales=gaussians.scales,
        opacities=gaussians.opacities,
        colors=gaussians.sh,
        viewmats=cams.world_to_cam,
        Ks=cams.K,
        width=W,
        height=H,
        near_plane=near_plane,
        far_plane=far_plane,
        radius_clip=radius_clip,
        eps2d=eps2d,
        sh_degree=sh_degree,
        packed=False,
        tile_size=tile_size,
        backgrounds=bg,
        render_mode=mode,
        rasterize_mode=rasterize_mode,
    )
    render = render.movedim(-1, -3)  # [*B, V, C, H, W]
    alphas = alpha.movedim(-1, -3)  # [*B, V, 1, H, W]
    colors = render[..., :3, :, :] if "RGB" in mode else None
    depths = render[..., -1:, :, :] if "D" in mode else None
    radii = meta["radii"]
    if radii.shape[-1] != 2:  # older gsplat: one radius per Gaussian
        radii = radii[..., None].expand(*radii.shape, 2)
    return RenderOutput(
        colors=colors,
        alphas=alphas,
        depths=depths,
        means2d=meta["means2d"],
        radii=radii.to(torch.int32),
        depths_gauss=meta["depths"],
        info={"backend": "gsplat", **meta},
    )
