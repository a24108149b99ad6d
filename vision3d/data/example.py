"""The typed example every dataset yields and the batch the training engine consumes.

One :class:`ViewsExample` holds the context views a reconstructor sees and the target views it
is supervised (or evaluated) on, with vision3d's conventions: images float32 ``[V, 3, H, W]`` in
``[0, 1]``, :class:`~vision3d.geometry.Cameras` with K in pixels and OpenCV cam-to-world.
:func:`collate_views` batches examples into a :class:`ViewsBatch` with images ``[B, V, 3, H, W]``
and cameras of batch shape ``[B, V]``. The fields mirror the example dictionaries of pixelSplat
(Charatan et al., arXiv:2312.12337, github.com/dcharatan/pixelsplat, MIT) -- context/target
images, intrinsics, extrinsics, near, far, index, scene -- as dataclasses instead of loose dicts.
Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch
from torch import Tensor

from vision3d.geometry import Cameras

__all__ = ["ViewsExample", "ViewsBatch", "collate_views"]


@dataclass
class ViewsExample:
    """One scene's sampled views."""

    scene: str  # scene key (RE10K: 16 hex digits; DL3DV: the scene hash, optionally prefixed)
    context_images: Tensor  # [Vc, 3, H, W] float32 in [0, 1]
    context_cameras: Cameras  # batch [Vc], K in pixels, cam_to_world OpenCV
    target_images: Tensor  # [Vt, 3, H, W] float32 in [0, 1]
    target_cameras: Cameras  # batch [Vt]
    context_indices: Tensor  # [Vc] int64 frame indices into the scene
    target_indices: Tensor  # [Vt] int64
    near: float  # near plane (world units, after any scene-scale normalisation)
    far: float  # far plane
    scale: float = 1.0  # the world was divided by this (1.0 = no normalisation)
    epoch: int = 0  # epoch of the sampler that asked for this example
    position: int = -1  # position in the sampler's per-rank stream (for resuming), -1 if unknown
    skipped: int = 0  # bad scenes skipped (skip_bad=True) to produce this example
    context_depths: Tensor | None = None  # [Vc, 1, H, W] float32 camera z-depth (world units), 0 = unknown
    target_depths: Tensor | None = None  # [Vt, 1, H, W] float32, 0 = unknown

    def __post_init__(self) -> None:
        for name, imgs, cams, idx, depth in (
            ("context", self.context_images, self.context_cameras, self.context_indices, self.context_depths),
            ("target", self.target_images, self.target_cameras, self.target_indices, self.target_depths),
        ):
            cams.check_images(imgs, f"{self.scene}: {name}_images / {name}_cameras")
            v = imgs.shape[0]
            if idx.shape != (v,):
                raise ValueError(f"{self.scene}: {name}_indices must be [{v}], got {tuple(idx.shape)}")
            if depth is not None and tuple(depth.shape) != (v, 1, *imgs.shape[-2:]):
                raise ValueError(f"{self.scene}: {name}_depths must be [{v}, 1, {imgs.shape[-2]}, {imgs.shape[-1]}], "
                                 f"got {tuple(depth.shape)}")


