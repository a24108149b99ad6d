"""Image folders and videos: EXIF, size policy, known cameras, sharp-frame sampling, bad input."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests.data.util import scene_cameras
from vision3d.data.folder import laplacian_variance, list_images, load_image_folder, load_video
from vision3d.geometry.conventions import opencv_to_opengl


def _save(path, w, h, seed=0, exif_orientation=None):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif.tobytes())
    else:
        im.save(path)
    return arr


def test_folder_formats_order_and_exif(tmp_path):
    _save(tmp_path / "img10.png", 40, 30, 0)
    _save(tmp_path / "img2.bmp", 40, 30, 1)
    _save(tmp_path / "img1.webp", 40, 30, 2)
    # stored 30x40 (portrait pixels) with orientation 6 (rotate 90 CW to view): upright 40x30
    _save(tmp_path / "img3.jpg", 30, 40, 3, exif_orientation=6)
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_images(tmp_path)] == ["img1.webp", "img2.bmp", "img3.jpg", "img10.png"]
    s = load_image_folder(tmp_path)
    assert s.images.shape == (4, 3, 30, 40) and s.cameras is None and s.images.dtype == torch.float32
    png = np.asarray(Image.open(tmp_path / "img10.png"))
    assert torch.allclose(s.images[3], torch.from_numpy(png.copy()).permute(2, 0, 1).float() / 255)
    assert load_image_folder(tmp_path, max_images=2).names == ["img1.webp", "img10.png"]


def test_mixed_sizes_policy(tmp_path):
    _save(tmp_path / "a.png", 64, 48, 0)
    _save(tmp_path / "b.png", 64, 48, 1)
    _save(tmp_path / "c.png", 128, 96, 2)  # same aspect: resized to the common size
    s = load_image_folder(tmp_path)
    assert s.images.shape == (3, 3, 48, 64)
    _save(tmp_path / "d.png", 48, 48, 3)  # square: aspect off by 25%
    with pytest.raises(ValueError, match=r"d\.png \(48x48\).*size_policy='crop'"):
        load_image_folder(tmp_path)
    s = load_image_folder(tmp_path, size_policy="crop", image_shape=(32, 32))
    assert s.images.shape == (4, 3, 32, 32)


def test_fewer_than_two_images(tmp_path):
    _save(tmp_path / "only.png", 16, 16)
    with pytest.raises(ValueError, match=r"found 1 image\(s\).*at least two"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "nope")


def test_too_few_images_explains_what_was_not_read(tmp_path):
    """HEIC photos and a nested images/ folder are named in the error, with what to do."""
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"x")
    (tmp_path / "IMG_0002.heic").write_bytes(b"x")
    (tmp_path / ".DS_Store").write_bytes(b"x")  # hidden files are not worth mentioning
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    with pytest.raises(ValueError) as e:
        load_image_folder(tmp_path)
    msg = str(e.value)
    assert "not read: 2 .heic file(s)" in msg and "export them as JPEG" in msg and "DS_Store" not in msg
    assert "sub-folder(s) with images: images (pass that folder instead)" in msg


def test_known_cameras_from_transforms_json(tmp_path):
    cams = scene_cameras(3, 64, 48)
    (tmp_path / "images").mkdir()
    names = ["f0.png", "f1.png", "f2.png"]
    for n in names:
        _save(tmp_path / "images" / n, 32, 24)  # a model made on 2x larger images
    gl = opencv_to_opengl(cams.cam_to_world)
    K = cams.K[0]
    meta = {"w": 64, "h": 48, "fl_x": float(K[0, 0]), "fl_y": float(K[1, 1]), "cx": float(K[0, 2]), "cy": float(K[1, 2]),
            "frames": [{"file_path": f"images/{n}", "transform_matrix": gl[i].tolist()} for i, n in reversed(list(enumerate(names)))]}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    s = load_image_folder(tmp_path / "images", cameras=tmp_path / "transforms.json")
    assert tuple(s.cameras.batch_shape) == (3,) and (s.cameras.width, s.cameras.height) == (32, 24)
    ref = cams.resize(32, 24)
    assert torch.allclose(s.cameras.K.double(), ref.K, atol=1e-4)  # matched by name despite the reversed order
    assert torch.allclose(s.cameras.cam_to_world.double(), ref.cam_to_world, atol=1e-5)
    _save(tmp_path / "images" / "extra.png", 32, 24)
    with pytest.raises(ValueError, match=r"extra\.png"):
        load_image_folder(tmp_path / "images", cameras=tmp_path / "transforms.json")
    assert len(load_image_folder(tmp_path / "images", cameras=tmp_path / "transforms.json", drop_unposed=True)) == 3


def test_video_even_frames_and_sharpness(tmp_path):
    path = tmp_path / "clip.avi"
    w, h, n = 64, 48, 24
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    base = (rng.random((h, w)) > 0.5).astype(np.uint8) * 255
    for i in range(n):
        frame = np.roll(base, i, axis=1)
        if i % 2 == 1:  # odd frames motion-blurred
            frame = cv2.blur(frame, (9, 9))
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    s = load_video(path, 6)
    assert s.images.shape == (6, 3, 48, 64)
    assert s.frame_indices.tolist() == [0, 5, 9, 14, 18, 23]
    sharp = load_video(path, 6, sharpness_window=2, image_shape=(32, 32))
    assert sharp.images.shape == (6, 3, 32, 32)
    assert all(i % 2 == 0 for i in sharp.frame_indices.tolist()), sharp.frame_indices
    assert laplacian_variance(base) > laplacian_variance(cv2.blur(base, (9, 9)))
    with pytest.raises(ValueError, match="num_frames"):
        load_video(path, 1)
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="bad.avi"):
        load_video(bad, 4)


def test_known_cameras_from_colmap_and_exif_mismatch(tmp_path):
    from vision3d.geometry.colmap import ColmapModel, write_colmap

    cams = scene_cameras(3, 40, 30)
    names = ["a.jpg", "b.jpg", "c.jpg"]
    write_colmap(ColmapModel.from_cameras(cams.to(torch.float64), names), tmp_path / "sparse" / "0")
    (tmp_path / "images").mkdir()
    for i, n in enumerate(names):
        _save(tmp_path / "images" / n, 40, 30, i)
    s = load_image_folder(tmp_path / "images", cameras=tmp_path / "sparse" / "0")
    assert torch.allclose(s.cameras.K.double(), cams.K, atol=1e-4)
    assert torch.allclose(s.cameras.cam_to_world.double(), cams.cam_to_world, atol=1e-5)
    # a photo whose EXIF rotation makes it portrait, while the model was made on the raw landscape pixels
    _save(tmp_path / "images" / "b.jpg", 40, 30, 1, exif_orientation=6)
    with pytest.raises(ValueError, match=r"b\.jpg.*exif_transpose=False"):
        load_image_folder(tmp_path / "images", cameras=tmp_path / "sparse" / "0", size_policy="crop")
    assert load_image_folder(tmp_path / "images", cameras=tmp_path / "sparse" / "0", exif_transpose=False).images.shape == (3, 3, 30, 40)


@pytest.mark.parametrize("side", [9000, 12000])  # over our 64 Mpx limit; 12000^2 also trips Pillow's bomb check
def test_oversized_images_are_refused_before_decoding(tmp_path, side):
    from PIL import Image

    from vision3d.data.folder import read_image
    from vision3d.errors import InputError

    p = tmp_path / "big.png"
    Image.new("1", (side, side)).save(p)  # a few KB on disk, 3 x side^2 bytes decoded
    with pytest.raises(InputError, match=r"big\.png: image size"):
        read_image(p)


def test_broken_image_names_the_file(tmp_path):
    from vision3d.data.folder import read_image
    from vision3d.errors import InputError

    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)
    with pytest.raises(InputError, match=r"x\.jpg: file: expected a readable image"):
        read_image(tmp_path / "x.jpg")
