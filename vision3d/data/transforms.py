"""Scene transforms applied to training examples, so that every model trains as its authors did.

A transform maps one :class:`~vision3d.data.example.ViewsExample` to another describing the same
images in another world frame (cameras, near/far and ``scale`` moved consistently). The engine
applies the one named by ``DataConfig.scene_transform`` where it builds the dataset
(:func:`with_scene_transform`); presets choose it:

- ``"none"``: the dataset's own frame (DepthSplat, MVSplat, pixelSplat train in it);
- ``"mean_camera"``: iLRM's normalisation (Gynjn/iLRM): the frame of the mean context camera, scaled
  so that the context camera centres' largest coordinate is 1 (:func:`mean_camera_similarity`);
  targets move with the context.

Rendered images do not depend on the frame, so metrics are unchanged by a transform.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from vision3d.gaussians import Similarity, transform_cameras
from vision3d.geometry import Cameras

from .example import ViewsExample

__all__ = ["SCENE_TRANSFORMS", "mean_camera_similarity", "mean_camera_frame", "get_scene_transform", "with_scene_transform", "TransformedDataset"]


def mean_camera_similarity(
    cameras: Cameras,  # batch [V] context cameras, OpenCV cam_to_world
    extent: float = 1.0,
) -> Similarity:
    """World -> iLRM's training frame: the mean context camera, centres' largest coordinate = ``extent``.

    Degenerate cases: when the mean optical axis vanishes (cameras facing opposite ways) or the mean
    down axis is parallel to it, the first camera's axes are used; when every centre coincides (one
    view), the scale is 1.
    """
    if not extent > 0:
        raise ValueError(f"mean_camera_similarity: extent must be positive, got {extent}")
    c2w = cameras.flatten().cam_to_world.detach().to(device="cpu", dtype=torch.float64)  # [V, 4, 4]
    if c2w.shape[0] == 0:
        raise ValueError("mean_camera_similarity: no cameras")
    centre = c2w[:, :3, 3].mean(0)  # [3]
    forward = c2w[:, :3, 2].mean(0)
    down = c2w[:, :3, 1].mean(0)
    down = down - down.dot(forward) / forward.dot(forward).clamp_min(1e-30) * forward
    if float(forward.norm()) < 1e-6 or float(down.norm()) < 1e-6:
        axes = c2w[0, :3, :3]
    else:
        forward, down = forward / forward.norm(), down / down.norm()
        axes = torch.stack([torch.linalg.cross(down, forward), down, forward], -1)  # [3, 3] columns: right, down, fwd
    to_mean = Similarity(1.0, axes.T, -(axes.T @ centre))  # world -> mean-camera frame (rigid)
    largest = float(to_mean.apply_points(c2w[:, :3, 3]).abs().max())
    scale = extent / largest if largest > 1e-9 else 1.0
    return Similarity(scale).compose(to_mean)


def mean_camera_frame(ex: ViewsExample) -> ViewsExample:
    """The example in iLRM's training frame (from its context cameras); near/far, depths and ``scale`` follow."""
    sim = mean_camera_similarity(ex.context_cameras)
    return replace(
        ex,
        context_cameras=transform_cameras(ex.context_cameras, sim),
        target_cameras=transform_cameras(ex.target_cameras, sim),
        context_depths=None if ex.context_depths is None else ex.context_depths * sim.scale,
        target_depths=None if ex.target_depths is None else ex.target_depths * sim.scale,
        near=ex.near * sim.scale,
        far=ex.far * sim.scale,
        scale=ex.scale / sim.scale,
    )


def _identity(ex: ViewsExample) -> ViewsExample:
    return ex


SCENE_TRANSFORMS: dict[str, Callable[[ViewsExample], ViewsExample]] = {
    "none": _identity,
    "mean_camera": mean_camera_frame,
}


def get_scene_transform(name: str) -> Callable[[ViewsExample], ViewsExample]:
    if name not in SCENE_TRANSFORMS:
        raise ValueError(f"data.scene_transform: unknown transform {name!r}; expected one of {sorted(SCENE_TRANSFORMS)}")
    return SCENE_TRANSFORMS[name]


class TransformedDataset(torch.utils.data.Dataset):
    """``dataset`` with ``fn`` applied to every example; other attributes are the dataset's."""

    def __init__(self, dataset, fn: Callable[[ViewsExample], ViewsExample], name: str = ""):
        self.dataset, self.fn, self.name = dataset, fn, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> ViewsExample:
        return self.fn(self.dataset[item])

    def __getattr__(self, attr):  # groups, keys, cfg, ... of the wrapped dataset
        if attr in ("dataset", "fn", "name"):
            raise AttributeError(attr)
        return getattr(self.dataset, attr)


def with_scene_transform(dataset, name: str):
    """``dataset`` itself for ``"none"``, else wrapped so every example goes through the transform."""
    fn = get_scene_transform(name)
    return dataset if name == "none" else TransformedDataset(dataset, fn, name)
