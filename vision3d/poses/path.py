"""Smooth camera paths through a set of posed cameras (for fly-through videos of a reconstruction).

Key cameras are put in a chain (their given order, or a greedy nearest-neighbour tour from the
first), thinned to at most ``max_keys`` evenly spaced along the chain, and interpolated: centres
with a uniform Catmull-Rom spline (Catmull and Rom, 1974) and rotations with quaternion slerp
(Shoemake, SIGGRAPH 1985) between consecutive keys, at parameters spaced by arc length so the
speed is even. Intrinsics are the keys' mean, resized to the requested frame size.

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vision3d.geometry import Cameras
from vision3d.geometry.rotations import make_rigid, matrix_to_quat, quat_to_matrix

__all__ = ["chain_order", "slerp", "catmull_rom", "smooth_camera_path"]


def chain_order(centers: Tensor) -> list[int]:  # [V, 3] world -> a permutation of range(V)
    """Greedy nearest-neighbour tour through the camera centres, starting at index 0."""
    v = centers.shape[0]
    left = list(range(1, v))
    order = [0]
    c = centers.double()
    while left:
        d = (c[left] - c[order[-1]]).norm(dim=-1)
        order.append(left.pop(int(d.argmin())))
    return order


def slerp(q0: Tensor, q1: Tensor, t: Tensor) -> Tensor:  # [..., 4] wxyz x2, [...] in [0, 1] -> [..., 4]
    """Spherical linear interpolation of unit quaternions along the shorter arc."""
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    dot = dot.abs().clamp(max=1.0)
    t = t[..., None]
    theta = torch.acos(dot)
    s = torch.sin(theta)
    near = s < 1e-6
    w0 = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / s.clamp_min(1e-12))
    w1 = torch.where(near, t, torch.sin(t * theta) / s.clamp_min(1e-12))
    q = w0 * q0 + w1 * q1
    return q / q.norm(dim=-1, keepdim=True)


def catmull_rom(p0: Tensor, p1: Tensor, p2: Tensor, p3: Tensor, t: Tensor) -> Tensor:  # [..., 3] x4, [...] -> [..., 3]
    """Uniform Catmull-Rom segment from ``p1`` (t=0) to ``p2`` (t=1)."""
    t = t[..., None]
    t2, t3 = t * t, t * t * t
    return 0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2 + (3 * p1 - p0 - 3 * p2 + p3) * t3)


def smooth_camera_path(
    cameras: Cameras,  # batch [V] keys, OpenCV cam_to_world, K in pixels
    num_frames: int,
    width: int | None = None,
    height: int | None = None,
    *,
    order: Literal["given", "nearest"] = "nearest",
    max_keys: int = 10,
) -> Cameras:  # batch [num_frames]
    """``num_frames`` cameras along a smooth path through (a thinned chain of) ``cameras``."""
    cams = cameras.flatten().to(dtype=torch.float64)
    v = cams.batch_shape[0]
    if v < 1 or num_frames < 1:
        raise ValueError(f"smooth_camera_path: need at least one camera and one frame, got {v} and {num_frames}")
    idx = list(range(v)) if order == "given" else chain_order(cams.centers)
    if len(idx) > max_keys:
        keep = torch.linspace(0, len(idx) - 1, max_keys).round().long().tolist()
        idx = [idx[i] for i in keep]
    keys = cams[torch.tensor(idx)]
    pos = keys.centers  # [k, 3]
    quat = matrix_to_quat(keys.rotation)  # [k, 4]
    for i in range(1, quat.shape[0]):  # one hemisphere so consecutive keys slerp the short way
        if float((quat[i] * quat[i - 1]).sum()) < 0:
            quat[i] = -quat[i]
    k = pos.shape[0]
    if k == 1:
        c2w = keys.cam_to_world.expand(num_frames, 4, 4)
    else:
        seg = (pos[1:] - pos[:-1]).norm(dim=-1)  # [k-1]
        if float(seg.sum()) < 1e-12:
            seg = torch.ones_like(seg)
        cum = torch.cat([seg.new_zeros(1), seg.cumsum(0)]) / seg.sum()  # [k] in [0, 1]
        s = torch.linspace(0, 1, num_frames, dtype=torch.float64)
        j = (torch.searchsorted(cum, s, right=True) - 1).clamp(0, k - 2)  # segment of each frame
        t = ((s - cum[j]) / (cum[j + 1] - cum[j]).clamp_min(1e-12)).clamp(0, 1)
        ext = torch.cat([2 * pos[:1] - pos[1:2], pos, 2 * pos[-1:] - pos[-2:-1]])  # phantom end points
        centres = catmull_rom(ext[j], ext[j + 1], ext[j + 2], ext[j + 3], t)
        q = slerp(quat[j], quat[j + 1], t)
        c2w = make_rigid(quat_to_matrix(q), centres)
    K = keys.K.mean(0)
    out = Cameras(K.expand(num_frames, 3, 3).clone(), c2w.clone(), cams.width, cams.height, cams.near, cams.far)
    out = out.to(dtype=cameras.dtype)
    if width is not None or height is not None:
        w = width if width is not None else max(1, round(height * cams.width / cams.height))
        h = height if height is not None else max(1, round(width * cams.height / cams.width))
        out = out.resize(int(w), int(h))
    return out

