"""Scene transforms (vision3d.data.transforms): iLRM's mean-camera frame, the registry, the dataset wrapper
the engine applies from ``data.scene_transform``."""

from __future__ import annotations

import pytest
import torch

from tests.data.util import scene_cameras, scene_points
from vision3d.data.example import ViewsExample
from vision3d.data.transforms import TransformedDataset, get_scene_transform, mean_camera_frame, with_scene_transform


def _example() -> ViewsExample:
    cams = scene_cameras(6, 32, 24).to(dtype=torch.float32)
    cams.cam_to_world[:, :3, 3] += torch.tensor([10.0, -4.0, 2.0])  # far from the origin
    ctx, tgt = cams[torch.tensor([0, 2, 4])], cams[torch.tensor([1, 3])]
    return ViewsExample(
        scene="s", context_images=torch.rand(3, 3, 24, 32), context_cameras=ctx, target_images=torch.rand(2, 3, 24, 32),
        target_cameras=tgt, context_indices=torch.tensor([0, 2, 4]), target_indices=torch.tensor([1, 3]),
        near=0.5, far=100.0,
    )


def test_mean_camera_frame_normalises_and_keeps_the_images_consistent():
    ex = _example()
    out = mean_camera_frame(ex)
    c = out.context_cameras.cam_to_world[:, :3, 3]
    assert float(c.abs().max()) == pytest.approx(1.0, abs=1e-5)  # largest context coordinate = 1
    torch.testing.assert_close(c.mean(0), torch.zeros(3), atol=1e-5, rtol=0)  # mean camera at the origin
    s = out.near / ex.near
    assert out.far == pytest.approx(ex.far * s) and out.scale == pytest.approx(ex.scale / s)
    # the same world point projects to the same pixels in every view (the images stay valid)
    pts = scene_points(5).float() * 2 + torch.tensor([10.0, -4.0, 2.0])
    from vision3d.gaussians import transform_cameras  # noqa: F401  (the transform used by the module)
    from vision3d.data.transforms import mean_camera_similarity

    sim = mean_camera_similarity(ex.context_cameras)
    for a, b in ((ex.context_cameras, out.context_cameras), (ex.target_cameras, out.target_cameras)):
        uv0, _ = a.project(pts.expand(a.batch_shape[0], 5, 3))
        uv1, _ = b.project(sim.apply_points(pts.double()).float().expand(b.batch_shape[0], 5, 3))
        torch.testing.assert_close(uv0, uv1, atol=2e-3, rtol=0)


def test_registry_and_dataset_wrapper():
    ex = _example()

    class DS(torch.utils.data.Dataset):
        groups = [[0]]

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return ex

    ds = DS()
    assert with_scene_transform(ds, "none") is ds
    wrapped = with_scene_transform(ds, "mean_camera")
    assert isinstance(wrapped, TransformedDataset) and len(wrapped) == 1 and wrapped.groups == [[0]]
    assert wrapped[0].near != ex.near
    with pytest.raises(ValueError, match="'centroid'"):
        get_scene_transform("centroid")


def test_engine_applies_the_configured_transform(tmp_path):
    from vision3d.data.synthetic import write_synthetic_dataset
    from vision3d.train.config import DataConfig, TrainConfig
    from vision3d.train.engine import build_dataset

    write_synthetic_dataset(tmp_path, "train", num_scenes=1, seed=1, num_views=8, width=16, height=16, density=0.05)
    data = dict(root=str(tmp_path), image_shape=(16, 16), num_context=2, num_target=1, min_gap=2, max_gap=4,
                gap_warmup_steps=0, num_workers=0)
    plain = build_dataset(TrainConfig(data=DataConfig(**data)))
    moved = build_dataset(TrainConfig(data=DataConfig(**data, scene_transform="mean_camera")))
    a, b = plain[0], moved[0]
    torch.testing.assert_close(a.context_images, b.context_images)
    assert float(b.context_cameras.cam_to_world[:, :3, 3].abs().max()) == pytest.approx(1.0, abs=1e-5)


def test_mean_camera_frame_scales_depths_with_the_scene():
    from dataclasses import replace

    ex = _example()
    ex = replace(ex, context_depths=torch.rand(3, 1, 24, 32) + 1, target_depths=torch.rand(2, 1, 24, 32) + 1)
    out = mean_camera_frame(ex)
    s = out.near / ex.near
    torch.testing.assert_close(out.context_depths, ex.context_depths * s)
    torch.testing.assert_close(out.target_depths, ex.target_depths * s)
    assert mean_camera_frame(_example()).context_depths is None
