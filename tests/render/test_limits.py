"""Render limits checked before allocating, and a loud gsplat fallback."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from vision3d.errors import ResourceLimitError
from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras
from vision3d.render import rasterize
from vision3d.render.torch_backend import estimate_render_bytes

rz = importlib.import_module("vision3d.render.rasterize")  # the module (the package exports the function)


def _scene(n=4, scale=0.05):
    g = torch.Generator().manual_seed(0)
    return Gaussians.from_rgb(
        means=torch.randn(n, 3, generator=g) * 0.2 + torch.tensor([0.0, 0.0, 3.0]),
        quats=torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1),
        scales=torch.full((n, 3), scale),
        opacities=torch.full((n,), 0.8),
        rgb=torch.rand(n, 3, generator=g),
    )


def _cams(w, h, f=None):
    f = f or 0.8 * w
    K = torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1.0]])
    return Cameras(K[None], torch.eye(4)[None], w, h)


def test_huge_image_is_refused_before_allocating():
    # a 20000^2 render: about 31 GiB of images; refused against an 8 GiB budget with the numbers
    with pytest.raises(ResourceLimitError, match=r"1 image\(s\) of 20000x20000 with 4 Gaussians: about \d+ MiB"):
        rasterize(_scene(), _cams(20000, 20000), backend="torch", max_bytes=8 << 30)
    assert estimate_render_bytes(1, 4, 20000, 20000, 4) > 8 << 30


def test_many_gaussians_are_refused_with_the_count():
    need = estimate_render_bytes(1, 5_000_000, 64, 64, 4)
    assert need > 4 << 30  # the per-Gaussian tensors, not the 64^2 image, dominate
    with pytest.raises(ResourceLimitError, match=r"with 200 Gaussians"):
        rasterize(_scene(200), _cams(64, 64), backend="torch", max_bytes=estimate_render_bytes(1, 199, 64, 64, 4))


def test_screen_filling_gaussians_are_refused_by_intersection_count():
    g = _scene(50, scale=2.0)  # each covers the whole image
    cams = _cams(256, 256)
    ok = rasterize(g, cams, backend="torch", mode="RGB")  # fits the default budget
    assert ok.info["n_isects"] == 50 * 64 * 64
    budget = estimate_render_bytes(1, 50, 256, 256, 3) + 1  # passes the size check, not the tile-list check
    with pytest.raises(ResourceLimitError, match=r"render work: expected at most \d+ Gaussian-tile intersections.*about 204800 intersections"):
        rasterize(g, cams, backend="torch", mode="RGB", max_bytes=budget)


def test_gsplat_fallback_is_loud_and_explicit_gsplat_raises(monkeypatch):
    rz.gsplat_cuda_error.cache_clear()
    rz._warn_fallback.cache_clear()
    monkeypatch.setattr(rz, "gsplat_cuda_error", lambda: "ImportError: libcudart.so.12: cannot open shared object file")
    cuda = torch.device("cuda")
    with pytest.warns(rz.GsplatFallbackWarning, match="libcudart.so.12.*pure-PyTorch twin"):
        assert rz.resolve_backend("auto", cuda) == "torch"
    with pytest.raises(RuntimeError, match=r"backend='gsplat'.*libcudart\.so\.12"):
        rz.resolve_backend("gsplat", cuda)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rz.resolve_backend("auto", torch.device("cpu")) == "torch"  # the CPU path is silent
    rz._warn_fallback.cache_clear()
