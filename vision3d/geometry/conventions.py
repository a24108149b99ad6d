"""Named conversions between camera conventions and ours (K in pixels, cam-to-world OpenCV).

Every other convention is converted here, at the boundary, and nowhere else.

- **OpenGL / nerfstudio / Blender / instant-ngp** camera frame: x right, y up, z backwards (the
  camera looks down -z). Going to OpenCV (x right, y down, z forward) negates the camera's y and z
  axes, i.e. right-multiplies the cam-to-world matrix by ``diag(1, -1, -1, 1)``; the camera centre
  and the world frame are unchanged. ``kornia.geometry.conversions.camtoworld_graphics_to_vision_4x4``
  does the same product but only for a ``[B, 4, 4]`` batch; ours takes any ``[..., 4, 4]`` and is a
  sign flip of two columns (exact in every dtype, differentiable).
- **RealEstate10K** (Zhou et al., "Stereo Magnification", SIGGRAPH 2018; the ``.txt`` camera files
  of google.github.io/realestate10k) and the ``.torch`` chunks of pixelSplat (Charatan et al.,
  arXiv:2312.12337, github.com/dcharatan/pixelsplat, ``src/dataset/dataset_re10k.py``, MIT) and
  MVSplat (Chen et al., arXiv:2403.14627, github.com/donydchen/mvsplat at 175b17a,
  ``DatasetRE10k.convert_poses``, MIT): each camera is one
  row ``timestamp fx fy cx cy 0 0 r00 r01 r02 t0 r10 r11 r12 t1 r20 r21 r22 t2``; the
  intrinsics are normalised by the image width (fx, cx) and height (fy, cy), and the 3x4 matrix
  is **world-to-camera** in OpenCV axes, row-major. The pixelSplat/MVSplat loaders read the 18
  numbers after the timestamp, build K with those four numbers, and invert the padded 4x4 matrix
  to get cam-to-world. :func:`cameras_from_re10k` and :func:`cameras_to_re10k` take those 18
  numbers; :func:`read_re10k_txt` reads the original text files.
- **VGGT** pose encoding ``absT_quaR_FoV`` (Wang et al., arXiv:2503.11651,
  github.com/facebookresearch/vggt at 71fe69b, ``vggt/utils/pose_enc.py`` and ``rotation.py``;
  VGGT licence): per camera ``[t (3), quaternion xyzw (4), fov_h, fov_w]`` of the world-to-camera
  OpenCV pose (quaternion real part last and non-negative), principal point at the image centre.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from .cameras import Cameras
from .rotations import matrix_to_quat, quat_to_matrix, rigid_inverse

def _check_c2w(c2w: Tensor, name: str) -> None:
    if not isinstance(c2w, Tensor) or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"{name}: expected a cam-to-world tensor [..., 4, 4], got {getattr(c2w, 'shape', type(c2w))}")


def opengl_to_opencv(c2w: Tensor) -> Tensor:  # [..., 4, 4] cam-to-world, OpenGL -> OpenCV
    """Cam-to-world in the OpenGL/nerfstudio/Blender camera frame -> the OpenCV camera frame.

    Args:
        c2w: ``[..., 4, 4]`` cam-to-world, camera x right, y up, z backwards.

    Returns:
        ``[..., 4, 4]`` cam-to-world, camera x right, y down, z forward (same world frame, same
        camera centres).
    """
    _check_c2w(c2w, "opengl_to_opencv")
    return _flip_yz(c2w)


def opencv_to_opengl(c2w: Tensor) -> Tensor:  # [..., 4, 4] cam-to-world, OpenCV -> OpenGL
    """Inverse of :func:`opengl_to_opencv` (the flip is its own inverse)."""
    _check_c2w(c2w, "opencv_to_opengl")
    return _flip_yz(c2w)


def _flip_yz(c2w: Tensor) -> Tensor:  # [..., 4, 4] -> [..., 4, 4], camera y and z axes negated
    # c2w @ diag(1, -1, -1, 1), written as a negation of columns 1 and 2 of the top 3 rows (no -0.0 in
    # the last row, exact, differentiable)
    top = torch.cat([c2w[..., :3, :1], -c2w[..., :3, 1:3], c2w[..., :3, 3:]], -1)
    return torch.cat([top, c2w[..., 3:, :]], -2)


# ---------------------------------------------------------------------------------------- RE10K
RE10K_ROW = 18  # numbers per camera after the timestamp


def cameras_from_re10k(
    rows: Tensor,  # [..., 18] fx fy cx cy (normalised), 0, 0, world-to-camera 3x4 row-major (OpenCV)
    width: int,
    height: int,
    near: float | None = None,
    far: float | None = None,
) -> Cameras:
    """Cameras from RealEstate10K / pixelSplat camera rows (the 18 numbers after the timestamp).

    Args:
        rows: ``[..., 18]``: ``fx fy cx cy`` normalised by the image width/height, two unused
            numbers, then the world-to-camera ``3x4`` matrix (OpenCV axes), row-major.
        width, height: size in pixels of the images the cameras belong to.

    Returns:
        :class:`Cameras` with batch shape ``rows.shape[:-1]``, K in pixels, cam-to-world OpenCV.
    """
    if not isinstance(rows, Tensor):
        rows = torch.as_tensor(rows)
    if rows.shape[-1:] != (RE10K_ROW,):
        raise ValueError(
            f"cameras_from_re10k: rows must be [..., {RE10K_ROW}] (fx fy cx cy, 2 unused, 3x4 "
            f"world-to-camera), got shape {tuple(rows.shape)}"
        )
    if not rows.dtype.is_floating_point:
        rows = rows.float()
    batch = rows.shape[:-1]
    K = _pinhole_K(rows[..., 0], rows[..., 1], rows[..., 2], rows[..., 3])
    w2c = torch.eye(4, dtype=rows.dtype, device=rows.device).expand(*batch, 4, 4).clone()
    w2c[..., :3, :] = rows[..., 6:].reshape(*batch, 3, 4)
    c2w = torch.linalg.inv(w2c)  # the authors' loaders invert the full 4x4 (no rigidity assumed)
    return Cameras.from_normalized(K, c2w, width, height, near, far)


def cameras_to_re10k(cameras: Cameras) -> Tensor:  # [..., 18]
    """Exact inverse of :func:`cameras_from_re10k`: ``[..., 18]`` rows (the two unused numbers are 0)."""
    Kn = cameras.K_normalized
    w2c = torch.linalg.inv(cameras.cam_to_world)  # general inverse, mirroring the reader
    batch = cameras.batch_shape
    rows = torch.zeros(*batch, RE10K_ROW, dtype=cameras.dtype, device=cameras.device)
    rows[..., 0] = Kn[..., 0, 0]
    rows[..., 1] = Kn[..., 1, 1]
    rows[..., 2] = Kn[..., 0, 2]
    rows[..., 3] = Kn[..., 1, 2]
    rows[..., 6:] = w2c[..., :3, :].reshape(*batch, 12)
    return rows


def read_re10k_txt(path: str | os.PathLike, dtype: torch.dtype = torch.float64) -> tuple[str, Tensor, Tensor]:
    """Read one RealEstate10K camera file.

    The first line is the YouTube URL; each further line is ``timestamp`` (microseconds) followed
    by the 18 numbers :func:`cameras_from_re10k` takes.

    Returns:
        ``(url, timestamps [N] int64, rows [N, 18])``.
    """
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{p}: cannot read the RE10K camera file ({e.strerror})") from e
    lines = [ln.strip() for ln in lines]
    if not lines or not lines[0]:
        raise ValueError(f"{p}: empty RE10K camera file (expected the video URL on line 1)")
    url = lines[0]
    stamps: list[int] = []
    rows: list[list[float]] = []
    for i, ln in enumerate(lines[1:], start=2):
        if not ln:
            continue
        parts = ln.split()
        if len(parts) != RE10K_ROW + 1:
            raise ValueError(
                f"{p}:{i}: camera row has {len(parts)} numbers, expected {RE10K_ROW + 1} "
                "(timestamp fx fy cx cy 0 0 and a 3x4 world-to-camera matrix)"
            )
        try:
            stamps.append(int(parts[0]))
            rows.append([float(x) for x in parts[1:]])
        except ValueError as e:
            raise ValueError(f"{p}:{i}: camera row is not numeric ({e})") from e
    return (
        url,
        torch.tensor(stamps, dtype=torch.int64),
        torch.tensor(rows, dtype=dtype).reshape(-1, RE10K_ROW),
    )


# ---------------------------------------------------------------------------------------- VGGT
def cameras_from_vggt_pose_encoding(
    pose_enc: Tensor,  # [..., 9] t (3), quaternion xyzw (4), fov_h, fov_w; world-to-camera OpenCV
    width: int,
    height: int,
    near: float | None = None,
    far: float | None = None,
) -> Cameras:
    """Cameras from VGGT's ``absT_quaR_FoV`` encoding (principal point at the image centre).

    Args:
        pose_enc: ``[..., 9]``: translation of the world-to-camera pose, its rotation as a
            quaternion in **xyzw** order (VGGT's), vertical then horizontal field of view (radians).
        width, height: image size in pixels the fields of view refer to.
    """
    if pose_enc.shape[-1:] != (9,):
        raise ValueError(f"cameras_from_vggt_pose_encoding: expected [..., 9], got {tuple(pose_enc.shape)}")
    batch = pose_enc.shape[:-1]
    t = pose_enc[..., :3]
    q_xyzw = pose_enc[..., 3:7]
    q_wxyz = torch.cat([q_xyzw[..., 3:], q_xyzw[..., :3]], -1)
    fov_h, fov_w = pose_enc[..., 7], pose_enc[..., 8]
    w2c = torch.eye(4, dtype=pose_enc.dtype, device=pose_enc.device).expand(*batch, 4, 4).clone()
    w2c[..., :3, :3] = quat_to_matrix(q_wxyz)
    w2c[..., :3, 3] = t
    K = _pinhole_K(fov_to_focal(fov_w, width), fov_to_focal(fov_h, height), torch.full_like(fov_w, width / 2.0),
                   torch.full_like(fov_h, height / 2.0))
    return Cameras(K, rigid_inverse(w2c), width, height, near, far)


def cameras_to_vggt_pose_encoding(cameras: Cameras) -> Tensor:  # [..., 9]
    """Inverse of :func:`cameras_from_vggt_pose_encoding` (the principal point is not encoded)."""
    w2c = cameras.world_to_cam
    q = matrix_to_quat(w2c[..., :3, :3])  # wxyz
    q_xyzw = torch.cat([q[..., 1:], q[..., :1]], -1)
    fov_w = 2.0 * torch.atan((cameras.width / 2.0) / cameras.K[..., 0, 0])
    fov_h = 2.0 * torch.atan((cameras.height / 2.0) / cameras.K[..., 1, 1])
    return torch.cat([w2c[..., :3, 3], q_xyzw, fov_h[..., None], fov_w[..., None]], -1)


def _pinhole_K(fx: Tensor, fy: Tensor, cx: Tensor, cy: Tensor) -> Tensor:  # 4 x [...] -> [..., 3, 3]
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    rows = [torch.stack([fx, zero, cx], -1), torch.stack([zero, fy, cy], -1), torch.stack([zero, zero, one], -1)]
    return torch.stack(rows, -2)


def fov_to_focal(fov: Tensor | float, size: float) -> Tensor | float:
    """Focal length in pixels of a field of view ``fov`` (radians) across ``size`` pixels."""
    if isinstance(fov, Tensor):
        return (size / 2.0) / torch.tan(fov / 2.0)
    return (size / 2.0) / math.tan(fov / 2.0)
