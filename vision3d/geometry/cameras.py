"""The camera type every vision3d module shares.

Conventions (see ``DESIGN.md``):

- ``K`` is in **pixels** and maps camera coordinates to continuous image coordinates in which the
  image covers ``[0, width] x [0, height]``: the centre of pixel ``(row i, column j)`` is at
  ``(j + 0.5, i + 0.5)``. This is the convention of COLMAP, gsplat and the RE10K normalised
  intrinsics (``cx = 0.5`` is the image centre), so resizing scales K exactly and cropping shifts it.
- ``cam_to_world`` is a rigid ``4x4`` transform in the **OpenCV** convention (x right, y down,
  z forward). Every other convention is converted at the boundary by the named functions in
  :mod:`vision3d.geometry.conventions`.
- Cameras are batched: ``K`` is ``[..., 3, 3]`` and ``cam_to_world`` ``[..., 4, 4]`` with the same
  batch shape (broadcast at construction). All cameras of one object share ``width``/``height``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor


@dataclass(eq=False)  # tensor fields: == would be ambiguous; compare fields explicitly
class Cameras:
    K: Tensor  # [..., 3, 3] intrinsics in pixels
    cam_to_world: Tensor  # [..., 4, 4] rigid, OpenCV (x right, y down, z forward)
    width: int  # image width in pixels
    height: int  # image height in pixels
    near: float | None = None  # optional near plane (world units, along +z of the camera)
    far: float | None = None  # optional far plane

    def __post_init__(self) -> None:
        K, c2w = self.K, self.cam_to_world
        if not isinstance(K, Tensor) or K.shape[-2:] != (3, 3):
            raise ValueError(f"Cameras.K: expected a tensor [..., 3, 3], got {getattr(K, 'shape', type(K))}")
        if not isinstance(c2w, Tensor) or c2w.shape[-2:] != (4, 4):
            raise ValueError(
                f"Cameras.cam_to_world: expected a tensor [..., 4, 4], got {getattr(c2w, 'shape', type(c2w))}"
            )
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"Cameras: width/height must be positive, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)
        try:
            batch = torch.broadcast_shapes(K.shape[:-2], c2w.shape[:-2])
        except RuntimeError as e:
            raise ValueError(
                f"Cameras: K batch shape {tuple(K.shape[:-2])} and cam_to_world batch shape "
                f"{tuple(c2w.shape[:-2])} do not broadcast"
            ) from e
        dtype = torch.promote_types(K.dtype, c2w.dtype)
        if not dtype.is_floating_point:
            dtype = torch.float32
        self.K = K.to(dtype).expand(*batch, 3, 3)
        self.cam_to_world = c2w.to(device=self.K.device, dtype=dtype).expand(*batch, 4, 4)

    # ------------------------------------------------------------------ batch handling
    @property
    def batch_shape(self) -> torch.Size:
        return self.K.shape[:-2]

    @property
    def shape(self) -> torch.Size:
        return self.batch_shape

    @property
    def device(self) -> torch.device:
        return self.K.device

    @property
    def dtype(self) -> torch.dtype:
        return self.K.dtype

    def __len__(self) -> int:
        if len(self.batch_shape) == 0:
            raise TypeError("len() of unbatched Cameras")
        return self.batch_shape[0]

    def __getitem__(self, idx) -> "Cameras":
        if len(self.batch_shape) == 0:
            raise IndexError("cannot index unbatched Cameras")
        return replace(self, K=self.K[idx], cam_to_world=self.cam_to_world[idx])

    def to(self, *args, **kwargs) -> "Cameras":
        return replace(self, K=self.K.to(*args, **kwargs), cam_to_world=self.cam_to_world.to(*args, **kwargs))

    def reshape(self, *shape: int) -> "Cameras":
        return replace(self, K=self.K.reshape(*shape, 3, 3), cam_to_world=self.cam_to_world.reshape(*shape, 4, 4))

    def flatten(self) -> "Cameras":
        """All batch dimensions folded into one: ``[N]``."""
        return self.reshape(-1)

    @staticmethod
    def stack(cams: Sequence["Cameras"], dim: int = 0) -> "Cameras":
        """Stack cameras of equal size along a new batch dimension."""
        first = cams[0]
        for c in cams[1:]:
            if (c.width, c.height) != (first.width, first.height):
                raise ValueError(
                    f"Cameras.stack: all cameras need one size, got {first.width}x{first.height} and {c.width}x{c.height}"
                )
        return replace(
            first,
            K=torch.stack([c.K for c in cams], dim),
            cam_to_world=torch.stack([c.cam_to_world for c in cams], dim),
        )

    @staticmethod
    def cat(cams: Sequence["Cameras"], dim: int = 0) -> "Cameras":
        first = cams[0]
        for c in cams[1:]:
            if (c.width, c.height) != (first.width, first.height):
                raise ValueError(
                    f"Cameras.cat: all cameras need one size, got {first.width}x{first.height} and {c.width}x{c.height}"
                )
        return replace(
            first,
            K=torch.cat([c.K for c in cams], dim),
            cam_to_world=torch.cat([c.cam_to_world for c in cams], dim),
        )

    # ------------------------------------------------------------------ derived quantities
    @property
    def world_to_cam(self) -> Tensor:  # [..., 4, 4]
        """Inverse of ``cam_to_world`` (computed as a rigid inverse, not a general one)."""
        R = self.cam_to_world[..., :3, :3]
        t = self.cam_to_world[..., :3, 3:]
        Rt = R.transpose(-1, -2)
        out = torch.zeros_like(self.cam_to_world)
        out[..., :3, :3] = Rt
        out[..., :3, 3:] = -Rt @ t
        out[..., 3, 3] = 1.0
        return out

    @property
    def centers(self) -> Tensor:  # [..., 3] camera centres in world
        return self.cam_to_world[..., :3, 3]

    @property
    def rotation(self) -> Tensor:  # [..., 3, 3] camera-to-world rotation
        return self.cam_to_world[..., :3, :3]

    @property
    def K_normalized(self) -> Tensor:  # [..., 3, 3] first row / width, second row / height
        """Intrinsics for an image of size 1x1 (RE10K / pixelSplat convention)."""
        scale = self.K.new_tensor([1.0 / self.width, 1.0 / self.height, 1.0])
        return self.K * scale[:, None]

    @staticmethod
    def from_normalized(
        K_normalized: Tensor,  # [..., 3, 3] intrinsics for a 1x1 image
        cam_to_world: Tensor,  # [..., 4, 4] OpenCV
        width: int,
        height: int,
        near: float | None = None,
        far: float | None = None,
    ) -> "Cameras":
        scale = K_normalized.new_tensor([float(width), float(height), 1.0])
        return Cameras(K_normalized * scale[:, None], cam_to_world, width, height, near, far)

    @property
    def fov(self) -> Tensor:  # [..., 2] horizontal and vertical field of view in radians
        fx, fy = self.K[..., 0, 0], self.K[..., 1, 1]
        return torch.stack([2 * torch.atan(self.width / (2 * fx)), 2 * torch.atan(self.height / (2 * fy))], -1)

    # ------------------------------------------------------------------ image-space edits
    def resize(self, width: int, height: int) -> "Cameras":
        """Cameras of the same views at another resolution (scales K's rows exactly)."""
        sx, sy = width / self.width, height / self.height
        scale = self.K.new_tensor([sx, sy, 1.0])
        return replace(self, K=self.K * scale[:, None], width=int(width), height=int(height))

    def crop(self, left: int, top: int, width: int, height: int) -> "Cameras":
        """Cameras of the pixel window ``[top:top+height, left:left+width]``."""
        if left < 0 or top < 0 or left + width > self.width or top + height > self.height:
            raise ValueError(
                f"Cameras.crop: window (left={left}, top={top}, {width}x{height}) is outside the "
                f"{self.width}x{self.height} image"
            )
        K = self.K.clone()
        K[..., 0, 2] -= left
        K[..., 1, 2] -= top
        return replace(self, K=K, width=int(width), height=int(height))

    def center_crop(self, width: int, height: int) -> "Cameras":
        return self.crop((self.width - width) // 2, (self.height - height) // 2, width, height)

    def resize_and_center_crop(self, width: int, height: int) -> "Cameras":
        """Scale so the image covers ``width x height``, then crop the centre (pixelSplat's policy)."""
        s = max(width / self.width, height / self.height)
        rw, rh = max(width, round(self.width * s)), max(height, round(self.height * s))
        return self.resize(rw, rh).center_crop(width, height)

    # ------------------------------------------------------------------ rays
    def pixel_grid(self) -> Tensor:  # [H, W, 2] pixel-centre coordinates (x, y)
        ys = torch.arange(self.height, device=self.device, dtype=self.dtype) + 0.5
        xs = torch.arange(self.width, device=self.device, dtype=self.dtype) + 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx, gy], -1)

    def rays(self, normalize: bool = True) -> tuple[Tensor, Tensor]:
        """Per-pixel world-space rays through pixel centres.

        Returns:
            origins ``[..., H, W, 3]`` and directions ``[..., H, W, 3]`` (unit length if
            ``normalize``, else with camera-space ``z = 1``).
        """
        uv = self.pixel_grid()  # [H, W, 2]
        Kinv = torch.linalg.inv(self.K)  # [..., 3, 3]
        uv1 = torch.cat([uv, torch.ones_like(uv[..., :1])], -1)  # [H, W, 3]
        d_cam = torch.einsum("...ij,hwj->...hwi", Kinv, uv1)
        d_world = torch.einsum("...ij,...hwj->...hwi", self.rotation, d_cam)
        if normalize:
            d_world = torch.nn.functional.normalize(d_world, dim=-1)
        origins = self.centers[..., None, None, :].expand_as(d_world)
        return origins, d_world

    def plucker(self) -> Tensor:  # [..., 6, H, W]
        """Plücker ray map ``(o x d, d)`` per pixel with unit ``d``, channels first.

        The moment-then-direction order is that of GS-LRM / LVSM / iLRM.
        """
        o, d = self.rays(normalize=True)
        m = torch.cross(o, d, dim=-1)
        return torch.cat([m, d], -1).movedim(-1, -3)

    def project(self, points_world: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points ``[..., N, 3]`` to pixels ``[..., N, 2]`` and depths ``[..., N]``."""
        w2c = self.world_to_cam
        p = torch.einsum("...ij,...nj->...ni", w2c[..., :3, :3], points_world) + w2c[..., None, :3, 3]
        z = p[..., 2]
        uvw = torch.einsum("...ij,...nj->...ni", self.K, p)
        w = uvw[..., 2:3]
        w = torch.where(w.abs() < 1e-12, torch.full_like(w, 1e-12), w)
        uv = uvw[..., :2] / w
        return uv, z

    def unproject(self, depth: Tensor) -> Tensor:
        """World points ``[..., H, W, 3]`` from per-pixel z-depth ``[..., H, W]`` (camera z, not ray length)."""
        uv = self.pixel_grid()
        uv1 = torch.cat([uv, torch.ones_like(uv[..., :1])], -1)
        d_cam = torch.einsum("...ij,hwj->...hwi", torch.linalg.inv(self.K), uv1)
        p_cam = d_cam * depth[..., None]
        return torch.einsum("...ij,...hwj->...hwi", self.rotation, p_cam) + self.centers[..., None, None, :]

    def check_images(self, images: Tensor, where: str, batch: str = "V") -> None:
        """Raise ``ValueError`` (its message starting with ``where``) unless ``images`` is
        ``[*batch, 3, H, W]`` with this batch shape and this width and height; ``batch`` names the
        batch dimensions, e.g. ``"V"`` or ``"B, V"``."""
        n = len(batch.split(","))
        if images.ndim != n + 3 or images.shape[n] != 3:
            raise ValueError(f"{where}: images must be [{batch}, 3, H, W], got {tuple(images.shape)}")
        if tuple(self.batch_shape) != tuple(images.shape[:n]):
            raise ValueError(
                f"{where}: cameras batch {tuple(self.batch_shape)} does not match images [{batch}] = "
                f"{tuple(images.shape[:n])}"
            )
        if (self.height, self.width) != tuple(images.shape[-2:]):
            raise ValueError(
                f"{where}: cameras are {self.width}x{self.height} but images are "
                f"{images.shape[-1]}x{images.shape[-2]} (W x H)"
            )

    def __repr__(self) -> str:
        return (
            f"Cameras(batch={tuple(self.batch_shape)}, {self.width}x{self.height}, "
            f"near={self.near}, far={self.far}, dtype={self.dtype}, device={self.device})"
        )
