"""Resize + centre crop (pixelSplat's policy), flips, jitter."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tests.data.util import scene_cameras, scene_points
from vision3d.data.preprocess import ColorJitter, hflip, resize_and_center_crop


def test_pixelsplat_policy_360x640_to_256():
    cams = scene_cameras(2, 640, 360)
    img = torch.randint(0, 256, (2, 3, 360, 640), dtype=torch.uint8)
    out, c = resize_and_center_crop(img, cams, (256, 256), "lanczos")
    # scale = max(256/360, 256/640) -> 256 x round(640 * 256/360) = 455; crop column (455-256)//2 = 99
    ref = np.array(Image.fromarray(img[0].permute(1, 2, 0).numpy()).resize((455, 256), Image.LANCZOS))
    assert torch.allclose(out[0], torch.from_numpy(ref[:, 99 : 99 + 256]).permute(2, 0, 1).float() / 255)
    s = 455 / 640, 256 / 360
    assert torch.allclose(c.K[..., 0, 0], cams.K[..., 0, 0] * s[0]) and torch.allclose(c.K[..., 1, 1], cams.K[..., 1, 1] * s[1])
    assert torch.allclose(c.K[..., 0, 2], cams.K[..., 0, 2] * s[0] - 99)
    assert (c.width, c.height) == (256, 256)
    same, c2 = resize_and_center_crop(img, cams, None)
    assert same.shape == img.shape and c2 is cams


def test_hflip_keeps_projection_consistent():
    cams = scene_cameras(3, 64, 48)
    pts = scene_points(seed=1)
    uv, z = cams.project(pts.expand(3, *pts.shape))
    _, fc = hflip(torch.zeros(3, 3, 48, 64), cams)
    pts_m = pts * torch.tensor([-1.0, 1.0, 1.0], dtype=pts.dtype)  # the world mirrored along x
    uv_m, z_m = fc.project(pts_m.expand(3, *pts.shape))
    assert torch.allclose(uv_m[..., 0], 64 - uv[..., 0], atol=1e-6) and torch.allclose(uv_m[..., 1], uv[..., 1], atol=1e-6)
    assert torch.allclose(z_m, z) and torch.allclose(torch.linalg.det(fc.rotation), torch.ones(3, dtype=fc.dtype))


def test_color_jitter_off_by_default_and_deterministic():
    x = torch.rand(2, 3, 8, 8)
    assert ColorJitter()(x, torch.Generator()) is x
    j = ColorJitter(0.2, 0.2, 0.2)
    a, b = j(x, torch.Generator().manual_seed(1)), j(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.min() >= 0 and a.max() <= 1
