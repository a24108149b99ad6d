"""Edits of Gaussian scenes: prune, select, concatenate, crop, merge and normalise.

Every function takes and returns :class:`~vision3d.gaussians.Gaussians`; masks are ``[N]`` booleans
for unbatched scenes. ``normalize_scene`` follows the usual practice of NeRF/3DGS pipelines
(e.g. nerfstudio's ``auto_orient_and_center_poses`` / ``scale_factor``, Apache-2.0; 3DGS's
``getNerfppNorm``, which sizes the scene by the cameras' bounding sphere): centre the cameras and
scale them into a sphere of the given radius. Own implementation; no code copied.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from vision3d.geometry import Cameras

from .gaussians import Gaussians
from .transform import Similarity, transform_cameras, transform_gaussians

__all__ = [
    "prune_mask",
    "prune",
    "select",
    "concat",
    "crop_mask",
    "crop",
    "merge",
    "dedup_voxel",
    "normalize_scene",
    "scene_bounds",
]


def _unbatched(g: Gaussians, what: str) -> None:
    if len(g.batch_shape) != 0:
        raise ValueError(
            f"{what}: expected unbatched Gaussians, got batch shape {tuple(g.batch_shape)}; "
            "index the batch or call .flatten_batch() first"
        )


def prune_mask(
    g: Gaussians,
    *,
    min_opacity: float | None = None,  # drop opacities below this
    max_scale: float | None = None,  # drop Gaussians whose largest axis exceeds this (world units)
    min_scale: float | None = None,  # drop Gaussians whose largest axis is below this
) -> Tensor:  # [..., N] bool, True = keep
    """Which Gaussians survive the thresholds (any batch shape)."""
    keep = torch.ones(g.means.shape[:-1], dtype=torch.bool, device=g.device)
    if min_opacity is not None:
        keep &= g.opacities >= min_opacity
    smax = g.scales.amax(-1)
    if max_scale is not None:
        keep &= smax <= max_scale
    if min_scale is not None:
        keep &= smax >= min_scale
    return keep


def prune(
    g: Gaussians, *, min_opacity: float | None = None, max_scale: float | None = None, min_scale: float | None = None
) -> Gaussians:
    """Drop transparent, huge or vanishing Gaussians (unbatched scenes)."""
    _unbatched(g, "prune")
    return g.select(prune_mask(g, min_opacity=min_opacity, max_scale=max_scale, min_scale=min_scale))


def select(g: Gaussians, index: Tensor) -> Gaussians:  # index: [N] bool mask or [M] int64 indices
    """Keep the Gaussians given by a mask or index tensor (unbatched scenes)."""
    _unbatched(g, "select")
    if index.dtype == torch.bool and index.shape != (g.num,):
        raise ValueError(f"select: boolean mask must have shape [{g.num}], got {tuple(index.shape)}")
    return g.select(index.to(g.device))


def concat(items: Sequence[Gaussians]) -> Gaussians:
    """Concatenate along ``N`` (SH degrees padded to the largest); see :meth:`Gaussians.cat`."""
    return Gaussians.cat(list(items))


def crop_mask(g: Gaussians, lo: Tensor | Sequence[float], hi: Tensor | Sequence[float]) -> Tensor:  # [..., N] bool
    """Which means lie in the axis-aligned box ``[lo, hi]`` (inclusive; world units, ``[3]`` each)."""
    lo_t = torch.as_tensor(lo, dtype=g.dtype, device=g.device)
    hi_t = torch.as_tensor(hi, dtype=g.dtype, device=g.device)
    if lo_t.shape != (3,) or hi_t.shape != (3,):
        raise ValueError(f"crop: lo and hi must be 3 numbers each, got {tuple(lo_t.shape)} and {tuple(hi_t.shape)}")
    if (lo_t > hi_t).any():
        raise ValueError(f"crop: empty box, lo {lo_t.tolist()} exceeds hi {hi_t.tolist()}")
    return ((g.means >= lo_t) & (g.means <= hi_t)).all(-1)


def crop(g: Gaussians, lo: Tensor | Sequence[float], hi: Tensor | Sequence[float]) -> Gaussians:
    """Keep the Gaussians whose means lie in the box ``[lo, hi]`` (unbatched scenes)."""
    _unbatched(g, "crop")
    return g.select(crop_mask(g, lo, hi))


def dedup_voxel(g: Gaussians, voxel_size: float) -> Gaussians:
    """Keep one Gaussian per occupied voxel of side ``voxel_size``: the most opaque one.

    Pixel-aligned predictions from overlapping views put several Gaussians on the same surface
    point; this thins them. Ties go to the earlier Gaussian; the result keeps the input order.
    """
    _unbatched(g, "dedup_voxel")
    if not voxel_size > 0:
        raise ValueError(f"dedup_voxel: voxel_size must be positive, got {voxel_size}")
    if g.num == 0:
        return g
    cells = torch.floor(g.means.detach() / voxel_size).to(torch.int64)  # [N, 3]
    _, inverse = torch.unique(cells, dim=0, return_inverse=True)  # [N] voxel id
    order = torch.argsort(-g.opacities.detach(), stable=True)  # most opaque first
    rank = torch.empty_like(order)
    rank[order] = torch.arange(g.num, device=g.device)
    best = torch.full((int(inverse.max()) + 1,), g.num, dtype=torch.int64, device=g.device)
    best = best.scatter_reduce(0, inverse, rank, reduce="amin")  # best rank per voxel
    keep = rank == best[inverse]
    return g.select(keep)


def merge(
    items: Sequence[Gaussians],
    *,
    transforms: Sequence[Similarity | None] | None = None,
    voxel_size: float | None = None,
) -> Gaussians:
    """One scene from several: flatten each input's batch, move it by its similarity, concatenate.

    Args:
        items: scenes of any batch shape (e.g. per-view Gaussians ``[V, N, ...]``).
        transforms: one :class:`Similarity` (or ``None``) per item, applied before concatenating.
        voxel_size: if given, thin the result with :func:`dedup_voxel`.
    """
    items = list(items)
    if not items:
        raise ValueError("merge: nothing to merge")
    if transforms is not None and len(transforms) != len(items):
        raise ValueError(f"merge: {len(items)} scenes but {len(transforms)} transforms")
    parts = []
    for i, g in enumerate(items):
        g = g.flatten_batch()
        if transforms is not None and transforms[i] is not None:
            g = transform_gaussians(g, transforms[i])
        parts.append(g)
    out = Gaussians.cat(parts)
    if voxel_size is not None:
        out = dedup_voxel(out, voxel_size)
    return out


def scene_bounds(g: Gaussians, quantile: float = 1.0) -> tuple[Tensor, Tensor]:  # ([3], [3])
    """Axis-aligned bounds of the means; ``quantile < 1`` ignores outliers on both sides."""
    m = g.means.detach().reshape(-1, 3)
    if m.shape[0] == 0:
        raise ValueError("scene_bounds: the scene has no Gaussians")
    if quantile >= 1.0:
        return m.amin(0), m.amax(0)
    q = torch.tensor([1 - quantile, quantile], dtype=m.dtype, device=m.device)
    b = torch.quantile(m, q, dim=0)
    return b[0], b[1]


def normalize_scene(
    gaussians: Gaussians | None,
    cameras: Cameras,  # any batch shape; OpenCV cam_to_world
    *,
    radius: float = 1.0,
) -> tuple[Gaussians | None, Cameras, Similarity]:
    """Centre the camera centres at the origin and scale them into a sphere of ``radius``.

    The similarity (``scale``, identity rotation, ``translation``) maps old world coordinates to
    new ones; it is returned so results can be mapped back with ``sim.inverse()``. With a single
    camera position (or coincident ones) there is no spread to size by: the scale is taken from the
    Gaussians (their largest distance to the camera maps to ``radius``) when given, else it is 1.
    """
    if not radius > 0:
        raise ValueError(f"normalize_scene: radius must be positive, got {radius}")
    centres = cameras.cam_to_world[..., :3, 3].reshape(-1, 3).to(torch.float64)  # [C, 3]
    if centres.shape[0] == 0:
        raise ValueError("normalize_scene: no cameras")
    lo, hi = centres.amin(0), centres.amax(0)
    centre = 0.5 * (lo + hi)
    spread = (centres - centre).norm(dim=-1).max().item()
    if spread > 1e-9:
        scale = radius / spread
    elif gaussians is not None and gaussians.num > 0:
        d = (gaussians.means.detach().reshape(-1, 3).to(torch.float64).cpu() - centre.cpu()).norm(dim=-1).max().item()
        scale = radius / d if d > 1e-9 else 1.0
    else:
        scale = 1.0
    sim = Similarity(scale, torch.eye(3, dtype=torch.float64), -scale * centre.cpu())
    new_g = None if gaussians is None else transform_gaussians(gaussians, sim)
    return new_g, transform_cameras(cameras, sim), sim
