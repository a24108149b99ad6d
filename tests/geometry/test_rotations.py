"""Quaternions (wxyz), matrices, axis-angle: known values, round trips, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from vision3d.geometry import (
    axis_angle_to_matrix,
    axis_angle_to_quat,
    make_rigid,
    matrix_to_axis_angle,
    matrix_to_quat,
    quat_canonical,
    quat_conjugate,
    quat_multiply,
    quat_normalize,
    quat_rotate,
    quat_to_axis_angle,
    quat_to_matrix,
    random_quat,
    random_rotation,
    rigid_inverse,
    rotation_angle,
)

D = torch.float64


def test_known_values_wxyz():
    s = math.sqrt(0.5)
    q = torch.tensor([s, 0.0, 0.0, s], dtype=D)  # +90 degrees about z
    R = quat_to_matrix(q)
    torch.testing.assert_close(R @ torch.tensor([1.0, 0, 0], dtype=D), torch.tensor([0.0, 1, 0], dtype=D))
    torch.testing.assert_close(quat_rotate(q, torch.tensor([0.0, 1, 0], dtype=D)), torch.tensor([-1.0, 0, 0], dtype=D))
    torch.testing.assert_close(axis_angle_to_quat(torch.tensor([0, 0, math.pi / 2], dtype=D)), q)
    torch.testing.assert_close(quat_to_matrix(torch.tensor([1.0, 0, 0, 0])), torch.eye(3))


def test_round_trips_and_canonical_sign():
    q = random_quat(4, 5, dtype=D)
    assert q.shape == (4, 5, 4) and bool((q[..., 0] >= 0).all())
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4, 5, dtype=D))
    R = quat_to_matrix(q)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=D).expand(4, 5, 3, 3))
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(4, 5, dtype=D))
    torch.testing.assert_close(matrix_to_quat(R), q)
    torch.testing.assert_close(matrix_to_quat(quat_to_matrix(-q)), q)  # double cover, one answer
    aa = quat_to_axis_angle(q)
    torch.testing.assert_close(axis_angle_to_matrix(aa), R)
    torch.testing.assert_close(axis_angle_to_matrix(matrix_to_axis_angle(R)), R)
    torch.testing.assert_close(quat_normalize(3.0 * q), q)
    torch.testing.assert_close(quat_canonical(-q), q)


def test_composition_and_inverse():
    a, b = random_quat(6, dtype=D), random_quat(6, dtype=D)
    torch.testing.assert_close(quat_to_matrix(quat_multiply(a, b)), quat_to_matrix(a) @ quat_to_matrix(b))
    ident = quat_canonical(quat_multiply(a, quat_conjugate(a)))
    torch.testing.assert_close(ident, torch.tensor([1.0, 0, 0, 0], dtype=D).expand(6, 4))
    # broadcasting one quaternion against many
    torch.testing.assert_close(quat_multiply(a[:1], b), quat_multiply(a[:1].expand(6, 4), b))


def test_random_rotation_is_seeded_and_spread():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(random_rotation(3, generator=g1), random_rotation(3, generator=g2))
    R = random_rotation(2000, dtype=D)
    # uniform on SO(3): E[R] = 0 and the mean angle is pi/2 + 2/pi
    assert R.mean(0).abs().max() < 0.06
    ang = rotation_angle(torch.eye(3, dtype=D).expand_as(R), R)
    assert abs(ang.mean().item() - (math.pi / 2 + 2 / math.pi)) < 0.05


def test_rigid_inverse_and_gradients():
    T = make_rigid(random_rotation(3, dtype=D), torch.randn(3, 3, dtype=D))
    torch.testing.assert_close(rigid_inverse(T), torch.linalg.inv(T))
    q = torch.randn(2, 4, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: quat_to_matrix(x), (q,))
    assert torch.autograd.gradcheck(lambda x: quat_multiply(x, x.flip(0)), (q,))


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"quat_to_matrix: expected a tensor \[\.\.\., 4\]"):
        quat_to_matrix(torch.zeros(3))
    with pytest.raises(ValueError, match=r"matrix_to_quat: expected a tensor \[\.\.\., 3, 3\]"):
        matrix_to_quat(torch.zeros(4, 4))


def test_look_at_points_the_camera_at_the_target():
    from vision3d.geometry import Cameras, look_at

    eye = torch.tensor([[3.0, 0.5, 1.0], [-2.0, 2.0, 0.5]], dtype=D)
    target = torch.tensor([0.1, -0.2, 0.3], dtype=D)
    c2w = look_at(eye, target)
    torch.testing.assert_close(torch.linalg.det(c2w[:, :3, :3]), torch.ones(2, dtype=D))
    K = torch.tensor([[10.0, 0, 8], [0, 10.0, 6], [0, 0, 1]], dtype=D)
    cams = Cameras(K, c2w, 16, 12)
    uv, z = cams.project(torch.stack([target, target + torch.tensor([0, 0, 0.1], dtype=D)])[None].expand(2, 2, 3))
    torch.testing.assert_close(uv[:, 0], torch.tensor([[8.0, 6.0], [8.0, 6.0]], dtype=D))  # target at the centre
    assert bool((uv[:, 1, 1] < 6.0).all())  # world up (+z) goes towards row 0
    torch.testing.assert_close(z[:, 0], (eye - target).norm(dim=-1))
    with pytest.raises(ValueError, match="parallel"):
        look_at(torch.tensor([0.0, 0, 5]), torch.zeros(3))
