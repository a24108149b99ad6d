"""COLMAP sparse models: read and write, text and binary.

Source of the formats: COLMAP (Schönberger & Frahm, "Structure-from-Motion Revisited", CVPR 2016;
github.com/colmap/colmap, BSD-3-Clause): camera model ids, names and parameter orders from
``src/colmap/sensor/models.h``; file layouts as written by ``src/colmap/scene/reconstruction_io``
and read by ``scripts/python/read_write_model.py``:

- ``cameras.bin``: ``uint64 n``; per camera ``int32 id, int32 model_id, uint64 width, uint64 height,
  float64 params[num_params(model)]``.
- ``images.bin``: ``uint64 n``; per image ``int32 id, float64 qw qx qy qz tx ty tz, int32 camera_id,
  name (NUL-terminated), uint64 m``, then ``m`` times ``float64 x, float64 y, int64 point3D_id``.
- ``points3D.bin``: ``uint64 n``; per point ``uint64 id, float64 x y z, uint8 r g b, float64 error,
  uint64 track_length``, then ``track_length`` times ``int32 image_id, int32 point2D_idx``.
- The ``.txt`` files hold the same fields, one camera/point per line and two lines per image.

All numbers are little-endian. ``qvec`` (w, x, y, z) and ``tvec`` are the **world-to-camera** pose
in OpenCV axes; pixel coordinates put the image in ``[0, width] x [0, height]`` (upper-left pixel
centre at 0.5), which is our :class:`~vision3d.geometry.Cameras` convention, so K needs no shift.

Distortion is never dropped silently: :meth:`ColmapModel.to_cameras` returns it beside the cameras
(:class:`CameraDistortion`, the model's extra parameters in COLMAP's order).
COLMAP >= 3.12 also writes ``rigs``/``frames`` files; they are not read here (each image's own
pose, which those versions still store in ``images``, is used).
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, check_finite, check_size, guard
from ..utils.io import write_bytes_atomic, write_text_atomic
from .cameras import Cameras
from .rotations import make_rigid, matrix_to_quat, quat_to_matrix, rigid_inverse


@dataclass(frozen=True)
class CameraModelInfo:
    id: int
    name: str
    num_focal: int  # 1 (f) or 2 (fx, fy); 0 for EQUIRECTANGULAR
    num_extra: int  # distortion parameters after the focal length(s) and principal point
    param_names: tuple[str, ...]

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    @property
    def is_pinhole(self) -> bool:
        """No distortion and a perspective projection: K says everything."""
        return self.name in ("SIMPLE_PINHOLE", "PINHOLE")


def _m(id_: int, name: str, params: str) -> CameraModelInfo:
    names = tuple(params.split())
    nf = 0 if name == "EQUIRECTANGULAR" else (1 if names[0] == "f" else 2)
    extra = 0 if nf == 0 else len(names) - nf - 2
    return CameraModelInfo(id_, name, nf, extra, names)


CAMERA_MODELS: tuple[CameraModelInfo, ...] = (
    _m(0, "SIMPLE_PINHOLE", "f cx cy"),
    _m(1, "PINHOLE", "fx fy cx cy"),
    _m(2, "SIMPLE_RADIAL", "f cx cy k"),
    _m(3, "RADIAL", "f cx cy k1 k2"),
    _m(4, "OPENCV", "fx fy cx cy k1 k2 p1 p2"),
    _m(5, "OPENCV_FISHEYE", "fx fy cx cy k1 k2 k3 k4"),
    _m(6, "FULL_OPENCV", "fx fy cx cy k1 k2 p1 p2 k3 k4 k5 k6"),
    _m(7, "FOV", "fx fy cx cy omega"),
    _m(8, "SIMPLE_RADIAL_FISHEYE", "f cx cy k"),
    _m(9, "RADIAL_FISHEYE", "f cx cy k1 k2"),
    _m(10, "THIN_PRISM_FISHEYE", "fx fy cx cy k1 k2 p1 p2 k3 k4 sx1 sy1"),
    _m(11, "RAD_TAN_THIN_PRISM_FISHEYE", "fx fy cx cy k0 k1 k2 k3 k4 k5 p0 p1 s0 s1 s2 s3"),
    _m(12, "SIMPLE_DIVISION", "f cx cy k"),
    _m(13, "DIVISION", "fx fy cx cy k"),
    _m(14, "SIMPLE_FISHEYE", "f cx cy"),
    _m(15, "FISHEYE", "fx fy cx cy"),
    _m(16, "EUCM", "fx fy cx cy alpha beta"),
    _m(17, "EQUIRECTANGULAR", "w h"),
)
MODELS_BY_ID: dict[int, CameraModelInfo] = {m.id: m for m in CAMERA_MODELS}
MODELS_BY_NAME: dict[str, CameraModelInfo] = {m.name: m for m in CAMERA_MODELS}


def camera_model(key: int | str, where: str = "camera model") -> CameraModelInfo:
    """Look a COLMAP camera model up by id or name; ``where`` prefixes the error message."""
    table = MODELS_BY_ID if isinstance(key, (int, np.integer)) else MODELS_BY_NAME
    info = table.get(int(key) if isinstance(key, (int, np.integer)) else str(key))
    if info is None:
        known = ", ".join(f"{m.id}={m.name}" for m in CAMERA_MODELS)
        raise ValueError(f"{where}: unknown COLMAP camera model {key!r}; known models: {known}")
    return info


# ---------------------------------------------------------------------------------------- records
# The file records hold numpy arrays (COLMAP's own Python tools do too): a model can hold millions of
# points, and a numpy view into the file's bytes costs a fraction of a torch tensor per record.
# Everything derived for the rest of vision3d (K, poses, Cameras, point clouds) is a torch tensor.
def _arr(x, dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x, dtype=dtype)
    try:
        return a.reshape(shape)
    except ValueError as e:
        raise ValueError(f"{what}: expected shape {shape}, got {a.shape}") from e


@dataclass
class ColmapCamera:
    id: int
    model: str  # COLMAP model name, e.g. "PINHOLE", "OPENCV"
    width: int
    height: int
    params: np.ndarray  # [num_params] float64 in the model's order (see CAMERA_MODELS)

    def __post_init__(self) -> None:
        info = camera_model(self.model, f"ColmapCamera {self.id}: field 'model'")
        self.params = _arr(self.params, np.float64, (-1,), f"ColmapCamera {self.id} params")
        if self.params.size != info.num_params:
            raise ValueError(
                f"ColmapCamera {self.id}: model {info.name} takes {info.num_params} params "
                f"({' '.join(info.param_names)}), got {self.params.size}"
            )

    @property
    def info(self) -> CameraModelInfo:
        return MODELS_BY_NAME[self.model]

    @property
    def model_id(self) -> int:
        return self.info.id

    @property
    def K(self) -> Tensor:  # [3, 3] float64, pixels
        info, p = self.info, self.params.tolist()
        if info.num_focal == 0:
            raise ValueError(f"COLMAP camera {self.id}: model {self.model} has no pinhole intrinsics")
        fx, fy = (p[0], p[0]) if info.num_focal == 1 else (p[0], p[1])
        cx, cy = p[info.num_focal], p[info.num_focal + 1]
        return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)

    @property
    def distortion(self) -> Tensor:  # [num_extra] float64, the model's extra parameters
        info = self.info
        start = 0 if info.num_focal == 0 else info.num_focal + 2
        return torch.tensor(self.params[start:].tolist(), dtype=torch.float64)


_NO_XY = np.zeros((0, 2), dtype=np.float64)
_NO_ID = np.zeros((0,), dtype=np.int64)


@dataclass
class ColmapImage:
    id: int
    qvec: np.ndarray  # [4] float64, wxyz, world-to-camera rotation
    tvec: np.ndarray  # [3] float64, world-to-camera translation
    camera_id: int
    name: str
    xys: np.ndarray = field(default_factory=lambda: _NO_XY)  # [M, 2] float64 pixels
    point3D_ids: np.ndarray = field(default_factory=lambda: _NO_ID)  # [M] int64, -1 = none

    def __post_init__(self) -> None:
        what = f"ColmapImage {self.id} ({self.name})"
        self.qvec = _arr(self.qvec, np.float64, (4,), f"{what} qvec")
        self.tvec = _arr(self.tvec, np.float64, (3,), f"{what} tvec")
        self.xys = _arr(self.xys, np.float64, (-1, 2), f"{what} xys")
        self.point3D_ids = _arr(self.point3D_ids, np.int64, (-1,), f"{what} point3D_ids")
        if self.xys.shape[0] != self.point3D_ids.shape[0]:
            raise ValueError(f"{what}: {self.xys.shape[0]} xys but {self.point3D_ids.shape[0]} point3D_ids")

    @property
    def world_to_cam(self) -> Tensor:  # [4, 4] float64, OpenCV
        q = torch.from_numpy(self.qvec.copy())
        return make_rigid(quat_to_matrix(q), torch.from_numpy(self.tvec.copy()))

    @property
    def cam_to_world(self) -> Tensor:  # [4, 4] float64, OpenCV
        return rigid_inverse(self.world_to_cam)


@dataclass
class ColmapPoint3D:
    id: int
    xyz: np.ndarray  # [3] float64 world
    rgb: np.ndarray  # [3] uint8
    error: float = 0.0  # mean reprojection error in pixels
    image_ids: np.ndarray = field(default_factory=lambda: _NO_ID)  # [T] track: images seeing the point
    point2D_idxs: np.ndarray = field(default_factory=lambda: _NO_ID)  # [T] index into that image's xys

    def __post_init__(self) -> None:
        self.xyz = _arr(self.xyz, np.float64, (3,), f"ColmapPoint3D {self.id} xyz")
        self.rgb = _arr(self.rgb, np.uint8, (3,), f"ColmapPoint3D {self.id} rgb")
        self.image_ids = _arr(self.image_ids, np.int64, (-1,), f"ColmapPoint3D {self.id} image_ids")
        self.point2D_idxs = _arr(self.point2D_idxs, np.int64, (-1,), f"ColmapPoint3D {self.id} point2D_idxs")
        if self.image_ids.shape != self.point2D_idxs.shape:
            raise ValueError(f"ColmapPoint3D {self.id}: track image_ids and point2D_idxs differ in length")
        self.error = float(self.error)

    @classmethod
    def _trusted(cls, id_, xyz, rgb, error, image_ids, point2D_idxs) -> "ColmapPoint3D":
        # readers pass arrays of the right dtype and shape: skip the checks (millions of points)
        p = cls.__new__(cls)
        p.id, p.xyz, p.rgb, p.error, p.image_ids, p.point2D_idxs = id_, xyz, rgb, error, image_ids, point2D_idxs
        return p


@dataclass
class CameraDistortion:
    """Lens distortion that K alone does not describe, one row per camera."""

    model: str  # COLMAP model name, e.g. "OPENCV"
    params: Tensor  # [N, k] the model's extra parameters in COLMAP's order (may be [N, 0] for fisheye)

    @property
    def param_names(self) -> tuple[str, ...]:
        info = MODELS_BY_NAME[self.model]
        return info.param_names[info.num_focal + 2 :]

    def undistort_image(
        self,
        image: Tensor,  # [N, C, H, W] distorted images, one per camera
        cameras: Cameras,  # [N] their cameras (K of the distorted images)
        K_new: Tensor | None = None,  # [N, 3, 3] intrinsics of the output pinhole images (default: K)
    ) -> Tensor:  # [N, C, H, W]
        """Pinhole images for these cameras (see :func:`vision3d.geometry.distortion.undistort_image`)."""
        from .distortion import undistort_image

        return undistort_image(image, cameras.K, self.model, self.params, K_new)


# ---------------------------------------------------------------------------------------- model
@dataclass
class ColmapModel:
    cameras: dict[int, ColmapCamera] = field(default_factory=dict)
    images: dict[int, ColmapImage] = field(default_factory=dict)
    points3D: dict[int, ColmapPoint3D] = field(default_factory=dict)
    path: Path | None = None  # the folder it was read from, if any

    def __repr__(self) -> str:
        return (
            f"ColmapModel({len(self.cameras)} cameras, {len(self.images)} images, "
            f"{len(self.points3D)} points, path={self.path})"
        )

    # ------------------------------------------------------------------ points
    def points_xyz(self) -> Tensor:  # [P, 3] float64 world, in the order of points3D
        xyz = np.array([p.xyz for p in self.points3D.values()], dtype=np.float64).reshape(-1, 3)
        return torch.from_numpy(xyz)

    def points_rgb(self) -> Tensor:  # [P, 3] uint8
        rgb = np.array([p.rgb for p in self.points3D.values()], dtype=np.uint8).reshape(-1, 3)
        return torch.from_numpy(rgb)

    # ------------------------------------------------------------------ to / from Cameras
    def _select(self, image_ids: Sequence[int] | None, sort_by_name: bool) -> list[ColmapImage]:
        where = self.path if self.path is not None else "ColmapModel"
        if image_ids is None:
            imgs = list(self.images.values())
        else:
            missing = [i for i in image_ids if i not in self.images]
            if missing:
                raise ValueError(f"{where}: image ids {missing[:5]} are not in the model")
            imgs = [self.images[i] for i in image_ids]
        if sort_by_name:
            imgs = sorted(imgs, key=lambda im: im.name)
        for im in imgs:
            if im.camera_id not in self.cameras:
                raise ValueError(f"{where}: image {im.id} ({im.name}) refers to camera_id {im.camera_id}, not in cameras")
        return imgs

    def to_cameras(
        self,
        image_ids: Sequence[int] | None = None,
        *,
        sort_by_name: bool = True,
        group_by_size: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> (
        tuple[Cameras, list[str], CameraDistortion | None]
        | dict[tuple[int, int], tuple[Cameras, list[str], CameraDistortion | None]]
    ):
        """Our cameras for the model's images.

        Args:
            image_ids: images to take (default: all).
            sort_by_name: order by image name (else by ``image_ids`` / file order).
            group_by_size: if the images come from cameras of different sizes, return a dict
                ``{(width, height): (Cameras, names, distortion)}`` instead of raising.
            dtype: dtype of the returned tensors.

        Returns:
            ``(Cameras [N], names [N], distortion)`` where ``distortion`` is ``None`` if all cameras
            are pinhole (SIMPLE_PINHOLE/PINHOLE), else a :class:`CameraDistortion` with the extra
            parameters of each image's camera (all images must then share one camera model).
        """
        imgs = self._select(image_ids, sort_by_name)
        where = self.path if self.path is not None else "ColmapModel"
        if not imgs:
            raise ValueError(f"{where}: no images to convert")
        sizes: dict[tuple[int, int], list[ColmapImage]] = {}
        for im in imgs:
            cam = self.cameras[im.camera_id]
            sizes.setdefault((cam.width, cam.height), []).append(im)
        if len(sizes) > 1 and not group_by_size:
            desc = ", ".join(f"{w}x{h} ({len(v)} images)" for (w, h), v in sizes.items())
            raise ValueError(
                f"{where}: images come from cameras of different sizes: {desc}. Cameras hold one size "
                "per batch; pass group_by_size=True to get one batch per size"
            )
        groups = {size: self._convert(group, size, dtype, where) for size, group in sizes.items()}
        if group_by_size:
            return groups
        return next(iter(groups.values()))

    def _convert(
        self, imgs: list[ColmapImage], size: tuple[int, int], dtype: torch.dtype, where
    ) -> tuple[Cameras, list[str], CameraDistortion | None]:
        cams = [self.cameras[im.camera_id] for im in imgs]
        for c in cams:
            if c.info.num_focal == 0:
                raise ValueError(f"{where}: camera {c.id} is {c.model} (no pinhole intrinsics); cannot make Cameras")
        K = torch.stack([c.K for c in cams]).to(dtype)
        c2w = torch.stack([im.cam_to_world for im in imgs]).to(dtype)
        # values finite in float64 can overflow the requested dtype (a principal point of 1e83 in float32)
        _check_representable(where, K, [f"camera {c.id} PARAMS" for c in cams], [c.params for c in cams], dtype)
        _check_representable(where, c2w, [f"image {im.id} QVEC/TVEC" for im in imgs], [np.concatenate([im.qvec, im.tvec]) for im in imgs], dtype)
        cameras = Cameras(K, c2w, size[0], size[1])
        names = [im.name for im in imgs]
        models = {c.model for c in cams}
        if all(MODELS_BY_NAME[m].is_pinhole for m in models):
            return cameras, names, None
        if len(models) > 1:
            raise ValueError(
                f"{where}: images use different distorted camera models {sorted(models)}; "
                "select images of one model (image_ids=...) to convert them"
            )
        coeffs = torch.stack([c.distortion for c in cams]).to(dtype)
        _check_representable(where, coeffs, [f"camera {c.id} PARAMS" for c in cams], [c.params for c in cams], dtype)
        dist = CameraDistortion(models.pop(), coeffs)
        return cameras, names, dist

    @staticmethod
    def from_cameras(
        cameras: Cameras,  # [N] (any batch shape, flattened), OpenCV cam_to_world, K in pixels
        names: Sequence[str],
        points: Tensor | None = None,  # [P, 3] world
        colors: Tensor | None = None,  # [P, 3] uint8, or float in [0, 1]
        distortion: CameraDistortion | None = None,
        *,
        share_cameras: bool = True,
    ) -> "ColmapModel":
        """A model with one image per camera (ids from 1, in order) and optional points.

        Views with identical intrinsics (and distortion) share one COLMAP camera when
        ``share_cameras``. Without ``distortion`` cameras are written as PINHOLE.
        """
        cams = cameras.flatten() if len(cameras.batch_shape) != 1 else cameras
        n = cams.batch_shape[0]
        if len(names) != n:
            raise ValueError(f"ColmapModel.from_cameras: {len(names)} names for {n} cameras")
        model_name = "PINHOLE" if distortion is None else distortion.model
        info = camera_model(model_name, "ColmapModel.from_cameras: distortion.model")
        if info.num_focal == 0:
            raise ValueError(f"ColmapModel.from_cameras: cannot write {info.name} cameras from pinhole K")
        K = cams.K.detach().to("cpu", torch.float64)
        if distortion is not None:
            d = torch.as_tensor(distortion.params, dtype=torch.float64).cpu()
            d = d.expand(n, -1) if d.ndim == 1 else d
            if d.shape != (n, info.num_extra):
                raise ValueError(
                    f"ColmapModel.from_cameras: distortion.params must be [{n}, {info.num_extra}] for {info.name}, "
                    f"got {tuple(d.shape)}"
                )
        else:
            d = torch.zeros(n, 0, dtype=torch.float64)
        if info.num_focal == 1:
            if not torch.allclose(K[:, 0, 0], K[:, 1, 1], rtol=1e-6, atol=0):
                raise ValueError(f"ColmapModel.from_cameras: {info.name} has one focal length but fx != fy")
            focal = K[:, :1, 0]
        else:
            focal = torch.stack([K[:, 0, 0], K[:, 1, 1]], -1)
        params = torch.cat([focal, K[:, :2, 2], d], -1)  # [N, num_params]

        model = ColmapModel()
        cam_ids: list[int] = []
        seen: dict[tuple[float, ...], int] = {}
        for i in range(n):
            key = tuple(params[i].tolist())
            if share_cameras and key in seen:
                cam_ids.append(seen[key])
                continue
            cid = len(model.cameras) + 1
            model.cameras[cid] = ColmapCamera(cid, info.name, cams.width, cams.height, params[i].numpy().copy())
            seen[key] = cid
            cam_ids.append(cid)
        w2c = rigid_inverse(cams.cam_to_world.detach().to("cpu", torch.float64))
        q = matrix_to_quat(w2c[:, :3, :3])
        for i in range(n):
            model.images[i + 1] = ColmapImage(i + 1, q[i].numpy(), w2c[i, :3, 3].numpy(), cam_ids[i], str(names[i]))
        if points is not None:
            pts = torch.as_tensor(points).detach().to("cpu", torch.float64).reshape(-1, 3)
            if colors is None:
                rgb = torch.full((pts.shape[0], 3), 128, dtype=torch.uint8)
            else:
                c = torch.as_tensor(colors).detach().cpu().reshape(-1, 3)
                if c.shape[0] != pts.shape[0]:
                    raise ValueError(f"ColmapModel.from_cameras: {c.shape[0]} colors for {pts.shape[0]} points")
                rgb = c if c.dtype == torch.uint8 else (c.double().clamp(0, 1) * 255).round().to(torch.uint8)
            pts_np, rgb_np = pts.numpy(), rgb.numpy()
            for j in range(pts.shape[0]):
                model.points3D[j + 1] = ColmapPoint3D(j + 1, pts_np[j], rgb_np[j])
        elif colors is not None:
            raise ValueError("ColmapModel.from_cameras: colors given without points")
        return model


# ---------------------------------------------------------------------------------------- input checks
def _check_representable(where, values: torch.Tensor, fields: list[str], raw: list, dtype: torch.dtype) -> None:
    """Refuse the first row of ``values`` (one per camera or image) that is not finite after the cast to ``dtype``."""
    rows = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    if not rows.all():
        i = int(torch.nonzero(~rows)[0])
        raise InputError(where, fields[i], f"values representable in {dtype}", np.asarray(raw[i]).tolist())


def _check_cameras(path: Path, cams: dict[int, ColmapCamera]) -> None:
    """Refuse sizes that are not positive and intrinsics that are not finite or not physical."""
    for cid, c in cams.items():
        check_size(path, f"camera {cid} WIDTH/HEIGHT", c.width, c.height, max_pixels=2**31)
        check_finite(path, f"camera {cid} PARAMS", c.params, "finite camera parameters")
        nf = c.info.num_focal
        if nf and not (c.params[:nf] > 0).all():
            raise InputError(path, f"camera {cid} PARAMS (focal length)", "focal lengths > 0", c.params[:nf].tolist())


def _check_images(path: Path, imgs: dict[int, ColmapImage]) -> None:
    """Refuse non-finite poses and quaternions too short to be a rotation (all zero is not the identity).

    Non-finite 2-D observations are accepted as COLMAP writes them: its image undistorter leaves NaN for
    keypoints it cannot map into the undistorted image; they carry no pose information."""
    for iid, im in imgs.items():
        check_finite(path, f"image {iid} QVEC/TVEC", np.concatenate([im.qvec, im.tvec]), "finite pose values")
        n = float(np.linalg.norm(im.qvec))
        if not n > 1e-6:
            raise InputError(path, f"image {iid} QVEC", "a unit quaternion (norm 1)", im.qvec.tolist())


def _check_points(path: Path, pts: dict[int, ColmapPoint3D]) -> None:
    for pid, pt in pts.items():
        if not (np.isfinite(pt.xyz).all() and math.isfinite(pt.error)):
            raise InputError(path, f"point {pid} XYZ/ERROR", "finite values", [*pt.xyz.tolist(), pt.error])


def _reader(what: str, check):
    """Wrap a reader: any parse failure becomes an InputError naming the file; the result is checked."""

    def deco(fn):
        @functools.wraps(fn)
        def read(path: str | os.PathLike):
            path = Path(path)
            with guard(path, what):
                out = fn(path)
                check(path, out)
            return out

        return read

    return deco


# ---------------------------------------------------------------------------------------- binary read
class _Buf:
    """Sequential reader over a binary file that names the file and field on truncation."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e.strerror})") from e
        self.off = 0

    def _need(self, n: int, what: str) -> None:
        if self.off + n > len(self.data):
            raise ValueError(
                f"{self.path}: truncated file: needs {n} more bytes at byte {self.off} for {what}, "
                f"but the file has {len(self.data)} bytes"
            )

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct("<" + fmt)
        self._need(s.size, what)
        out = s.unpack_from(self.data, self.off)
        self.off += s.size
        return out

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        dtype = np.dtype(dtype)
        self._need(dtype.itemsize * count, what)
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.off)
        self.off += dtype.itemsize * count
        return out

    def cstring(self, what: str) -> str:
        end = self.data.find(b"\x00", self.off)
        if end < 0:
            raise ValueError(f"{self.path}: truncated file: {what} has no NUL terminator (from byte {self.off})")
        s = self.data[self.off : end].decode("utf-8")
        self.off = end + 1
        return s

    def done(self) -> None:
        if self.off != len(self.data):
            raise ValueError(
                f"{self.path}: {len(self.data) - self.off} unexpected bytes after the last record (corrupt file?)"
            )


