"""Lens distortion of the COLMAP camera models, and undistortion of points and images.

The formulas are COLMAP's (github.com/colmap/colmap, ``src/colmap/sensor/models.h``, BSD-3-Clause;
Schönberger & Frahm, CVPR 2016), in its parameter order (``CAMERA_MODELS`` in
:mod:`vision3d.geometry.colmap`): a camera-space point ``(u, v, w)`` goes to the normalised plane
``(u/w, v/w)``; fisheye models first map it to the equidistant plane (radius ``theta = atan(r)``);
the model's distortion ``d(p)`` is added (``p + d(p)``) and K maps the result to pixels.

- :func:`distort` / :func:`undistort`: normalised pinhole coordinates <-> distorted ones (the
  inverse by Newton's method in float64, as COLMAP's ``IterativeUndistortion``, with a numerical
  Jacobian).
- :func:`undistortion_grid` / :func:`undistort_image`: resample a distorted image into a pinhole
  image with intrinsics ``K_new`` (``torch.nn.functional.grid_sample``, ``align_corners=False``,
  which matches our pixel convention: the image spans ``[0, W] x [0, H]``).

Supported: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, FULL_OPENCV, OPENCV_FISHEYE,
SIMPLE_RADIAL_FISHEYE, RADIAL_FISHEYE, SIMPLE_FISHEYE, FISHEYE (checked against pycolmap 4.2.1 by
``tests/geometry/test_distortion.py`` when pycolmap is installed). Other models raise a ValueError.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EXTRA = {
    "SIMPLE_PINHOLE": 0,
    "PINHOLE": 0,
    "SIMPLE_RADIAL": 1,
    "RADIAL": 2,
    "OPENCV": 4,
    "FULL_OPENCV": 8,
    "OPENCV_FISHEYE": 4,
    "SIMPLE_RADIAL_FISHEYE": 1,
    "RADIAL_FISHEYE": 2,
    "SIMPLE_FISHEYE": 0,
    "FISHEYE": 0,
}
_FISHEYE = {"OPENCV_FISHEYE", "SIMPLE_RADIAL_FISHEYE", "RADIAL_FISHEYE", "SIMPLE_FISHEYE", "FISHEYE"}
SUPPORTED_MODELS = tuple(_EXTRA)


def _check(model: str, params: Tensor) -> None:
    if model not in _EXTRA:
        raise ValueError(f"distortion: camera model {model!r} is not supported; supported: {list(SUPPORTED_MODELS)}")
    if params.shape[-1] != _EXTRA[model]:
        raise ValueError(
            f"distortion: {model} takes {_EXTRA[model]} distortion parameters, got params of shape {tuple(params.shape)}"
        )


def _plane_offset(model: str, k: Tensor, p: Tensor) -> Tensor:  # k [..., 1, e], p [..., N, 2] -> [..., N, 2]
    """COLMAP's ``Distortion``: the offset ``d(p)`` added on the (normalised or equidistant) plane."""
    u, v = p[..., 0], p[..., 1]
    r2 = u * u + v * v
    if model in ("SIMPLE_RADIAL", "SIMPLE_RADIAL_FISHEYE"):
        radial = k[..., 0] * r2
        return p * radial[..., None]
    if model in ("RADIAL", "RADIAL_FISHEYE"):
        radial = k[..., 0] * r2 + k[..., 1] * r2 * r2
        return p * radial[..., None]
    if model == "OPENCV_FISHEYE":
        r4 = r2 * r2
        radial = k[..., 0] * r2 + k[..., 1] * r4 + k[..., 2] * r4 * r2 + k[..., 3] * r4 * r4
        return p * radial[..., None]
    if model in ("OPENCV", "FULL_OPENCV"):
        k1, k2, p1, p2 = k[..., 0], k[..., 1], k[..., 2], k[..., 3]
        uv = u * v
        if model == "OPENCV":
            radial = k1 * r2 + k2 * r2 * r2
        else:
            k3, k4, k5, k6 = k[..., 4], k[..., 5], k[..., 6], k[..., 7]
            r4, r6 = r2 * r2, r2 * r2 * r2
            radial = (1 + k1 * r2 + k2 * r4 + k3 * r6) / (1 + k4 * r2 + k5 * r4 + k6 * r6) - 1
        du = u * radial + 2 * p1 * uv + p2 * (r2 + 2 * u * u)
        dv = v * radial + 2 * p2 * uv + p1 * (r2 + 2 * v * v)
        return torch.stack([du, dv], -1)
    return torch.zeros_like(p)  # pinhole and undistorted fisheye


def _to_fisheye(p: Tensor) -> Tensor:  # normalised plane -> equidistant plane, [..., N, 2]
    r = p.norm(dim=-1, keepdim=True)
    scale = torch.where(r > 1e-12, torch.atan(r) / r.clamp_min(1e-12), torch.ones_like(r))
    return p * scale


def _from_fisheye(q: Tensor) -> Tensor:  # equidistant plane -> normalised plane, [..., N, 2]
    theta = q.norm(dim=-1, keepdim=True)
    scale = torch.where(theta > 1e-12, torch.tan(theta) / theta.clamp_min(1e-12), torch.ones_like(theta))
    return q * scale


