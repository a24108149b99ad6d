"""The reconstructor interface and registry.

A reconstructor is an ``nn.Module`` whose ``forward(images, cameras)`` takes context images
``[B, V, 3, H, W]`` in ``[0, 1]`` and :class:`~vision3d.geometry.Cameras` of batch shape ``[B, V]``
and returns a :class:`ReconOutput`. Each model file registers its variants with :func:`register`;
:func:`create` builds one by name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras


@dataclass
class ReconOutput:
    gaussians: Gaussians | None = None  # batch shape [B]
    mesh: Any | None = None  # vision3d.mesh.Mesh for mesh reconstructors
    depth: Tensor | None = None  # [B, V, 1, H, W] z-depth per context view
    confidence: Tensor | None = None  # [B, V, 1, H, W]
    cameras: Cameras | None = None  # predicted cameras (pose estimators), batch [B, V]
    extras: dict[str, Tensor] = field(default_factory=dict)  # model-specific auxiliaries
    # extra predictions supervised in training like `gaussians`, each as (loss weight, Gaussians batch [B])
    aux_gaussians: list[tuple[float, Gaussians]] = field(default_factory=list)


class Reconstructor(nn.Module):
    """Base class: images + cameras in, :class:`ReconOutput` out."""

    def forward(self, images: Tensor, cameras: Cameras) -> ReconOutput:  # images [B, V, 3, H, W] in [0, 1]
        raise NotImplementedError

    @staticmethod
    def check_inputs(images: Tensor, cameras: Cameras | None, name: str = "reconstructor") -> None:
        if cameras is not None:
            cameras.check_images(images, name, batch="B, V")
        elif images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"{name}: images must be [B, V, 3, H, W], got {tuple(images.shape)}")


_REGISTRY: dict[str, Callable[..., Reconstructor]] = {}
# model files imported on first use of the registry (kept lazy so `import vision3d` stays light)
_MODULES = ["ilrm", "depthsplat", "zpressor", "volsplat", "vggt", "flashvggt", "dimer"]


def register(name: str) -> Callable:
    def deco(fn):
        if name in _REGISTRY:
            raise KeyError(f"reconstructor '{name}' registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_all() -> None:
    for m in _MODULES:
        try:
            importlib.import_module(f"vision3d.recon.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"vision3d.recon.{m}":
                raise


def list_models() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def create(name: str, **cfg) -> Reconstructor:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reconstructor '{name}'; available: {', '.join(sorted(_REGISTRY)) or 'none'}")
    return _REGISTRY[name](**cfg)


def device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
