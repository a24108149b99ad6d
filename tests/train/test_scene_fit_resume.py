"""Exact resumption of per-scene fitting: ``fit_scene`` stopped after step k and continued from its
``FitState``, and ``vision3d reconstruct`` interrupted then run with ``--resume``, end bit-identical
to uninterrupted runs (CPU, gsplat's DefaultStrategy densifying before and after the stop, an SH band
switched on after it)."""

from __future__ import annotations

import io
import os
import signal
from dataclasses import replace

import pytest
import torch

from vision3d.gaussians.procedural import hemisphere_cameras, procedural_scene
from vision3d.render import rasterize
from vision3d.train.scene_fit import FitState, SceneFitConfig, fit_scene

STOP = 5  # refinements at steps 3 (before the stop), 6 and 9 (after); SH band 1 from step 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    scene = procedural_scene(seed=1, density=0.08)
    cams = hemisphere_cameras(5, scene.target, 2.4, width=20, height=16, fov_deg=60)
    with torch.no_grad():
        images = rasterize(scene.gaussians, cams, mode="RGB", backend="torch").colors.clamp(0, 1)
    init = scene.gaussians.select(torch.arange(0, scene.gaussians.num, 6))
    cfg = SceneFitConfig(
        steps=11, batch_views=2, densify="default", refine_start=2, refine_every=3, grow_grad2d=1e-2,
        sh_degree=1, sh_degree_interval=6, ssim_weight=0.2, lr_means=1e-3, log_every=2, progress=False,
        backend="torch",
    )
    return init, images, cams, cfg


def _round_trip(state: FitState) -> FitState:
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    return FitState.from_state_dict(torch.load(buf, weights_only=True))


def _assert_same(a, b) -> None:
    ta, tb = a.gaussians.tensors(), b.gaussians.tensors()
    for k in ta:
        assert ta[k].shape == tb[k].shape, (k, ta[k].shape, tb[k].shape)
        assert torch.equal(ta[k], tb[k]), f"{k}: max |diff| {float((ta[k] - tb[k]).abs().max())}"
    assert [(h["step"], h["loss"], h["num_gaussians"]) for h in a.history] == [
        (h["step"], h["loss"], h["num_gaussians"]) for h in b.history
    ]


def _stop_at(step_to_stop: int):
    def cb(step, g, entry):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return cb


def test_stopped_and_resumed_fit_is_bit_identical(problem):
    init, images, cams, cfg = problem
    full = fit_scene(init, images, cams, cfg)
    grew = [h["num_gaussians"] for h in full.history]
    assert grew[0] == init.num and grew[1] < grew[-1] and full.gaussians.num > grew[2]  # densified before and after
    assert full.gaussians.sh.shape[1] == 4

    saved: list[FitState] = []
    cfg_log1 = replace(cfg, log_every=1)  # log_every changes the history only, so a resume may change it
    with pytest.raises(KeyboardInterrupt):
        fit_scene(init, images, cams, cfg_log1, callback=_stop_at(STOP), checkpoint=saved.append, checkpoint_every=4)
    assert [s.step for s in saved] == [4, STOP]  # the periodic checkpoint, then the one on Ctrl-C
    stopped = _round_trip(saved[-1])
    assert stopped.params["means"].shape[0] == grew[2]  # refined once before the stop
    resumed = fit_scene(stopped, images, cams, cfg)
    assert resumed.steps == cfg.steps and resumed.history[-1]["step"] == cfg.steps
    ta, tb = full.gaussians.tensors(), resumed.gaussians.tensors()
    for k in ta:
        assert ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]), k
    # the periodic checkpoint resumes exactly too, and its history continues the first run's
    again = fit_scene(_round_trip(saved[0]), images, cams, replace(cfg, log_every=1), checkpoint=saved.append)
    ta, tb = full.gaussians.tensors(), again.gaussians.tensors()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert [h["step"] for h in again.history] == list(range(1, cfg.steps + 1))
    assert saved[-1].step == cfg.steps  # the last step is always checkpointed

    with pytest.raises(ValueError, match=r"lr_sh0: 0\.0025 -> 0\.01"):
        fit_scene(stopped, images, cams, replace(cfg, lr_sh0=1e-2))
    with pytest.raises(ValueError, match="steps: 11 -> 12"):
        fit_scene(stopped, images, cams, replace(cfg, steps=12))


