"""Bundle adjustment of given cameras (vision3d.poses.bundle_adjust) and its use by the feed-forward estimators.

The scene is ray-cast, not splatted: three boxes on a ground plane with a solid random texture give
SIFT a few hundred features per 320x240 view in well under a second on the CPU (the procedural
Gaussian scene takes ~1 s per view at 160x120 and gives ~130 features, too few to pin poses down).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.conftest import optional
from vision3d.geometry import Cameras
from vision3d.geometry.rotations import axis_angle_to_matrix, rotation_angle
from vision3d.gaussians.procedural import intrinsics_from_fov, look_at
from vision3d.poses.base import PoseEstimationError, PoseInput
from vision3d.poses.bundle_adjust import BundleAdjustOptions, bundle_adjust, pose_neighbour_pairs

W, H, V = 320, 240, 10
BOXES = torch.tensor([  # [3, 2, 3] min and max corners, world z up, on the ground z = 0
    [[-0.7, -0.5, 0.0], [-0.15, 0.1, 0.55]],
    [[0.2, -0.6, 0.0], [0.65, -0.1, 0.35]],
    [[-0.1, 0.3, 0.0], [0.35, 0.7, 0.85]],
])


def scene_cameras(n: int = V) -> Cameras:  # batch [n]: a 80-degree arc with varying height, distance and aim
    i = torch.arange(n, dtype=torch.float64)
    az, el = torch.deg2rad(9.0 * i), torch.deg2rad(35.0 + 18.0 * torch.sin(1.3 * i))
    r = 2.6 * (1 + 0.15 * torch.cos(0.9 * i))
    target = torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)
    eye = target + r[:, None] * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    aim = target + 0.15 * torch.stack([torch.sin(2.1 * i), torch.cos(1.7 * i), 0.5 * torch.sin(0.7 * i)], -1)
    return Cameras(intrinsics_from_fov(W, H, 55.0).expand(n, 3, 3), look_at(eye, aim).float(), W, H)


def render(cams: Cameras, seed: int = 0) -> torch.Tensor:  # [n, 3, H, W] in [0, 1], white background
    """Ray-cast the boxes and the ground ([-2, 2]^2), coloured by a two-octave solid noise texture."""
    g = torch.Generator().manual_seed(seed)
    volumes = [torch.rand(1, 3, k, k, k, generator=g) for k in (16, 48)]
    o, d = cams.rays(normalize=True)  # [n, H, W, 3] each
    o = o.expand_as(d)
    t = torch.where(d[..., 2] < -1e-6, -o[..., 2] / d[..., 2], torch.full_like(d[..., 2], math.inf))
    t = torch.where(((o + t[..., None] * d)[..., :2].abs() <= 2.0).all(-1), t, torch.full_like(t, math.inf))
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    for lo, hi in BOXES:
        t0, t1 = (lo - o) * inv, (hi - o) * inv
        near, far = torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)
        t = torch.where((near <= far) & (near > 0) & (near < t), near, t)
    p = (o + t.clamp(max=100.0)[..., None] * d) / 2.0  # texture coordinates in [-1, 1]
    grid = p.clamp(-1, 1).reshape(1, -1, 1, 1, 3)
    col = sum(w * nn.functional.grid_sample(v, grid, align_corners=True) for v, w in zip(volumes, (0.6, 0.4)))
    col = ((col.reshape(3, *p.shape[:-1]) - 0.5) * 2.2 + 0.5).clamp(0, 1).permute(1, 0, 2, 3)  # [n, 3, H, W]
    return torch.where(torch.isinf(t)[:, None], torch.ones_like(col), col)


def perturb(cams: Cameras, rot_deg=2.0, centre=0.03, focal=0.03, seed=0) -> Cameras:
    g = torch.Generator().manual_seed(seed)
    n = cams.batch_shape[0]
    axis = nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    c2w = cams.cam_to_world.double().clone()
    c2w[:, :3, :3] = axis_angle_to_matrix(axis * math.radians(rot_deg)) @ c2w[:, :3, :3]
    c2w[:, :3, 3] += centre * nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)
    K = cams.K.double().clone()
    s = (1 + focal) * (1 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64))  # a bias and some spread
    K[:, 0, 0] *= s
    K[:, 1, 1] *= s
    return Cameras(K.float(), c2w.float(), cams.width, cams.height)


def pose_errors(cams: Cameras, ref: Cameras) -> tuple[float, float, float]:
    """Gauge-free errors: mean relative rotation (deg), mean relative direction (deg), mean focal (ratio)."""
    R, Rr = cams.rotation.double(), ref.rotation.double()
    C, Cr = cams.centers.double(), ref.centers.double()
    i, j = torch.triu_indices(R.shape[0], R.shape[0], 1)
    rot = rotation_angle(R[i].transpose(-1, -2) @ R[j], Rr[i].transpose(-1, -2) @ Rr[j])
    t = nn.functional.normalize(torch.einsum("nki,nk->ni", R[i], C[j] - C[i]), dim=-1)  # j seen from i
    tr = nn.functional.normalize(torch.einsum("nki,nk->ni", Rr[i], Cr[j] - Cr[i]), dim=-1)
    direction = torch.acos((t * tr).sum(-1).clamp(-1, 1))
    focal = (cams.K[:, 0, 0].double() / ref.K[:, 0, 0].double() - 1).abs()
    return math.degrees(float(rot.mean())), math.degrees(float(direction.mean())), float(focal.mean())


@pytest.fixture(scope="module")
def scene():
    optional("pycolmap")
    gt = scene_cameras()
    return render(gt), gt, perturb(gt)


def test_bundle_adjust_recovers_perturbed_cameras(scene, tmp_path):
    images, gt, noisy = scene
    res = bundle_adjust(images, noisy, tmp_path, num_threads=2, progress=False)
    before, after = pose_errors(noisy, gt), pose_errors(res.cameras, gt)
    assert before[0] > 1.5 and before[2] > 0.02  # the perturbation is what the test says
    assert after[0] < 0.5 * before[0] and after[1] < 0.5 * before[1] and after[2] < 0.5 * before[2], (before, after)
    info = res.info
    assert info["reprojection_error_after"] < 1.5 < info["reprojection_error_before"]
    assert info["matcher"] == "exhaustive" and info["camera_model"] == "SIMPLE_PINHOLE" and info["focal_refined"]
    assert info["observations"] >= 2 * info["points"] and not info["unrefined_images"]
    # same order, size and convention; the first pose holds the gauge
    assert tuple(res.cameras.batch_shape) == (V,) and (res.cameras.width, res.cameras.height) == (W, H)
    assert res.cameras.K.dtype == torch.float32
    torch.testing.assert_close(res.cameras.cam_to_world[0], noisy.cam_to_world[0], atol=1e-4, rtol=0)
    assert res.points.shape[0] == info["points"] >= 50 and res.colors.shape == res.points.shape
    assert res.colors.min() >= 0 and res.colors.max() <= 1
    inside = (res.points[:, :2].abs() <= 2.05).all(-1) & (res.points[:, 2] > -0.05) & (res.points[:, 2] < 0.9)
    assert inside.float().mean() > 0.95  # on the ground or the boxes


def test_ill_conditioned_focal_falls_back_to_fixed_intrinsics(scene, tmp_path):
    images, gt, noisy = scene
    res = bundle_adjust(images, noisy, tmp_path, BundleAdjustOptions(max_focal_change=1e-4, num_threads=2,
                                                                     progress=False, rounds=1))
    info = res.info
    assert not info["focal_refined"] and info["rejected_focal_change"] > 1e-4 and info["focal_change"] == 0.0
    f0 = (noisy.K[:, 0, 0].double() * noisy.K[:, 1, 1].double()).sqrt().mean()  # the shared starting focal
    torch.testing.assert_close(res.cameras.K[:, 0, 0].double(), f0.expand(V), rtol=1e-5, atol=0)
    assert pose_errors(res.cameras, gt)[0] < 0.5 * pose_errors(noisy, gt)[0]


def test_folder_input_per_image_cameras_and_pose_matching(scene, tmp_path):
    from vision3d.utils.images import save_png

    images, gt, noisy = scene
    folder = tmp_path / "photos"
    names = [f"view {i}.png" for i in range(V)]
    for n, im in zip(names, images):
        save_png(folder / n, im)
    res = bundle_adjust(folder, noisy, tmp_path / "work", names=names, shared_camera=False, camera_model="PINHOLE",
                        matcher="poses", num_neighbors=4, num_threads=2, progress=False)
    assert res.info["matcher"] == "poses" and res.info["camera_model"] == "PINHOLE"
    assert res.info["reprojection_error_after"] < 1.5
    assert pose_errors(res.cameras, gt)[0] < 0.5 * pose_errors(noisy, gt)[0]
    with pytest.raises(ValueError, match="view 0.png is 320x240 but its camera is 160x120"):
        bundle_adjust(folder, noisy.resize(160, 120), tmp_path / "w2", names=names, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        bundle_adjust(folder, noisy, tmp_path / "w3", names=names[:-1] + ["missing.png"], progress=False)
    with pytest.raises(TypeError, match="refine_focus"):
        bundle_adjust(folder, noisy, tmp_path / "w4", names=names, refine_focus=False)
    with pytest.raises(ValueError, match="matcher"):
        BundleAdjustOptions(matcher="vocab")


def test_untextured_images_fail_clearly(tmp_path):
    optional("pycolmap")
    cams = scene_cameras(4)
    blank = torch.full((4, 3, H, W), 0.5)
    with pytest.raises(PoseEstimationError, match=r"(?s)00000.png.*--pose-ba"):
        bundle_adjust(blank, cams, tmp_path, progress=False, num_threads=2)


def test_pose_neighbour_pairs():
    eye = torch.tensor([[float(i), 0.0, 0.0] for i in range(5)] + [[2.0, 0.1, 0.0]], dtype=torch.float64)
    aim = eye + torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    aim[-1] = eye[-1] - torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # the last one looks the other way
    cams = Cameras(intrinsics_from_fov(8, 8, 60.0), look_at(eye, aim, up=(0.0, -1.0, 0.0)), 8, 8)
    pairs = pose_neighbour_pairs(cams, 2)
    assert (0, 1) in pairs and (3, 4) in pairs and (0, 4) not in pairs
    assert not any(5 in p for p in pairs)


class _FakeVGGT(nn.Module):
    """Stands in for the network: "predicts" the given cameras, resized to the network's input."""

    def __init__(self, cameras: Cameras):
        super().__init__()
        self.cameras = cameras

    def forward(self, x):  # [1, V, 3, h, w]
        h, w = x.shape[-2:]
        depth = torch.ones(1, x.shape[1], 1, h, w)
        return SimpleNamespace(cameras=self.cameras.resize(w, h).reshape(1, -1), depth=depth, confidence=depth)