_P2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
_TRACK = np.dtype([("image_id", "<i4"), ("idx", "<i4")])


@_reader("a COLMAP cameras.bin", _check_cameras)
def read_cameras_binary(path: str | os.PathLike) -> dict[int, ColmapCamera]:
    b = _Buf(Path(path))
    (n,) = b.unpack("Q", "num_cameras")
    out = {}
    for i in range(n):
        cid, model_id, w, h = b.unpack("iiQQ", f"camera #{i} (camera_id, model_id, width, height)")
        info = camera_model(model_id, f"{path}: camera #{i} (id {cid}) field model_id")
        params = b.unpack("d" * info.num_params, f"camera {cid} params ({info.name}: {info.num_params} float64)")
        out[cid] = ColmapCamera(cid, info.name, w, h, np.array(params, dtype=np.float64))
    b.done()
    return out


@_reader("a COLMAP images.bin", _check_images)
def read_images_binary(path: str | os.PathLike) -> dict[int, ColmapImage]:
    b = _Buf(Path(path))
    (n,) = b.unpack("Q", "num_reg_images")
    out = {}
    for i in range(n):
        rec = b.unpack("idddddddi", f"image #{i} (image_id, qvec, tvec, camera_id)")
        iid = rec[0]
        name = b.cstring(f"image {iid} name")
        (m,) = b.unpack("Q", f"image {iid} num_points2D")
        p2d = b.array(_P2D, m, f"image {iid} points2D ({m} x 24 bytes)")
        xys = np.stack([p2d["x"], p2d["y"]], -1).reshape(-1, 2)
        out[iid] = ColmapImage(iid, rec[1:5], rec[5:8], rec[8], name, xys, p2d["id"].astype(np.int64))
    b.done()
    return out


