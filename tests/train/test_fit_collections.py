"""Scene fitting on photo collections: per-photo sizes, appearance embeddings, pose refinement (CPU, tiny)."""

from __future__ import annotations

import pytest
import torch

from vision3d.gaussians.procedural import collection_cameras, collection_exposures, procedural_scene
from vision3d.render import rasterize
from vision3d.train.scene_fit import FitState, SceneFitConfig, fit_scene, fit_view_appearance


@pytest.fixture(scope="module")
def collection():
    """12 photos of 3 sizes and 3 zooms, each with its own exposure and white balance."""
    scene = procedural_scene(seed=3, density=0.35)
    cams = collection_cameras(12, scene.target, arc_deg=150, sizes=((40, 30), (30, 40), (36, 27)))
    gain, off = collection_exposures(12, strength=0.4, seed=1)
    imgs = []
    with torch.no_grad():
        for i, c in enumerate(cams):
            im = rasterize(scene.gaussians, c, mode="RGB", backend="torch").colors[0].clamp(0, 1)
            imgs.append((gain[i][:, None, None] * im + off[i][:, None, None]).clamp(0, 1))
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(scene.gaussians.num, generator=g)[:400]
    from vision3d.train.scene_fit import gaussians_from_points

    init = gaussians_from_points(scene.gaussians.means[idx], torch.full((400, 3), 0.5), opacity=0.5)
    return imgs, cams, init


def _cfg(**kw):
    return SceneFitConfig(steps=150, ssim_weight=0.0, log_every=50, progress=False, backend="torch", lr_sh0=1e-2, **kw)


def _half_psnr(pred, gt):  # right halves, [3, H, W]
    w = gt.shape[-1] // 2
    mse = (pred[..., w:].clamp(0, 1) - gt[..., w:]).pow(2).mean()
    return float(-10 * torch.log10(mse))


@pytest.mark.slow
def test_mixed_sizes_and_appearance_beat_the_plain_fit(collection):
    imgs, cams, init = collection
    test = [0, 6]
    train = [i for i in range(12) if i not in test]
    ti, tc = [imgs[i] for i in train], [cams[i] for i in train]
    plain = fit_scene(init, ti, tc, _cfg())
    app = fit_scene(init, ti, tc, _cfg(appearance=True, lr_appearance=5e-3))
    assert app.appearance is not None and plain.appearance is None
    scores = {"plain": [], "app": []}
    for i in test:
        with torch.no_grad():
            rp = rasterize(plain.gaussians, cams[i], mode="RGB", backend="torch").colors[0]
            ra = rasterize(app.gaussians, cams[i], mode="RGB", backend="torch").colors[0]
        w = imgs[i].shape[-1] // 2
        mask = torch.zeros(imgs[i].shape[-2:], dtype=torch.bool)
        mask[:, :w] = True  # fit the code on the left half, score the right half
        code = fit_view_appearance(app.appearance, ra, imgs[i], mask, steps=100)
        with torch.no_grad():
            ra = app.appearance.apply(ra[None], code[None])[0]
        scores["plain"].append(_half_psnr(rp, imgs[i]))
        scores["app"].append(_half_psnr(ra, imgs[i]))
    gain = sum(scores["app"]) / 2 - sum(scores["plain"]) / 2
    assert gain > 1.0, scores


def test_batch_views_needs_one_size_and_resume_keeps_modules(collection):
    imgs, cams, init = collection
    with pytest.raises(ValueError, match="batch_views=2 needs one image size"):
        fit_scene(init, imgs, cams, replace_cfg(_cfg(), batch_views=2))
    saved = []
    cfg = replace_cfg(_cfg(appearance=True, pose_opt=True), steps=6)
    full = fit_scene(init, imgs, cams, cfg)
    fit_scene(init, imgs, cams, cfg, checkpoint=saved.append, checkpoint_every=3)
    state = FitState.from_state_dict(saved[0].state_dict())
    assert state.step == 3 and set(state.modules) == {"appearance", "pose"}
    cont = fit_scene(state, imgs, cams, cfg)
    torch.testing.assert_close(cont.gaussians.means, full.gaussians.means, atol=0, rtol=0)
    torch.testing.assert_close(cont.appearance.embeds, full.appearance.embeds, atol=0, rtol=0)
    assert len(cont.cameras) == 12 and (cont.cameras[1].width, cont.cameras[1].height) == (30, 40)


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)
