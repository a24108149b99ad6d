"""Analytic signed distance functions and exact surface samplers (sphere, box, torus).

Negative inside. Used to test and benchmark isosurface extraction and mesh metrics against
shapes whose true surface is known. Box and torus distances follow the standard closed forms
(I. Quilez, "distance functions", iquilezles.org).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sphere:
    radius: float = 0.3
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __call__(self, p: Tensor) -> Tensor:  # [..., 3] -> [...]
        return (p - p.new_tensor(self.center)).norm(dim=-1) - self.radius

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` area-uniform surface points [n, 3] and outward normals [n, 3]."""
        d = torch.nn.functional.normalize(torch.randn(n, 3, generator=generator), dim=-1)
        return d * self.radius + torch.tensor(self.center), d

    def area(self) -> float:
        return 4 * math.pi * self.radius**2


@dataclass(frozen=True)
class Box:
    half: tuple[float, float, float] = (0.33, 0.21, 0.27)

    def __call__(self, p: Tensor) -> Tensor:
        q = p.abs() - p.new_tensor(self.half)
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        h = torch.tensor(self.half)
        # 6 faces; face (axis a, sign s) has area 4 * h[b] * h[c]
        areas = torch.tensor([4 * h[(a + 1) % 3] * h[(a + 2) % 3] for a in range(3) for _ in (0, 1)])
        face = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=generator)
        axis, sign = face // 2, (face % 2) * 2 - 1
        p = (torch.rand(n, 3, generator=generator) * 2 - 1) * h
        rows = torch.arange(n)
        p[rows, axis] = sign.float() * h[axis]
        nrm = torch.zeros(n, 3)
        nrm[rows, axis] = sign.float()
        return p, nrm

    def area(self) -> float:
        a, b, c = self.half
        return 8 * (a * b + b * c + a * c)


@dataclass(frozen=True)
class Torus:
    major: float = 0.3  # distance from the z axis to the tube centre
    minor: float = 0.1  # tube radius

    def __call__(self, p: Tensor) -> Tensor:
        q = torch.stack((torch.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2) - self.major, p[..., 2]), -1)
        return q.norm(dim=-1) - self.minor

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        # area element ~ (R + r cos v): rejection-sample v, u uniform
        R, r = self.major, self.minor
        out_v = torch.empty(0)
        while out_v.numel() < n:
            v = torch.rand(2 * n, generator=generator) * 2 * math.pi
            keep = torch.rand(2 * n, generator=generator) * (R + r) < R + r * torch.cos(v)
            out_v = torch.cat((out_v, v[keep]))
        v = out_v[:n]
        u = torch.rand(n, generator=generator) * 2 * math.pi
        nrm = torch.stack((torch.cos(v) * torch.cos(u), torch.cos(v) * torch.sin(u), torch.sin(v)), -1)
        centre = torch.stack((R * torch.cos(u), R * torch.sin(u), torch.zeros(n)), -1)
        return centre + r * nrm, nrm

    def area(self) -> float:
        return 4 * math.pi**2 * self.major * self.minor


SHAPES = {"sphere": Sphere(), "box": Box(), "torus": Torus()}