def distort(
    model: str,
    params: Tensor,  # [..., e] the model's distortion parameters (COLMAP order)
    xy: Tensor,  # [..., N, 2] normalised pinhole coordinates (u/w, v/w)
) -> Tensor:  # [..., N, 2] distorted coordinates; pixels = K applied to them
    """Distorted image-plane coordinates (before the focal length and principal point)."""
    _check(model, params)
    k = params[..., None, :].to(xy.dtype)
    p = _to_fisheye(xy) if model in _FISHEYE else xy
    return p + _plane_offset(model, k, p)


def undistort(
    model: str,
    params: Tensor,  # [..., e]
    xy_distorted: Tensor,  # [..., N, 2] distorted coordinates (K^-1 applied to pixels)
    iterations: int = 20,
) -> Tensor:  # [..., N, 2] normalised pinhole coordinates
    """Inverse of :func:`distort` by Newton's method (float64 inside; numerical 2x2 Jacobian)."""
    _check(model, params)
    dtype = xy_distorted.dtype
    k = params[..., None, :].to(torch.float64)
    target = xy_distorted.to(torch.float64)
    p = target.clone()
    if _EXTRA[model] > 0:
        eps = 1e-7
        ex = torch.tensor([eps, 0.0], dtype=torch.float64, device=p.device)
        ey = torch.tensor([0.0, eps], dtype=torch.float64, device=p.device)
        for _ in range(iterations):
            f = p + _plane_offset(model, k, p) - target
            jx = (_plane_offset(model, k, p + ex) - _plane_offset(model, k, p - ex)) / (2 * eps)
            jy = (_plane_offset(model, k, p + ey) - _plane_offset(model, k, p - ey)) / (2 * eps)
            a, c = 1 + jx[..., 0], jx[..., 1]  # columns of J = I + d(offset)/dp
            b, d = jy[..., 0], 1 + jy[..., 1]
            det = a * d - b * c
            det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
            step = torch.stack([(d * f[..., 0] - b * f[..., 1]) / det, (-c * f[..., 0] + a * f[..., 1]) / det], -1)
            p = p - step
    if model in _FISHEYE:
        p = _from_fisheye(p)
    return p.to(dtype)


def _pixels_to_grid(px: Tensor, width: int, height: int) -> Tensor:  # [..., 2] pixels -> [-1, 1]
    scale = px.new_tensor([2.0 / width, 2.0 / height])
    return px * scale - 1.0


def undistortion_grid(
    K: Tensor,  # [..., 3, 3] intrinsics of the distorted image, pixels
    model: str,
    params: Tensor,  # [..., e] distortion parameters (COLMAP order)
    width: int,  # size of the distorted (source) image
    height: int,
    K_new: Tensor | None = None,  # [..., 3, 3] intrinsics of the output pinhole image (default: K)
    out_size: tuple[int, int] | None = None,  # (width, height) of the output (default: the input's)
) -> Tensor:  # [..., H_out, W_out, 2] sampling locations in [-1, 1] for grid_sample(align_corners=False)
    """Where each pixel centre of the undistorted pinhole image lies in the distorted image."""
    _check(model, params)
    ow, oh = out_size if out_size is not None else (width, height)
    K_new = K if K_new is None else K_new
    dtype = torch.float64
    ys = torch.arange(oh, dtype=dtype, device=K.device) + 0.5
    xs = torch.arange(ow, dtype=dtype, device=K.device) + 0.5
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pix = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(-1, 3)  # [HW, 3]
    ray = torch.einsum("...ij,nj->...ni", torch.linalg.inv(K_new.to(dtype)), pix)
    xy = ray[..., :2] / ray[..., 2:]
    xd = distort(model, params.to(dtype), xy)
    Kd = K.to(dtype)
    src = torch.einsum("...ij,...nj->...ni", Kd[..., :2, :2], xd) + Kd[..., None, :2, 2]
    grid = _pixels_to_grid(src, width, height)
    return grid.reshape(*grid.shape[:-2], oh, ow, 2).to(K.dtype if K.dtype.is_floating_point else torch.float32)


def undistort_image(
    image: Tensor,  # [..., C, H, W] distorted image
    K: Tensor,  # [..., 3, 3] its intrinsics (batch shape = image's leading shape, or broadcastable)
    model: str,
    params: Tensor,  # [..., e]
    K_new: Tensor | None = None,  # [..., 3, 3] output intrinsics (default: K)
    out_size: tuple[int, int] | None = None,  # (width, height), default: the input's
    mode: str = "bilinear",
) -> Tensor:  # [..., C, H_out, W_out]; pixels that fall outside the source are 0
    """Resample a distorted image into the pinhole image with intrinsics ``K_new``."""
    *lead, C, H, W = image.shape
    grid = undistortion_grid(K, model, params, W, H, K_new, out_size)
    oh, ow = grid.shape[-3], grid.shape[-2]
    grid = grid.expand(*lead, oh, ow, 2).reshape(-1, oh, ow, 2).to(image.dtype)
    out = F.grid_sample(image.reshape(-1, C, H, W), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.reshape(*lead, C, oh, ow)