@_reader("a COLMAP points3D.bin", _check_points)
def read_points3D_binary(path: str | os.PathLike) -> dict[int, ColmapPoint3D]:
    b = _Buf(Path(path))
    (n,) = b.unpack("Q", "num_points")
    out = {}
    head = struct.Struct("<QdddBBBdQ")
    data, size = b.data, len(b.data)
    for i in range(n):
        if b.off + head.size > size:
            b.unpack(head.format[1:], f"point #{i} (point3D_id, xyz, rgb, error, track_length)")
        pid, x, y, z, r, g, bl, err, t = head.unpack_from(data, b.off)
        b.off += head.size
        tr = b.array(_TRACK, t, f"point {pid} track ({t} x 8 bytes)")
        out[pid] = ColmapPoint3D._trusted(
            pid,
            np.array((x, y, z), dtype=np.float64),
            np.array((r, g, bl), dtype=np.uint8),
            err,
            tr["image_id"].astype(np.int64),
            tr["idx"].astype(np.int64),
        )
    b.done()
    return out


# ---------------------------------------------------------------------------------------- text read
def _data_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line, comments and blank lines included (images.txt needs blanks)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from e
    return [(i + 1, ln.rstrip("\r\n")) for i, ln in enumerate(text.split("\n"))]


def _parse(path: Path, lineno: int, field_: str, conv, tok: str):
    try:
        return conv(tok)
    except ValueError as e:
        raise ValueError(f"{path}:{lineno}: field {field_}: cannot parse {tok!r} ({e})") from e


