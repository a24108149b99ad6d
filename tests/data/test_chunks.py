"""RE10K chunk format: round trips, conventions by reprojection, bad input."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from tests.data.util import blob_offsets, make_example, scene_points, write_split
from vision3d.data import (
    BadSceneError,
    BoundedViewSampler,
    ChunkDataset,
    ChunkDatasetConfig,
    EvaluationViewSampler,
    RE10KDataset,
    collate_views,
    decode_image,
    read_chunk,
    read_index,
    write_chunk,
)
from vision3d.geometry.conventions import cameras_from_re10k


def test_chunk_roundtrip_exact_layout(tmp_path):
    exs = [make_example("aaaa0000bbbb1111", n_views=5, blobs=False), make_example("cccc2222dddd3333", n_views=4, seed=1, blobs=False)]
    split = write_split(tmp_path, "train", [exs])
    # the published layout: index.json maps keys to chunk names relative to the split folder
    assert (split / "000000.torch").is_file()
    assert read_index(split) == {e["key"]: split / "000000.torch" for e in exs}
    raw = torch.load(split / "000000.torch", weights_only=True)  # plain containers + tensors only
    assert isinstance(raw, list) and set(raw[0]) == {"key", "url", "timestamps", "cameras", "images"}
    back = read_chunk(split / "000000.torch")
    for a, b in zip(exs, back):
        assert a["key"] == b["key"] and a["url"] == b["url"]
        assert b["timestamps"].dtype == torch.int64 and torch.equal(a["timestamps"], b["timestamps"])
        assert b["cameras"].dtype == torch.float32 and b["cameras"].shape == (len(a["images"]), 18)
        assert torch.equal(a["cameras"], b["cameras"])
        assert all(x.dtype == torch.uint8 and x.ndim == 1 and torch.equal(x, y) for x, y in zip(a["images"], b["images"]))
        img = decode_image(b["images"][0])
        assert img.shape == (3, 64, 96) and img.dtype == torch.uint8


def test_write_chunk_is_atomic_and_validates(tmp_path):
    bad = make_example("k", n_views=3, blobs=False)
    bad["cameras"] = bad["cameras"][:, :17]
    with pytest.raises(BadSceneError, match=r"scene k.*\[V, 18\]"):
        write_chunk(tmp_path / "000000.torch", [bad])
    assert not list(tmp_path.iterdir())  # nothing half-written


def assert_reprojects(imgs, cams, pts, min_points=10, win=4):
    """Known 3-D points land on their blobs: no bias (< 0.1 px) and small scatter."""
    off = blob_offsets(imgs, cams, pts, win)
    err = np.hypot(off[:, 0], off[:, 1])
    assert len(err) >= min_points
    # neighbouring blobs overlap now and then, so the checks are robust ones: a half-pixel or
    # crop-direction mistake moves the median far beyond these bounds
    assert np.median(err) < 0.3 and np.quantile(err, 0.6) < 0.35, err
    assert np.abs(np.median(off, 0)).max() < 0.1, np.median(off, 0)


def test_re10k_reprojection_through_resize_and_crop(tmp_path):
    ex = make_example("scene_a", n_views=8, width=192, height=128, seed=3)
    write_split(tmp_path, "test", [[ex]])
    ev = EvaluationViewSampler({"scene_a": {"context": [0, 4], "target": [1, 2, 7]}})
    pts = scene_points(seed=3)
    for shape, resample in [((96, 96), "area"), ((80, 144), "lanczos"), ((200, 256), "bilinear")]:
        ds = RE10KDataset(tmp_path, "test", ev, image_shape=shape, resample=resample)
        item = ds[0]
        for imgs, cams in ((item.context_images, item.context_cameras), (item.target_images, item.target_cameras)):
            if shape is not None:
                assert imgs.shape[-2:] == shape and (cams.height, cams.width) == shape
            assert_reprojects(imgs, cams, pts, min_points=8, win=6 if shape == (200, 256) else 4)
    assert item.context_indices.tolist() == [0, 4] and item.target_indices.tolist() == [1, 2, 7]


def test_camera_rows_match_loaded_cameras(tmp_path):
    ex = make_example("s", n_views=6, seed=2, blobs=False)
    write_split(tmp_path, "train", [[ex]])
    ds = RE10KDataset(tmp_path, "train", BoundedViewSampler(min_gap=2, max_gap=5, warm_up_steps=0), image_shape=None)
    item = ds[0]
    ref = cameras_from_re10k(ex["cameras"][item.context_indices], 96, 64)
    assert torch.allclose(item.context_cameras.K, ref.K) and torch.allclose(item.context_cameras.cam_to_world, ref.cam_to_world)
    assert item.near == 1.0 and item.far == 100.0


def test_collate_batches(tmp_path):
    write_split(tmp_path, "train", [[make_example(f"s{i}", n_views=10, seed=i, blobs=False) for i in range(3)]])
    ds = RE10KDataset(tmp_path, "train", BoundedViewSampler(num_context_views=3, min_gap=3, max_gap=6, warm_up_steps=0, num_target_views=2), image_shape=(32, 48))
    b = collate_views([ds[i] for i in range(3)])
    assert b.context_images.shape == (3, 3, 3, 32, 48) and b.target_images.shape == (3, 2, 3, 32, 48)
    assert tuple(b.context_cameras.batch_shape) == (3, 3) and tuple(b.target_cameras.batch_shape) == (3, 2)
    assert b.context_indices.shape == (3, 3) and b.near.tolist() == [1.0] * 3
    assert 0.0 <= float(b.context_images.min()) and float(b.context_images.max()) <= 1.0
    assert (b.context_indices[:, 1:] > b.context_indices[:, :-1]).all()


def test_make_baseline_1(tmp_path):
    write_split(tmp_path, "train", [[make_example("s", n_views=8, blobs=False)]])
    ds = RE10KDataset(tmp_path, "train", BoundedViewSampler(min_gap=3, max_gap=3, warm_up_steps=0), image_shape=None,
                      make_baseline_1=True)
    item = ds[0]
    c = item.context_cameras.centers
    assert abs(float((c[0] - c[1]).norm()) - 1.0) < 1e-5
    assert abs(item.near * item.scale - 1.0) < 1e-5 and item.scale > 0


# ------------------------------------------------------------------------------------ bad input
def _corrupt(ex: dict, frame: int) -> dict:
    data = ex["images"][frame].clone()
    data[len(data) // 3 :] = 0  # header intact, entropy-coded data destroyed
    ex["images"][frame] = data[: len(data) // 2]
    return ex


def test_corrupt_jpeg_names_chunk_and_scene(tmp_path):
    ex = _corrupt(make_example("badscene", n_views=4, blobs=False), 1)
    ex["images"][1] = torch.tensor([0xFF, 0xD8, 0xFF, 1, 2, 3], dtype=torch.uint8)
    split = write_split(tmp_path, "test", [[ex]])
    ds = RE10KDataset(tmp_path, "test", EvaluationViewSampler({"badscene": {"context": [0, 1], "target": [2]}}))
    with pytest.raises(BadSceneError, match=r"000000\.torch: scene badscene: context frame 1"):
        ds[0]
    assert split.exists()


def test_missing_field_and_wrong_row(tmp_path):
    ex = make_example("nofield", n_views=4, blobs=False)
    ex2 = make_example("shortrow", n_views=4, blobs=False)
    d = tmp_path / "train"
    d.mkdir()
    del ex["timestamps"]
    ex2["cameras"] = ex2["cameras"][:, :12]
    torch.save([ex, ex2], d / "000000.torch")
    (d / "index.json").write_text('{"nofield": "000000.torch", "shortrow": "000000.torch"}')
    ds = RE10KDataset(tmp_path, "train", BoundedViewSampler(min_gap=1, max_gap=2, warm_up_steps=0))
    with pytest.raises(BadSceneError, match=r"000000\.torch: scene nofield: missing field\(s\) \['timestamps'\]"):
        ds[ds.keys.index("nofield")]
    with pytest.raises(BadSceneError, match=r"scene shortrow: 'cameras' must be a float tensor \[V, 18\]"):
        ds[ds.keys.index("shortrow")]


def test_index_names_missing_chunk_or_scene(tmp_path):
    write_split(tmp_path, "train", [[make_example("a", n_views=4, blobs=False)]])
    d = tmp_path / "train"
    (d / "index.json").write_text('{"a": "000000.torch", "ghost": "000000.torch", "lost": "000007.torch"}')
    with pytest.raises(FileNotFoundError, match=r"000007\.torch.*scene lost"):
        RE10KDataset(tmp_path, "train")
    (d / "index.json").write_text('{"a": "000000.torch", "ghost": "000000.torch"}')
    ds = RE10KDataset(tmp_path, "train", BoundedViewSampler(min_gap=1, max_gap=2, warm_up_steps=0))
    with pytest.raises(BadSceneError, match=r"000000\.torch: index\.json names scene ghost"):
        ds[ds.keys.index("ghost")]


def test_unsafe_chunk_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "train"
    d.mkdir()
    torch.save([{"key": "x", "obj": Evil()}], d / "000000.torch")
    with pytest.raises(BadSceneError, match="weights_only"):
        read_chunk(d / "000000.torch")


def test_skip_bad_substitutes_and_counts(tmp_path, caplog):
    good = [make_example(f"g{i}", n_views=6, seed=i, blobs=False) for i in range(2)]
    bad = make_example("b0", n_views=6, blobs=False)
    bad["images"] = [torch.tensor([0xFF, 0xD8, 0xFF, 0, 0], dtype=torch.uint8)] * 6
    write_split(tmp_path, "train", [[bad, *good]])
    sampler = BoundedViewSampler(min_gap=2, max_gap=4, warm_up_steps=0)
    strict = RE10KDataset(tmp_path, "train", sampler)
    with pytest.raises(BadSceneError):
        strict[strict.keys.index("b0")]
    ds = RE10KDataset(tmp_path, "train", sampler, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        item = ds[ds.keys.index("b0")]
    assert item.scene != "b0" and item.skipped == 1 and ds.num_skipped == 1
    assert "b0" in caplog.text
    # too few frames for the gap is also a skippable bad scene
    short = RE10KDataset(tmp_path, "train", BoundedViewSampler(min_gap=8, max_gap=9, warm_up_steps=0), skip_bad=True, max_skips=3)
    with pytest.raises(BadSceneError, match="consecutive bad scenes"):
        short[0]


def test_evaluation_index_restricts_and_checks(tmp_path):
    write_split(tmp_path, "test", [[make_example(f"s{i}", n_views=6, seed=i, blobs=False) for i in range(3)]])
    ev = EvaluationViewSampler({"s2": {"context": [0, 5], "target": [3]}, "s0": None, "s1": {"context": [1, 4], "target": [2]}})
    ds = RE10KDataset(tmp_path, "test", ev)
    assert ds.keys == ["s1", "s2"]  # null scenes are left out
    ev2 = EvaluationViewSampler({"s9": {"context": [0, 1], "target": [0]}, "s1": {"context": [1, 4], "target": [2]}})
    with pytest.raises(ValueError, match="s9"):
        RE10KDataset(tmp_path, "test", ev2)
    assert RE10KDataset(tmp_path, "test", ev2, allow_missing_eval_scenes=True).keys == ["s1"]
    ev3 = EvaluationViewSampler({"s1": {"context": [1, 40], "target": [2]}})
    with pytest.raises(ValueError, match=r"scene s1: frame indices \[40\] out of range for 6 frames"):
        RE10KDataset(tmp_path, "test", ev3)[0]


def test_eval_index_file_roundtrip(tmp_path):
    p = tmp_path / "evaluation_index_re10k.json"
    p.write_text('{"5aca87f95a9412c6": {"context": [58, 133], "target": [84, 102, 129]}, "e74ceac9043aa1b8": null}')
    ev = EvaluationViewSampler(p)
    assert ev.scenes == ["5aca87f95a9412c6"]
    ctx, tgt = ev.sample("5aca87f95a9412c6", 200, None, torch.Generator())
    assert ctx.tolist() == [58, 133] and tgt.tolist() == [84, 102, 129] and ctx.dtype == torch.int64
    with pytest.raises(ValueError, match="null"):
        ev.sample("e74ceac9043aa1b8", 200, None, torch.Generator())
    with pytest.raises(FileNotFoundError, match="assets"):
        EvaluationViewSampler(tmp_path / "nope.json")


def test_config_dataset_multiple_roots(tmp_path):
    write_split(tmp_path / "r1", "train", [[make_example("a", n_views=4, blobs=False)]])
    write_split(tmp_path / "r2", "train", [[make_example("b", n_views=4, blobs=False)]])
    cfg = ChunkDatasetConfig(roots=[tmp_path / "r1", tmp_path / "r2"], image_shape=(16, 16))
    ds = ChunkDataset(cfg, BoundedViewSampler(min_gap=1, max_gap=3, warm_up_steps=0))
    assert sorted(ds.keys) == ["a", "b"] and len(ds.groups) == 2
    write_split(tmp_path / "r3", "train", [[make_example("a", n_views=4, blobs=False)]])
    with pytest.raises(ValueError, match="already in another root"):
        ChunkDataset(ChunkDatasetConfig(roots=[tmp_path / "r1", tmp_path / "r3"]), None)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("images", "int", r"'images'\[0\] must be encoded bytes as a 1-D uint8 tensor, got 2000000000"),
        ("cameras", torch.int64, r"'cameras' must be a float tensor \[V, 18\].*got torch\.int64"),
        ("cameras", torch.bool, r"'cameras' must be a float tensor.*got torch\.bool"),
        ("cameras", torch.complex64, r"'cameras' must be a float tensor.*got torch\.complex64"),
        ("cameras", "nan", r"'cameras' holds non-finite values"),
        ("cameras", "zero_focal", r"focal lengths fx, fy must be > 0"),
        ("cameras", "zero_rotation", r"must be a rotation \(determinant 1\), got determinant 0"),
    ],
)
def test_hostile_records_are_refused_and_skippable(tmp_path, field, value, match):
    from vision3d.errors import InputError

    bad = make_example("b0", n_views=6, blobs=False)
    cams = bad["cameras"]
    if value == "int":
        bad["images"] = [2_000_000_000] + bad["images"][1:]  # a 2.4 KB chunk asking for a 2 GB buffer
    elif value == "nan":
        cams[1, 2] = float("nan")
    elif value == "zero_focal":
        cams[0, 0] = 0.0
    elif value == "zero_rotation":
        cams[2, 6:] = 0.0
    else:
        bad["cameras"] = cams.to(value)
    d = tmp_path / "train"
    d.mkdir()
    torch.save([bad, make_example("g0", n_views=6, blobs=False)], d / "000000.torch")
    (d / "index.json").write_text('{"b0": "000000.torch", "g0": "000000.torch"}')
    with pytest.raises(InputError, match=match) as e:
        read_chunk(d / "000000.torch")
    assert "000000.torch" in str(e.value)
    ds = RE10KDataset(tmp_path, "train", BoundedViewSampler(min_gap=2, max_gap=4, warm_up_steps=0), skip_bad=True)
    assert ds[ds.keys.index("b0")].scene == "g0"  # skip_bad catches it


def test_index_chunk_names_stay_in_the_split_folder(tmp_path):
    from vision3d.errors import InputError

    write_split(tmp_path, "train", [[make_example("a", n_views=4, blobs=False)]])
    for bad in ("../../etc/passwd", "/etc/passwd"):
        (tmp_path / "train" / "index.json").write_text(json.dumps({"a": bad}))
        with pytest.raises(InputError, match=r"index\.json: scene 'a': expected a path inside"):
            read_index(tmp_path / "train")
