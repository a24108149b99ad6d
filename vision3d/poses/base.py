"""The pose-estimator interface: images in, pinhole cameras (and optionally a sparse point cloud) out.

Every estimator (known cameras, incremental SfM through pycolmap, feed-forward pose networks such
as VGGT/FlashVGGT when they land) subclasses :class:`PoseEstimator` and registers itself with
:func:`register_pose_estimator`; :func:`create_pose_estimator` builds one by name. Importing this
module imports no optional package: each estimator imports what it needs when it runs.

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from vision3d.geometry import Cameras

__all__ = [
    "PoseInput",
    "PoseResult",
    "PoseEstimator",
    "register_pose_estimator",
    "create_pose_estimator",
    "list_pose_estimators",
    "PoseEstimationError",
]


class PoseEstimationError(ValueError):
    """The estimator could not pose enough images (e.g. SfM registered too few)."""


@dataclass
class PoseInput:
    """What an estimator receives: the loaded images and what is known about them."""

    images: Tensor | list[Tensor]  # [V, 3, H, W] float32 in [0, 1], or V tensors [3, H_i, W_i] (per-image sizes)
    names: list[str]  # [V] file names (videos: "frame_000123"), unique
    source: Path  # the photo folder or the video they came from
    cameras: Cameras | list[Cameras] | None = None  # batch [V] known cameras sized W x H (OpenCV, K in pixels),
    # V cameras of batch [1] with per-image sizes, or None
    is_video: bool = False  # frames of one video, in temporal order (sequential matching applies)
    points: Tensor | None = None  # [P, 3] world, known sparse points that go with ``cameras``
    colors: Tensor | None = None  # [P, 3] float in [0, 1]

    def __post_init__(self) -> None:
        if isinstance(self.images, (list, tuple)):
            bad = [i for i, im in enumerate(self.images) if im.ndim != 3 or im.shape[0] != 3]
            if bad:
                raise ValueError(f"{self.source}: images must be [3, H, W] each, got {tuple(self.images[bad[0]].shape)}")
        elif self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.source}: images must be [V, 3, H, W], got {tuple(self.images.shape)}")
        if len(self.names) != len(self.images):
            raise ValueError(f"{self.source}: {len(self.names)} names for {len(self.images)} images")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"{self.source}: image names must be unique")


@dataclass
class PoseResult:
    """Posed images, ready for a Gaussian fit: pinhole cameras matching ``images``."""

    images: Tensor | list[Tensor]  # [R, 3, H', W'] float32 in [0, 1] (undistorted when the estimator undistorts),
    # or R tensors [3, H_i, W_i] (per-image sizes)
    names: list[str]  # [R] names of the registered images, a subset of the input's, in input order
    cameras: Cameras | list[Cameras]  # batch [R] pinhole sized W' x H' (OpenCV cam_to_world, K in pixels), or R of batch [1]
    points: Tensor | None = None  # [P, 3] world sparse points (SfM), or None
    colors: Tensor | None = None  # [P, 3] float in [0, 1], colours of ``points``
    info: dict = field(default_factory=dict)  # estimator-specific facts (time, registered count...)

    def __post_init__(self) -> None:
        if isinstance(self.images, (list, tuple)) or isinstance(self.cameras, (list, tuple)):
            if not (isinstance(self.images, (list, tuple)) and isinstance(self.cameras, (list, tuple))):
                raise ValueError("PoseResult: per-image images and cameras go together (two lists)")
            if not len(self.images) == len(self.names) == len(self.cameras):
                raise ValueError(f"PoseResult: {len(self.images)} images, {len(self.names)} names and "
                                 f"{len(self.cameras)} cameras must agree")
            for n, im, c in zip(self.names, self.images, self.cameras):
                c.check_images(im[None], f"PoseResult: {n}")
            if (self.points is None) != (self.colors is None):
                raise ValueError("PoseResult: points and colors go together")
            return
        r = self.images.shape[0]
        if len(self.names) != r or tuple(self.cameras.batch_shape) != (r,):
            raise ValueError(
                f"PoseResult: {r} images, {len(self.names)} names and cameras of batch "
                f"{tuple(self.cameras.batch_shape)} must agree"
            )
        if (self.cameras.height, self.cameras.width) != tuple(self.images.shape[-2:]):
            raise ValueError(
                f"PoseResult: cameras are {self.cameras.width}x{self.cameras.height}, images "
                f"{self.images.shape[-1]}x{self.images.shape[-2]}"
            )
        if (self.points is None) != (self.colors is None):
            raise ValueError("PoseResult: points and colors go together")


class PoseEstimator(abc.ABC):
    """Estimates cameras of a set of images. Subclasses set ``name`` and implement :meth:`estimate`."""

    name: str = ""
    needs_known_cameras: bool = False  # True for the "known" estimator: the input must carry cameras

    @abc.abstractmethod
    def estimate(self, inputs: PoseInput, work_dir: str | os.PathLike) -> PoseResult:
        """Pose ``inputs``; scratch files go under ``work_dir`` (created, may be kept for resume)."""


_REGISTRY: dict[str, Callable[..., PoseEstimator]] = {}


def register_pose_estimator(name: str):
    """Class decorator: make an estimator available to :func:`create_pose_estimator` as ``name``."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"pose estimator {name!r} is already registered by {_REGISTRY[name]!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    from . import colmap, feedforward, known  # noqa: F401 - registers colmap, known, vggt, flashvggt


def list_pose_estimators() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_pose_estimator(name: str, **kwargs) -> PoseEstimator:
    """The registered estimator ``name`` built with ``kwargs``."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown pose estimator {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def float_colors(rgb: Tensor) -> Tensor:  # [P, 3] uint8 or float -> [P, 3] float32 in [0, 1]
    return rgb.float() / 255.0 if rgb.dtype == torch.uint8 else rgb.float().clamp(0, 1)