def _numbers(path: Path, lineno: int, field_: str, toks: list[str], dtype) -> np.ndarray:
    """Parse number tokens in one numpy call; on failure name the file, line, field and token."""
    try:
        return np.array(toks, dtype=dtype).reshape(-1)
    except ValueError:
        conv = float if dtype == np.float64 else int
        for t in toks:
            _parse(path, lineno, field_, conv, t)
        raise


@_reader("a COLMAP cameras.txt", _check_cameras)
def read_cameras_text(path: str | os.PathLike) -> dict[int, ColmapCamera]:
    path = Path(path)
    out = {}
    for ln, line in _data_lines(path):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        el = s.split()
        if len(el) < 4:
            raise ValueError(f"{path}:{ln}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...', got {s!r}")
        cid = _parse(path, ln, "CAMERA_ID", int, el[0])
        info = camera_model(el[1], f"{path}:{ln}: camera {cid} field MODEL")
        w = _parse(path, ln, "WIDTH", int, el[2])
        h = _parse(path, ln, "HEIGHT", int, el[3])
        params = [_parse(path, ln, "PARAMS", float, x) for x in el[4:]]
        if len(params) != info.num_params:
            raise ValueError(
                f"{path}:{ln}: camera {cid} field PARAMS: {info.name} takes {info.num_params} "
                f"({' '.join(info.param_names)}), got {len(params)}"
            )
        out[cid] = ColmapCamera(cid, info.name, w, h, np.array(params, dtype=np.float64))
    return out


