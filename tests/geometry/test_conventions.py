"""OpenGL <-> OpenCV, RE10K rows and VGGT pose encodings: round trips and reprojection."""

from __future__ import annotations

import math

import pytest
import torch

from vision3d.geometry import (
    Cameras,
    cameras_from_re10k,
    cameras_from_vggt_pose_encoding,
    cameras_to_re10k,
    cameras_to_vggt_pose_encoding,
    make_rigid,
    opencv_to_opengl,
    opengl_to_opencv,
    random_rotation,
    read_re10k_txt,
)

D = torch.float64


def _project_opengl(c2w_gl, fx, fy, cx, cy, p):
    """Textbook OpenGL pinhole: camera looks down -z, y up; image rows grow downwards."""
    x, y, z = (torch.linalg.inv(c2w_gl) @ torch.cat([p, torch.ones(1, dtype=D)]))[:3]
    return torch.stack([cx + fx * x / -z, cy - fy * y / -z]), -z


def test_opengl_opencv_round_trip_and_axes():
    c2w = make_rigid(random_rotation(2, 3, dtype=D), torch.randn(2, 3, 3, dtype=D))
    torch.testing.assert_close(opencv_to_opengl(opengl_to_opencv(c2w)), c2w)
    cv = opengl_to_opencv(c2w)
    torch.testing.assert_close(cv[..., :3, 3], c2w[..., :3, 3])  # same centres
    torch.testing.assert_close(cv[..., :3, 2], -c2w[..., :3, 2])  # forward = -(GL z)
    torch.testing.assert_close(torch.linalg.det(cv[..., :3, :3]), torch.ones(2, 3, dtype=D))
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 4\]"):
        opengl_to_opencv(torch.eye(3))


def test_known_point_reprojects_identically_in_both_conventions():
    # identity OpenGL camera: a point straight ahead sits at -z and lands on the principal point
    fx, fy, cx, cy, W, H = 20.0, 22.0, 16.0, 12.0, 32, 24
    K = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=D)
    cam = Cameras(K, opengl_to_opencv(torch.eye(4, dtype=D)), W, H)
    uv, z = cam.project(torch.tensor([[0.0, 0.0, -2.0], [1.0, 1.0, -2.0]], dtype=D))
    torch.testing.assert_close(uv[0], torch.tensor([cx, cy], dtype=D))
    torch.testing.assert_close(z, torch.tensor([2.0, 2.0], dtype=D))
    # up in the world (GL +y) is towards row 0
    torch.testing.assert_close(uv[1], torch.tensor([cx + fx / 2, cy - fy / 2], dtype=D))
    # general pose
    c2w_gl = make_rigid(random_rotation(dtype=D), torch.randn(3, dtype=D))
    p = (c2w_gl @ torch.tensor([0.3, -0.2, -3.0, 1.0], dtype=D))[:3]
    uv_gl, z_gl = _project_opengl(c2w_gl, fx, fy, cx, cy, p)
    uv_cv, z_cv = Cameras(K, opengl_to_opencv(c2w_gl), W, H).project(p[None])
    torch.testing.assert_close(uv_cv[0], uv_gl)
    torch.testing.assert_close(z_cv[0], z_gl)


def _re10k_rows(n: int) -> torch.Tensor:
    w2c = make_rigid(random_rotation(n, dtype=D), torch.randn(n, 3, dtype=D))
    intr = torch.tensor([0.9, 1.6, 0.5, 0.48], dtype=D) + 0.01 * torch.rand(n, 4, dtype=D)
    return torch.cat([intr, torch.zeros(n, 2, dtype=D), w2c[:, :3].reshape(n, 12)], -1)


def test_re10k_round_trip_and_reprojection():
    rows = _re10k_rows(5)
    W, H = 64, 36
    cams = cameras_from_re10k(rows, W, H, near=1.0, far=100.0)
    assert cams.batch_shape == (5,) and (cams.width, cams.height, cams.near, cams.far) == (W, H, 1.0, 100.0)
    torch.testing.assert_close(cameras_to_re10k(cams), rows)
    # reprojection by hand: x = K_pix (R p + t), K_pix = normalised K scaled by (W, H)
    p = torch.randn(5, 1, 3, dtype=D) + torch.tensor([0, 0, 0], dtype=D)
    w2c = rows[:, 6:].reshape(5, 3, 4)
    pc = (w2c[:, :, :3] @ p[:, 0, :, None])[..., 0] + w2c[:, :, 3]
    u = rows[:, 0] * W * pc[:, 0] / pc[:, 2] + rows[:, 2] * W
    v = rows[:, 1] * H * pc[:, 1] / pc[:, 2] + rows[:, 3] * H
    uv, z = cams.project(p)
    torch.testing.assert_close(uv[:, 0], torch.stack([u, v], -1))
    torch.testing.assert_close(z[:, 0], pc[:, 2])
    # any batch shape
    assert cameras_from_re10k(rows.reshape(5, 1, 18), W, H).batch_shape == (5, 1)


def test_re10k_bad_rows():
    with pytest.raises(ValueError, match=r"\[\.\.\., 18\].*\(5, 17\)"):
        cameras_from_re10k(torch.zeros(5, 17), 8, 8)


def test_read_re10k_txt(tmp_path):
    rows = _re10k_rows(2)
    f = tmp_path / "0123abcd.txt"
    lines = ["https://www.youtube.com/watch?v=xyz"]
    for i, r in enumerate(rows.tolist()):
        lines.append(" ".join([str(1000 * (i + 1))] + [repr(x) for x in r]))
    f.write_text("\n".join(lines) + "\n")
    url, stamps, got = read_re10k_txt(f)
    assert url.endswith("xyz") and stamps.tolist() == [1000, 2000]
    torch.testing.assert_close(got, rows)
    f.write_text(lines[0] + "\n" + lines[1] + "\n" + " ".join(lines[2].split()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"0123abcd\.txt:3: camera row has 18 numbers, expected 19"):
        read_re10k_txt(f)


def test_vggt_pose_encoding_round_trip():
    W, H = 40, 30
    c2w = make_rigid(random_rotation(2, 3, dtype=D), torch.randn(2, 3, 3, dtype=D))
    K = torch.tensor([[35.0, 0, 20], [0, 33.0, 15], [0, 0, 1]], dtype=D)
    cams = Cameras(K, c2w, W, H)
    enc = cameras_to_vggt_pose_encoding(cams)
    assert enc.shape == (2, 3, 9)
    torch.testing.assert_close(enc[..., 8], torch.full((2, 3), 2 * math.atan(20 / 35), dtype=D))  # fov_w last
    torch.testing.assert_close(enc[..., :3], cams.world_to_cam[..., :3, 3])
    back = cameras_from_vggt_pose_encoding(enc, W, H)
    torch.testing.assert_close(back.cam_to_world, c2w)
    torch.testing.assert_close(back.K, K.expand(2, 3, 3, 3))
