"""The procedural scene and the look-at camera rigs."""

from __future__ import annotations

import math

import pytest
import torch

from vision3d.gaussians.procedural import (
    hemisphere_cameras,
    intrinsics_from_fov,
    look_at,
    orbit_cameras,
    procedural_scene,
)
from vision3d.geometry.rotations import quat_to_matrix


def test_scene_is_deterministic_valid_and_seed_dependent():
    a = procedural_scene(seed=3, density=0.3)
    b = procedural_scene(seed=3, density=0.3)
    c = procedural_scene(seed=4, density=0.3)
    for k, v in a.gaussians.tensors().items():
        assert torch.equal(v, b.gaussians.tensors()[k]), k
    assert not torch.equal(a.gaussians.sh, c.gaussians.sh)
    a.gaussians.validate("procedural")
    assert a.gaussians.num > 1000
    assert procedural_scene(density=1.0).gaussians.num > 10_000
    assert (a.bounds_min <= a.gaussians.means.amin(0)).all() and (a.gaussians.means.amax(0) <= a.bounds_max).all()


def test_surfels_are_flat_along_the_ground_normal():
    s = procedural_scene(seed=0, density=0.3)
    g = s.gaussians
    ground = g.means[:, 2].abs() < 1e-6
    assert ground.sum() > 100
    R = quat_to_matrix(g.quats[ground])
    normal_axis = R[..., :, 2]  # local z is the short axis
    assert torch.allclose(normal_axis.abs()[:, 2], torch.ones(int(ground.sum())), atol=1e-5)
    assert (g.scales[ground, 2] < 0.5 * g.scales[ground, :2].min(-1).values).all()
    with pytest.raises(ValueError, match="density"):
        procedural_scene(density=0)


def test_look_at_is_opencv_and_looks_at_the_target():
    eye = torch.tensor([[3.0, 0.0, 1.0], [0.0, -2.0, 2.0]])
    target = torch.tensor([0.0, 0.0, 0.5])
    c2w = look_at(eye, target.expand(2, 3))
    R = c2w[:, :3, :3]
    assert torch.allclose(R.transpose(-1, -2) @ R, torch.eye(3).expand(2, 3, 3), atol=1e-6)
    assert torch.allclose(torch.linalg.det(R), torch.ones(2), atol=1e-6)
    fwd = torch.nn.functional.normalize(target - eye, dim=-1)
    assert torch.allclose(R[:, :, 2], fwd, atol=1e-6)
    assert (R[:, 2, 1] < 0).all()  # camera y (down in the image) points down in the world (z up)
    straight_down = look_at(torch.tensor([0.0, 0.0, 5.0]), torch.zeros(3))
    assert torch.isfinite(straight_down).all()


@pytest.mark.parametrize("rig", ["orbit", "hemisphere"])
def test_rigs_project_the_target_to_the_image_centre(rig):
    target = torch.tensor([0.2, -0.1, 0.4])
    if rig == "orbit":
        cams = orbit_cameras(6, target, 2.5, 30.0, width=40, height=30, fov_deg=60)
        dist = torch.full((6,), 2.5)
    else:
        cams = hemisphere_cameras(6, target, (2.0, 3.0), (10, 70), width=40, height=30, fov_deg=60)
        dist = (cams.centers - target).norm(dim=-1)
        assert (dist >= 2.0 - 1e-5).all() and (dist <= 3.0 + 1e-5).all()
        elev = torch.rad2deg(torch.asin((cams.centers - target)[:, 2] / dist))
        assert (elev >= 10 - 1e-3).all() and (elev <= 70 + 1e-3).all()
    uv, z = cams.project(target.expand(6, 1, 3))
    assert torch.allclose(uv[:, 0], torch.tensor([20.0, 15.0]).expand(6, 2), atol=1e-3)
    assert torch.allclose(z[:, 0], dist, atol=1e-4)
    assert torch.allclose(cams.fov[:, 0], torch.full((6,), math.radians(60)), atol=1e-5)
    other = hemisphere_cameras(6, target, 2.5, offset=0.5)
    assert not torch.allclose(other.centers, hemisphere_cameras(6, target, 2.5).centers)


def test_rig_errors():
    with pytest.raises(ValueError, match="n must"):
        orbit_cameras(0, (0, 0, 0), 1.0)
    with pytest.raises(ValueError, match="fov"):
        intrinsics_from_fov(10, 10, 190)
    with pytest.raises(ValueError, match="elevation"):
        hemisphere_cameras(3, (0, 0, 0), 1.0, (60, 10))


def test_collection_cameras_and_exposures():
    from vision3d.gaussians.procedural import collection_cameras, collection_exposures

    cams = collection_cameras(6, (0.0, 0.0, 0.3), sizes=((40, 30), (30, 40)), fovs_deg=(50.0, 40.0, 60.0))
    assert [(c.width, c.height) for c in cams] == [(40, 30), (30, 40)] * 3
    assert len({round(float(c.K[0, 0, 0]), 3) for c in cams}) > 2  # zooms and sizes give different focal lengths
    for c in cams:  # every photo looks at the target
        z = c.cam_to_world[0, :3, 2]
        to_t = torch.tensor([0.0, 0.0, 0.3]) - c.cam_to_world[0, :3, 3]
        assert float(torch.nn.functional.cosine_similarity(z, to_t, dim=0)) > 0.999
    gain, off = collection_exposures(6, strength=0.3, seed=2)
    g2, o2 = collection_exposures(6, strength=0.3, seed=2)
    assert torch.equal(gain, g2) and torch.equal(off, o2) and gain.shape == (6, 3)
    assert float(gain.min()) > 0.5 and float(gain.std()) > 0.01
    assert torch.equal(collection_exposures(3, strength=0.0, tint=0.0)[0], torch.ones(3, 3))
