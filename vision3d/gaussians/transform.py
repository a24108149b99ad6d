"""Similarity transforms (uniform scale, rotation, translation) of Gaussian scenes and cameras.

A point ``x`` maps to ``s R x + t``. For Gaussians that moves the means, composes the rotation onto
each quaternion (``q' = q_R * q``, Hamilton product, wxyz), multiplies the scales by ``s`` and
rotates the view-dependent colour: the new coefficients ``c'`` satisfy
``eval_sh(c', R d) == eval_sh(c, d)`` for every direction ``d``. For a real SH basis each band
``l`` transforms by its own ``(2l+1) x (2l+1)`` matrix; we compute it exactly (to float64 rounding)
by least squares from the basis of :mod:`vision3d.gaussians.sh` evaluated at fixed directions and
at their rotated images. The basis of one band spans a rotation-invariant space of polynomials, so
the system is consistent and its solution is the band's rotation matrix (the real Wigner D-matrix in
this basis's sign convention), with no recursion to get wrong. Background: R. Green, "Spherical
Harmonic Lighting: The Gritty Details" (GDC 2003), on rotating real SH bands; the basis and its signs
are those of 3D Gaussian Splatting (Kerbl et al. 2023, arXiv 2308.04079) as coded in ``sh.py``. Our
own derivation and code. Quaternion algebra comes from :mod:`vision3d.geometry.rotations`.

Cameras follow the scene: ``cam_to_world' = [[R R_c, s R c + t], [0, 1]]`` (rigid, OpenCV), so the
image of the transformed scene from the transformed camera is the original image (depth times ``s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from vision3d.geometry import Cameras, matrix_to_quat, quat_multiply

from .gaussians import Gaussians
from .sh import sh_basis

__all__ = [
    "Similarity",
    "transform_gaussians",
    "transform_cameras",
    "rotate_sh",
    "sh_rotation_matrices",
]


# ---------------------------------------------------------------------------------------- similarity
@dataclass
class Similarity:
    """``x -> scale * rotation @ x + translation``; the rotation is proper (det +1)."""

    scale: float = 1.0  # > 0
    rotation: Tensor | None = None  # [3, 3] proper rotation; None = identity
    translation: Tensor | None = None  # [3]; None = zero

    def __post_init__(self) -> None:
        self.scale = float(self.scale)
        if not math.isfinite(self.scale) or self.scale <= 0:
            raise ValueError(f"Similarity.scale: expected a finite positive number, got {self.scale}")
        R = torch.eye(3, dtype=torch.float64) if self.rotation is None else torch.as_tensor(self.rotation)
        t = torch.zeros(3, dtype=R.dtype) if self.translation is None else torch.as_tensor(self.translation)
        if R.shape != (3, 3):
            raise ValueError(f"Similarity.rotation: expected [3, 3], got {tuple(R.shape)}")
        if t.shape != (3,):
            raise ValueError(f"Similarity.translation: expected [3], got {tuple(t.shape)}")
        R64 = R.detach().to(torch.float64)
        err = (R64 @ R64.T - torch.eye(3, dtype=torch.float64, device=R.device)).abs().max().item()
        if err > 1e-4 or torch.linalg.det(R64).item() < 0:
            raise ValueError(
                f"Similarity.rotation: expected a proper rotation (orthonormal, det +1); "
                f"|R R^T - I| = {err:.2e}, det = {torch.linalg.det(R64).item():.4f}"
            )
        self.rotation, self.translation = R, t

    @staticmethod
    def identity() -> "Similarity":
        return Similarity()

    @staticmethod
    def from_matrix(M: Tensor) -> "Similarity":  # [4, 4] with top-left block s R
        M = torch.as_tensor(M)
        if M.shape != (4, 4):
            raise ValueError(f"Similarity.from_matrix: expected [4, 4], got {tuple(M.shape)}")
        A = M[:3, :3]
        s = torch.linalg.det(A.to(torch.float64)).item()
        if s <= 0:
            raise ValueError("Similarity.from_matrix: the 3x3 block must have positive determinant")
        s = s ** (1.0 / 3.0)
        return Similarity(s, A / s, M[:3, 3])

    def matrix(self, dtype: torch.dtype | None = None) -> Tensor:  # [4, 4]
        dtype = dtype or self.rotation.dtype
        M = torch.eye(4, dtype=dtype, device=self.rotation.device)
        M[:3, :3] = self.scale * self.rotation.to(dtype)
        M[:3, 3] = self.translation.to(device=self.rotation.device, dtype=dtype)
        return M

    def inverse(self) -> "Similarity":
        Rt = self.rotation.transpose(0, 1)
        return Similarity(1.0 / self.scale, Rt, -(Rt @ self.translation.to(Rt.dtype)) / self.scale)

    def compose(self, first: "Similarity") -> "Similarity":
        """``self ∘ first``: apply ``first``, then ``self``."""
        R2 = self.rotation
        R1 = first.rotation.to(R2)
        t1 = first.translation.to(R2)
        return Similarity(self.scale * first.scale, R2 @ R1, self.scale * (R2 @ t1) + self.translation.to(R2))

    def apply_points(self, x: Tensor) -> Tensor:  # [..., 3] -> [..., 3]
        R = self.rotation.to(x)
        return self.scale * (x @ R.transpose(0, 1)) + self.translation.to(x)

    def apply_directions(self, d: Tensor) -> Tensor:  # [..., 3] -> [..., 3] (rotation only)
        return d @ self.rotation.to(d).transpose(0, 1)


# ---------------------------------------------------------------------------------------- SH rotation
def _sample_dirs(n: int, dtype: torch.dtype, device) -> Tensor:  # [n, 3] Fibonacci sphere, deterministic
    i = torch.arange(n, dtype=dtype, device=device) + 0.5
    z = 1 - 2 * i / n
    r = (1 - z * z).clamp_min(0).sqrt()
    phi = i * math.pi * (3 - math.sqrt(5))
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)


def sh_rotation_matrices(R: Tensor, degree: int) -> list[Tensor]:  # [3, 3] -> list of [2l+1, 2l+1]
    """Per-band matrices ``M_l`` with ``rotated_band_l = M_l @ band_l`` (coefficients as columns).

    Computed in float64 and returned in ``R``'s dtype. ``M_0 = [[1]]``. They satisfy
    ``sh_basis(d)_l @ M_l == sh_basis(R^T d)_l`` for every unit ``d``.
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"sh_rotation_matrices: degree must be 0..3, got {degree}")
    R64 = R.detach().to(torch.float64)
    dirs = _sample_dirs(64, torch.float64, R.device)  # enough to pin down all 16 basis functions
    Y = sh_basis(degree, dirs)  # [S, K] at d
    Yr = sh_basis(degree, dirs @ R64)  # [S, K] at R^T d (row-vector form: d @ R == (R^T d)^T)
    out = []
    for band in range(degree + 1):
        sl = slice(band * band, (band + 1) * (band + 1))
        # Y_l(R^T d) = Y_l(d) @ M, solved exactly by least squares over the sample directions
        M = torch.linalg.lstsq(Y[:, sl], Yr[:, sl]).solution  # [2l+1, 2l+1]
        out.append(M.to(R.dtype))
    return out


