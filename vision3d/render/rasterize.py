"""The one rasterisation entry point.

Source of the math: gsplat (nerfstudio-project/gsplat, v1.5.3, Apache-2.0), "gsplat: An Open-Source
Library for Gaussian Splatting" (arXiv 2409.06765), and 3D Gaussian Splatting (Kerbl et al. 2023).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras

from .types import RenderOutput

Mode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
Backend = Literal["auto", "gsplat", "torch"]


@functools.lru_cache(maxsize=None)
def gsplat_cuda_usable() -> bool:
    """True when CUDA is present and gsplat's CUDA kernels load (built or built on first use)."""
    if not torch.cuda.is_available():
        return False
    try:
        from gsplat.cuda._backend import _C  # noqa: F401  (triggers the JIT build if needed)
    except Exception:  # noqa: BLE001
        return False
    return _C is not None


def resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend == "auto":
        return "gsplat" if device.type == "cuda" and gsplat_cuda_usable() else "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise ValueError("rasterize(backend='gsplat') needs CUDA tensors; use backend='torch' on the CPU")
        if not gsplat_cuda_usable():
            raise RuntimeError(
                "gsplat's CUDA kernels are not usable here (run `vision3d doctor`); install with `pip install gsplat` "
                "on a machine with the CUDA toolkit, or use backend='torch'"
            )
        return "gsplat"
    if backend == "torch":
        return "torch"
    raise ValueError(f"rasterize: unknown backend {backend!r}; expected 'auto', 'gsplat' or 'torch'")


def rasterize(
    gaussians: Gaussians,  # batch shape [*B] (may be empty), N Gaussians
    cameras: Cameras,  # batch shape [*B, V] (or [V] with unbatched Gaussians); OpenCV cam_to_world
    *,
    sh_degree: int | None = None,  # None: every coefficient present; else use bands 0..sh_degree
    background: Tensor | None = None,  # [3] or [*B, V, 3] in [0, 1]; None = black
    mode: Mode = "RGB+ED",
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    near_plane: float | None = None,  # None: cameras.near or 0.01
    far_plane: float | None = None,  # None: cameras.far or 1e10
    eps2d: float = 0.3,  # low-pass dilation of 2D covariances, pixels^2 (gsplat's default)
    radius_clip: float = 0.0,  # skip Gaussians with a pixel radius <= this
    backend: Backend = "auto",
    tile_size: int | None = None,  # pixels per tile side; None: 16 for gsplat, 4 for the torch twin
) -> RenderOutput:
    """Render Gaussians into every camera.

    Same projection (EWA, pinhole), 0.3-px dilation, antialiased opacity compensation, per-axis
    opacity-aware extents (at most 3.33 sigma), alpha clamp 0.999 (gsplat 1.5.3), alpha threshold
    1/255 and transmittance cut-off 1e-4 in both backends, so they agree to the tolerance stated
    in ``tests/render/test_gsplat_parity.py``.

    ``tile_size`` changes only the work split, not the image (the twin's tiles are evaluated
    densely, so it defaults to small 4x4 tiles on the CPU; gsplat's CUDA kernel uses 16x16).

    Returns:
        :class:`RenderOutput` with channels-first images of shape ``[*B, V, C, H, W]``.
    """
    if mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"rasterize: mode {mode!r} is not one of RGB, D, ED, RGB+D, RGB+ED")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize: rasterize_mode {rasterize_mode!r} is not 'classic' or 'antialiased'")
    gb = tuple(gaussians.batch_shape)
    cb = tuple(cameras.batch_shape)
    if len(cb) != len(gb) + 1 or cb[: len(gb)] != gb:
        raise ValueError(
            f"rasterize: cameras batch {cb} must be the Gaussians' batch {gb} plus one view dimension"
        )
    deg = gaussians.sh_degree if sh_degree is None else int(sh_degree)
    if deg > gaussians.sh_degree or deg < 0:
        raise ValueError(f"rasterize: sh_degree={deg} but the Gaussians carry degree {gaussians.sh_degree}")
    near = near_plane if near_plane is not None else (cameras.near if cameras.near is not None else 0.01)
    far = far_plane if far_plane is not None else (cameras.far if cameras.far is not None else 1e10)
    cameras = cameras.to(device=gaussians.device, dtype=gaussians.dtype)
    which = resolve_backend(backend, gaussians.device)
    if tile_size is None:
        tile_size = 16 if which == "gsplat" else 4
    kwargs = dict(
        sh_degree=deg,
        background=background,
        mode=mode,
        rasterize_mode=rasterize_mode,
        near_plane=float(near),
        far_plane=float(far),
        eps2d=float(eps2d),
        radius_clip=float(radius_clip),
        tile_size=int(tile_size),
    )
    if which == "gsplat":
        from .gsplat_backend import rasterize_gsplat

        return rasterize_gsplat(gaussians, cameras, **kwargs)
    from .torch_backend import rasterize_torch

    return rasterize_torch(gaussians, cameras, **kwargs)
