"""Scene edits: prune, select, concat, crop, merge, voxel dedup, normalise."""

from __future__ import annotations

import pytest
import torch

from vision3d.gaussians import (
    Gaussians,
    Similarity,
    concat,
    crop,
    dedup_voxel,
    merge,
    normalize_scene,
    prune,
    scene_bounds,
    select,
)
from vision3d.geometry import Cameras


def scene(n=10, degree=1, batch=()) -> Gaussians:
    k = (degree + 1) ** 2
    return Gaussians(
        torch.randn(*batch, n, 3),
        torch.randn(*batch, n, 4),
        torch.rand(*batch, n, 3) * 0.2 + 0.01,
        torch.rand(*batch, n),
        torch.randn(*batch, n, k, 3),
    )


def test_prune_by_opacity_and_scale():
    g = scene(6)
    g.opacities[:] = torch.tensor([0.001, 0.5, 0.9, 0.004, 0.7, 0.6])
    g.scales[:] = 0.1
    g.scales[4, 2] = 5.0  # huge
    g.scales[5] = 1e-6  # vanishing
    out = prune(g, min_opacity=0.005, max_scale=1.0, min_scale=1e-4)
    assert torch.equal(out.means, g.means[[1, 2]])
    assert prune(g).num == 6
    with pytest.raises(ValueError, match="unbatched"):
        prune(scene(3, batch=(2,)), min_opacity=0.1)


def test_select_crop_concat():
    g = scene(8)
    g.means[:] = torch.linspace(-1, 1, 8)[:, None].expand(8, 3)
    assert torch.equal(select(g, torch.tensor([3, 0])).means, g.means[[3, 0]])
    with pytest.raises(ValueError, match="shape"):
        select(g, torch.ones(3, dtype=torch.bool))
    c = crop(g, [-0.5, -0.5, -0.5], [0.5, 0.5, 0.5])
    assert ((c.means >= -0.5) & (c.means <= 0.5)).all() and c.num == 4
    with pytest.raises(ValueError, match="empty box"):
        crop(g, [1, 0, 0], [0, 1, 1])
    cat = concat([g, scene(3, degree=3)])
    assert cat.num == 11 and cat.sh_degree == 3
    assert torch.equal(cat.sh[:8, 4:], torch.zeros(8, 12, 3))


def test_dedup_voxel_keeps_most_opaque():
    g = scene(5)
    g.means[:] = torch.tensor([[0.01, 0.01, 0.01], [0.02, 0.03, 0.04], [1.5, 0, 0], [0.05, 0.05, 0.05], [1.6, 0.1, 0]])
    g.opacities[:] = torch.tensor([0.2, 0.9, 0.3, 0.5, 0.8])
    out = dedup_voxel(g, 1.0)
    assert out.num == 2
    assert torch.equal(out.means, g.means[[1, 4]])  # input order kept


def test_merge_flattens_transforms_and_dedups():
    per_view = scene(4, batch=(2,))
    per_view.means.abs_()  # all in the voxel [0, 1e3)^3 below
    other = scene(3, degree=0)
    sim = Similarity(2.0, None, torch.tensor([10.0, 0.0, 0.0]))
    out = merge([per_view, other], transforms=[None, sim])
    assert out.num == 11 and out.sh_degree == 1
    torch.testing.assert_close(out.means[8:], 2.0 * other.means + torch.tensor([10.0, 0, 0]))
    torch.testing.assert_close(out.scales[8:], 2.0 * other.scales)
    assert merge([per_view], voxel_size=1e3).num == 1
    with pytest.raises(ValueError, match="2 scenes but 1 transforms"):
        merge([per_view, other], transforms=[sim])


def cameras_at(centres: torch.Tensor) -> Cameras:  # [V, 3]
    c2w = torch.eye(4).repeat(len(centres), 1, 1)
    c2w[:, :3, 3] = centres
    K = torch.tensor([[20.0, 0, 8], [0, 20, 8], [0, 0, 1]])
    return Cameras(K, c2w, 16, 16, near=0.5, far=50.0)


def test_normalize_scene_fits_cameras_in_unit_sphere():
    centres = torch.tensor([[10.0, 2.0, 3.0], [14.0, 2.0, 3.0], [12.0, 5.0, 3.0], [12.0, 2.0, -1.0]])
    cams = cameras_at(centres)
    g = scene(20)
    g2, cams2, sim = normalize_scene(g, cams, radius=1.0)
    new_centres = cams2.cam_to_world[:, :3, 3]
    assert new_centres.norm(dim=-1).max().item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(sim.apply_points(centres.double()).float(), new_centres)
    torch.testing.assert_close(g2.means, sim.apply_points(g.means))
    torch.testing.assert_close(g2.scales, g.scales * sim.scale)
    # rotations of cameras are unchanged, near/far scale with the scene
    torch.testing.assert_close(cams2.cam_to_world[:, :3, :3], cams.cam_to_world[:, :3, :3])
    assert cams2.near == pytest.approx(0.5 * sim.scale)
    # mapping back restores the input
    back = sim.inverse().apply_points(new_centres.double()).float()
    torch.testing.assert_close(back, centres)


def test_normalize_scene_single_camera_uses_gaussians():
    cams = cameras_at(torch.tensor([[1.0, 1.0, 1.0]]))
    g = scene(5)
    g.means[:] = torch.tensor([1.0, 1.0, 1.0]) + torch.tensor([[4.0, 0, 0]] * 5)
    g2, cams2, sim = normalize_scene(g, cams, radius=2.0)
    assert sim.scale == pytest.approx(0.5)
    torch.testing.assert_close(cams2.cam_to_world[0, :3, 3], torch.zeros(3))
    _, _, sim_none = normalize_scene(None, cams)
    assert sim_none.scale == 1.0


def test_scene_bounds():
    g = scene(100)
    lo, hi = scene_bounds(g)
    torch.testing.assert_close(lo, g.means.amin(0))
    lo9, hi9 = scene_bounds(g, 0.9)
    assert (lo9 >= lo).all() and (hi9 <= hi).all()
