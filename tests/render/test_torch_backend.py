"""The PyTorch twin of gsplat's rasterizer: projection and SH against gsplat's own PyTorch helpers,
compositing and gradients against an independent brute-force renderer, gradcheck, tiling
invariance, batching, culling, memory bound."""

from __future__ import annotations

import resource

import pytest
import torch

from tests.render.helpers import brute_force, cameras, random_scene
from tests.conftest import optional
from vision3d.gaussians import Gaussians
from vision3d.gaussians.sh import eval_sh
from vision3d.geometry import Cameras
from vision3d.render import rasterize
from vision3d.render.torch_backend import covariances_3d, project_gaussians, rasterize_torch

gsplat_impl = optional("gsplat.cuda._torch_impl")

F64 = torch.float64


def _render(g, cams, **kw):
    kw.setdefault("sh_degree", g.sh_degree)
    return rasterize(g, cams, backend="torch", **kw)


# ------------------------------------------------------------------ projection and SH vs gsplat
@pytest.mark.parametrize("antialiased", [False, True])
def test_projection_matches_gsplat_torch_impl(antialiased):
    g = random_scene(200, dtype=F64, spread=1.5)
    cams = cameras(3, width=40, height=30, dtype=F64)
    covars, _ = gsplat_impl._quat_scale_to_covar_preci(g.quats, g.scales, True, False, triu=False)
    torch.testing.assert_close(covariances_3d(g.quats, g.scales), covars)
    radii_ref, m_ref, d_ref, con_ref, comp_ref = gsplat_impl._fully_fused_projection(
        g.means, covars, cams.world_to_cam, cams.K, 40, 30, eps2d=0.3, calc_compensations=True
    )
    p = project_gaussians(
        g.means[None], covars[None], g.opacities[None], cams.world_to_cam[None], cams.K[None], 40, 30,
        antialiased=antialiased,
    )  # fmt: skip
    vis = p["radii"][0].gt(0).all(-1)
    assert vis.sum() > 50
    torch.testing.assert_close(p["means2d"][0][vis], m_ref[vis])
    torch.testing.assert_close(p["conics"][0][vis], con_ref[vis])
    torch.testing.assert_close(p["depths"][0], d_ref)
    torch.testing.assert_close(p["compensations"][0][vis], comp_ref[vis])
    o = g.opacities[None].expand_as(d_ref) * (comp_ref if antialiased else 1.0)
    torch.testing.assert_close(p["opacities"][0][vis], o[vis])
    # radii: gsplat 1.5.3's CUDA rule (opacity-aware extent) is never larger than the 3.33-sigma one
    assert (p["radii"][0][vis] <= radii_ref[vis]).all()
    cov2d = p["covars2d"][0]
    ext = torch.sqrt(2 * torch.log(p["opacities"][0] * 255)).clamp(max=3.33)
    expect = torch.ceil(ext[..., None] * torch.sqrt(torch.diagonal(cov2d, dim1=-2, dim2=-1)))
    assert torch.equal(p["radii"][0][vis].double(), expect[vis])


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_sh_matches_gsplat(degree):
    dirs = torch.randn(50, 3, dtype=F64)
    sh = torch.randn(50, 16, 3, dtype=F64)
    ref = gsplat_impl._spherical_harmonics(degree, dirs, sh)
    torch.testing.assert_close(eval_sh(degree, sh, dirs), ref)