@_reader("a COLMAP images.txt", _check_images)
def read_images_text(path: str | os.PathLike) -> dict[int, ColmapImage]:
    path = Path(path)
    lines = _data_lines(path)
    out = {}
    i = 0
    while i < len(lines):
        ln, line = lines[i]
        s = line.strip()
        i += 1
        if not s or s.startswith("#"):
            continue
        el = s.split()
        if len(el) < 10:
            raise ValueError(
                f"{path}:{ln}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {len(el)} fields"
            )
        iid = _parse(path, ln, "IMAGE_ID", int, el[0])
        q = [_parse(path, ln, "QVEC", float, x) for x in el[1:5]]
        t = [_parse(path, ln, "TVEC", float, x) for x in el[5:8]]
        cid = _parse(path, ln, "CAMERA_ID", int, el[8])
        name = " ".join(el[9:])
        pts = lines[i][1].split() if i < len(lines) else []
        pln = lines[i][0] if i < len(lines) else ln + 1
        i += 1
        if len(pts) % 3:
            raise ValueError(f"{path}:{pln}: image {iid} field POINTS2D: expected triplets (X Y POINT3D_ID), got {len(pts)} numbers")
        xs = _numbers(path, pln, "POINTS2D", pts, np.float64).reshape(-1, 3)
        ids = _numbers(path, pln, "POINTS2D (POINT3D_ID)", pts[2::3], np.int64)
        out[iid] = ColmapImage(iid, q, t, cid, name, xs[:, :2], ids)
    return out


