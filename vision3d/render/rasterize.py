"""The one rasterisation entry point.

Source of the math: gsplat (nerfstudio-project/gsplat, v1.5.3, Apache-2.0), "gsplat: An Open-Source
Library for Gaussian Splatting" (arXiv 2409.06765), and 3D Gaussian Splatting (Kerbl et al. 2023).
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal

import torch
from torch import Tensor

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras

from .types import RenderOutput

Mode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]
Backend = Literal["auto", "gsplat", "torch"]


class GsplatFallbackWarning(RuntimeWarning):
    """CUDA tensors are rendered by the CPU-style torch twin because gsplat's kernels did not load."""


@functools.lru_cache(maxsize=None)
def gsplat_cuda_error() -> str | None:
    """``None`` when CUDA is present and gsplat's CUDA kernels load (built, or built on first use); else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        from gsplat.cuda._backend import _C  # noqa: F401  (triggers the JIT build if needed)
    except Exception as e:  # noqa: BLE001 - a failed build or a missing toolkit can raise anything
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    if _C is None:
        return "gsplat.cuda._backend._C is None (the CUDA extension did not build; see gsplat's build log)"
    return None


def gsplat_cuda_usable() -> bool:
    """True when CUDA is present and gsplat's CUDA kernels load (built or built on first use)."""
    return gsplat_cuda_error() is None


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason: str) -> None:  # once per process and reason
    warnings.warn(
        f"rasterize(backend='auto'): gsplat's CUDA kernels are not usable ({reason}); rendering CUDA tensors with the "
        "pure-PyTorch twin, which is far slower (~100x). Run `vision3d doctor`, or pass backend='torch' to silence this.",
        GsplatFallbackWarning,
        stacklevel=4,
    )


def resolve_backend(backend: Backend, device: torch.device) -> str:
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        reason = gsplat_cuda_error()
        if reason is None:
            return "gsplat"
        _warn_fallback(reason)  # loud: never a silent 100x slowdown on a GPU machine
        return "torch"
    if backend == "gsplat":
        if device.type != "cuda":
            raise ValueError("rasterize(backend='gsplat') needs CUDA tensors; use backend='torch' on the CPU")
        reason = gsplat_cuda_error()
        if reason is not None:
            raise RuntimeError(
                f"rasterize(backend='gsplat'): gsplat's CUDA kernels are not usable here ({reason}); run `vision3d doctor`, "
                "install with `pip install gsplat` on a machine with the CUDA toolkit, or use backend='torch'"
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
    max_bytes: int | None = None,  # refuse a render planned above this many bytes; None: half the free memory
) -> RenderOutput:
    """Render Gaussians into every camera.

    Same projection (EWA, pinhole), 0.3-px dilation, antialiased opacity compensation, per-axis
    opacity-aware extents (at most 3.33 sigma), alpha clamp 0.999 (gsplat 1.5.3), alpha threshold
    1/255 and transmittance cut-off 1e-4 in both backends, so they agree to the tolerance stated
    in ``tests/render/test_gsplat_parity.py``.

    ``tile_size`` changes only the work split, not the image (the twin's tiles are evaluated
    densely, so it defaults to small 4x4 tiles on the CPU; gsplat's CUDA kernel uses 16x16).

    Memory is sized before anything is allocated (images, per-Gaussian tensors and, in the twin,
    the tile lists); a render that would exceed ``max_bytes`` raises
    :class:`~vision3d.errors.ResourceLimitError` with the numbers. With ``backend="auto"`` on CUDA
    tensors, a gsplat that fails to load is reported by a :class:`GsplatFallbackWarning` naming the
    error before the (much slower) twin runs; ``backend="gsplat"`` raises instead.

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
    from .torch_backend import check_render_size, rasterize_torch

    if which == "gsplat":
        from .gsplat_backend import rasterize_gsplat

        channels = (3 if "RGB" in mode else 0) + (1 if "D" in mode else 0)
        check_render_size(cameras.batch_shape.numel(), gaussians.num, cameras.width, cameras.height, channels, max_bytes, gaussians.device)
        return rasterize_gsplat(gaussians, cameras, **kwargs)
    return rasterize_torch(gaussians, cameras, max_bytes=max_bytes, **kwargs)
