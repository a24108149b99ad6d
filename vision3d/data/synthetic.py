"""Synthetic RE10K-format datasets: procedural Gaussian scenes rendered with our renderer.

Each scene is :func:`vision3d.gaussians.procedural.procedural_scene` (seeded) seen by a camera
that moves along an arc around it like a hand-held video (``num_views`` frames over
``arc_deg`` degrees of azimuth, slowly changing height and distance), rendered with
:func:`vision3d.render.rasterize` and written with :func:`vision3d.data.re10k.write_chunk` in the
published chunk layout. Tests, CI and the demo therefore exercise the real loaders, samplers and
conventions end to end without downloads. ``render_scale < 1`` renders at a lower resolution and
upsamples (cameras are those of the stored size), which keeps CPU generation cheap for
benchmarks of the loader. Each record also carries ``depths`` (float16 ``[V, H, W]``): the
rendered expected z-depth where the accumulated opacity is at least ``DEPTH_MIN_ALPHA``, 0 (unknown)
elsewhere, so depth and point-map losses (VGGT) and depth metrics can be exercised too.
Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from vision3d.geometry import Cameras
from vision3d.geometry.conventions import cameras_to_re10k

from .preprocess import encode_jpeg
from .re10k import write_chunk, write_index

DEPTH_MIN_ALPHA = 0.5
"""Pixels whose accumulated opacity is below this get depth 0 (unknown): mostly background."""

__all__ = ["synthetic_scenes", "synthetic_cameras", "render_synthetic_scene", "synthetic_example", "write_synthetic_dataset"]


def synthetic_scenes(seed: int, num_scenes: int) -> list[tuple[str, int]]:
    """``(key, scene seed)`` of each scene of a synthetic dataset; keys are 16 hex digits like RE10K's."""
    out = []
    for i in range(num_scenes):
        s = int(seed) * 100_003 + i
        out.append((f"{(s * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF:016x}", s))
    return out


def synthetic_cameras(
    num_views: int,
    target: Tensor,  # [3] world point looked at
    radius: float,
    width: int,
    height: int,
    seed: int = 0,
    arc_deg: float = 120.0,
    fov_deg: float = 55.0,
) -> Cameras:  # batch [num_views], OpenCV
    """A smooth video-like camera path on an arc around ``target`` (world z up)."""
    from vision3d.gaussians.procedural import intrinsics_from_fov, look_at

    g = torch.Generator().manual_seed(int(seed) + 1)
    start = float(torch.rand((), generator=g)) * 360.0
    t = torch.linspace(0.0, 1.0, num_views, dtype=torch.float64)
    az = torch.deg2rad(start + arc_deg * t)
    el = torch.deg2rad(20.0 + 12.0 * torch.sin(math.pi * t))
    r = radius * (1.0 + 0.12 * torch.cos(2 * math.pi * t))
    tgt = target.to(torch.float64)
    eye = tgt + torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1) * r[:, None]
    c2w = look_at(eye, tgt.expand_as(eye)).float()
    K = intrinsics_from_fov(width, height, fov_deg).expand(num_views, 3, 3)
    return Cameras(K, c2w, width, height)


def render_synthetic_scene(
    seed: int,
    num_views: int = 24,
    width: int = 64,
    height: int = 64,
    density: float = 0.25,
    render_scale: float = 1.0,
    background: float = 1.0,
    with_depth: bool = False,
) -> tuple[Tensor, Cameras] | tuple[Tensor, Cameras, Tensor]:  # [V, 3, H, W] in [0, 1], batch [V] (, [V, 1, H, W])
    """Render one procedural scene along its camera path (and, with ``with_depth``, its z-depth
    ``[V, 1, H, W]``, 0 where the opacity is below ``DEPTH_MIN_ALPHA``)."""
    from vision3d.gaussians.procedural import procedural_scene
    from vision3d.render import rasterize

    scene = procedural_scene(seed=seed, density=density)
    cams = synthetic_cameras(num_views, scene.target, 2.2 * scene.radius + 0.8, width, height, seed)
    rw, rh = max(8, round(width * render_scale)), max(8, round(height * render_scale))
    rcams = cams if (rw, rh) == (width, height) else cams.resize(rw, rh)
    bg = torch.full((3,), float(background))
    with torch.no_grad():
        out = rasterize(scene.gaussians, rcams, mode="RGB+ED" if with_depth else "RGB", background=bg,
                        backend="torch", near_plane=0.05)
    imgs = out.colors.clamp(0, 1)
    depth = None
    if with_depth:
        depth = torch.where(out.alphas >= DEPTH_MIN_ALPHA, out.depths, torch.zeros_like(out.depths))
    if (rw, rh) != (width, height):
        imgs = torch.nn.functional.interpolate(imgs, size=(height, width), mode="bilinear", align_corners=False).clamp(0, 1)
        if depth is not None:
            depth = torch.nn.functional.interpolate(depth, size=(height, width), mode="nearest-exact")
    return (imgs, cams) if depth is None else (imgs, cams, depth)


def synthetic_example(key: str, seed: int, quality: int = 95, **render_kwargs) -> dict:
    """One chunk record (JPEG frames, RE10K camera rows, float16 depth maps) of a rendered procedural scene."""
    imgs, cams, depth = render_synthetic_scene(seed, with_depth=True, **render_kwargs)
    return {
        "key": key,
        "url": "",
        "timestamps": torch.arange(imgs.shape[0], dtype=torch.int64) * 33_333,
        "cameras": cameras_to_re10k(cams).float(),
        "images": [encode_jpeg(im, quality) for im in imgs],
        "depths": depth[:, 0].to(torch.float16),
    }


def write_synthetic_dataset(
    root: str | os.PathLike,
    split: str = "train",
    num_scenes: int = 4,
    scenes_per_chunk: int = 2,
    seed: int = 0,
    progress: bool = False,
    quality: int = 95,
    **render_kwargs,
) -> dict[str, str]:
    """Write ``root/split/000000.torch ...`` and ``index.json``; returns the index (key -> chunk).

    Keys and per-scene seeds are :func:`synthetic_scenes`. ``render_kwargs`` go to
    :func:`render_synthetic_scene` (``num_views``, ``width``, ``height``, ``density``, ``render_scale``).
    """
    from tqdm import tqdm

    out = Path(root) / split
    index: dict[str, str] = {}
    chunk: list[dict] = []
    chunk_id = 0
    scenes = synthetic_scenes(seed, num_scenes)
    for i, (key, s) in enumerate(tqdm(scenes, desc=f"synthetic {split}", disable=not progress)):
        chunk.append(synthetic_example(key, s, quality, **render_kwargs))
        if len(chunk) == scenes_per_chunk or i == num_scenes - 1:
            name = f"{chunk_id:06d}.torch"
            write_chunk(out / name, chunk)
            index.update({ex["key"]: name for ex in chunk})
            chunk, chunk_id = [], chunk_id + 1
    write_index(out, index)
    return index
