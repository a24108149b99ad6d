"""Tiny scenes in the exact published layouts, with images that show known 3-D points as blobs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vision3d.geometry import Cameras
from vision3d.geometry.conventions import cameras_to_re10k, opencv_to_opengl
from vision3d.gaussians.procedural import orbit_cameras
from vision3d.data.preprocess import encode_jpeg
from vision3d.data.re10k import write_chunk, write_index


def scene_points(n: int = 8, seed: int = 0) -> torch.Tensor:  # [n, 3] world, near the origin
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([1.2, 1.2, 0.6], dtype=torch.float64)


def scene_cameras(n_views: int, width: int, height: int, seed: int = 0) -> Cameras:
    cams = orbit_cameras(n_views, (0.0, 0.0, 0.0), 3.0 + 0.1 * seed, elevation_deg=30.0, width=width, height=height,
                         fov_deg=45.0, start_deg=7.0 * seed)
    # an off-centre principal point and fx != fy, so crops and resizes are really exercised
    K = cams.K.clone().double()
    K[..., 0, 2] += 3.0
    K[..., 1, 2] -= 2.0
    K[..., 1, 1] *= 1.05
    return Cameras(K, cams.cam_to_world.double(), width, height)


def blob_images(cams: Cameras, points: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:  # [V, 3, H, W] uint8
    """Black images with a white Gaussian blob where each point projects."""
    uv, z = cams.project(points.expand(*cams.batch_shape, *points.shape))
    ys = torch.arange(cams.height, dtype=torch.float64) + 0.5
    xs = torch.arange(cams.width, dtype=torch.float64) + 0.5
    out = []
    for v in range(cams.batch_shape[0]):
        u, vv = uv[v, :, 0].double(), uv[v, :, 1].double()  # [P]
        w = (z[v] > 0).double()[:, None, None]
        blobs = torch.exp(-(((xs[None, None] - u[:, None, None]) ** 2) + ((ys[None, :, None] - vv[:, None, None]) ** 2)) / (2 * sigma**2))
        img = (w * blobs).sum(0)
        out.append((img.clamp(0, 1) * 255).round().to(torch.uint8)[None].expand(3, -1, -1))
    return torch.stack(out)


def make_example(key: str, n_views: int = 12, width: int = 96, height: int = 64, seed: int = 0, blobs: bool = True) -> dict:
    cams = scene_cameras(n_views, width, height, seed)
    if blobs:
        imgs = blob_images(cams, scene_points(seed=seed))
    else:
        g = torch.Generator().manual_seed(seed)
        imgs = torch.randint(0, 256, (n_views, 3, height, width), generator=g, dtype=torch.uint8)
    return {
        "key": key,
        "url": f"https://example.invalid/{key}",
        "timestamps": torch.arange(n_views, dtype=torch.int64) * 33_366,
        "cameras": cameras_to_re10k(cams).float(),
        "images": [encode_jpeg(im, 98) for im in imgs],
    }


def write_split(root: Path, split: str, chunks: list[list[dict]]) -> Path:
    """Chunks ``000000.torch``, ... and ``index.json`` in ``root/split``."""
    d = root / split
    index = {}
    for i, exs in enumerate(chunks):
        name = f"{i:06d}.torch"
        write_chunk(d / name, exs)
        index.update({ex["key"]: name for ex in exs})
    write_index(d, index)
    return d


def write_dl3dv_scene(folder: Path, n_views: int = 10, full_w: int = 192, full_h: int = 128, seed: int = 0) -> Cameras:
    """A raw DL3DV scene: transforms.json (OpenGL, full-res intrinsics) + images/ and images_2/ PNGs."""
    import cv2

    cams = scene_cameras(n_views, full_w, full_h, seed)
    frames = []
    for sub, factor in (("images", 1), ("images_2", 2)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        c = cams.resize(full_w // factor, full_h // factor)
        imgs = blob_images(c, scene_points(seed=seed))
        for i in range(n_views):
            arr = imgs[i].permute(1, 2, 0).numpy()[..., ::-1]
            cv2.imwrite(str(folder / sub / f"frame_{i + 1:05d}.png"), np.ascontiguousarray(arr))
    gl = opencv_to_opengl(cams.cam_to_world)
    for i in range(n_views):
        frames.append({"file_path": f"images/frame_{i + 1:05d}.png", "transform_matrix": gl[i].tolist()})
    K = cams.K[0]
    meta = {
        "w": full_w, "h": full_h, "fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]),
        "cy": float(K[1, 2]), "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "camera_model": "OPENCV",
        "frames": frames,
    }
    (folder / "transforms.json").write_text(json.dumps(meta))
    return cams


def blob_offsets(images: torch.Tensor, cams: Cameras, points: torch.Tensor, win: int = 4) -> np.ndarray:
    """``[M, 2]`` offsets (px) from each visible point's projection to the intensity centroid around it."""
    uv, z = cams.project(points.to(cams.dtype).expand(*cams.batch_shape, *points.shape))
    errs = []
    V, _, H, W = images.shape
    for v in range(V):
        img = images[v].mean(0).double()
        for (u, vv), zz in zip(uv[v].tolist(), z[v].tolist()):
            j, i = int(np.floor(u)), int(np.floor(vv))
            if zz <= 0 or i < win or j < win or i >= H - win or j >= W - win:
                continue
            patch = img[i - win : i + win + 1, j - win : j + win + 1]
            if patch.sum() < 1e-3:
                errs.append((float("inf"), float("inf")))
                continue
            ys = torch.arange(i - win, i + win + 1, dtype=torch.float64) + 0.5
            xs = torch.arange(j - win, j + win + 1, dtype=torch.float64) + 0.5
            cu = float((patch.sum(0) * xs).sum() / patch.sum())
            cv = float((patch.sum(1) * ys).sum() / patch.sum())
            errs.append((cu - u, cv - vv))
    return np.array(errs).reshape(-1, 2)
