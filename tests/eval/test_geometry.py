"""Camera metrics (relative rotation/translation angle errors, AUC@30) and depth metrics (AbsRel,
delta<1.25 with median scaling) on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from vision3d.eval.geometry import accuracy_at, camera_errors, depth_metrics, pose_auc
from vision3d.geometry.rotations import make_rigid, random_rotation


def _rot_y(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    return torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]], dtype=torch.float64)


def _rig(n: int, seed: int = 0) -> torch.Tensor:  # [n, 4, 4] cam-to-world
    g = torch.Generator().manual_seed(seed)
    return make_rigid(random_rotation(n, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64))


def test_camera_errors_zero_and_gauge_invariant():
    gt = _rig(5)
    rre, rte = camera_errors(gt, gt)
    assert rre.shape == (10,) and rre.abs().max() < 1e-3 and rte.abs().max() < 1e-3
    # another world frame and scale for the prediction: still no error
    sim = make_rigid(_rot_y(40.0), torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    pred = sim @ gt
    pred[..., :3, 3] *= 3.7
    rre, rte = camera_errors(pred, gt)
    assert rre.max() < 1e-3 and rte.max() < 1e-3


def test_camera_errors_known_rotation_and_translation():
    gt = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    gt[1, :3, 3] = torch.tensor([1.0, 0.0, 0.0])
    pred = gt.clone()
    pred[1, :3, :3] = _rot_y(10.0)  # camera 1 turned by 10 degrees, same centre
    pred[1, :3, 3] = torch.tensor([math.cos(math.radians(25)), 0.0, math.sin(math.radians(25))])
    rre, rte = camera_errors(pred, gt)
    assert rre.item() == pytest.approx(10.0, abs=1e-3)
    assert 0 < rte.item() < 90  # the relative translation direction moved
    # a direction flipped by 180 degrees counts as no error (sign ambiguity)
    flip = gt.clone()
    flip[1, :3, 3] = -gt[1, :3, 3]
    assert camera_errors(flip, gt)[1].item() == pytest.approx(0.0, abs=1e-3)


def test_pose_auc_and_accuracy():
    zero = torch.zeros(8)
    assert pose_auc(zero, zero) == pytest.approx(1.0)
    e = torch.full((8,), 15.5)
    assert pose_auc(e, zero) == pytest.approx(15 / 30)  # below t for t = 16..30
    assert pose_auc(zero, torch.full((8,), 45.0)) == 0.0
    with pytest.raises(ValueError, match="one error per pair"):
        pose_auc(zero, zero[:3])
    mixed = torch.tensor([0.5, 40.0])
    assert pose_auc(mixed, torch.zeros(2)) == pytest.approx(0.5)
    assert accuracy_at(torch.tensor([10.0, 29.0, 31.0, 90.0]), 30) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no view pairs"):
        pose_auc(torch.zeros(0), torch.zeros(0))


def test_depth_metrics_median_scaling():
    g = torch.Generator().manual_seed(0)
    gt = 1 + torch.rand(2, 1, 8, 8, generator=g)
    gt[0, 0, :2] = 0  # unknown depth is ignored
    m = depth_metrics(3.0 * gt, gt)  # right up to scale
    assert torch.allclose(m["abs_rel"], torch.zeros(2), atol=1e-6) and torch.allclose(m["delta1"], torch.ones(2))
    noisy = gt * torch.where(torch.arange(64).reshape(1, 1, 8, 8) % 2 == 0, 1.5, 1.0)
    m = depth_metrics(noisy, gt, align="none")
    assert m["delta1"][1] == pytest.approx(0.5) and m["abs_rel"][1] == pytest.approx(0.25)
    assert torch.isnan(depth_metrics(gt, torch.zeros_like(gt))["abs_rel"]).all()
    with pytest.raises(ValueError, match="differ"):
        depth_metrics(gt, gt[:1])
