"""``transforms.json`` camera files (nerfstudio, instant-ngp, Blender/NeRF-synthetic, DL3DV).

Format, as read by nerfstudio's ``nerfstudio/data/dataparsers/nerfstudio_dataparser.py`` and written
by its ``process_data/colmap_utils.py`` (github.com/nerfstudio-project/nerfstudio, Apache-2.0),
instant-ngp's ``scripts/colmap2nerf.py`` (github.com/NVlabs/instant-ngp, NVIDIA licence) and the
NeRF-synthetic scenes (Mildenhall et al., arXiv:2003.08934):

- top level: intrinsics ``fl_x fl_y cx cy w h`` (pixels; the image spans ``[0, w]``, as in COLMAP),
  or ``camera_angle_x`` (and optionally ``camera_angle_y``) with the principal point at the centre;
  distortion ``k1 k2 k3 k4 p1 p2`` and ``camera_model``; any other key (``applied_transform``,
  ``ply_file_path``, ``aabb_scale``...) is kept in :attr:`TransformsJson.extra`.
- ``frames``: one dict per image with ``file_path`` (relative to the json's folder; NeRF-synthetic
  omits the ``.png``) and ``transform_matrix`` (4x4 cam-to-world, **OpenGL** camera axes). A frame
  may override any intrinsic key. Other frame keys (``mask_path``, ``depth_file_path``...) are kept
  in :attr:`TransformsJson.frame_extra`.

We convert to OpenCV cam-to-world (:func:`vision3d.geometry.conventions.opengl_to_opencv`); the
world frame is left as it is in the file (nerfstudio's ``applied_transform`` is reported in
``extra``, not undone).

Distortion is kept in COLMAP's parameter order for the model, see :data:`DISTORTION_KEYS`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, check_finite, check_positive, check_size, guard, inside, short
from ..utils.io import write_text_atomic
from .cameras import Cameras
from .conventions import opencv_to_opengl, opengl_to_opencv

# camera_model -> the distortion keys, in the order of the [N, k] distortion tensor (COLMAP's order)
DISTORTION_KEYS: dict[str, tuple[str, ...]] = {
    "PINHOLE": (),
    "SIMPLE_PINHOLE": (),
    "EQUIRECTANGULAR": (),
    "SIMPLE_RADIAL": ("k1",),
    "RADIAL": ("k1", "k2"),
    "OPENCV": ("k1", "k2", "p1", "p2"),
    "FULL_OPENCV": ("k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
    "OPENCV_FISHEYE": ("k1", "k2", "k3", "k4"),
}
_ALL_DIST = ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y", "camera_model")
_FRAME_KEYS = ("file_path", "transform_matrix")


@dataclass
class TransformsJson:
    K: Tensor  # [N, 3, 3] intrinsics in pixels, one per frame
    cam_to_world: Tensor  # [N, 4, 4] OpenCV cam_to_world
    sizes: list[tuple[int, int]]  # (w, h) of each frame; nerfstudio allows them to differ
    image_paths: list[Path]  # one per camera, resolved against the json's folder
    distortion: Tensor | None  # [N, k] in the order DISTORTION_KEYS[camera_model], or None
    camera_model: str  # "OPENCV", "PINHOLE", "OPENCV_FISHEYE", ...
    extra: dict  # other top-level keys, kept as read
    frame_extra: list[dict] = field(default_factory=list)  # other keys of each frame (mask_path...)
    path: Path | None = None  # the file read, for messages

    @property
    def uniform_size(self) -> bool:
        return len(set(self.sizes)) <= 1

    @property
    def cameras(self) -> Cameras:
        """All frames as one batch [N]; needs one image size (else use :meth:`camera` or :meth:`by_size`)."""
        if not self.uniform_size:
            first = self.sizes[0]
            bad = next(i for i, s in enumerate(self.sizes) if s != first)
            raise InputError(
                self.path, f"frames[{bad}].w/h", f"one image size for all frames to make one Cameras batch (frames[0] is "
                f"{first[0]}x{first[1]}); read per frame with .camera(i) or grouped with .by_size()",
                f"{self.sizes[bad][0]}x{self.sizes[bad][1]}",
            )
        w, h = self.sizes[0]
        return Cameras(self.K, self.cam_to_world, w, h)

    def camera(self, i: int) -> Cameras:
        """Frame ``i`` as Cameras [1] at its own size."""
        w, h = self.sizes[i]
        return Cameras(self.K[i : i + 1], self.cam_to_world[i : i + 1], w, h)

    def by_size(self) -> dict[tuple[int, int], tuple[Cameras, list[int]]]:
        """``(w, h) -> (Cameras [n], frame indices)``, sizes in order of first appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.sizes):
            groups.setdefault(s, []).append(i)
        return {s: (Cameras(self.K[idx], self.cam_to_world[idx], *s), idx) for s, idx in groups.items()}

    @property
    def applied_transform(self) -> Tensor | None:  # [4, 4] float64, or None
        """nerfstudio's ``applied_transform``: file world = ``A @`` original (COLMAP) world."""
        a = self.extra.get("applied_transform")
        if a is None:
            return None
        A = torch.tensor(a, dtype=torch.float64)
        if A.shape == (3, 4):
            A = torch.cat([A, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
        if A.shape != (4, 4):
            raise ValueError(f"transforms.json: applied_transform must be 3x4 or 4x4, got {tuple(A.shape)}")
        return A

    def cameras_in_original_world(self) -> Cameras:
        """The cameras with nerfstudio's ``applied_transform`` undone (the COLMAP world frame)."""
        A = self.applied_transform
        if A is None:
            return self.cameras
        cams = self.cameras
        c2w = torch.linalg.inv(A).to(cams.cam_to_world) @ cams.cam_to_world
        return replace(cams, cam_to_world=c2w)


def _num(path: Path, where: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(path, f"{where}{key}", "a number", value)
    try:
        v = float(value)
    except OverflowError:
        raise InputError(path, f"{where}{key}", "a finite number", value) from None
    if not math.isfinite(v):
        raise InputError(path, f"{where}{key}", "a finite number", value)
    return v


def _image_size(path: Path, image: Path) -> tuple[int, int]:
    try:
        from PIL import Image

        with Image.open(image) as im:
            return im.size
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL's errors for broken files come in many types
        raise ValueError(
            f"{path}: no 'w'/'h' keys and the first image {image} cannot be opened to read its size ({e})"
        ) from e


def _resolve_image(root: Path, file_path: str, path: Path | None = None, where: str = "", data_root: Path | None = None) -> Path:
    """``file_path`` resolved against the json's folder ``root``; refused if it leaves ``data_root`` (default ``root``)."""
    if "\x00" in file_path or not file_path.strip():
        raise InputError(path or root, f"{where}file_path", "a relative image path", file_path)
    full = Path(file_path) if Path(file_path).is_absolute() else root.resolve() / file_path
    try:
        p = inside(data_root if data_root is not None else root, full, f"{where}file_path", path=path)
    except InputError as e:
        raise InputError(e.path, e.field, e.expected, file_path) from None
    if p.suffix == "" and not p.exists():
        for ext in (".png", ".jpg", ".jpeg", ".PNG", ".JPG"):
            if p.with_suffix(ext).exists():
                return p.with_suffix(ext)
    return p


def read_transforms_json(
    path: str | os.PathLike,
    downscale: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    root: str | os.PathLike | None = None,
) -> TransformsJson:
    """Read a ``transforms.json``.

    Args:
        path: the json file, or the folder holding ``transforms.json``.
        downscale: integer factor; K is divided by it and the size floored (nerfstudio's
            ``downscale_factor``), and images are looked up in ``images_<downscale>/`` beside the
            json (nerfstudio's and DL3DV's layout).
        dtype: dtype of the returned cameras and distortion.
        root: the dataset folder that every ``file_path`` must stay inside (default: the json's
            folder); a path leaving it (``../../etc/passwd``, ``/etc/passwd``, a link out) is
            refused. vision3d run folders keep the json in ``cameras/`` with ``../images/...``
            paths: their readers pass the run folder.

    Frames may differ in size (per-frame ``w``/``h``, as nerfstudio allows and as vision3d writes for
    photo collections): :attr:`TransformsJson.cameras` is then refused with the frame named, and
    :meth:`~TransformsJson.camera` / :meth:`~TransformsJson.by_size` give the cameras at their sizes.

    Raises:
        ValueError naming the file and the field on missing or malformed keys, unknown camera
        models, or frames using different camera models.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "transforms.json"
    with guard(path, "a transforms.json (nerfstudio / NeRF-synthetic layout)"):
        return _read_transforms_json(path, downscale, dtype, Path(root) if root is not None else path.parent)


def _read_transforms_json(path: Path, downscale: int, dtype: torch.dtype, data_root: Path) -> TransformsJson:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise InputError(path, "file", "a readable file", e.strerror) from e
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, "file", "valid JSON", str(e)) from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(meta).__name__}")
    if "frames" not in meta:
        raise ValueError(f"{path}: missing key 'frames' (the list of images with file_path and transform_matrix)")
    frames = meta["frames"]
    if not isinstance(frames, list) or not frames:
        raise ValueError(f"{path}: 'frames' must be a non-empty list")
    if int(downscale) < 1:
        raise ValueError(f"read_transforms_json: downscale must be a positive integer, got {downscale}")
    downscale = int(downscale)
    root = path.parent

    c2ws, Ks, dists, paths, fextra = [], [], [], [], []
    sizes: list[tuple[int, int]] = []
    first_size: tuple[int, int] | None = None
    models: set[str] = set()
    for i, fr in enumerate(frames):
        where = f"frames[{i}]."
        if not isinstance(fr, dict):
            raise ValueError(f"{path}: frames[{i}] must be an object")
        for key in _FRAME_KEYS:
            if key not in fr:
                raise ValueError(f"{path}: {where}{key} is missing")
        if not isinstance(fr["file_path"], str):
            raise ValueError(f"{path}: {where}file_path must be a string, got {fr['file_path']!r}")
        m = torch.tensor(fr["transform_matrix"], dtype=torch.float64) if _is_matrix(fr["transform_matrix"]) else None
        if m is None or m.shape not in ((4, 4), (3, 4)):
            raise ValueError(f"{path}: {where}transform_matrix must be a 4x4 (or 3x4) list of numbers")
        if m.shape == (3, 4):
            m = torch.cat([m, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
        check_finite(path, f"{where}transform_matrix", m, "finite values")
        _check_rotation(path, f"{where}transform_matrix", m[:3, :3])
        c2ws.append(m)

        def get(key, _fr=fr):
            return _fr.get(key, meta.get(key))

        cam_model = str(get("camera_model") or "PINHOLE")
        if cam_model not in DISTORTION_KEYS:
            raise ValueError(
                f"{path}: camera_model '{cam_model}' is not supported; expected one of {sorted(DISTORTION_KEYS)}"
            )
        image = _resolve_image(root, fr["file_path"], path, where, data_root)
        w, h = get("w"), get("h")
        if w is None or h is None:  # NeRF-synthetic: no size keys; all frames share the first image's size
            if first_size is None:
                first_size = _image_size(path, image)
            w, h = first_size
        w, h = check_size(path, f"{where if 'w' in fr else ''}w/h", _num(path, where if "w" in fr else "", "w", w), _num(path, where if "h" in fr else "", "h", h))
        fx, fy = get("fl_x"), get("fl_y")
        if fx is None:
            ax = get("camera_angle_x")
            if ax is None:
                raise ValueError(
                    f"{path}: frames[{i}] has no focal length: neither 'fl_x' nor 'camera_angle_x' is set "
                    "in the frame or at the top level"
                )
            fx = 0.5 * w / math.tan(0.5 * _angle(path, "camera_angle_x", ax))
        if fy is None:
            ay = get("camera_angle_y")
            fy = fx if ay is None else 0.5 * h / math.tan(0.5 * _angle(path, "camera_angle_y", ay))
        cx, cy = get("cx"), get("cy")
        cx = w / 2.0 if cx is None else cx
        cy = h / 2.0 if cy is None else cy
        vals = {}
        for key, val in (("fl_x", fx), ("fl_y", fy), ("cx", cx), ("cy", cy)):
            vals[key] = _num(path, where if key in fr else "", key, val)
        for key in ("fl_x", "fl_y"):
            check_positive(path, f"{where if key in fr else ''}{key}", vals[key], "a finite focal length > 0 (pixels)")
        Ks.append([[vals["fl_x"], 0.0, vals["cx"]], [0.0, vals["fl_y"], vals["cy"]], [0.0, 0.0, 1.0]])
        dist_all = {}
        for key in _ALL_DIST:
            v = get(key)
            dist_all[key] = 0.0 if v is None else _num(path, where if key in fr else "", key, v)
        if cam_model == "OPENCV" and (dist_all["k3"] != 0.0 or dist_all["k4"] != 0.0):
            if dist_all["k4"] != 0.0:
                raise ValueError(
                    f"{path}: {where}k4={dist_all['k4']} with camera_model OPENCV (nerfstudio's 8th-order "
                    "radial polynomial) has no COLMAP model; use OPENCV_FISHEYE or FULL_OPENCV"
                )
            cam_model = "FULL_OPENCV"  # k3 is FULL_OPENCV's r^6 numerator term
        unused = [k for k in _ALL_DIST if dist_all[k] != 0.0 and k not in DISTORTION_KEYS[cam_model]]
        if unused:
            raise ValueError(
                f"{path}: {where}distortion keys {unused} are not parameters of camera_model '{cam_model}' "
                f"(it takes {list(DISTORTION_KEYS[cam_model])})"
            )
        models.add(cam_model)
        dists.append([dist_all[k] for k in DISTORTION_KEYS[cam_model]])
        sizes.append((w, h))
        paths.append(image if downscale == 1 else (root / f"images_{downscale}" / image.name).resolve())
        fextra.append({k: v for k, v in fr.items() if k not in _FRAME_KEYS and k not in _INTRINSIC_KEYS and k not in _ALL_DIST})

    if len(models) > 1:
        raise ValueError(f"{path}: frames use different camera models {sorted(models)} (field 'camera_model')")
    cam_model = models.pop()
    c2w = opengl_to_opencv(torch.stack(c2ws)).to(dtype)
    K = torch.tensor(Ks, dtype=torch.float64).to(dtype)
    if downscale > 1:
        K = K * K.new_tensor([1.0 / downscale, 1.0 / downscale, 1.0])[:, None]
        sizes = [(w // downscale, h // downscale) for w, h in sizes]
        small = next((i for i, (w, h) in enumerate(sizes) if w < 1 or h < 1), None)
        if small is not None:
            raise InputError(path, f"frames[{small}].w/h", f"an image of at least {downscale}x{downscale} pixels for downscale {downscale}",
                             f"{sizes[small][0] * downscale}x{sizes[small][1] * downscale}")
    # values finite in float64 can overflow the requested dtype (a 1e40 translation in float32)
    check_finite(path, "transform_matrix", c2w, f"values representable in {dtype}")
    check_finite(path, "fl_x/fl_y/cx/cy", K, f"values representable in {dtype}")
    distortion = torch.tensor(dists, dtype=dtype) if DISTORTION_KEYS[cam_model] else None
    extra = {
        k: v for k, v in meta.items() if k != "frames" and k not in _INTRINSIC_KEYS and k not in _ALL_DIST
    }
    return TransformsJson(K, c2w, sizes, paths, distortion, cam_model, extra, fextra, path)


def _angle(path: Path, key: str, value) -> float:
    """A field of view in radians, strictly between 0 and pi (``camera_angle_x: 0`` would divide by zero)."""
    a = _num(path, "", key, value)
    if not 0.0 < a < math.pi:
        raise InputError(path, key, "a field of view in radians, 0 < angle < pi", value)
    return a


def _check_rotation(path: Path, field: str, R: Tensor) -> None:  # [3, 3] float64
    """Refuse a rotation block that is not a rotation (all zero, scaled, sheared): it would not silently be the identity."""
    err = float((R.T @ R - torch.eye(3, dtype=R.dtype)).abs().max())
    det = float(torch.linalg.det(R))
    if err > 1e-2 or det < 0:
        raise InputError(path, field, "a rotation in the upper-left 3x3 (orthonormal, determinant +1)", f"determinant {det:.4g}, |R^T R - I| = {err:.3g}")


def _is_matrix(x) -> bool:
    return (
        isinstance(x, list)
        and all(isinstance(r, list) for r in x)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for r in x for v in r)
        and len({len(r) for r in x}) == 1
    )


def _json_float(v: float, single: bool) -> float:
    # float32 values are written as the shortest decimal that reads back to the same float32
    return float(str(np.float32(v))) if single else float(v)


def write_transforms_json(
    path: str | os.PathLike,
    cameras: Cameras | Sequence[Cameras],  # batch [N] (any shape, flattened), or one Cameras per size group; OpenCV
    image_paths: list[str],  # one per camera, written as given (relative to the json's folder)
    distortion: Tensor | None = None,  # [N, k] or [k] in the order DISTORTION_KEYS[camera_model]
    camera_model: str = "PINHOLE",
    extra: dict | None = None,
    *,
    frame_extra: list[dict] | None = None,
) -> None:
    """Write a nerfstudio ``transforms.json`` atomically.

    Intrinsics, image sizes and distortion equal across all cameras go to the top level, otherwise
    into each frame (``cameras`` may be a list of Cameras of different sizes, concatenated in order).
    Poses are written in OpenGL camera axes, as nerfstudio expects.
    """
    path = Path(path)
    groups = [cameras] if isinstance(cameras, Cameras) else list(cameras)
    if not groups or not all(isinstance(c, Cameras) for c in groups):
        raise ValueError(f"write_transforms_json({path}): cameras must be a Cameras or a non-empty list of Cameras")
    groups = [c.flatten() if len(c.batch_shape) != 1 else c for c in groups]
    sizes = [(c.width, c.height) for c in groups for _ in range(c.batch_shape[0])]
    cams = groups[0] if len(groups) == 1 else Cameras(
        torch.cat([c.K.detach().to("cpu", torch.float64) for c in groups]),
        torch.cat([c.cam_to_world.detach().to("cpu", torch.float64) for c in groups]), groups[0].width, groups[0].height)
    cameras = groups[0]  # dtype of the values written
    n = cams.batch_shape[0]
    if len(image_paths) != n:
        raise ValueError(f"write_transforms_json({path}): {len(image_paths)} image_paths for {n} cameras")
    if camera_model not in DISTORTION_KEYS:
        raise ValueError(
            f"write_transforms_json({path}): camera_model '{camera_model}' is not supported; "
            f"expected one of {sorted(DISTORTION_KEYS)}"
        )
    keys = DISTORTION_KEYS[camera_model]
    single = cameras.dtype != torch.float64
    single_dist = single
    if distortion is not None:
        distortion = torch.as_tensor(distortion)
        single_dist = distortion.dtype != torch.float64
        distortion = distortion.detach().to("cpu", torch.float64)
        if distortion.ndim == 1:
            distortion = distortion.expand(n, -1)
        if distortion.shape != (n, len(keys)):
            raise ValueError(
                f"write_transforms_json({path}): distortion must be [{n}, {len(keys)}] ({list(keys)} for "
                f"{camera_model}), got {tuple(distortion.shape)}"
            )
    elif keys:
        raise ValueError(f"write_transforms_json({path}): camera_model {camera_model} needs distortion {list(keys)}")
    if frame_extra is not None and len(frame_extra) != n:
        raise ValueError(f"write_transforms_json({path}): {len(frame_extra)} frame_extra dicts for {n} cameras")

    K = cams.K.detach().to("cpu", torch.float64)
    c2w = opencv_to_opengl(cams.cam_to_world.detach().to("cpu", torch.float64))
    per_cam = {
        "fl_x": K[:, 0, 0],
        "fl_y": K[:, 1, 1],
        "cx": K[:, 0, 2],
        "cy": K[:, 1, 2],
    }
    if distortion is not None:
        for j, key in enumerate(keys):
            per_cam[key] = distortion[:, j]
    is_single = {k: (single_dist if k in keys else single) for k in per_cam}
    shared = {k: v for k, v in per_cam.items() if bool((v == v[0]).all())}
    varying = {k: v for k, v in per_cam.items() if k not in shared}

    same_size = len(set(sizes)) == 1
    out: dict = {"camera_model": camera_model}
    if same_size:
        out.update(w=sizes[0][0], h=sizes[0][1])
    for k, v in shared.items():
        out[k] = _json_float(float(v[0]), is_single[k])
    for k, v in (extra or {}).items():
        if k in out or k == "frames":
            raise ValueError(f"write_transforms_json({path}): extra key '{k}' clashes with a key the writer sets")
        out[k] = v
    frames = []
    for i in range(n):
        mat = [[_json_float(x, single) for x in row] for row in c2w[i].tolist()]
        fr = {"file_path": str(image_paths[i]), "transform_matrix": mat}
        if not same_size:
            fr["w"], fr["h"] = sizes[i]
        for k, v in varying.items():
            fr[k] = _json_float(float(v[i]), is_single[k])
        if frame_extra is not None:
            for k, v in frame_extra[i].items():
                if k in fr:
                    raise ValueError(f"write_transforms_json({path}): frame_extra[{i}] key '{k}' clashes")
                fr[k] = v
        frames.append(fr)
    out["frames"] = frames
    write_text_atomic(path, json.dumps(out, indent=2) + "\n")