# ------------------------------------------------------------------ values vs brute force
@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_values_match_brute_force(rasterize_mode, dtype):
    g = random_scene(40, sh_degree=2, dtype=dtype, scale=(0.05, 0.2))
    cams = cameras(2, dtype=dtype)
    bg = torch.tensor([0.2, 0.5, 0.9], dtype=dtype)
    aa = rasterize_mode == "antialiased"
    col, alp, dep = brute_force(g, cams, sh_degree=2, background=bg, antialiased=aa)
    assert alp.max() > 0.8 and alp.min() < 0.1  # a scene with both empty and dense pixels
    tol = 1e-12 if dtype == F64 else 2e-5
    out = _render(g, cams, background=bg, mode="RGB+D", rasterize_mode=rasterize_mode, tile_size=8)
    assert out.colors.shape == (2, 3, 20, 24) and out.alphas.shape == (2, 1, 20, 24)
    torch.testing.assert_close(out.colors, col, atol=tol, rtol=0)
    torch.testing.assert_close(out.alphas, alp, atol=tol, rtol=0)
    torch.testing.assert_close(out.depths, dep, atol=tol * 10, rtol=0)
    ed = _render(g, cams, background=bg, mode="ED", rasterize_mode=rasterize_mode, tile_size=8)
    assert ed.colors is None
    torch.testing.assert_close(ed.depths, dep / alp.clamp(min=1e-10), atol=tol * 1e3, rtol=tol * 10)


