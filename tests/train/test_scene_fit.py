"""vision3d.train.scene_fit: raw-parameter round trip, point initialisation, the fitting loop."""

from __future__ import annotations

import math

import pytest
import torch

from vision3d.gaussians.procedural import hemisphere_cameras, procedural_scene
from vision3d.render import rasterize
from vision3d.train.scene_fit import (
    SceneFitConfig,
    camera_scene_scale,
    fit_scene,
    gaussians_from_params,
    gaussians_from_points,
    params_from_gaussians,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_problem():
    scene = procedural_scene(seed=1, density=0.08)
    cams = hemisphere_cameras(6, scene.target, 2.4, width=20, height=16, fov_deg=60)
    with torch.no_grad():
        images = rasterize(scene.gaussians, cams, mode="RGB", backend="torch").colors.clamp(0, 1)
    return scene, cams, images


def test_params_round_trip():
    g = procedural_scene(seed=0, density=0.1).gaussians.with_sh_degree(1)
    g.sh[:, 1:] = torch.randn_like(g.sh[:, 1:]) * 0.1
    p = params_from_gaussians(g)
    assert p["sh0"].shape == (g.num, 1, 3) and p["shN"].shape == (g.num, 3, 3)
    back = gaussians_from_params(p)
    for k, v in g.tensors().items():
        assert torch.allclose(back.tensors()[k], v, atol=1e-5, rtol=1e-5), k
    assert gaussians_from_params(p, active_sh_degree=0).sh.shape == (g.num, 1, 3)
    with pytest.raises(ValueError, match="unbatched"):
        params_from_gaussians(g.map(lambda t: t[None]))


def test_points_init_scales_are_neighbour_distances():
    xs = torch.arange(5, dtype=torch.float32) * 0.1
    pts = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    pts = torch.cat([pts, torch.zeros(25, 1)], -1)
    g = gaussians_from_points(pts, torch.rand(25, 3), opacity=0.3, chunk=7)
    corner = torch.tensor([0, 4, 20, 24])
    want = torch.full((25,), 0.1)
    want[corner] = math.sqrt((0.01 + 0.01 + 0.02) / 3)  # two neighbours at 0.1, the third on the diagonal
    assert torch.allclose(g.scales, want[:, None].expand(25, 3), atol=1e-6)
    assert torch.allclose(g.opacities, torch.full((25,), 0.3))
    with pytest.raises(ValueError, match="rgb"):
        gaussians_from_points(pts, torch.rand(24, 3))


def test_fit_improves_and_decays_the_position_rate(tiny_problem):
    scene, cams, images = tiny_problem
    gen = torch.Generator().manual_seed(0)
    lo, hi = scene.bounds_min.clone(), scene.bounds_max.clone()
    hi[2] = max(float(hi[2]), 0.3)
    pts = lo + (hi - lo) * torch.rand(300, 3, generator=gen)  # random points in the scene bounds
    init = gaussians_from_points(pts, torch.full((300, 3), 0.5), opacity=0.3, scale_factor=0.5)
    cfg = SceneFitConfig(steps=20, batch_views=3, lr_sh0=3e-2, lr_means=1e-3, ssim_weight=0.2, log_every=5, progress=False)
    res = fit_scene(init, images, cams, cfg)
    assert res.gaussians.num == 300 and res.steps == 20
    res.gaussians.validate("fitted")
    with torch.no_grad():
        before = rasterize(init, cams, mode="RGB", backend="torch").colors
        after = rasterize(res.gaussians, cams, mode="RGB", backend="torch").colors
    mse = lambda a: float((a.clamp(0, 1) - images).pow(2).mean())  # noqa: E731
    assert 10 * math.log10(mse(before) / mse(after)) > 2.0  # at least 2 dB better
    assert res.history[-1]["step"] == 20
    want = cfg.lr_means * camera_scene_scale(cams) * cfg.lr_means_final_factor
    assert res.history[-1]["lr_means"] == pytest.approx(want, rel=1e-4)
    assert torch.equal(init.means, pts)  # init left untouched


def test_default_densification_runs_on_the_cpu(tiny_problem):
    scene, cams, images = tiny_problem
    init = scene.gaussians.select(torch.arange(0, scene.gaussians.num, 8))
    cfg = SceneFitConfig(
        steps=4, densify="default", refine_start=1, refine_every=2, grow_grad2d=1e-12, progress=False, log_every=1
    )
    res = fit_scene(init, images, cams, cfg)
    assert res.gaussians.num > init.num  # clone/split happened with a zero gradient threshold
    assert res.history[-1]["num_gaussians"] == res.gaussians.num


def test_fit_input_errors(tiny_problem):
    scene, cams, images = tiny_problem
    g = scene.gaussians
    with pytest.raises(ValueError, match=r"\[V, 3, H, W\]"):
        fit_scene(g, images[:, :2], cams, SceneFitConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="cameras batch"):
        fit_scene(g, images, cams[:3], SceneFitConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="W x H"):
        fit_scene(g, images, cams.resize(12, 10), SceneFitConfig(steps=1, progress=False))
    with pytest.raises(ValueError, match="mcmc"):
        fit_scene(g, images, cams, SceneFitConfig(steps=1, densify="mcmc", progress=False))
    with pytest.raises(ValueError, match="sh_degree"):
        fit_scene(g, images, cams, SceneFitConfig(steps=1, sh_degree=4, progress=False))
