"""Plane-sweep cost volumes over inverse-depth candidates.

The multi-view stereo block of MVSplat / DepthSplat (Xu et al., "DepthSplat: Connecting Gaussian
Splatting and Depth", arXiv 2410.13862; github.com/cvg/depthsplat @ 2dad25a, MIT,
``src/model/encoder/unimatch/matching.py`` and ``mv_unimatch.py``), written for vision3d:

- :func:`inverse_depth_candidates`: ``D`` candidates evenly spaced in inverse depth between
  ``1 / far`` and ``1 / near`` (the authors' coarse level), and :func:`refined_candidates`, the
  finer levels' window of ``D`` candidates around the current estimate;
- :func:`plane_sweep_warp`: source-view features sampled at the reprojection of every reference
  pixel for every depth candidate (integer pixel grid, bilinear, ``align_corners=True``, zeros
  outside the source image, projected depth clamped to ``1e-3``);
- :func:`correlation_volume`: the dot product of reference and warped features divided by
  ``sqrt(C)``, averaged over the source views;
- :func:`nearest_views`: for each view, itself followed by its ``k`` nearest views by camera centre
  (DepthSplat matches against these when it has more than three views).

A pixel whose reprojection leaves every source image for every candidate (views without overlap)
gets a cost of exactly zero: no matching evidence, which downstream layers see as a flat cost.
Points behind a source camera are handled as the authors do (projected depth clamped to ``1e-3``,
which sends them far outside the image in practice), so trained weights see the same volumes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def inverse_depth_candidates(
    near: Tensor,  # [N] world units, > 0
    far: Tensor,  # [N] world units, > near
    num: int,
) -> Tensor:  # [N, num, 1, 1] inverse depth, increasing from 1/far to 1/near
    """``num`` inverse-depth candidates evenly spaced from ``1 / far`` to ``1 / near``."""
    if num < 2:
        raise ValueError(f"inverse_depth_candidates: need at least 2 candidates, got {num}")
    if (near <= 0).any() or (far <= near).any():
        raise ValueError(
            f"inverse_depth_candidates: need 0 < near < far, got near={near.tolist()} far={far.tolist()}"
        )
    lo, hi = (1.0 / far).view(-1, 1, 1, 1), (1.0 / near).view(-1, 1, 1, 1)
    t = torch.linspace(0, 1, num, dtype=near.dtype, device=near.device).view(1, num, 1, 1)
    return lo + t * (hi - lo)


def refined_candidates(
    inv_depth: Tensor,  # [N, 1, H, W] current inverse-depth estimate
    near: Tensor,  # [N]
    far: Tensor,  # [N]
    num: int,  # candidates at this level
    interval: Tensor,  # [N] spacing of the candidates at this level (inverse depth)
) -> Tensor:  # [N, num, H, W]
    """``num`` candidates from ``x - (num // 2) * interval`` to ``x + (num // 2 - 1) * interval``
    around the estimate, each end clamped to ``[1 / far, 1 / near]``, evenly spaced in between."""
    interval = interval.view(-1, 1, 1, 1)
    lo = (inv_depth - interval * (num // 2)).clamp(min=(1.0 / far).view(-1, 1, 1, 1))
    hi = (inv_depth + interval * (num // 2 - 1)).clamp(max=(1.0 / near).view(-1, 1, 1, 1))
    t = torch.linspace(0, 1, num, dtype=inv_depth.dtype, device=inv_depth.device).view(1, num, 1, 1)
    return lo + t * (hi - lo)


def plane_sweep_warp(
    src_features: Tensor,  # [N, C, H, W] source-view features
    K: Tensor,  # [N, 3, 3] intrinsics of this feature grid, pixels (shared by both views)
    ref_to_src: Tensor,  # [N, 4, 4] rigid transform from reference camera to source camera (OpenCV)
    depth: Tensor,  # [N, D, H, W] z-depth candidates in the reference camera
    min_depth: float = 1e-3,
) -> Tensor:  # [N, C, D, H, W]
    """Sample the source features where each reference pixel at each depth candidate projects."""
    N, D, H, W = depth.shape
    C = src_features.shape[1]
    with torch.no_grad():
        ys, xs = torch.meshgrid(
            torch.arange(H, device=depth.device, dtype=depth.dtype),
            torch.arange(W, device=depth.device, dtype=depth.dtype),
            indexing="ij",
        )
        pix = torch.stack([xs, ys, torch.ones_like(xs)], 0).view(1, 3, H * W).expand(N, 3, H * W)
        rays = torch.linalg.inv(K) @ pix  # [N, 3, HW] camera z = 1
        pts = (ref_to_src[:, :3, :3] @ rays).unsqueeze(2) * depth.view(N, 1, D, H * W)  # [N, 3, D, HW]
        pts = pts + ref_to_src[:, :3, 3].view(N, 3, 1, 1)
        proj = (K @ pts.view(N, 3, D * H * W)).view(N, 3, D, H * W)
        uv = proj[:, :2] / proj[:, 2:].clamp(min=min_depth)
        grid = torch.stack([2 * uv[:, 0] / (W - 1) - 1, 2 * uv[:, 1] / (H - 1) - 1], -1)  # [N, D, HW, 2]
    out = F.grid_sample(src_features, grid.view(N, D * H, W, 2), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.view(N, C, D, H, W)


def correlation_volume(
    ref_features: Tensor,  # [N, C, H, W]
    warped: Tensor,  # [N, S, C, D, H, W] the S source views warped by plane_sweep_warp
) -> Tensor:  # [N, D, H, W]
    """``<ref, warped> / sqrt(C)`` averaged over the ``S`` source views."""
    C = ref_features.shape[1]
    return ((ref_features[:, None, :, None] * warped).sum(2) / C**0.5).mean(1)


def nearest_views(
    centers: Tensor,  # [B, V, 3] camera centres, world
    k: int,
) -> Tensor:  # [B, V, k + 1] long: each view itself first, then its k nearest views
    """Indices of each view and its ``k`` nearest views by camera-centre distance."""
    V = centers.shape[1]
    if not 1 <= k < V:
        raise ValueError(f"nearest_views: k={k} must be in [1, {V - 1}] for {V} views")
    d = torch.cdist(centers.double(), centers.double())
    # the view itself first even when two cameras coincide
    d = d + torch.eye(V, dtype=d.dtype, device=d.device) * -1.0
    return d.argsort(-1)[..., : k + 1]
