"""The scene type: a set of 3D Gaussians.

Fields (see ``DESIGN.md``), all sharing the batch shape ``[...]`` and the count ``N``:

- ``means``     ``[..., N, 3]`` world coordinates;
- ``quats``     ``[..., N, 4]`` rotations as quaternions **wxyz** (need not be unit: the renderer
  normalises, as gsplat does);
- ``scales``    ``[..., N, 3]`` activated standard deviations in world units (not log);
- ``opacities`` ``[..., N]`` in ``[0, 1]`` (not logit);
- ``sh``        ``[..., N, K, 3]`` spherical-harmonic coefficients, DC first, ``K = (degree + 1)^2``;
  the colour of the DC term alone is ``rgb = 0.5 + C0 * sh[..., 0, :]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
from torch import Tensor

SH_C0 = 0.28209479177387814  # 1 / (2 sqrt(pi))

FIELDS = ("means", "quats", "scales", "opacities", "sh")


def rgb_to_sh(rgb: Tensor) -> Tensor:
    """DC coefficient that reproduces ``rgb`` (in [0, 1]) when evaluated."""
    return (rgb - 0.5) / SH_C0


def sh_to_rgb(sh_dc: Tensor) -> Tensor:
    return sh_dc * SH_C0 + 0.5


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def sh_degree_from_bases(k: int) -> int:
    d = int(round(math.sqrt(k))) - 1
    if (d + 1) ** 2 != k or d < 0:
        raise ValueError(f"Gaussians.sh: {k} coefficients is not (degree+1)^2 for any degree")
    return d


@dataclass
class Gaussians:
    means: Tensor  # [..., N, 3] world
    quats: Tensor  # [..., N, 4] wxyz
    scales: Tensor  # [..., N, 3] world units, activated
    opacities: Tensor  # [..., N] in [0, 1]
    sh: Tensor  # [..., N, K, 3] DC first

    def __post_init__(self) -> None:
        m = self.means
        if m.ndim < 2 or m.shape[-1] != 3:
            raise ValueError(f"Gaussians.means: expected [..., N, 3], got {tuple(m.shape)}")
        lead = m.shape[:-1]  # [..., N]
        expect = {
            "quats": (*lead, 4),
            "scales": (*lead, 3),
            "opacities": tuple(lead),
        }
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"Gaussians.{name}: expected shape {shape}, got {got}")
        sh = self.sh
        if sh.ndim != m.ndim + 1 or tuple(sh.shape[:-2]) != tuple(lead) or sh.shape[-1] != 3:
            raise ValueError(f"Gaussians.sh: expected [{', '.join(map(str, lead))}, K, 3], got {tuple(sh.shape)}")
        sh_degree_from_bases(sh.shape[-2])
        for name in FIELDS[1:]:
            dev = getattr(self, name).device
            if dev != m.device:
                raise ValueError(f"Gaussians.{name}: on {dev} but means are on {m.device}; put every field on one device")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_rgb(
        means: Tensor,  # [..., N, 3]
        quats: Tensor,  # [..., N, 4] wxyz
        scales: Tensor,  # [..., N, 3]
        opacities: Tensor,  # [..., N]
        rgb: Tensor,  # [..., N, 3] in [0, 1]
        sh_degree: int = 0,
    ) -> "Gaussians":
        sh = torch.zeros(*rgb.shape[:-1], num_sh_bases(sh_degree), 3, dtype=rgb.dtype, device=rgb.device)
        sh[..., 0, :] = rgb_to_sh(rgb)
        return Gaussians(means, quats, scales, opacities, sh)

    @staticmethod
    def empty(sh_degree: int = 0, device=None, dtype=torch.float32) -> "Gaussians":
        z = lambda *s: torch.zeros(*s, device=device, dtype=dtype)  # noqa: E731
        q = z(0, 4)
        return Gaussians(z(0, 3), q, z(0, 3), z(0), z(0, num_sh_bases(sh_degree), 3))

    # ------------------------------------------------------------------ properties
    @property
    def num(self) -> int:
        return self.means.shape[-2]

    def __len__(self) -> int:
        return self.num

    @property
    def batch_shape(self) -> torch.Size:
        return self.means.shape[:-2]

    @property
    def sh_degree(self) -> int:
        return sh_degree_from_bases(self.sh.shape[-2])

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return self.means.dtype

    @property
    def rgb(self) -> Tensor:  # [..., N, 3] colour of the DC term, clamped to [0, 1]
        return sh_to_rgb(self.sh[..., 0, :]).clamp(0, 1)

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # ------------------------------------------------------------------ transforms of the container
    def map(self, fn) -> "Gaussians":
        """Apply ``fn`` to every field tensor (e.g. ``lambda t: t.detach()``)."""
        return Gaussians(**{k: fn(v) for k, v in self.tensors().items()})

    def to(self, *args, **kwargs) -> "Gaussians":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Gaussians":
        return self.map(lambda t: t.detach())

    def clone(self) -> "Gaussians":
        return self.map(lambda t: t.clone())

    def __getitem__(self, idx) -> "Gaussians":
        """Index the batch dimensions (not the Gaussians; use :meth:`select` for those)."""
        if len(self.batch_shape) == 0:
            raise IndexError("cannot index the batch of unbatched Gaussians; use .select() for Gaussians")
        return self.map(lambda t: t[idx])

    def select(self, index: Tensor) -> "Gaussians":
        """Keep the Gaussians given by a boolean mask ``[N]`` or an index tensor (unbatched only)."""
        if len(self.batch_shape) != 0:
            raise ValueError("Gaussians.select works on unbatched Gaussians; index the batch first")
        return self.map(lambda t: t[index])

    def with_sh_degree(self, degree: int) -> "Gaussians":
        """Truncate or zero-pad the SH coefficients to ``degree``."""
        k = num_sh_bases(degree)
        cur = self.sh.shape[-2]
        if k <= cur:
            sh = self.sh[..., :k, :]
        else:
            pad = self.sh.new_zeros(*self.sh.shape[:-2], k - cur, 3)
            sh = torch.cat([self.sh, pad], -2)
        return replace(self, sh=sh)

    @staticmethod
    def cat(items: Sequence["Gaussians"]) -> "Gaussians":
        """Concatenate along ``N`` (batch shapes must match; SH degrees are padded to the largest)."""
        if not items:
            raise ValueError("Gaussians.cat: nothing to concatenate")
        deg = max(g.sh_degree for g in items)
        items = [g.with_sh_degree(deg) for g in items]
        n_dim = {"means": -2, "quats": -2, "scales": -2, "opacities": -1, "sh": -3}  # where N sits in each field
        return Gaussians(**{k: torch.cat([getattr(g, k) for g in items], n_dim[k]) for k in FIELDS})

    def flatten_batch(self) -> "Gaussians":
        """Fold every batch dimension into ``N`` (e.g. merge per-view Gaussians into one scene)."""
        n = self.means.shape[:-1].numel()
        return Gaussians(
            self.means.reshape(n, 3),
            self.quats.reshape(n, 4),
            self.scales.reshape(n, 3),
            self.opacities.reshape(n),
            self.sh.reshape(n, self.sh.shape[-2], 3),
        )

    def validate(self, source: str = "Gaussians") -> "Gaussians":
        """Raise a ValueError naming the field if any value is NaN/inf or out of its range."""
        for name, t in self.tensors().items():
            bad = ~torch.isfinite(t)
            if bad.any():
                raise ValueError(f"{source}: field '{name}' has {int(bad.sum())} non-finite values (NaN or inf)")
        if (self.scales < 0).any():
            raise ValueError(f"{source}: field 'scales' has negative values; expected activated scales >= 0")
        if ((self.opacities < 0) | (self.opacities > 1)).any():
            raise ValueError(f"{source}: field 'opacities' must lie in [0, 1] (activated, not logit)")
        if (self.quats.norm(dim=-1) == 0).any():
            raise ValueError(f"{source}: field 'quats' has zero-norm quaternions")
        return self

    def __repr__(self) -> str:
        return (
            f"Gaussians(batch={tuple(self.batch_shape)}, N={self.num}, sh_degree={self.sh_degree}, "
            f"dtype={self.dtype}, device={self.device})"
        )
