"""VGGT / FlashVGGT as pose estimators: intrinsics mapped back through VGGT's crop and resize,
confident depth points, weight loading, and the error without weights."""

from __future__ import annotations

import pytest
import torch

from vision3d.poses.base import PoseEstimationError, PoseInput, create_pose_estimator, list_pose_estimators
from vision3d.poses.feedforward import VGGTPoses
from vision3d.recon import create
from vision3d.recon.vggt import preprocess_images
from vision3d.train.checkpoint import save_weights


def _inputs(h: int, w: int, n: int = 3) -> PoseInput:
    g = torch.Generator().manual_seed(0)
    return PoseInput(images=torch.rand(n, 3, h, w, generator=g), names=[f"{i:03d}.png" for i in range(n)], source="mem")


@pytest.mark.parametrize("h,w", [(40, 60), (60, 40)], ids=["landscape", "portrait-cropped"])
def test_cameras_map_back_to_input_size(h, w, tmp_path):
    torch.manual_seed(0)
    model = create("vggt_tiny").eval()
    est = VGGTPoses(model=model, device="cpu", resolution=56, max_points=500)
    inputs = _inputs(h, w)
    res = est.estimate(inputs, tmp_path)
    assert tuple(res.cameras.batch_shape) == (3,) and (res.cameras.width, res.cameras.height) == (w, h)
    x = preprocess_images(list(inputs.images), mode="crop", target=56)
    with torch.no_grad():
        pred = model(x[None]).cameras[0]
    full_h = round(h * 56 / w / 14) * 14  # VGGT's resize before the centre crop
    again = res.cameras.resize(56, full_h).center_crop(x.shape[-1], x.shape[-2])
    torch.testing.assert_close(again.K, pred.K, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(res.cameras.cam_to_world, pred.cam_to_world)
    assert 0 < res.points.shape[0] <= 500 and torch.isfinite(res.points).all()
    assert res.colors.min() >= 0 and res.colors.max() <= 1 and res.info["estimator"] == "vggt"


def test_weights_from_a_converted_file_and_errors(tmp_path):
    assert {"vggt", "flashvggt"} <= set(list_pose_estimators())
    with pytest.raises(PoseEstimationError, match="--pose-weights"):
        create_pose_estimator("vggt").estimate(_inputs(28, 28), tmp_path)
    torch.manual_seed(0)
    tiny = create("vggt_tiny")
    save_weights(tmp_path / "tiny.safetensors", tiny.state_dict())
    est = VGGTPoses(weights=tmp_path / "tiny.safetensors", model_name="vggt_tiny", device="cpu", resolution=28)
    for a, b in zip(est.model().state_dict().values(), tiny.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        VGGTPoses(weights=tmp_path / "missing.pt", model_name="vggt_tiny").model()