def test_saturation_rule_excludes_the_last_gaussian():
    """Two opaque Gaussians at one pixel: the second would bring T to 1e-6 and must be dropped."""
    dt = F64
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 3.0]], dtype=dt)
    q = torch.tensor([[1.0, 0, 0, 0]] * 2, dtype=dt)
    s = torch.full((2, 3), 0.3, dtype=dt)
    o = torch.tensor([1.0, 1.0], dtype=dt)
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=dt)
    g = Gaussians.from_rgb(means, q, s, o, rgb)
    K = torch.tensor([[20.0, 0, 3.5], [0, 20.0, 3.5], [0, 0, 1]], dtype=dt)  # centres on pixel (3, 3)
    cams = Cameras(K[None], torch.eye(4, dtype=dt)[None], 8, 8)
    out = _render(g, cams, mode="RGB")
    # centre pixels: alpha_1 ~ 0.999 -> T = 1e-3; the second (alpha 0.999) would give 1e-6 <= 1e-4
    c = out.colors[0, :, 3, 3]
    assert c[1] == 0.0 and abs(float(c[0]) - 0.999) < 1e-12 and abs(float(out.alphas[0, 0, 3, 3]) - 0.999) < 1e-12
    col, alp, _ = brute_force(g, cams, sh_degree=0)
    torch.testing.assert_close(out.colors, col, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.alphas, alp, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ gradients
def _loss_grads(g, render, weights):
    ps = [t.clone().requires_grad_() for t in (g.means, g.quats, g.scales, g.opacities, g.sh)]
    col, alp, dep = render(Gaussians(*ps))
    (torch.cat([col, alp, dep], 1) * weights).sum().backward()
    return [p.grad for p in ps]


@pytest.mark.parametrize("rasterize_mode", ["classic", "antialiased"])
@pytest.mark.parametrize(
    "chunk_elems,cache_bytes",
    [(1 << 22, 1 << 29), (2000, 1 << 29), (2000, 0)],  # 2000: lists walked in segments; 0: backward recomputes
)
def test_gradients_match_brute_force(rasterize_mode, chunk_elems, cache_bytes):
    g = random_scene(40, sh_degree=1, dtype=F64)
    cams = cameras(2, dtype=F64)
    bg = torch.tensor([0.3, 0.6, 0.1], dtype=F64)
    aa = rasterize_mode == "antialiased"
    w = torch.randn(2, 5, 20, 24, dtype=F64)

    def twin(gg):
        o = rasterize_torch(
            gg, cams, sh_degree=1, background=bg, mode="RGB+D", rasterize_mode=rasterize_mode, tile_size=8,
            chunk_elems=chunk_elems, cache_bytes=cache_bytes,
        )  # fmt: skip
        assert o.info["cached"] == (cache_bytes > 0)
        return o.colors, o.alphas, o.depths

    ref = _loss_grads(g, lambda gg: brute_force(gg, cams, sh_degree=1, background=bg, antialiased=aa), w)
    got = _loss_grads(g, twin, w)
    for name, a, b in zip(("means", "quats", "scales", "opacities", "sh"), got, ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


def test_gradcheck_tiny():
    g = random_scene(4, sh_degree=1, dtype=F64, spread=0.3, scale=(0.08, 0.2))
    cams = cameras(1, width=10, height=8, dtype=F64, f=10.0)
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=F64)

    def f(means, quats, scales, opac, sh):
        o = rasterize_torch(
            Gaussians(means, quats, scales, opac, sh), cams, sh_degree=1, background=bg, mode="RGB+D", tile_size=4
        )
        return o.colors, o.alphas, o.depths

    inputs = tuple(t.clone().requires_grad_() for t in (g.means, g.quats, g.scales, g.opacities, g.sh))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_means2d_gradient_for_densification():
    g = random_scene(30)
    cams = cameras(2)
    for t in (g.means, g.sh):
        t.requires_grad_()
    out = _render(g, cams, mode="RGB", tile_size=8)
    out.means2d.retain_grad()
    out.colors.sum().backward()
    vis = (out.radii > 0).all(-1)
    assert out.means2d.grad.shape == (2, 30, 2)
    assert out.means2d.grad[vis].abs().sum() > 0
    assert (out.means2d.grad[~vis] == 0).all()


# ------------------------------------------------------------------ structure
def test_tiling_invariance():
    g = random_scene(80, dtype=F64)
    cams = cameras(2, width=33, height=21, dtype=F64)
    outs = [_render(g, cams, mode="RGB+D", tile_size=ts) for ts in (2, 8, 16, 33)]
    for o in outs[1:]:
        torch.testing.assert_close(o.colors, outs[0].colors, atol=1e-11, rtol=0)
        torch.testing.assert_close(o.alphas, outs[0].alphas, atol=1e-11, rtol=0)
        torch.testing.assert_close(o.depths, outs[0].depths, atol=1e-10, rtol=0)
    # a tiny chunk budget (many groups and segments) changes nothing either
    small = rasterize_torch(g, cams, sh_degree=1, mode="RGB+D", tile_size=8, chunk_elems=3000)
    torch.testing.assert_close(small.colors, outs[1].colors, atol=1e-11, rtol=0)
    torch.testing.assert_close(small.alphas, outs[1].alphas, atol=1e-11, rtol=0)


def test_batch_shapes_match_per_item_renders():
    gs = [random_scene(25, seed=s) for s in range(3)]
    batched = Gaussians(*[torch.stack([getattr(g, f) for g in gs]) for f in ("means", "quats", "scales", "opacities", "sh")])
    cams = cameras(2)
    bcams = Cameras(cams.K.expand(3, 2, 3, 3), cams.cam_to_world.expand(3, 2, 4, 4), cams.width, cams.height)
    bg = torch.rand(3, 2, 3)
    out = _render(batched, bcams, background=bg, mode="RGB+ED")
    assert out.colors.shape == (3, 2, 3, 20, 24)
    assert out.depths.shape == (3, 2, 1, 20, 24) and out.alphas.shape == (3, 2, 1, 20, 24)
    assert out.means2d.shape == (3, 2, 25, 2) and out.radii.shape == (3, 2, 25, 2)
    assert out.depths_gauss.shape == (3, 2, 25)
    for b in range(3):
        one = _render(gs[b], cams, background=bg[b], mode="RGB+ED")
        torch.testing.assert_close(out.colors[b], one.colors)
        torch.testing.assert_close(out.depths[b], one.depths)
    # two batch dimensions
    g2 = batched.map(lambda t: t[None])
    c2 = Cameras(bcams.K[None], bcams.cam_to_world[None], 24, 20)
    assert _render(g2, c2, mode="RGB").colors.shape == (1, 3, 2, 3, 20, 24)


def test_empty_scene_and_background():
    cams = cameras(2)
    bg = torch.tensor([0.25, 0.5, 0.75])
    out = _render(Gaussians.empty(sh_degree=1), cams, background=bg, mode="RGB+ED")
    assert out.colors.shape == (2, 3, 20, 24)
    torch.testing.assert_close(out.colors, bg[:, None, None].expand(2, 3, 20, 24))
    assert (out.alphas == 0).all() and (out.depths == 0).all()


def test_behind_camera_and_near_far_culling():
    g = random_scene(30)
    behind = g.map(lambda t: t.clone())
    behind.means[:, 2] = -behind.means[:, 2]  # every centre behind the camera
    cams = cameras(1)
    out = _render(behind, cams, mode="RGB+D")
    assert (out.radii == 0).all() and (out.alphas == 0).all()
    assert torch.isfinite(out.means2d).all()
    full = _render(g, cams, mode="RGB+D")
    z = full.depths_gauss[0]
    near, far = float(z.quantile(0.3)), float(z.quantile(0.7))
    cut = _render(g, cams, mode="RGB+D", near_plane=near, far_plane=far)
    kept = (z >= near) & (z <= far)
    assert ((cut.radii[0] > 0).all(-1) <= kept).all()
    ref = _render(g.select(kept), cams, mode="RGB+D")
    torch.testing.assert_close(cut.colors, ref.colors)
    # gradients stay finite with Gaussians behind the camera in the scene
    mixed = Gaussians.cat([g, behind]).map(lambda t: t.detach().requires_grad_())
    o = _render(mixed, cams, mode="RGB+D")
    (o.colors.sum() + o.depths.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in mixed.tensors().values())


def test_bad_inputs():
    g = random_scene(5)
    with pytest.raises(ValueError, match="background"):
        _render(g, cameras(1), background=torch.ones(4))
    with pytest.raises(ValueError, match="tile_size"):
        _render(g, cameras(1), tile_size=0)
    with pytest.raises(ValueError, match="batch"):
        _render(g, cameras(1)[0])


# ------------------------------------------------------------------ memory bound
@pytest.fixture
def one_thread():
    """Large dense ops run faster on one thread when the CI machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_memory_bounded_256px_100k(one_thread):
    torch.manual_seed(0)
    n = 100_000
    means = torch.randn(n, 3) * 0.8 + torch.tensor([0.0, 0.0, 3.0])
    g = Gaussians.from_rgb(means, torch.randn(n, 4), torch.rand(n, 3) * 0.004 + 0.001, torch.rand(n) * 0.5 + 0.1, torch.rand(n, 3))
    g = g.map(lambda t: t.requires_grad_())
    K = torch.tensor([[240.0, 0, 128], [0, 240.0, 128], [0, 0, 1]])
    cams = Cameras(K[None], torch.eye(4)[None], 256, 256)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = _render(g, cams, mode="RGB", tile_size=4)
    out.colors.mean().backward()
    grown_gb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert out.info["n_isects"] > 100_000
    assert torch.isfinite(g.means.grad).all() and g.means.grad.abs().sum() > 0
    assert grown_gb < 1.5, f"peak RSS grew by {grown_gb:.2f} GB"


@pytest.mark.parametrize("cache_bytes", [1 << 29, 0])
def test_early_stop_when_every_pixel_is_done(cache_bytes):
    """Two huge opaque Gaussians in front saturate every pixel: the walk stops early, forward and backward."""
    g = random_scene(20, sh_degree=1, dtype=F64)
    front = Gaussians(
        torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.2]], dtype=F64),
        torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2, dtype=F64),
        torch.full((2, 3), 5.0, dtype=F64),
        torch.tensor([1.0, 1.0], dtype=F64),
        torch.randn(2, 4, 3, dtype=F64),
    )
    scene = Gaussians.cat([g, front])
    cams = cameras(1, dtype=F64)
    w = torch.randn(1, 5, 20, 24, dtype=F64)

    def twin(gg):
        o = rasterize_torch(gg, cams, sh_degree=1, mode="RGB+D", tile_size=4, chunk_elems=64, cache_bytes=cache_bytes)
        return o.colors, o.alphas, o.depths

    col, alp, dep = twin(scene)
    assert (alp > 0.99).all()
    rc, ra, rd = brute_force(scene, cams, sh_degree=1)
    torch.testing.assert_close(col, rc, atol=1e-12, rtol=0)
    torch.testing.assert_close(alp, ra, atol=1e-12, rtol=0)
    torch.testing.assert_close(dep, rd, atol=1e-11, rtol=0)
    ref = _loss_grads(scene, lambda gg: brute_force(gg, cams, sh_degree=1), w)
    got = _loss_grads(scene, twin, w)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
