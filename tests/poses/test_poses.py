"""Pose-estimator registry, the known estimator, SfM file names and the smooth camera path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vision3d.gaussians.procedural import hemisphere_cameras, orbit_cameras
from vision3d.poses.base import PoseInput, create_pose_estimator, list_pose_estimators
from vision3d.poses.colmap import sfm_file_names
from vision3d.poses.path import slerp, smooth_camera_path


def test_registry():
    assert {"colmap", "known"} <= set(list_pose_estimators())
    with pytest.raises(ValueError, match="unknown pose estimator 'vggt-nope'.*colmap"):
        create_pose_estimator("vggt-nope")


def test_known_passes_cameras_through_and_requires_them(tmp_path):
    cams = orbit_cameras(3, (0.0, 0.0, 0.0), 2.0, width=16, height=12)
    inp = PoseInput(torch.rand(3, 3, 12, 16), ["a.png", "b.png", "c.png"], Path("x"), cameras=cams)
    res = create_pose_estimator("known").estimate(inp, tmp_path)
    assert res.names == inp.names and torch.equal(res.cameras.cam_to_world, cams.cam_to_world)
    with pytest.raises(ValueError, match="--cameras"):
        create_pose_estimator("known").estimate(PoseInput(inp.images, inp.names, Path("x")), tmp_path)
    with pytest.raises(ValueError, match="unique"):
        PoseInput(inp.images, ["a", "a", "b"], Path("x"))


def test_sfm_file_names_unique_and_safe():
    out = sfm_file_names(["a.jpg", "a.png", "b c.JPG", "frame_000001"])
    assert out == ["a.png", "00001_a.png", "b_c.png", "frame_000001.png"]
    assert len({o.lower() for o in out}) == 4


def test_slerp_endpoints_and_unit_norm():
    q0 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    q1 = torch.nn.functional.normalize(torch.tensor([0.5, 0.5, -0.5, 0.5], dtype=torch.float64), dim=0)
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    q = slerp(q0.expand(7, 4), q1.expand(7, 4), t)
    torch.testing.assert_close(q[0], q0)
    torch.testing.assert_close(q[-1], q1)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(7, dtype=torch.float64))


def test_smooth_path_passes_through_its_ends_and_is_smooth():
    cams = hemisphere_cameras(12, (0.0, 0.0, 0.3), 2.5, width=40, height=30)
    path = smooth_camera_path(cams, 60, 20, None, order="given", max_keys=12)
    assert len(path) == 60 and (path.width, path.height) == (20, 15)
    torch.testing.assert_close(path.cam_to_world[0], cams.cam_to_world[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(path.cam_to_world[-1], cams.cam_to_world[-1], atol=1e-5, rtol=0)
    R = path.rotation.double()
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(60, 3, 3),
                               atol=1e-5, rtol=0)
    step = (path.centers[1:] - path.centers[:-1]).norm(dim=-1)
    assert float(step.max()) < 4 * float(step.mean())  # even speed, no jumps
    nearest = smooth_camera_path(cams, 10, order="nearest", max_keys=5)
    assert len(nearest) == 10 and torch.isfinite(nearest.cam_to_world).all()