@dataclass
class ViewsBatch:
    """A batch of :class:`ViewsExample` (all with equal view counts and image sizes)."""

    scenes: list[str]  # [B] scene keys
    context_images: Tensor  # [B, Vc, 3, H, W] float32 in [0, 1]
    context_cameras: Cameras  # batch [B, Vc]
    target_images: Tensor  # [B, Vt, 3, H, W]
    target_cameras: Cameras  # batch [B, Vt]
    context_indices: Tensor  # [B, Vc] int64
    target_indices: Tensor  # [B, Vt] int64
    near: Tensor  # [B] float32
    far: Tensor  # [B] float32
    scale: Tensor  # [B] float32
    epochs: Tensor  # [B] int64
    positions: Tensor  # [B] int64
    skipped: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))  # [B] int64
    context_depths: Tensor | None = None  # [B, Vc, 1, H, W] z-depth, 0 = unknown (None: the data has no depth)
    target_depths: Tensor | None = None  # [B, Vt, 1, H, W]

    def __len__(self) -> int:
        return len(self.scenes)

    def to(self, *args, **kwargs) -> "ViewsBatch":
        """Move every tensor (cameras included), e.g. ``batch.to(device, non_blocking=True)``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(*args, **kwargs) if isinstance(v, (Tensor, Cameras)) else v
        # integer bookkeeping stays integer even when a dtype is passed
        for name in ("context_indices", "target_indices", "epochs", "positions", "skipped"):
            out[name] = getattr(self, name).to(device=out["near"].device)
        return replace(self, **out)

    def pin_memory(self) -> "ViewsBatch":
        """Called by ``DataLoader(pin_memory=True)``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v.pin_memory()
            elif isinstance(v, Cameras):
                out[f.name] = replace(v, K=v.K.pin_memory(), cam_to_world=v.cam_to_world.pin_memory())
            else:
                out[f.name] = v
        return replace(self, **out)


def _stack_cameras(cams: Sequence[Cameras], near: Tensor, far: Tensor, what: str) -> Cameras:
    try:
        out = Cameras.stack(list(cams), 0)
    except ValueError as e:
        raise ValueError(f"collate_views: {what} cameras differ in size ({e}); use one image_shape") from e
    same_near = bool((near == near[0]).all())
    same_far = bool((far == far[0]).all())
    return replace(
        out, near=float(near[0]) if same_near else None, far=float(far[0]) if same_far else None
    )


def collate_views(examples: Sequence[ViewsExample]) -> ViewsBatch:
    """Batch examples: images ``[B, V, 3, H, W]``, cameras ``[B, V]``.

    ``Cameras.near``/``far`` of the batch are set when every example shares them (else ``None``;
    per-example values are always in ``batch.near``/``batch.far``).
    """
    if len(examples) == 0:
        raise ValueError("collate_views: empty batch")
    ex0 = examples[0]
    for ex in examples[1:]:
        for name in ("context_images", "target_images"):
            a, b = getattr(ex0, name), getattr(ex, name)
            if a.shape != b.shape:
                raise ValueError(
                    f"collate_views: {name} of {ex0.scene} is {tuple(a.shape)} but of {ex.scene} is "
                    f"{tuple(b.shape)}; batch examples need equal view counts and image sizes"
                )
    near = torch.tensor([float(e.near) for e in examples], dtype=torch.float32)
    far = torch.tensor([float(e.far) for e in examples], dtype=torch.float32)

    def depths(name: str) -> Tensor | None:
        have = [getattr(e, name) is not None for e in examples]
        if not any(have):
            return None
        if not all(have):
            missing = [e.scene for e, h in zip(examples, have) if not h]
            raise ValueError(f"collate_views: {name} are missing for {missing[:3]} but present for other examples "
                             "of the batch; use data whose scenes all carry depth, or none")
        return torch.stack([getattr(e, name) for e in examples])

    return ViewsBatch(
        scenes=[e.scene for e in examples],
        context_images=torch.stack([e.context_images for e in examples]),
        context_cameras=_stack_cameras([e.context_cameras for e in examples], near, far, "context"),
        target_images=torch.stack([e.target_images for e in examples]),
        target_cameras=_stack_cameras([e.target_cameras for e in examples], near, far, "target"),
        context_indices=torch.stack([e.context_indices for e in examples]),
        target_indices=torch.stack([e.target_indices for e in examples]),
        near=near,
        far=far,
        scale=torch.tensor([float(e.scale) for e in examples], dtype=torch.float32),
        epochs=torch.tensor([int(e.epoch) for e in examples], dtype=torch.int64),
        positions=torch.tensor([int(e.position) for e in examples], dtype=torch.int64),
        skipped=torch.tensor([int(e.skipped) for e in examples], dtype=torch.int64),
        context_depths=depths("context_depths"),
        target_depths=depths("target_depths"),
    )
