"""vision3d.utils.images / vision3d.utils.video: PNG, 16-bit depth, NPY/EXR depth and MP4, atomic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vision3d.utils.images import (
    load_depth_exr,
    load_depth_png16,
    load_png,
    save_depth,
    save_depth_exr,
    save_depth_png16,
    save_png,
    to_uint8_hwc,
)
from vision3d.utils.video import read_video_info, write_video


def test_png_round_trip_channels_first_and_last(tmp_path):
    img = torch.rand(3, 9, 13)
    save_png(tmp_path / "a.png", img)
    back = load_png(tmp_path / "a.png")
    assert back.shape == (3, 9, 13)
    assert (back - img).abs().max() <= 0.5 / 255 + 1e-6
    hwc = (np.random.rand(5, 7, 3) * 255).astype(np.uint8)
    save_png(tmp_path / "b.png", hwc)
    assert torch.equal((load_png(tmp_path / "b.png") * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(hwc))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_bad_image_shape_names_the_shape():
    with pytest.raises(ValueError, match="expected"):
        to_uint8_hwc(torch.rand(4, 5, 6, 7))


def test_depth_png16_quantisation_and_zero_is_no_depth(tmp_path):
    d = torch.rand(6, 8) * 4 + 0.5
    d[0, 0] = 0.0
    d[1, 1] = float("nan")
    s = save_depth_png16(tmp_path / "d.png", d)
    back = load_depth_png16(tmp_path / "d.png", s)
    valid = torch.isfinite(d) & (d > 0)
    assert (back[valid] - d[valid]).abs().max() <= s / 2 + 1e-6
    assert back[0, 0] == 0 and back[1, 1] == 0
    assert abs(float(back.max()) - float(d[valid].max())) <= s


def test_depth_exr_and_npy_round_trip(tmp_path):
    d = torch.rand(5, 7) * 3
    save_depth_exr(tmp_path / "d.exr", d)
    assert torch.equal(load_depth_exr(tmp_path / "d.exr"), d)
    p, scale = save_depth(tmp_path / "e", d[None], "npy")
    assert p.suffix == ".npy" and scale is None
    assert np.array_equal(np.load(p), d.numpy())
    with pytest.raises(ValueError, match="png16"):
        save_depth(tmp_path / "f", d, "tiff")
    (tmp_path / "bad.exr").write_bytes(b"not an exr at all")
    with pytest.raises(ValueError, match="not an OpenEXR"):
        load_depth_exr(tmp_path / "bad.exr")


def test_video_is_written_and_readable(tmp_path):
    frames = [torch.full((3, 32, 48), i / 7) for i in range(8)]
    path = write_video(tmp_path / "v.mp4", frames, fps=8)
    info = read_video_info(path)
    assert info["frames"] == 8 and (info["width"], info["height"]) == (48, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_video_errors_leave_no_file(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "v.mp4", [])
    with pytest.raises(ValueError, match="frame 1"):
        write_video(tmp_path / "w.mp4", [torch.zeros(3, 16, 16), torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match=".mp4"):
        write_video(tmp_path / "x.avi", [torch.zeros(3, 16, 16)])
    assert list(tmp_path.iterdir()) == []