@_reader("a COLMAP points3D.txt", _check_points)
def read_points3D_text(path: str | os.PathLike) -> dict[int, ColmapPoint3D]:
    path = Path(path)
    out = {}
    for ln, line in _data_lines(path):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        el = s.split()
        if len(el) < 8 or (len(el) - 8) % 2:
            raise ValueError(
                f"{path}:{ln}: expected 'POINT3D_ID X Y Z R G B ERROR' and (IMAGE_ID POINT2D_IDX) pairs, got {len(el)} fields"
            )
        pid = _parse(path, ln, "POINT3D_ID", int, el[0])
        xyz = _numbers(path, ln, "XYZ", el[1:4], np.float64)
        rgb = _numbers(path, ln, "RGB", el[4:7], np.int64)
        if (rgb < 0).any() or (rgb > 255).any():
            raise ValueError(f"{path}:{ln}: point {pid} field RGB: values must be 0..255, got {rgb.tolist()}")
        err = _parse(path, ln, "ERROR", float, el[7])
        track = _numbers(path, ln, "TRACK", el[8:], np.int64).reshape(-1, 2)
        out[pid] = ColmapPoint3D._trusted(pid, xyz, rgb.astype(np.uint8), err, track[:, 0].copy(), track[:, 1].copy())
    return out


