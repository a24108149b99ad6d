"""Depth travels from the synthetic RE10K-format chunks to the training batch: stored float16 at the
frame size, resized/cropped with the images (nearest), divided by the scene scale, mirrored with
hflip, batched by collate_views; a malformed depth field is refused with the chunk's name."""

from __future__ import annotations

import pytest
import torch

from vision3d.data import BoundedViewSampler, ChunkDataset, ChunkDatasetConfig, collate_views, read_chunk, write_chunk
from vision3d.data.preprocess import BadSceneError, resize_and_center_crop_depth
from vision3d.data.synthetic import render_synthetic_scene, synthetic_scenes, write_synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _ds(root, **kw):
    sampler = BoundedViewSampler(num_context_views=2, num_target_views=1, min_gap=2, max_gap=4, warm_up_steps=0)
    return ChunkDataset(ChunkDatasetConfig(roots=[root], near=0.05, far=100.0, **kw), sampler)


def test_depth_from_chunk_to_batch(tmp_path):
    write_synthetic_dataset(tmp_path, "train", num_scenes=2, num_views=6, width=32, height=24, density=0.1)
    rec = read_chunk(tmp_path / "train" / "000000.torch")[0]
    assert rec["depths"].dtype == torch.float16 and rec["depths"].shape == (6, 24, 32)
    depth = rec["depths"].float()
    assert (depth > 0).float().mean() > 0.2 and (depth == 0).any()  # surfaces and unknown background
    imgs, _, fresh = render_synthetic_scene(synthetic_scenes(0, 1)[0][1], num_views=6, width=32, height=24,
                                            density=0.1, with_depth=True)
    torch.testing.assert_close(fresh[:, 0].half(), rec["depths"])  # the stored maps are the rendered depth
    assert imgs.shape == (6, 3, 24, 32)

    plain = _ds(tmp_path, image_shape=None)[0]
    stored = rec["depths"].float()[plain.context_indices][:, None]
    torch.testing.assert_close(plain.context_depths, stored)
    small = _ds(tmp_path, image_shape=(16, 16))[0]
    assert small.context_depths.shape == (2, 1, 16, 16) and small.target_depths.shape == (1, 1, 16, 16)
    torch.testing.assert_close(small.context_depths, resize_and_center_crop_depth(stored, (16, 16)))
    scaled = _ds(tmp_path, image_shape=None, make_baseline_1=True)[0]
    torch.testing.assert_close(scaled.context_depths, stored / scaled.scale)
    flipped = _ds(tmp_path, image_shape=None, hflip_prob=1.0)[0]
    torch.testing.assert_close(flipped.context_depths, stored.flip(-1))
    batch = collate_views([plain, _ds(tmp_path, image_shape=None)[1]])
    assert batch.context_depths.shape == (2, 2, 1, 24, 32)


def test_bad_depth_field_is_refused(tmp_path):
    write_synthetic_dataset(tmp_path, "train", num_scenes=1, num_views=4, width=16, height=16, density=0.1)
    rec = read_chunk(tmp_path / "train" / "000000.torch")[0]
    rec["depths"] = rec["depths"][:3]
    with pytest.raises(BadSceneError, match=r"bad\.torch.*'depths' must be a float tensor \[4, H, W\]"):
        write_chunk(tmp_path / "bad.torch", [rec])
