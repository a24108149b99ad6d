"""Plane-sweep cost volumes: exact reprojection of a synthetic depth map, candidate spacing, matching peak,
no-overlap behaviour, nearest views; and the Swin-window transformer / cross-view U-Net blocks."""

from __future__ import annotations

import math

import pytest
import torch

from vision3d.layers.costvolume import (
    correlation_volume,
    inverse_depth_candidates,
    nearest_views,
    plane_sweep_warp,
    refined_candidates,
)
from vision3d.layers.mvtransformer import MultiViewTransformer, merge_windows, shifted_window_mask, split_windows
from vision3d.layers.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _rig(H=12, W=16):
    K = torch.tensor([[14.0, 0, 7.5], [0, 14.0, 5.5], [0, 0, 1]])
    a = 0.08
    R = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    ref_to_src = torch.eye(4)
    ref_to_src[:3, :3] = R
    ref_to_src[:3, 3] = torch.tensor([-0.2, 0.05, 0.1])
    return K, ref_to_src


def test_warp_reprojects_a_synthetic_depth_map_exactly():
    """Source features that are the source pixel coordinates themselves (linear, so bilinear sampling
    is exact): warping at the true depth must return each reference pixel's analytic reprojection."""
    H, W = 12, 16
    K, T = _rig(H, W)
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    depth = 3.0 + 0.05 * xs - 0.03 * ys  # a slanted plane, z-depth in the reference camera
    src = torch.stack([xs, ys])[None]  # [1, 2, H, W]: feature = (u, v) of the source pixel
    warped = plane_sweep_warp(src, K[None], T[None], depth[None, None])[0, :, 0]  # [2, H, W]
    # analytic reprojection
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # [H, W, 3]
    pts = (pix @ torch.linalg.inv(K).T) * depth[..., None]
    pts = pts @ T[:3, :3].T + T[:3, 3]
    uv = (pts @ K.T)[..., :2] / (pts @ K.T)[..., 2:]
    inside = (uv[..., 0] >= 0) & (uv[..., 0] <= W - 1) & (uv[..., 1] >= 0) & (uv[..., 1] <= H - 1)
    assert inside.float().mean() > 0.5
    torch.testing.assert_close(warped.permute(1, 2, 0)[inside], uv[inside], atol=1e-3, rtol=0)


def test_identity_pose_warp_is_the_identity():
    K, _ = _rig()
    f = torch.randn(2, 5, 12, 16)
    out = plane_sweep_warp(f, K.expand(2, 3, 3), torch.eye(4).expand(2, 4, 4), torch.full((2, 3, 12, 16), 2.0))
    for d in range(3):
        torch.testing.assert_close(out[:, :, d], f, atol=1e-5, rtol=1e-5)


def test_candidates_are_even_in_inverse_depth():
    near, far = torch.tensor([0.5, 1.0]), torch.tensor([100.0, 10.0])
    c = inverse_depth_candidates(near, far, 9)[..., 0, 0]  # [2, 9]
    torch.testing.assert_close(c[:, 0], 1 / far)
    torch.testing.assert_close(c[:, -1], 1 / near)
    steps = c.diff(dim=1)
    torch.testing.assert_close(steps, ((1 / near - 1 / far) / 8)[:, None].expand_as(steps))
    with pytest.raises(ValueError, match="near < far"):
        inverse_depth_candidates(torch.tensor([2.0]), torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="at least 2"):
        inverse_depth_candidates(near, far, 1)


def test_refined_candidates_window_and_clamp():
    near, far = torch.tensor([0.5]), torch.tensor([100.0])
    interval = torch.tensor([0.01])
    est = torch.tensor([1.0, 1.995]).view(1, 1, 1, 2)  # inverse depth; the second sits near 1/near = 2
    c = refined_candidates(est, near, far, 8, interval)[0, :, 0]  # [8, 2]
    torch.testing.assert_close(c[0, 0], torch.tensor(1.0 - 4 * 0.01))
    torch.testing.assert_close(c[-1, 0], torch.tensor(1.0 + 3 * 0.01))
    torch.testing.assert_close(c[:, 0].diff(), torch.full((7,), 0.01))
    assert float(c[-1, 1]) == pytest.approx(2.0)  # clamped at 1/near
    assert (c[:, 1].diff() > 0).all()