# ---------------------------------------------------------------------------------------- model read
_NAMES = ("cameras", "images", "points3D")


def find_colmap_model(path: str | os.PathLike) -> tuple[Path, str]:
    """The folder holding the model and its extension (``".bin"`` preferred, else ``".txt"``).

    Looks in ``path``, ``path/sparse/0`` and ``path/sparse``.
    """
    p = Path(path)
    for cand in (p, p / "sparse" / "0", p / "sparse"):
        for ext in (".bin", ".txt"):
            if (cand / f"cameras{ext}").is_file() and (cand / f"images{ext}").is_file():
                return cand, ext
    raise ValueError(
        f"{p}: no COLMAP model found (looked for cameras.bin/images.bin or cameras.txt/images.txt in "
        f"{p}, {p / 'sparse' / '0'} and {p / 'sparse'})"
    )


def read_colmap(path: str | os.PathLike, ext: str | None = None) -> ColmapModel:
    """Read a COLMAP sparse model, text or binary (auto-detected; binary first if both exist).

    Args:
        path: the model folder (holding ``cameras``/``images``/``points3D``) or a parent with
            ``sparse/0``. A missing ``points3D`` file gives an empty point set.
        ext: ``".bin"`` or ``".txt"`` to force one format.
    """
    if ext is None:
        folder, ext = find_colmap_model(path)
    else:
        if ext not in (".bin", ".txt"):
            raise ValueError(f"read_colmap: ext must be '.bin' or '.txt', got {ext!r}")
        folder = Path(path)
        for name in _NAMES[:2]:
            if not (folder / f"{name}{ext}").is_file():
                raise ValueError(f"{folder}: missing {name}{ext}")
    readers = (
        (read_cameras_binary, read_images_binary, read_points3D_binary)
        if ext == ".bin"
        else (read_cameras_text, read_images_text, read_points3D_text)
    )
    cams = readers[0](folder / f"cameras{ext}")
    imgs = readers[1](folder / f"images{ext}")
    pts_path = folder / f"points3D{ext}"
    pts = readers[2](pts_path) if pts_path.is_file() else {}
    for im in imgs.values():
        if im.camera_id not in cams:
            raise InputError(
                folder / f"images{ext}", f"image {im.id} ({im.name}) field camera_id={im.camera_id}",
                f"a camera id of {folder / f'cameras{ext}'}", "an id not in it",
            )
    return ColmapModel(cams, imgs, pts, folder)


