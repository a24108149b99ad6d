"""Rotations: unit quaternions (**wxyz**, real part first), matrices, axis-angle.

Quaternions are ``[..., 4]`` in ``(w, x, y, z)`` order everywhere in vision3d (Gaussians, COLMAP).
Kornia 0.9 (github.com/kornia/kornia, Apache-2.0) uses the same order in
``kornia.geometry.conversions``; the conversions below delegate to it and add only what it lacks:

- :func:`quat_to_matrix`, :func:`matrix_to_quat`, :func:`quat_normalize`,
  :func:`axis_angle_to_matrix`, :func:`matrix_to_axis_angle`, :func:`axis_angle_to_quat`,
  :func:`quat_to_axis_angle`: kornia's functions, any batch shape, float32/float64, differentiable.
  :func:`matrix_to_quat` additionally fixes the sign (``w >= 0``; kornia leaves it free), so the same
  rotation always gives the same four numbers, which files (COLMAP) and tests need.
- :func:`quat_multiply` and :func:`quat_conjugate`: kornia has them only as methods of its
  ``Quaternion`` ``nn.Module``; we call those methods on a wrapper, so the Hamilton product is
  kornia's.
- :func:`random_quat` / :func:`random_rotation`: kornia's ``Quaternion.random`` takes only an
  integer batch size and no ``torch.Generator``; ours takes any shape and a generator (normalised
  4D Gaussian samples, uniform on SO(3)).
- :func:`make_rigid`, :func:`rigid_inverse`, :func:`look_at`, :func:`rotation_angle`: kornia's
  nearest functions (``Rt_to_matrix4x4``, ``inverse_transformation``) take only ``[B, ...]``
  batches; these take any batch shape. :func:`look_at` returns OpenCV cam-to-world directly.
"""

from __future__ import annotations

import torch
from kornia.geometry import conversions as _kc
from kornia.geometry.quaternion import Quaternion as _KQuaternion
from torch import Tensor


def _check_last(x: Tensor, n: int, name: str) -> None:
    if not isinstance(x, Tensor) or x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"{name}: expected a tensor [..., {n}], got {getattr(x, 'shape', type(x))}")


def _check_mat(R: Tensor, name: str) -> None:
    if not isinstance(R, Tensor) or R.shape[-2:] != (3, 3):
        raise ValueError(f"{name}: expected a tensor [..., 3, 3], got {getattr(R, 'shape', type(R))}")


def quat_normalize(q: Tensor, eps: float = 1e-12) -> Tensor:  # [..., 4] -> [..., 4] unit
    """Unit quaternion (L2 normalisation of the last axis)."""
    _check_last(q, 4, "quat_normalize")
    return _kc.normalize_quaternion(q, eps=eps)


def quat_canonical(q: Tensor) -> Tensor:  # [..., 4] wxyz -> [..., 4] wxyz with w >= 0
    """The one of ``q`` / ``-q`` (same rotation) whose real part is non-negative."""
    _check_last(q, 4, "quat_canonical")
    return torch.where(q[..., :1] < 0, -q, q)


def quat_to_matrix(q: Tensor) -> Tensor:  # [..., 4] wxyz -> [..., 3, 3]
    """Rotation matrix of a quaternion ``(w, x, y, z)`` (normalised first)."""
    _check_last(q, 4, "quat_to_matrix")
    return _kc.quaternion_to_rotation_matrix(q)


def matrix_to_quat(R: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 4] wxyz, w >= 0
    """Unit quaternion ``(w, x, y, z)`` with ``w >= 0`` of a rotation matrix."""
    _check_mat(R, "matrix_to_quat")
    return quat_canonical(quat_normalize(_kc.rotation_matrix_to_quaternion(R)))


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:  # [..., 4] wxyz x [..., 4] wxyz -> [..., 4]
    """Hamilton product ``a * b``: the rotation ``b`` followed by ``a`` (``R(a b) = R(a) R(b)``)."""
    _check_last(a, 4, "quat_multiply(a)")
    _check_last(b, 4, "quat_multiply(b)")
    a, b = torch.broadcast_tensors(a, b)
    return (_KQuaternion(a) * _KQuaternion(b)).data


def quat_conjugate(q: Tensor) -> Tensor:  # [..., 4] wxyz
    """Conjugate ``(w, -x, -y, -z)``; the inverse rotation for a unit quaternion."""
    _check_last(q, 4, "quat_conjugate")
    return _KQuaternion(q).conj().data