def test_correlation_peaks_at_the_true_depth():
    """A sideways baseline with the true candidate at an integer disparity and unit-norm source features:
    by Cauchy-Schwarz the correlation is largest exactly at the true candidate."""
    torch.manual_seed(0)
    H, W, C = 12, 16, 8
    K, _ = _rig(H, W)
    src = torch.nn.functional.normalize(torch.randn(1, C, H, W), dim=1)
    near, far = torch.tensor([1.0]), torch.tensor([20.0])
    inv = inverse_depth_candidates(near, far, 16).expand(-1, -1, H, W)  # [1, 16, H, W]
    true = 5
    T = torch.eye(4)
    T[0, 3] = 2.0 / (K[0, 0] * inv[0, true, 0, 0])  # source pixel u + 2, a disparity of exactly 2 px at the true candidate
    ref = torch.zeros_like(src)
    ref[..., :-2] = src[..., 2:]  # the reference view of a fronto-parallel plane at that depth
    warped = plane_sweep_warp(src, K[None], T[None], 1.0 / inv)
    cost = correlation_volume(ref, warped[:, None])  # [1, 16, H, W]
    torch.testing.assert_close(cost, (ref[:, :, None] * warped).sum(1) / C**0.5)  # the definition
    best = cost.argmax(1)[0, :, 4:-4]  # away from the borders
    assert (best == true).all()


def test_views_without_overlap_give_zero_cost():
    K, _ = _rig()
    T = torch.eye(4)
    T[0, 3] = 50.0  # the source camera sees a disjoint part of the scene
    f = torch.randn(1, 4, 12, 16)
    warped = plane_sweep_warp(f, K[None], T[None], torch.full((1, 6, 12, 16), 3.0))
    assert warped.abs().max() == 0
    assert correlation_volume(torch.randn(1, 4, 12, 16), warped[:, None]).abs().max() == 0


def test_nearest_views_put_each_view_first():
    c = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0.2, 0, 0], [5, 0, 0]]])
    nn = nearest_views(c, 2)
    assert nn[0].tolist() == [[0, 2, 1], [1, 2, 0], [2, 0, 1], [3, 1, 2]]
    same = torch.zeros(1, 3, 3)  # coinciding cameras: still itself first
    assert nearest_views(same, 1)[0, :, 0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="k=4"):
        nearest_views(c, 4)


# ----------------------------------------------------------------------------- transformer and U-Net
def test_windows_round_trip_and_mask():
    x = torch.randn(2, 8, 12, 3)
    torch.testing.assert_close(merge_windows(split_windows(x, 2), 2, 8, 12), x)
    m = shifted_window_mask(8, 8, 2)
    assert m.shape == (4, 16, 16) and set(m.unique().tolist()) <= {0.0, -100.0}
    assert (m[0] == 0).all()  # the first window does not straddle a seam
    assert (m[-1] != 0).any()
    with pytest.raises(ValueError, match="does not split"):
        split_windows(torch.randn(1, 7, 8, 2), 2)


def test_transformer_backends_agree_and_views_interact():
    torch.manual_seed(0)
    t = MultiViewTransformer(16, num_layers=2, backend="math")
    x = torch.randn(1, 3, 16, 8, 8)
    src = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    ref = t(x, src, splits=2)
    for layer in t.modules():
        if hasattr(layer, "backend"):
            layer.backend = "sdpa"
    torch.testing.assert_close(t(x, src, splits=2), ref, atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[:, 2] += 1.0
    out = t(y, src, splits=2)
    assert (out[:, 0] - ref[:, 0]).abs().max() > 1e-3  # view 0 reads view 2
    assert t(x, src, splits=1).shape == x.shape  # global attention


def test_unet_cross_view_attention_mixes_views():
    torch.manual_seed(0)
    net = UNet(16, 16, 16, (1, 1, 1), 1, (4,), head_channels=8)
    for m in net.modules():  # make the zero-initialised outputs live
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            torch.nn.init.normal_(m.weight, std=0.2)
    x = torch.randn(2 * 2, 16, 8, 8)  # B=2 scenes x V=2 views
    a = net(x, num_views=2)
    y = x.clone()
    y[1] += 1.0  # scene 0, view 1
    b = net(y, num_views=2)
    assert (b[0] - a[0]).abs().max() > 1e-4  # view 0 of the same scene changes (cross-view attention)
    torch.testing.assert_close(b[2:], a[2:])  # the other scene does not
    with pytest.raises(ValueError, match="not divisible by 4"):
        net(torch.randn(2, 16, 6, 6), num_views=2)