def test_ctrl_c_during_the_update_waits_for_the_whole_step(problem, monkeypatch):
    from gsplat.strategy import DefaultStrategy

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by someone else here")
    init, images, cams, cfg = problem
    cfg = replace(cfg, steps=8, log_every=4)
    full = fit_scene(init, images, cams, cfg)
    real = DefaultStrategy.step_post_backward

    def post_backward(self, params, optimizers, state, step, info, **kw):
        real(self, params, optimizers, state, step, info, **kw)
        if step == 6:  # right after a refinement, before the optimiser steps
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(DefaultStrategy, "step_post_backward", post_backward)
    saved: list[FitState] = []
    with pytest.raises(KeyboardInterrupt):
        fit_scene(init, images, cams, cfg, checkpoint=saved.append)
    assert [s.step for s in saved] == [7]
    monkeypatch.setattr(DefaultStrategy, "step_post_backward", real)
    _assert_same(full, fit_scene(_round_trip(saved[0]), images, cams, cfg))


# ------------------------------------------------------------------ vision3d reconstruct --resume
def _recon_cfg(folder, out, **kw):
    from vision3d.train.reconstruct import ReconstructConfig, _default_fit

    fit = replace(_default_fit(), refine_start=2, refine_every=3, grow_grad2d=3e-3, sh_degree=1, sh_degree_interval=6,
                  ssim_weight=0.0, log_every=1)
    base = dict(input=folder, out=out, poses="known", steps=10, holdout_every=4, max_size=None, ckpt_every=4,
                video=False, lpips=False, progress=False, device="cpu", fit=fit)
    return ReconstructConfig(**{**base, **kw})


def test_reconstruct_interrupted_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    import shutil

    import vision3d.train.scene_fit as sf
    from tests.poses.helpers import make_photo_folder
    from vision3d.gaussians.ply import load_ply
    from vision3d.train.reconstruct import reconstruct

    folder, _ = make_photo_folder(tmp_path, n=6, width=24, height=16, num_points=60)
    m_full = reconstruct(_recon_cfg(folder, tmp_path / "full"))
    grew = [h["num_gaussians"] for h in m_full["history"]]
    assert grew[0] < grew[STOP - 1] < grew[-1]  # densified before and after the stop
    run = tmp_path / "run"
    real = sf.fit_scene

    def interrupted(*args, **kw):
        return real(*args, **{**kw, "callback": _stop_at(STOP)})

    monkeypatch.setattr(sf, "fit_scene", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reconstruct(_recon_cfg(folder, run))
    monkeypatch.setattr(sf, "fit_scene", real)
    ckpt = run / "ckpt"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["fit"]["step"] == STOP and (ckpt / "scene.ply").is_file() and not (run / "scene.ply").exists()
    assert load_ply(ckpt / "scene.ply").num == state["fit"]["params"]["means"].shape[0]

    # a setting that changes the result is refused, by name; an old checkpoint without state.pt too
    with pytest.raises(ValueError, match=r"steps: 10 -> 12.*fit\.lr_sh0"):
        reconstruct(_recon_cfg(folder, run, resume=True, steps=12,
                               fit=replace(_recon_cfg(folder, run).fit, lr_sh0=1e-2)))
    shutil.move(ckpt / "state.pt", tmp_path / "state.pt")
    (ckpt / "state.json").write_text('{"step": 5}')
    with pytest.raises(ValueError, match="older vision3d"):
        reconstruct(_recon_cfg(folder, run, resume=True))
    (ckpt / "state.json").unlink()
    shutil.move(tmp_path / "state.pt", ckpt / "state.pt")

    m = reconstruct(_recon_cfg(folder, run, resume=True, video_path_frames=2))  # outputs' settings may change
    assert m["resumed_from_step"] == STOP and [h["step"] for h in m["history"]] == list(range(1, 11))
    a, b = load_ply(tmp_path / "full" / "scene.ply"), load_ply(run / "scene.ply")
    assert a.num == b.num == m_full["num_gaussians"]
    for k, v in a.tensors().items():
        assert torch.equal(v, b.tensors()[k]), k
    assert m["test"]["psnr"] == m_full["test"]["psnr"]