def quat_rotate(q: Tensor, v: Tensor) -> Tensor:  # [..., 4] wxyz, [..., 3] -> [..., 3]
    """Rotate vectors ``v`` by (normalised) quaternions ``q``."""
    _check_last(v, 3, "quat_rotate")
    return (quat_to_matrix(q) @ v[..., None])[..., 0]


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:  # [..., 3] axis * angle (rad) -> [..., 3, 3]
    _check_last(axis_angle, 3, "axis_angle_to_matrix")
    return _kc.axis_angle_to_rotation_matrix(axis_angle)


def matrix_to_axis_angle(R: Tensor) -> Tensor:  # [..., 3, 3] -> [..., 3] axis * angle in [0, pi]
    _check_mat(R, "matrix_to_axis_angle")
    return _kc.rotation_matrix_to_axis_angle(R)


def axis_angle_to_quat(axis_angle: Tensor) -> Tensor:  # [..., 3] -> [..., 4] wxyz
    _check_last(axis_angle, 3, "axis_angle_to_quat")
    return _kc.axis_angle_to_quaternion(axis_angle)


def quat_to_axis_angle(q: Tensor) -> Tensor:  # [..., 4] wxyz -> [..., 3]
    _check_last(q, 4, "quat_to_axis_angle")
    return _kc.quaternion_to_axis_angle(q)


def random_quat(
    *shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:  # [*shape, 4] wxyz unit, w >= 0
    """Rotations drawn uniformly from SO(3), as unit quaternions with ``w >= 0``."""
    q = torch.randn(*shape, 4, generator=generator, dtype=dtype, device=device)
    return quat_canonical(quat_normalize(q))


def random_rotation(
    *shape: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:  # [*shape, 3, 3]
    """Rotation matrices drawn uniformly from SO(3)."""
    return quat_to_matrix(random_quat(*shape, generator=generator, dtype=dtype, device=device))


def rotation_angle(R_a: Tensor, R_b: Tensor) -> Tensor:  # [..., 3, 3] x2 -> [...] radians
    """Geodesic angle between two rotations (radians, in ``[0, pi]``)."""
    _check_mat(R_a, "rotation_angle")
    _check_mat(R_b, "rotation_angle")
    rel = R_a.transpose(-1, -2) @ R_b
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return torch.acos(cos)


def make_rigid(R: Tensor, t: Tensor) -> Tensor:  # [..., 3, 3], [..., 3] -> [..., 4, 4]
    """``[[R, t], [0, 1]]``."""
    _check_mat(R, "make_rigid")
    _check_last(t, 3, "make_rigid")
    batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    out = torch.zeros(*batch, 4, 4, dtype=R.dtype, device=R.device)
    out[..., :3, :3] = R
    out[..., :3, 3] = t
    out[..., 3, 3] = 1.0
    return out


def rigid_inverse(T: Tensor) -> Tensor:  # [..., 4, 4] rigid -> [..., 4, 4]
    """Inverse of a rigid transform ``[[R, t], [0, 1]]`` as ``[[R^T, -R^T t], [0, 1]]``."""
    if not isinstance(T, Tensor) or T.shape[-2:] != (4, 4):
        raise ValueError(f"rigid_inverse: expected a tensor [..., 4, 4], got {getattr(T, 'shape', type(T))}")
    R, t = T[..., :3, :3], T[..., :3, 3]
    Rt = R.transpose(-1, -2)
    return make_rigid(Rt, -(Rt @ t[..., None])[..., 0])


def look_at(
    eye: Tensor,  # [..., 3] camera centres, world
    target: Tensor,  # [..., 3] points the cameras look at, world
    up: Tensor | tuple[float, float, float] = (0.0, 0.0, 1.0),  # [..., 3] world up
) -> Tensor:  # [..., 4, 4] cam-to-world, OpenCV (x right, y down, z forward)
    """OpenCV cam-to-world of cameras at ``eye`` looking at ``target`` with ``up`` towards row 0."""
    eye = torch.as_tensor(eye)
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device)
    _check_last(eye, 3, "look_at(eye)")
    _check_last(target, 3, "look_at(target)")
    _check_last(up, 3, "look_at(up)")
    eye, target, up = torch.broadcast_tensors(eye, target, up)
    z = torch.nn.functional.normalize(target - eye, dim=-1)
    x = torch.linalg.cross(z, up, dim=-1)
    if bool((x.norm(dim=-1) < 1e-9).any()):
        raise ValueError("look_at: the viewing direction is parallel to `up`; pick another up vector")
    x = torch.nn.functional.normalize(x, dim=-1)
    y = torch.linalg.cross(z, x, dim=-1)
    return make_rigid(torch.stack([x, y, z], -1), eye)
