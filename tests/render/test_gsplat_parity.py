"""The PyTorch twin against gsplat's CUDA rasterizer (skips without CUDA and usable gsplat kernels),
and the gsplat adapter's argument/output layout on the CPU (gsplat.rasterization faked by the twin).

Tolerances (float32): images max |diff| <= 2e-3 for colours and alphas, depth max |diff| <= 2e-3 *
max depth; cosine similarity of every parameter's gradient >= 0.99. Differences come from float32
summation order, gsplat's fast ``__expf`` and Gaussians whose alpha lies within rounding of the 1/255
threshold at a pixel.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import optional, requires_cuda
from tests.render.helpers import cameras, random_scene
from vision3d.gaussians import Gaussians
from vision3d.render import rasterize
from vision3d.render.rasterize import gsplat_cuda_usable

FIELDS = ("means", "quats", "scales", "opacities", "sh")


def _scenes():
    yield "random", random_scene(3000, sh_degree=2, spread=0.8, scale=(0.005, 0.08), seed=1)
    # structured: a grid of flat, aligned, opaque splats (many exact ties and saturated pixels)
    xs = torch.linspace(-1.0, 1.0, 20)
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1), torch.full((400,), 3.0)], -1)
    means = torch.cat([means, means + torch.tensor([0.05, 0.05, 0.5])])
    n = means.shape[0]
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(n, 4).clone()
    scales = torch.tensor([[0.06, 0.06, 0.001]]).expand(n, 3).clone()
    rgb = torch.rand(n, 3)
    yield "grid", Gaussians.from_rgb(means, quats, scales, torch.full((n,), 0.95), rgb, sh_degree=1)


def _render_with_grads(g, cams, backend, rasterize_mode, weights):
    ps = [getattr(g, f).detach().clone().requires_grad_() for f in FIELDS]
    out = rasterize(
        Gaussians(*ps), cams, background=torch.tensor([0.1, 0.2, 0.3], device=ps[0].device), mode="RGB+ED",
        rasterize_mode=rasterize_mode, backend=backend, tile_size=16,
    )  # fmt: skip
    img = torch.cat([out.colors, out.alphas, out.depths], -3)
    (img * weights).sum().backward()
    return out, [p.grad for p in ps]


@requires_cuda
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
def test_torch_twin_matches_gsplat_cuda(rasterize_mode):
    if not gsplat_cuda_usable():
        pytest.skip("gsplat CUDA kernels not usable")
    dev = torch.device("cuda")
    for name, g in _scenes():
        g = g.to(dev)
        cams = cameras(2, width=96, height=80, f=90.0).to(dev)
        weights = torch.randn(2, 5, 80, 96, device=dev)
        ref, g_ref = _render_with_grads(g, cams, "gsplat", rasterize_mode, weights)
        got, g_got = _render_with_grads(g, cams, "torch", rasterize_mode, weights)
        assert torch.equal((ref.radii > 0).all(-1), (got.radii > 0).all(-1)), name
        vis = (ref.radii > 0).all(-1)
        torch.testing.assert_close(got.means2d[vis], ref.means2d[vis], atol=1e-3, rtol=1e-5)
        assert (got.colors - ref.colors).abs().max() <= 2e-3, name
        assert (got.alphas - ref.alphas).abs().max() <= 2e-3, name
        dmax = float(ref.depths.max())
        assert (got.depths - ref.depths).abs().max() <= 2e-3 * dmax, name
        for f, a, b in zip(FIELDS, g_got, g_ref):
            cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            assert cos >= 0.99, f"{name}/{f}: gradient cosine {float(cos):.4f}"


# ------------------------------------------------------------------ the adapter, on the CPU
def _fake_rasterization(calls):
    """Stands in for ``gsplat.rasterization`` with gsplat's documented layout, computed by the twin."""
    from vision3d.geometry import Cameras
    from vision3d.render.torch_backend import rasterize_torch

    def fake(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane, far_plane, radius_clip,
        eps2d, sh_degree, packed, tile_size, backgrounds, render_mode, rasterize_mode,
    ):  # fmt: skip
        calls.append(dict(packed=packed, sh_degree=sh_degree, render_mode=render_mode, tile_size=tile_size))
        assert colors.shape[-1] == 3 and colors.shape[:-2] == means.shape[:-1]  # [..., N, K, 3] SH
        assert backgrounds is None or backgrounds.shape == (*viewmats.shape[:-2], 3)  # [..., C, 3]
        c2w = torch.linalg.inv(viewmats)
        out = rasterize_torch(
            Gaussians(means, quats, scales, opacities, colors), Cameras(Ks, c2w, width, height), sh_degree=sh_degree,
            background=backgrounds, mode=render_mode, rasterize_mode=rasterize_mode, near_plane=near_plane,
            far_plane=far_plane, eps2d=eps2d, radius_clip=radius_clip,
        )  # fmt: skip
        chans = [t for t in (out.colors, out.depths) if t is not None]
        render = torch.cat(chans, -3).movedim(-3, -1)  # gsplat: [..., C, H, W, X]
        meta = {"radii": out.radii, "means2d": out.means2d, "depths": out.depths_gauss}
        return render, out.alphas.movedim(-3, -1), meta

    return fake


@pytest.mark.parametrize("mode", ["RGB", "D", "RGB+ED"])
def test_gsplat_adapter_layout(monkeypatch, mode):
    """Arguments reach gsplat in its layout and its outputs come back channels-first (no CUDA needed)."""
    gsplat = optional("gsplat")
    from vision3d.render.gsplat_backend import rasterize_gsplat
    from vision3d.render.torch_backend import rasterize_torch

    calls = []
    monkeypatch.setattr(gsplat, "rasterization", _fake_rasterization(calls))
    g = random_scene(30, sh_degree=2, dtype=torch.float64)
    cams = cameras(2, dtype=torch.float64)
    bg = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    kw = dict(sh_degree=1, background=bg, mode=mode, rasterize_mode="antialiased", near_plane=0.01, far_plane=1e10,
              eps2d=0.3, radius_clip=0.0)  # fmt: skip
    got = rasterize_gsplat(g, cams, tile_size=16, **kw)
    ref = rasterize_torch(g, cams, tile_size=4, **kw)
    assert calls == [dict(packed=False, sh_degree=1, render_mode=mode, tile_size=16)]
    for name in ("colors", "depths", "alphas"):
        a, b = getattr(got, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert got.radii.shape == (2, 30, 2) and got.means2d.shape == (2, 30, 2)
    empty = rasterize_gsplat(Gaussians.empty(sh_degree=2, dtype=torch.float64), cams, tile_size=16, **kw)
    assert (empty.alphas == 0).all() and len(calls) == 1