# ---------------------------------------------------------------------------------------- write
def _fmt(x: float) -> str:
    return repr(float(x))


def _cameras_text(cameras: dict[int, ColmapCamera]) -> str:
    out = [
        "# Camera list with one line of data per camera:",
        "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]",
        f"# Number of cameras: {len(cameras)}",
    ]
    for c in cameras.values():
        out.append(" ".join([str(c.id), c.model, str(c.width), str(c.height), *map(_fmt, c.params.tolist())]))
    return "\n".join(out) + "\n"


def _images_text(images: dict[int, ColmapImage]) -> str:
    mean_obs = sum(im.xys.shape[0] for im in images.values()) / max(len(images), 1)
    out = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        f"# Number of images: {len(images)}, mean observations per image: {mean_obs}",
    ]
    for im in images.values():
        if any(ch.isspace() for ch in im.name):
            raise ValueError(f"write_colmap: image {im.id} name {im.name!r} contains whitespace (the text format forbids it)")
        out.append(
            " ".join(
                [str(im.id), *map(_fmt, im.qvec.tolist()), *map(_fmt, im.tvec.tolist()), str(im.camera_id), im.name]
            )
        )
        out.append(
            " ".join(
                f"{_fmt(x)} {_fmt(y)} {int(pid)}" for (x, y), pid in zip(im.xys.tolist(), im.point3D_ids.tolist())
            )
        )
    return "\n".join(out) + "\n"


def _points_text(points: dict[int, ColmapPoint3D]) -> str:
    mean_track = sum(p.image_ids.size for p in points.values()) / max(len(points), 1)
    out = [
        "# 3D point list with one line of data per point:",
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)",
        f"# Number of points: {len(points)}, mean track length: {mean_track}",
    ]
    for p in points.values():
        track = [f"{a} {b}" for a, b in zip(p.image_ids.tolist(), p.point2D_idxs.tolist())]
        out.append(
            " ".join([str(p.id), *map(_fmt, p.xyz.tolist()), *map(str, p.rgb.tolist()), _fmt(p.error), *track])
        )
    return "\n".join(out) + "\n"


def _cameras_bin(cameras: dict[int, ColmapCamera]) -> bytes:
    parts = [struct.pack("<Q", len(cameras))]
    for c in cameras.values():
        parts.append(struct.pack("<iiQQ", c.id, c.model_id, c.width, c.height))
        parts.append(np.asarray(c.params.tolist(), dtype="<f8").tobytes())
    return b"".join(parts)


def _images_bin(images: dict[int, ColmapImage]) -> bytes:
    parts = [struct.pack("<Q", len(images))]
    for im in images.values():
        parts.append(struct.pack("<idddddddi", im.id, *im.qvec.tolist(), *im.tvec.tolist(), im.camera_id))
        parts.append(im.name.encode("utf-8") + b"\x00")
        m = im.xys.shape[0]
        parts.append(struct.pack("<Q", m))
        rec = np.empty(m, dtype=_P2D)
        rec["x"], rec["y"], rec["id"] = im.xys[:, 0], im.xys[:, 1], im.point3D_ids
        parts.append(rec.tobytes())
    return b"".join(parts)


def _points_bin(points: dict[int, ColmapPoint3D]) -> bytes:
    parts = [struct.pack("<Q", len(points))]
    for p in points.values():
        parts.append(struct.pack("<QdddBBBd", p.id, *p.xyz.tolist(), *p.rgb.tolist(), float(p.error)))
        t = p.image_ids.size
        parts.append(struct.pack("<Q", t))
        rec = np.empty(t, dtype=_TRACK)
        rec["image_id"], rec["idx"] = p.image_ids, p.point2D_idxs
        parts.append(rec.tobytes())
    return b"".join(parts)


def write_colmap(model: ColmapModel, path: str | os.PathLike, binary: bool = True) -> Path:
    """Write ``cameras``, ``images`` and ``points3D`` (``.bin`` or ``.txt``) into folder ``path``.

    Each file is written atomically. Returns the folder.
    """
    folder = Path(path)
    if binary:
        write_bytes_atomic(folder / "cameras.bin", _cameras_bin(model.cameras))
        write_bytes_atomic(folder / "images.bin", _images_bin(model.images))
        write_bytes_atomic(folder / "points3D.bin", _points_bin(model.points3D))
    else:
        write_text_atomic(folder / "cameras.txt", _cameras_text(model.cameras))
        write_text_atomic(folder / "images.txt", _images_text(model.images))
        write_text_atomic(folder / "points3D.txt", _points_text(model.points3D))
    return folder
