"""DL3DV: raw layout, conversion to chunks (resumable), and agreement with the RE10K path."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.conftest import REPO
from tests.data.test_chunks import assert_reprojects
from tests.data.util import make_example, scene_cameras, scene_points, write_dl3dv_scene, write_split
from vision3d.data import EvaluationViewSampler, RE10KDataset, read_chunk, read_index
from vision3d.data.dl3dv import (
    DL3DV_FAR,
    DL3DV_NEAR,
    DL3DVDataset,
    DL3DVRawDataset,
    convert_dl3dv,
    find_dl3dv_scenes,
    read_dl3dv_scene,
)


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl3dv_raw")
    write_dl3dv_scene(root / "1K" / "aaaa1111", n_views=8, seed=3)
    write_dl3dv_scene(root / "1K" / "bbbb2222" / "nerfstudio", n_views=6, seed=4)
    return root


def test_find_and_read_raw_scene(raw_root):
    found = find_dl3dv_scenes(raw_root)
    assert set(found) == {"aaaa1111", "bbbb2222"}
    scene = read_dl3dv_scene(found["aaaa1111"], downscale=2)
    assert (scene.cameras.width, scene.cameras.height) == (96, 64)
    assert scene.timestamps.tolist() == list(range(1, 9))
    assert all(p.parent.name == "images_2" for p in scene.image_paths)


def test_raw_dataset_reprojects_and_matches_re10k_path(raw_root, tmp_path):
    idx = {"context": [0, 5], "target": [2, 3, 7]}
    full = DL3DVRawDataset(raw_root, EvaluationViewSampler({"aaaa1111": idx}), downscale=1, image_shape=None)[0]
    assert full.context_images.shape == (2, 3, 128, 192) and (full.near, full.far) == (DL3DV_NEAR, DL3DV_FAR)
    assert_reprojects(full.target_images, full.target_cameras, scene_points(seed=3), min_points=8)
    # images_2: K follows the folder (exactly the ground-truth cameras at half size)
    half = DL3DVRawDataset(raw_root, EvaluationViewSampler({"aaaa1111": idx}), downscale=2, image_shape=None)[0]
    gt = scene_cameras(8, 192, 128, seed=3).resize(96, 64)[torch.tensor(idx["target"])]
    assert torch.allclose(half.target_cameras.K.double(), gt.K, atol=1e-4)
    assert torch.allclose(half.target_cameras.cam_to_world.double(), gt.cam_to_world, atol=1e-5)
    # the same cameras written as an RE10K chunk (192x128, seed 3) load to the same geometry and pixels
    write_split(tmp_path, "test", [[make_example("aaaa1111", n_views=8, width=192, height=128, seed=3)]])
    re = RE10KDataset(tmp_path, "test", EvaluationViewSampler({"aaaa1111": idx}), image_shape=None)[0]
    assert torch.allclose(re.target_cameras.K, full.target_cameras.K, atol=1e-3)
    assert torch.allclose(re.target_cameras.cam_to_world, full.target_cameras.cam_to_world, atol=1e-5)
    assert (re.target_images - full.target_images).abs().mean() < 0.01


def test_convert_resumable_and_chunked_dataset(raw_root, tmp_path):
    out = tmp_path / "dl3dv"
    index = convert_dl3dv(raw_root, out, "test", downscale=1, image_shape=(96, 128), scenes=["aaaa1111"], progress=False)
    assert index == {"aaaa1111": "000000.torch"}
    rec = read_chunk(out / "test" / "000000.torch")[0]
    assert rec["cameras"].shape == (8, 18) and rec["timestamps"].tolist() == list(range(1, 9))
    assert bytes(rec["images"][0][:3].tolist()) == b"\xff\xd8\xff"  # re-encoded JPEG
    mtime = (out / "test" / "000000.torch").stat().st_mtime_ns
    # second run: the done scene is skipped, the new one goes to the next chunk
    index = convert_dl3dv(raw_root, out, "test", downscale=1, image_shape=(96, 128), progress=False)
    assert index == {"aaaa1111": "000000.torch", "bbbb2222": "000001.torch"}
    assert (out / "test" / "000000.torch").stat().st_mtime_ns == mtime
    assert {k: v.name for k, v in read_index(out / "test").items()} == index
    # interrupted after a chunk was written but before the index was: the chunk is adopted, not redone
    (out / "test" / "index.json").write_text(json.dumps({"aaaa1111": "000000.torch"}))
    mtime1 = (out / "test" / "000001.torch").stat().st_mtime_ns
    assert convert_dl3dv(raw_root, out, "test", downscale=1, image_shape=(96, 128), progress=False) == index
    assert (out / "test" / "000001.torch").stat().st_mtime_ns == mtime1 and not (out / "test" / "000002.torch").exists()
    ds = DL3DVDataset(out, "test", EvaluationViewSampler({"aaaa1111": {"context": [0, 5], "target": [2, 3, 7]}}), image_shape=None)
    item = ds[0]
    assert item.target_images.shape == (3, 3, 96, 128)
    assert_reprojects(item.target_images, item.target_cameras, scene_points(seed=3), min_points=5)


def test_convert_skips_bad_scene_and_tool_runs(raw_root, tmp_path):
    bad = tmp_path / "raw" / "cccc3333"
    bad.mkdir(parents=True)
    (bad / "transforms.json").write_text(json.dumps({"w": 8, "h": 8, "fl_x": 8, "fl_y": 8, "frames": [
        {"file_path": "images/frame_00001.png", "transform_matrix": torch.eye(4).tolist()}]}))
    write_dl3dv_scene(tmp_path / "raw" / "dddd4444", n_views=5, seed=1)
    out = tmp_path / "out"
    spec = importlib.util.spec_from_file_location("convert_dl3dv_tool", REPO / "tools" / "convert_dl3dv.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # the CLI in-process (a subprocess would re-import torch)
    argv = [str(tmp_path / "raw"), str(out), "--split", "train", "--downscale", "2", "--key-prefix", "dl3dv_", "--no-progress"]
    assert tool.main(argv) == 0
    assert {k: v.name for k, v in read_index(out / "train").items()} == {"dl3dv_dddd4444": "000000.torch"}
    skipped = json.loads((out / "train" / "skipped.json").read_text())
    assert "cccc3333" in skipped and "missing" in skipped["cccc3333"]