def test_feedforward_estimator_refines_its_cameras(scene, tmp_path):
    from vision3d.poses.feedforward import VGGTPoses

    images, gt, noisy = scene
    inputs = PoseInput(images=images, names=[f"{i:02d}.jpg" for i in range(V)], source=tmp_path)
    est = VGGTPoses(model=_FakeVGGT(noisy), device="cpu", resolution=W, bundle_adjust=True,
                    ba_options={"num_threads": 2, "progress": False})
    res = est.estimate(inputs, tmp_path / "poses")
    ba = res.info["bundle_adjustment"]
    assert res.info["estimator"] == "vggt" and ba["reprojection_error_after"] < 1.5
    assert res.points.shape[0] == res.info["points"] == ba["points"] and res.colors.max() <= 1
    assert (tmp_path / "poses" / "bundle_adjust" / "images" / "00.png").is_file()
    assert pose_errors(res.cameras, gt)[0] < 0.5 * pose_errors(noisy, gt)[0]
    plain = VGGTPoses(model=_FakeVGGT(noisy), device="cpu", resolution=W).estimate(inputs, tmp_path / "plain")
    assert "bundle_adjustment" not in plain.info
    torch.testing.assert_close(plain.cameras.cam_to_world, noisy.cam_to_world, atol=1e-5, rtol=0)