def rotate_sh(sh: Tensor, R: Tensor) -> Tensor:  # [..., K, 3], [3, 3] -> [..., K, 3]
    """Coefficients of the colour field rotated by ``R``: ``eval_sh(out, R d) == eval_sh(sh, d)``."""
    k = sh.shape[-2]
    degree = int(round(math.sqrt(k))) - 1
    if (degree + 1) ** 2 != k or degree > 3:
        raise ValueError(f"rotate_sh: {k} coefficients is not (degree+1)^2 for a degree 0..3")
    if degree == 0:
        return sh
    mats = sh_rotation_matrices(R.to(device=sh.device), degree)
    bands = [sh[..., :1, :]]
    for band in range(1, degree + 1):
        sl = slice(band * band, (band + 1) * (band + 1))
        # the colour is sum_m c_m Y_m(R^T d) = sum_j (M c)_j Y_j(d)  ->  c' = M c
        bands.append(torch.einsum("ij,...jc->...ic", mats[band].to(sh.dtype), sh[..., sl, :]))
    return torch.cat(bands, -2)


# ---------------------------------------------------------------------------------------- scenes and cameras
def transform_gaussians(gaussians: Gaussians, sim: Similarity) -> Gaussians:
    """Apply ``sim`` to every Gaussian (any batch shape); differentiable in the Gaussians."""
    g = gaussians
    R64 = sim.rotation.to(device=g.device, dtype=torch.float64)  # the SH matrices are built in float64
    q_r = matrix_to_quat(R64).to(g.dtype)  # [4] wxyz
    return Gaussians(
        means=sim.apply_points(g.means),
        quats=quat_multiply(q_r.expand_as(g.quats), g.quats),
        scales=g.scales * sim.scale,
        opacities=g.opacities,
        sh=rotate_sh(g.sh, R64),
    )


def transform_cameras(cameras: Cameras, sim: Similarity) -> Cameras:
    """Move cameras with the scene: same images of the transformed scene; near/far times ``s``."""
    c2w = cameras.cam_to_world
    R = sim.rotation.to(device=c2w.device, dtype=c2w.dtype)
    out = c2w.clone()
    out[..., :3, :3] = R @ c2w[..., :3, :3]
    out[..., :3, 3] = sim.apply_points(c2w[..., :3, 3])
    near = None if cameras.near is None else cameras.near * sim.scale
    far = None if cameras.far is None else cameras.far * sim.scale
    return replace(cameras, cam_to_world=out, near=near, far=far)
