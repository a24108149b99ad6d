"""transforms.json (nerfstudio / instant-ngp / Blender): round trips, conventions, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vision3d.errors import InputError
from vision3d.geometry import (
    Cameras,
    make_rigid,
    opencv_to_opengl,
    random_rotation,
    read_transforms_json,
    write_transforms_json,
)

D = torch.float64


def _cams(n=3, dtype=D):
    c2w = make_rigid(random_rotation(n, dtype=dtype), torch.randn(n, 3, dtype=dtype))
    K = torch.tensor([[30.0, 0, 16.5], [0, 31.0, 12.25], [0, 0, 1]], dtype=dtype)
    return Cameras(K, c2w, 32, 24)


def test_round_trip_shared_intrinsics(tmp_path):
    cams = _cams()
    dist = torch.tensor([0.1, -0.02, 0.001, 0.0005], dtype=D)
    extra = {"applied_transform": [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]], "ply_file_path": "sparse_pc.ply"}
    fe = [{"mask_path": f"masks/{i}.png"} for i in range(3)]
    write_transforms_json(tmp_path / "transforms.json", cams, [f"images/f{i}.png" for i in range(3)], dist, "OPENCV", extra, frame_extra=fe)
    raw = json.loads((tmp_path / "transforms.json").read_text())
    assert raw["fl_x"] == 30.0 and "fl_x" not in raw["frames"][0]  # shared intrinsics at the top
    t = read_transforms_json(tmp_path, dtype=D)
    torch.testing.assert_close(t.cameras.cam_to_world, cams.cam_to_world)
    torch.testing.assert_close(t.cameras.K, cams.K)
    assert (t.cameras.width, t.cameras.height) == (32, 24)
    assert t.camera_model == "OPENCV"
    torch.testing.assert_close(t.distortion, dist.expand(3, 4))
    assert t.extra == extra
    assert t.frame_extra == fe
    assert t.image_paths == [(tmp_path / f"images/f{i}.png").resolve() for i in range(3)]
    # the file stores OpenGL poses
    torch.testing.assert_close(torch.tensor(raw["frames"][1]["transform_matrix"], dtype=D), opencv_to_opengl(cams.cam_to_world[1]))


def test_round_trip_per_frame_intrinsics_float32(tmp_path):
    cams = _cams(dtype=torch.float32)
    K = cams.K.clone()
    K[1, 0, 0] = 29.3
    cams = Cameras(K, cams.cam_to_world, 32, 24)
    write_transforms_json(tmp_path / "t.json", cams, ["a.png", "b.png", "c.png"])
    raw = json.loads((tmp_path / "t.json").read_text())
    assert raw["frames"][1]["fl_x"] == 29.3 and "fl_x" not in raw  # shortest float32 decimal
    t = read_transforms_json(tmp_path / "t.json")
    assert t.camera_model == "PINHOLE" and t.distortion is None
    assert torch.equal(t.cameras.K, cams.K) and torch.equal(t.cameras.cam_to_world, cams.cam_to_world)


def test_nerfstudio_file_reprojects_like_opengl(tmp_path):
    # a hand-written nerfstudio file: camera at (1, 2, 3) looking down -z (GL identity rotation)
    meta = {
        "fl_x": 40.0, "fl_y": 40.0, "cx": 20.0, "cy": 15.0, "w": 40, "h": 30, "camera_model": "PINHOLE",
        "frames": [{"file_path": "images/a.png", "transform_matrix": [[1, 0, 0, 1], [0, 1, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]]}],
    }
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    t = read_transforms_json(tmp_path)
    # world point 2 units in front, 0.5 right and 0.25 up -> right and above the centre
    uv, z = t.cameras.project(torch.tensor([[[1.5, 2.25, 1.0]]]))
    torch.testing.assert_close(uv[0, 0], torch.tensor([20.0 + 40 * 0.5 / 2, 15.0 - 40 * 0.25 / 2]))
    torch.testing.assert_close(z[0, 0], torch.tensor(2.0))


def test_blender_camera_angle_and_image_size(tmp_path):
    from PIL import Image

    (tmp_path / "train").mkdir()
    Image.new("RGB", (20, 10)).save(tmp_path / "train" / "r_0.png")
    meta = {"camera_angle_x": 2 * math.atan(0.5), "frames": [{"file_path": "./train/r_0", "transform_matrix": torch.eye(4).tolist()}]}
    (tmp_path / "transforms_train.json").write_text(json.dumps(meta))
    t = read_transforms_json(tmp_path / "transforms_train.json")
    assert t.image_paths[0] == (tmp_path / "train" / "r_0.png").resolve()
    assert (t.cameras.width, t.cameras.height) == (20, 10)
    torch.testing.assert_close(t.cameras.K[0], torch.tensor([[20.0, 0, 10], [0, 20.0, 5], [0, 0, 1]]))


def test_downscale(tmp_path):
    cams = _cams(2)
    write_transforms_json(tmp_path / "transforms.json", cams, ["images/x.png", "images/y.png"])
    t = read_transforms_json(tmp_path, downscale=4, dtype=D)
    assert (t.cameras.width, t.cameras.height) == (8, 6)
    torch.testing.assert_close(t.cameras.K[..., :2, :], cams.K[..., :2, :] / 4)
    assert t.image_paths[1] == (tmp_path / "images_4" / "y.png").resolve()


def test_opencv_with_k3_becomes_full_opencv(tmp_path):
    meta = {"fl_x": 10.0, "fl_y": 10.0, "cx": 5.0, "cy": 5.0, "w": 10, "h": 10, "camera_model": "OPENCV",
            "k1": 0.1, "k2": 0.2, "k3": 0.3, "p1": 0.01, "p2": 0.02,
            "frames": [{"file_path": "a.png", "transform_matrix": torch.eye(4).tolist()}]}
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    t = read_transforms_json(tmp_path, dtype=D)
    assert t.camera_model == "FULL_OPENCV"
    torch.testing.assert_close(t.distortion, torch.tensor([[0.1, 0.2, 0.01, 0.02, 0.3, 0, 0, 0]], dtype=D))


@pytest.mark.parametrize(
    "meta, match",
    [
        ({"fl_x": 1.0}, r"transforms\.json: missing key 'frames'"),
        ({"fl_x": 1.0, "w": 4, "h": 4, "camera_model": "KANNALA", "frames": [{"file_path": "a", "transform_matrix": torch.eye(4).tolist()}]},
         r"transforms\.json: camera_model 'KANNALA' is not supported"),
        ({"fl_x": 1.0, "w": 4, "h": 4, "frames": [{"file_path": "a", "transform_matrix": [[1, 0], [0, 1]]}]},
         r"transforms\.json: frames\[0\]\.transform_matrix must be a 4x4"),
        ({"fl_x": 1.0, "w": 4, "h": 4, "frames": [{"transform_matrix": torch.eye(4).tolist()}]},
         r"transforms\.json: frames\[0\]\.file_path is missing"),
        ({"w": 4, "h": 4, "frames": [{"file_path": "a", "transform_matrix": torch.eye(4).tolist()}]},
         r"frames\[0\] has no focal length"),
        ({"fl_x": "big", "w": 4, "h": 4, "frames": [{"file_path": "a", "transform_matrix": torch.eye(4).tolist()}]},
         r"fl_x: expected a number"),
    ],
)
def test_bad_files_name_file_and_field(tmp_path, meta, match):
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        read_transforms_json(tmp_path)


_EYE = torch.eye(4).tolist()
_ZERO_R = [[0.0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 3], [0, 0, 0, 1]]


@pytest.mark.parametrize(
    "top, frame, field",
    [
        ({}, {"file_path": "../../etc/passwd"}, r"frames\[0\]\.file_path: expected a path inside"),
        ({}, {"file_path": "/etc/passwd"}, r"frames\[0\]\.file_path: expected a path inside"),
        ({"fl_x": float("nan")}, {}, r"fl_x: expected a finite number"),
        ({"fl_x": -3.0}, {}, r"fl_x: expected a finite focal length > 0"),
        ({"fl_x": 0}, {}, r"fl_x: expected a finite focal length > 0"),
        ({"fl_x": None, "camera_angle_x": 0}, {}, r"camera_angle_x: expected a field of view"),
        ({"w": 0}, {}, r"w/h width: expected a positive integer"),
        ({"h": -4}, {}, r"w/h height: expected a positive integer"),
        ({"w": 10**6, "h": 10**6}, {}, r"w/h: expected at most"),
        ({}, {"transform_matrix": _ZERO_R}, r"frames\[0\]\.transform_matrix: expected a rotation"),
        ({}, {"transform_matrix": [[float("nan")] * 4] * 4}, r"frames\[0\]\.transform_matrix: expected finite values"),
        ({"cx": float("inf")}, {}, r"cx: expected a finite number"),
    ],
)
def test_hostile_values_are_refused_with_input_error(tmp_path, top, frame, field):
    meta = {"fl_x": 4.0, "w": 4, "h": 4, **top}
    meta = {k: v for k, v in meta.items() if v is not None}
    meta["frames"] = [{"file_path": "a.png", "transform_matrix": _EYE, **frame}]
    (tmp_path / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=field) as e:
        read_transforms_json(tmp_path)
    assert str(tmp_path / "transforms.json") in str(e.value)


def test_bad_writer_arguments(tmp_path):
    cams = _cams(2)
    with pytest.raises(ValueError, match="2 cameras"):
        write_transforms_json(tmp_path / "t.json", cams, ["a.png"])
    with pytest.raises(ValueError, match=r"distortion must be \[2, 4\]"):
        write_transforms_json(tmp_path / "t.json", cams, ["a", "b"], torch.zeros(3), "OPENCV")
    assert not (tmp_path / "t.json").exists()


def test_applied_transform_undone(tmp_path):
    cams = _cams(2)
    A = torch.tensor([[0.0, 1, 0, 0.5], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], dtype=D)
    moved = Cameras(cams.K, A @ cams.cam_to_world, 32, 24)
    write_transforms_json(tmp_path / "transforms.json", moved, ["a", "b"], extra={"applied_transform": A[:3].tolist()})
    t = read_transforms_json(tmp_path, dtype=D)
    torch.testing.assert_close(t.applied_transform, A)
    torch.testing.assert_close(t.cameras_in_original_world().cam_to_world, cams.cam_to_world)


def test_per_frame_sizes_round_trip(tmp_path):
    """nerfstudio allows per-frame w/h (vision3d writes them for photo collections): read, group, and refuse one batch."""
    from vision3d import InputError
    from vision3d.geometry import Cameras

    a = Cameras(torch.tensor([[[20.0, 0, 16], [0, 21, 12], [0, 0, 1]]]), torch.eye(4)[None], 32, 24)
    b = Cameras(torch.tensor([[[18.0, 0, 12], [0, 18, 16], [0, 0, 1]]]).expand(2, 3, 3), torch.eye(4).expand(2, 4, 4), 24, 32)
    write_transforms_json(tmp_path / "transforms.json", [a, b], ["a.png", "b.png", "c.png"])
    meta = json.loads((tmp_path / "transforms.json").read_text())
    assert "w" not in meta and [(f["w"], f["h"]) for f in meta["frames"]] == [(32, 24), (24, 32), (24, 32)]
    t = read_transforms_json(tmp_path)
    assert t.sizes == [(32, 24), (24, 32), (24, 32)] and not t.uniform_size
    torch.testing.assert_close(t.camera(0).K, a.K)
    assert (t.camera(2).width, t.camera(2).height) == (24, 32)
    groups = t.by_size()
    assert list(groups) == [(32, 24), (24, 32)] and groups[(24, 32)][1] == [1, 2]
    torch.testing.assert_close(groups[(24, 32)][0].K, b.K)
    with pytest.raises(InputError, match=r"transforms\.json.*frames\[1\]\.w/h.*one image size.*24x32"):
        t.cameras
    half = read_transforms_json(tmp_path, downscale=2)
    assert half.sizes == [(16, 12), (12, 16), (12, 16)]
    # the render command renders each size group
    from vision3d.cli.render import load_cameras

    assert [(c.width, c.height, n) for c, n in load_cameras(tmp_path / "transforms.json")] == [(32, 24, ["a"]), (24, 32, ["b", "c"])]
