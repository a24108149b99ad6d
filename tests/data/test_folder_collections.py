"""Photo collections: per-photo sizes, the majority-aspect crop, unreadable files, EXIF camera keys."""

from __future__ import annotations

import pytest
import torch

from vision3d.data.folder import exif_camera, list_images, load_images, majority_size
from vision3d.utils.images import save_png


def test_majority_size_is_the_majority_aspect_not_the_commonest_exact_size():
    # 6 landscape photos, all of different sizes, against 2 identical portrait ones
    sizes = [(400, 300), (404, 303), (800, 600), (640, 480), (1000, 750), (396, 297), (300, 400), (300, 400)]
    w, h = majority_size(sizes)
    assert w > h
    assert majority_size([(30, 40), (30, 40), (40, 30)]) == (30, 40)
    with pytest.raises(ValueError):
        majority_size([])


def test_keep_crop_error_and_unreadable(tmp_path):
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate([(30, 40), (30, 40), (40, 30), (27, 36)]):
        save_png(tmp_path / f"p{i}.png", torch.rand(3, h, w, generator=g))
    files = list_images(tmp_path)
    kept = load_images(files, size_policy="keep")
    assert [tuple(im.shape[1:]) for im in kept.images] == [(30, 40), (30, 40), (40, 30), (27, 36)]
    cropped = load_images(files, size_policy="crop")
    assert tuple(cropped.images.shape) == (4, 3, 30, 40)  # the landscape majority, the portrait one cropped
    with pytest.raises(ValueError, match=r"p2.png.*--size-policy keep"):
        load_images(files)
    (tmp_path / "p1.png").write_bytes(b"broken")
    (tmp_path / "p3.png").write_bytes(b"broken too")
    with pytest.raises(ValueError, match=r"2 of 4 image\(s\) cannot be read:\n.*p1.png.*\n.*p3.png") as e:
        load_images(files, size_policy="keep")
    assert "skip_unreadable" in str(e.value)
    s = load_images(files, size_policy="keep", skip_unreadable=True)
    assert s.names == ["p0.png", "p2.png"] and s.skipped == ["p1.png", "p3.png"]


def test_exif_camera_keys(tmp_path):
    from PIL import Image

    def jpeg(name, model, focal, size=(40, 30)):
        im = Image.new("RGB", size, (120, 80, 40))
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = "Maker", model
        exif.get_ifd(0x8769)[0x920A] = focal
        im.save(tmp_path / name, exif=exif)
        return tmp_path / name

    a, b, c = jpeg("a.jpg", "X1", 24.0), jpeg("b.jpg", "X1", 24.0), jpeg("c.jpg", "X1", 50.0)
    assert exif_camera(a) == exif_camera(b) == (40, 30, "Maker", "X1", 24.0)
    assert exif_camera(c) != exif_camera(a)
    save_png(tmp_path / "d.png", torch.rand(3, 30, 40))
    assert exif_camera(tmp_path / "d.png") == (40, 30, None, None, None)
    (tmp_path / "e.jpg").write_bytes(b"no")
    assert exif_camera(tmp_path / "e.jpg") is None


def test_auto_camera_mode(tmp_path):
    from vision3d.train.reconstruct import ReconstructConfig, _camera_mode

    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_png(tmp_path / "same" / f"p{i}.png", torch.rand(3, 30, 40, generator=g))
        save_png(tmp_path / "mixed" / f"p{i}.png", torch.rand(3, 30 + i, 40, generator=g))
    assert _camera_mode(ReconstructConfig(tmp_path / "same", tmp_path / "o")) == "single"
    assert _camera_mode(ReconstructConfig(tmp_path / "mixed", tmp_path / "o")) == "per-image"
    assert _camera_mode(ReconstructConfig(tmp_path / "same", tmp_path / "o", camera_mode="per-folder")) == "per-folder"
