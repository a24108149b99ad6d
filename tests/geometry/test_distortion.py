"""COLMAP lens distortion: hand formulas, parity with pycolmap (when installed), undistortion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import optional
from vision3d.geometry.colmap import MODELS_BY_NAME
from vision3d.geometry.distortion import (
    SUPPORTED_MODELS,
    distort,
    undistort,
    undistort_image,
    undistortion_grid,
)

D = torch.float64


def _params(model: str, g: torch.Generator) -> torch.Tensor:
    n = MODELS_BY_NAME[model].num_extra
    return (torch.rand(n, generator=g, dtype=D) - 0.5) * 0.1


def test_opencv_by_hand():
    k1, k2, p1, p2 = 0.1, -0.05, 0.01, -0.02
    u, v = 0.3, -0.2
    r2 = u * u + v * v
    radial = k1 * r2 + k2 * r2 * r2
    want = [u + u * radial + 2 * p1 * u * v + p2 * (r2 + 2 * u * u), v + v * radial + 2 * p2 * u * v + p1 * (r2 + 2 * v * v)]
    got = distort("OPENCV", torch.tensor([k1, k2, p1, p2], dtype=D), torch.tensor([[u, v]], dtype=D))
    torch.testing.assert_close(got[0], torch.tensor(want, dtype=D))
    # equidistant fisheye without distortion: the image radius is the angle to the axis
    got = distort("FISHEYE", torch.zeros(0, dtype=D), torch.tensor([[1.0, 0.0]], dtype=D))
    torch.testing.assert_close(got[0], torch.tensor([torch.pi / 4, 0.0], dtype=D))


@pytest.mark.parametrize("model", SUPPORTED_MODELS)
def test_undistort_inverts_distort(model):
    g = torch.Generator().manual_seed(0)
    params = _params(model, g).expand(3, -1)  # a batch of 3 cameras sharing parameters
    xy = (torch.rand(3, 40, 2, generator=g, dtype=D) - 0.5) * 1.2
    back = undistort(model, params, distort(model, params, xy))
    torch.testing.assert_close(back, xy, atol=1e-10, rtol=0)


def test_bad_model_and_param_count():
    with pytest.raises(ValueError, match="'FOV' is not supported"):
        distort("FOV", torch.zeros(1), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="OPENCV takes 4 distortion parameters"):
        distort("OPENCV", torch.zeros(3), torch.zeros(1, 2))


def test_undistort_image_samples_the_right_source_pixels():
    # a distorted image whose value is its own x pixel coordinate (bilinear reproduces it exactly)
    W, H = 40, 30
    K = torch.tensor([[30.0, 0, 20.5], [0, 31.0, 14.5], [0, 0, 1]], dtype=D)
    params = torch.tensor([0.08, -0.02, 0.003, -0.002], dtype=D)
    xs = torch.arange(W, dtype=D) + 0.5
    image = xs.expand(1, H, W).clone()  # [C=1, H, W]
    out = undistort_image(image, K, "OPENCV", params)
    grid = undistortion_grid(K, "OPENCV", params, W, H)
    src_x = (grid[..., 0] + 1) * W / 2  # pixels in the distorted image
    inside = (src_x > 1) & (src_x < W - 1) & (grid[..., 1].abs() < 1 - 2 / H)
    torch.testing.assert_close(out[0][inside], src_x[inside])
    # each output pixel centre, undistorted from its source location, is the pinhole ray through it
    src = (grid + 1) * torch.tensor([W / 2, H / 2], dtype=D)
    xd = (src - K[:2, 2]) / torch.stack([K[0, 0], K[1, 1]])
    ray = undistort("OPENCV", params, xd.reshape(-1, 2))
    gy, gx = torch.meshgrid(torch.arange(H, dtype=D) + 0.5, torch.arange(W, dtype=D) + 0.5, indexing="ij")
    want = (torch.stack([gx, gy], -1).reshape(-1, 2) - K[:2, 2]) / torch.stack([K[0, 0], K[1, 1]])
    torch.testing.assert_close(ray, want, atol=1e-9, rtol=0)


def test_parity_with_pycolmap():
    pycolmap = optional("pycolmap")
    rng = np.random.default_rng(0)
    for model in SUPPORTED_MODELS:
        info = MODELS_BY_NAME[model]
        extra = rng.uniform(-0.05, 0.05, info.num_extra)
        focal = [300.0] if info.num_focal == 1 else [300.0, 310.0]
        cam = pycolmap.Camera(model=model, width=320, height=240, params=np.array(focal + [160.0, 120.0, *extra]))
        xyz = np.concatenate([rng.uniform(-0.5, 0.5, (50, 2)), np.ones((50, 1))], 1) * rng.uniform(1, 3, (50, 1))
        want = np.asarray(cam.img_from_cam(xyz))
        K = np.asarray(cam.calibration_matrix())
        xd = distort(model, torch.from_numpy(extra), torch.from_numpy(xyz[:, :2] / xyz[:, 2:])).numpy()
        np.testing.assert_allclose(xd @ K[:2, :2].T + K[:2, 2], want, atol=1e-9, err_msg=model)
