"""Real spherical harmonics up to degree 3, in the basis and sign convention of 3D Gaussian
Splatting (graphdeco-inria/gaussian-splatting, ``utils/sh_utils.py``) and gsplat, so coefficients
read from INRIA PLY files evaluate to the same colours.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .gaussians import SH_C0

SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Basis functions ``[..., (degree+1)^2]`` at unit directions ``dirs [..., 3]``."""
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_basis: degree must be 0..3, got {degree}")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [
            SH_C2[0] * xy,
            SH_C2[1] * yz,
            SH_C2[2] * (2.0 * zz - xx - yy),
            SH_C2[3] * xz,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * xy * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, -1)


def eval_sh(degree: int, sh: Tensor, dirs: Tensor) -> Tensor:
    """Colour (before the +0.5 offset) of coefficients ``sh [..., K, 3]`` seen along ``dirs [..., 3]``.

    ``dirs`` need not be unit length (normalised here). Only the first ``(degree+1)^2`` coefficients
    are used. Returns ``[..., 3]``; add 0.5 and clamp at 0 for the rendered colour, as gsplat does.
    """
    k = (degree + 1) ** 2
    if sh.shape[-2] < k:
        raise ValueError(f"eval_sh: degree {degree} needs {k} coefficients, got {sh.shape[-2]}")
    d = torch.nn.functional.normalize(dirs, dim=-1)
    basis = sh_basis(degree, d)  # [..., k]
    return (basis[..., None] * sh[..., :k, :]).sum(-2)
