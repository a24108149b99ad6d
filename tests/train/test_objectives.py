"""Training recipes and the VGGT losses: which models train (and the refusal of the rest before
any work), the pose-encoding camera loss, the confidence-weighted regression with its gradient
terms, the normalisation of the ground truth, head switching, freezing and gradient checkpointing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tests.train.util import RandomViewsDataset
from vision3d import recon
from vision3d.data import collate_views
from vision3d.geometry import Cameras
from vision3d.geometry.conventions import cameras_to_vggt_pose_encoding
from vision3d.train.config import LossConfig, TrainConfig
from vision3d.train.engine import build_model, freeze_parameters, train
from vision3d.train.objectives import (
    GAUSSIANS,
    VGGT_RECIPE,
    NotTrainable,
    VGGTObjective,
    camera_loss,
    confidence_regression,
    gradient_term,
    normal_term,
    quantile_filter,
    recipe_for,
    trainable_models,
    vggt_targets,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("name", recon.list_models())
def test_every_model_has_a_recipe_or_a_reason(name):
    if name.startswith("dimer"):
        with pytest.raises(NotTrainable, match="nvdiffrast") as e:
            recipe_for(name)
        assert "vggt_tiny" in str(e.value) and "ilrm_tiny" in str(e.value)  # lists the models that train
        return
    r = recipe_for(name)
    assert r is (VGGT_RECIPE if "vggt" in name else GAUSSIANS)
    assert r.primary in r.metrics and set(r.requires) <= {"context_images", "context_cameras", "target_images",
                                                         "target_cameras", "context_depths"}


def test_untrainable_model_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(NotTrainable, match="differentiable mesh rasterizer"):
        train(TrainConfig(model="dimer_tiny", out=str(out), device="cpu", progress=False))
    assert not out.exists(), "the run folder was created for a model that cannot train"
    from vision3d.cli.train import main

    assert main(["--model", "dimer_tiny", "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nvdiffrast" in err and "vggt_tiny" in err and not out.exists()
    with pytest.raises(NotTrainable, match="unknown reconstructor 'nope'"):
        recipe_for("nope")
    assert "dimer_tiny" not in trainable_models() and "flashvggt_tiny" in trainable_models()


# ------------------------------------------------------------------------------------ camera loss
def _cams(b=2, s=3, seed=0) -> Cameras:
    g = torch.Generator().manual_seed(seed)
    c2w = torch.eye(4).repeat(b, s, 1, 1)
    c2w[..., :3, 3] = torch.randn(b, s, 3, generator=g)
    K = torch.tensor([[30.0, 0, 14], [0, 32.0, 14], [0, 0, 1]]).expand(b, s, 3, 3)
    return Cameras(K, c2w, 28, 28)


def test_camera_loss_values():
    gt = cameras_to_vggt_pose_encoding(_cams())  # [2, 3, 9]
    iters = gt.expand(4, -1, -1, -1).clone()
    zero = camera_loss(iters, gt)
    assert all(float(v) == 0.0 for v in zero.values())
    iters[-1, ..., 0] += 0.3  # last iteration: translation x off by 0.3
    iters[0, ..., 7] += 0.1  # first iteration: vertical fov off by 0.1
    out = camera_loss(iters, gt, gamma=0.6)
    # mean over the 3 translation components, iteration weight 1 (last) / 4 iterations
    assert float(out["loss_T"]) == pytest.approx(0.3 / 3 / 4, rel=1e-5)
    assert float(out["loss_FL"]) == pytest.approx(0.6 ** 3 * 0.1 / 2 / 4, rel=1e-5)
    assert float(out["loss_R"]) == 0.0
    assert float(out["loss_camera"]) == pytest.approx(float(out["loss_T"]) + 0.5 * float(out["loss_FL"]), rel=1e-6)
    valid = torch.tensor([False, False])
    assert float(camera_loss(iters, gt, valid)["loss_camera"]) == 0.0  # no valid example: zero, still a graph


def test_vggt_targets_normalisation():
    cams = _cams()
    depth = torch.full((2, 3, 1, 28, 28), 2.0)
    depth[:, :, :, :4] = 0  # unknown rows
    t = vggt_targets(cams, depth)
    assert t.mask.shape == (2, 3, 28, 28) and not t.mask[:, :, :4].any()
    assert torch.allclose(t.pose_enc[:, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]).expand(2, 7), atol=1e-6)
    mean_dist = (t.points.norm(dim=-1) * t.mask).flatten(1).sum(1) / t.mask.flatten(1).sum(1)
    assert torch.allclose(mean_dist, torch.ones(2), atol=1e-5)  # unit mean point distance
    assert torch.allclose(t.depth[..., 0][t.mask], (2.0 / t.scale[:, None, None, None].expand(2, 3, 28, 28))[t.mask])
    # camera-only: unit mean distance of the other camera centres from the first
    t2 = vggt_targets(cams, None)
    centres = t2.pose_enc[:, 1:, :3].norm(dim=-1)  # identity rotations: |t| = centre distance
    assert t2.depth is None and torch.allclose(centres.mean(1), torch.ones(2), atol=1e-5)


# ------------------------------------------------------------------------------ regression terms
def test_confidence_regression_terms():
    g = torch.Generator().manual_seed(1)
    gt = 1 + torch.rand(1, 2, 6, 6, 1, generator=g)
    mask = torch.ones(1, 2, 6, 6, dtype=torch.bool)
    mask[0, 0, 0, 0] = False
    conf = torch.full((1, 2, 6, 6), 2.0)
    lc, lg, lr = confidence_regression(gt + 0.5, gt, mask, conf, "grad", gamma=1.0, alpha=0.2)
    assert float(lr) == pytest.approx(0.5, rel=1e-5)  # plain |err|
    assert float(lc) == pytest.approx(0.5 * 2.0 - 0.2 * math.log(2.0), rel=1e-5)
    assert float(lg) == pytest.approx(0.0, abs=1e-6)  # a constant offset has no gradient
    # a spatially varying error has a gradient term
    bumpy = gt.clone()
    bumpy[..., ::2, :, :] += 0.5
    assert float(confidence_regression(bumpy, gt, mask, conf, "grad")[1]) > 0
    with pytest.raises(ValueError, match="gradient term"):
        confidence_regression(bumpy, gt, mask, conf, "sobel")


def test_gradient_and_normal_terms():
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    plane = torch.stack([xx, yy, torch.full_like(xx, 5.0)], -1)[None]  # [1, 8, 8, 3] a fronto-parallel plane
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    assert float(normal_term(plane * 2.0, plane, mask)) == pytest.approx(0.0, abs=1e-6)  # same normals
    tilted = plane.clone()
    tilted[..., 2] = 5.0 + xx  # the plane turned by 45 degrees
    assert float(normal_term(tilted, plane, mask)) == pytest.approx(1 - math.cos(math.pi / 4), rel=1e-4)
    d = torch.zeros(1, 4, 4, 1)
    d[0, :, 2:] = 1.0  # a step in the error: 4 horizontal jumps of 1 over 16 valid pixels
    assert float(gradient_term(d, torch.zeros_like(d), torch.ones(1, 4, 4, dtype=torch.bool))) == pytest.approx(4 / 16)


def test_quantile_filter():
    x = torch.arange(2000.0)
    kept = quantile_filter(x / 100, 0.98)  # nearest-rank 0.98 quantile: the 1960th value, 19.59
    assert kept.numel() == 1959 and float(kept.max()) < 19.59
    assert quantile_filter(torch.arange(10.0), 0.5).numel() == 10  # too few: unchanged


# --------------------------------------------------------------------------- objective and model
def _batch(depth: bool):
    ds = RandomViewsDataset(num_scenes=2, views=3, targets=1, size=28)
    exs = [ds[i] for i in range(2)]
    if depth:
        exs = [replace(e, context_depths=torch.full((3, 1, 28, 28), 1.5)) for e in exs]
    return collate_views(exs)


def test_vggt_objective_needs_depth_only_when_asked():
    obj = VGGTObjective(LossConfig(depth=1.0))
    with pytest.raises(ValueError, match="--loss.depth 0 --loss.point 0"):
        obj.check_batch(_batch(depth=False))
    VGGTObjective(LossConfig(depth=0.0, point=0.0)).check_batch(_batch(depth=False))
    with pytest.raises(ValueError, match="nothing to train"):
        VGGTObjective(LossConfig(camera=0, depth=0, point=0))


@pytest.mark.parametrize("name", ["vggt_tiny", "flashvggt_tiny"])
def test_camera_only_objective_skips_and_freezes_unused_heads(name):
    model = recon.create(name)
    obj = VGGT_RECIPE.build(LossConfig(depth=0.0, point=0.0))
    frozen = obj.prepare(model)
    assert frozen and all(n.startswith(("depth_head.", "point_head.")) for n in frozen)
    r = obj.step(model, _batch(depth=False), 0, torch.autocast("cpu", enabled=False))
    r.loss.backward()
    assert set(r.logs) >= {"objective", "loss_camera", "loss_T", "loss_R", "loss_FL", "rre_deg"}
    assert not any(k.startswith("loss_conf") for k in r.logs)
    assert model.camera_head.embed_pose.weight.grad is not None
    assert all(p.grad is None for p in model.depth_head.parameters())
    assert model.aggregator.camera_token.grad is not None


def test_full_objective_and_freeze_patterns():
    model = recon.create("vggt_tiny")
    names = freeze_parameters(model, ["aggregator.*"])
    assert names and all(n.startswith("aggregator.") for n in names)
    obj = VGGT_RECIPE.build(LossConfig(depth=1.0, point=1.0))
    r = obj.step(model, _batch(depth=True), 0, torch.autocast("cpu", enabled=False))
    r.loss.backward()
    assert math.isfinite(r.logs["objective"])
    assert {"loss_conf_depth", "loss_reg_depth", "loss_grad_depth", "loss_conf_point", "loss_grad_point"} <= set(r.logs)
    assert all(p.grad is None for p in model.aggregator.parameters())  # frozen
    assert all(p.grad is not None for p in model.point_head.parameters() if p.requires_grad)
    assert r.preview is not None and r.preview.shape[-1] == 2 * 28
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze_parameters(model, ["agregator.*"])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = build_model(TrainConfig(model="vggt_tiny"))
    b = build_model(TrainConfig(model="vggt_tiny", grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    assert b.aggregator.frame_blocks[0].grad_checkpointing
    obj = VGGT_RECIPE.build(LossConfig(depth=1.0, point=0.0))
    batch = _batch(depth=True)
    for m in (a, b):
        m.train()
        obj.step(m, batch, 0, torch.autocast("cpu", enabled=False)).loss.backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=n)
