"""Your own images: a folder of photos or a video, optionally with known cameras.

- **Folders**: JPEG, PNG, BMP, TIFF and WebP files (HEIC is not read), in natural name order
  (``img2`` before ``img10``); EXIF orientation is applied (``PIL.ImageOps.exif_transpose``) so
  portrait photos come out upright; 16-bit and palette images are converted to 8-bit RGB.
- **Videos**: ``num_frames`` frames spread evenly over the video (first and last included), read
  with OpenCV. With ``sharpness_window=k > 1`` the video is cut into ``num_frames`` equal segments,
  ``k`` evenly spread candidates are read in each and the sharpest one (largest variance of the
  Laplacian, Pech-Pacheco et al., ICPR 2000) is kept, which drops motion-blurred frames without
  changing the even coverage.
- **Known cameras** (optional): a COLMAP sparse model (:func:`vision3d.geometry.colmap.read_colmap`)
  or a nerfstudio/instant-ngp ``transforms.json``
  (:func:`vision3d.geometry.transforms_json.read_transforms_json`), matched to the files by file
  name (case-insensitive, directories ignored). Images without a camera raise (or are dropped with
  ``drop_unposed=True``). Camera sizes that differ from the image by a uniform factor (a model made
  on downscaled images) are rescaled; a 90-degree mismatch (a model made from the un-rotated
  pixels) raises and suggests ``exif_transpose=False``.

**Mixed sizes policy.** The reference size is the most common ``W x H`` (ties: the larger area).
Every other image is resized to cover it and centre-cropped (pixelSplat's policy, K updated
through :class:`~vision3d.geometry.Cameras`) **if** its aspect ratio is within ``max_aspect_diff``
(relative, default 1%) of the reference; otherwise ``size_policy="error"`` (default) raises a
ValueError listing the files, and ``size_policy="crop"`` crops them too (losing the borders).

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from vision3d.geometry import Cameras

from .preprocess import resize_and_center_crop

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "list_images",
    "read_image",
    "load_image_folder",
    "load_images",
    "load_video",
    "laplacian_variance",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """Images ready for a reconstructor."""

    images: Tensor  # [V, 3, H, W] float32 in [0, 1]
    names: list[str]  # [V] file names (videos: "frame_000123")
    cameras: Cameras | None  # batch [V] sized W x H (K in pixels, OpenCV), or None when unknown
    source: Path  # folder, video or file list origin
    frame_indices: Tensor | None = None  # [V] int64, video frame numbers

    def __len__(self) -> int:
        return self.images.shape[0]


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, in natural order."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: image folder not found")
    files = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return sorted(files, key=lambda p: _natural_key(p.name))


def read_image(path: str | os.PathLike, exif_transpose: bool = True) -> Tensor:  # [3, H, W] uint8
    """One image file as RGB uint8, upright per its EXIF orientation (size limits: :func:`decode_image_file`)."""
    return decode_image_file(path, exif_transpose)


def decode_image_file(path: str | os.PathLike, exif_transpose: bool = True, max_pixels: int | None = None) -> Tensor:
    """Decode one image file to RGB ``[3, H, W]`` uint8, refusing oversized or broken files up front.

    The size in the header is checked against ``max_pixels`` (default
    :data:`vision3d.errors.MAX_IMAGE_PIXELS`, 64 Mpx) before any pixel is decoded, so a 12000² PNG
    or a decompression bomb ends in :class:`~vision3d.errors.InputError` naming the file, not in a
    3 GB allocation. Every decoding failure is an ``InputError`` too.
    """
    import warnings

    from PIL import Image, ImageOps

    from vision3d.errors import MAX_IMAGE_PIXELS, InputError, check_size, short

    p = Path(path)
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                check_size(p, "image size", *im.size, max_pixels=limit)
                im.load()
                if exif_transpose:
                    im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float64)
                    scale = 255.0 / 65535.0 if arr.size and arr.max() > 255 else 1.0
                    im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8))
                arr = np.array(im.convert("RGB"))
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(p, "image size", f"at most {limit} pixels", short(str(e), 200)) from e
    except FileNotFoundError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL reports broken files with many types (OSError, SyntaxError, struct.error ...)
        raise InputError(p, "file", "a readable image (PNG, JPEG, ...)", f"{type(e).__name__}: {short(str(e), 200)}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _known_cameras(source: str | os.PathLike, where: Path) -> dict[str, Cameras]:
    """File name (lower case) -> Cameras [1] from a COLMAP model or a transforms.json."""
    src = Path(source)
    out: dict[str, Cameras] = {}
    if src.suffix.lower() == ".json" or (src.is_dir() and (src / "transforms.json").is_file()):
        from vision3d.geometry.transforms_json import read_transforms_json

        # only the names are used: the paths may point anywhere under the folders the user named
        json_dir = (src if src.is_dir() else src.parent).resolve()
        tj = read_transforms_json(src, root=os.path.commonpath([json_dir, Path(where).resolve()]))
        for i, p in enumerate(tj.image_paths):
            out[Path(p).name.lower()] = tj.cameras[i : i + 1]
        return out
    from vision3d.geometry.colmap import read_colmap

    model = read_colmap(src)
    for (w, h), (cams, names, _dist) in model.to_cameras(group_by_size=True).items():
        for i, n in enumerate(names):
            out[Path(n).name.lower()] = cams[i : i + 1]
    if not out:
        raise ValueError(f"{src}: the camera model holds no images (needed to match {where})")
    return out


def _fit_camera(cam: Cameras, w: int, h: int, name: str) -> Cameras:
    if (cam.width, cam.height) == (w, h):
        return cam
    if abs(cam.width / cam.height - w / h) <= 1e-3 * (w / h):
        return cam.resize(w, h)
    if abs(cam.width / cam.height - h / w) <= 1e-3 * (h / w):
        raise ValueError(
            f"{name}: the camera is {cam.width}x{cam.height} but the upright image is {w}x{h}: the camera model was "
            "probably made from the pixels before EXIF rotation; pass exif_transpose=False"
        )
    raise ValueError(f"{name}: the camera is {cam.width}x{cam.height} but the image is {w}x{h} (different aspect ratio)")


def load_images(
    paths: Sequence[str | os.PathLike],
    *,
    cameras: str | os.PathLike | None = None,
    image_shape: tuple[int, int] | None = None,
    size_policy: Literal["error", "crop"] = "error",
    max_aspect_diff: float = 0.01,
    exif_transpose: bool = True,
    drop_unposed: bool = False,
    resample: str = "area",
    source: str | os.PathLike | None = None,
) -> ImageSet:
    """Images from a list of files (see the module docstring for the size policy and cameras)."""
    paths = [Path(p) for p in paths]
    where = Path(source) if source is not None else (paths[0].parent if paths else Path("."))
    if len(paths) < 2:
        raise ValueError(f"{where}: found {len(paths)} image(s); reconstruction needs at least two")
    known = _known_cameras(cameras, where) if cameras is not None else None
    if known is not None:
        unposed = [p.name for p in paths if p.name.lower() not in known]
        if unposed and not drop_unposed:
            raise ValueError(
                f"{where}: {len(unposed)} image(s) have no camera in {cameras}, e.g. {unposed[:3]} "
                "(pass drop_unposed=True to leave them out)"
            )
        paths = [p for p in paths if p.name.lower() in known]
        if len(paths) < 2:
            raise ValueError(f"{where}: only {len(paths)} image(s) have cameras in {cameras}; need at least two")
    imgs = [read_image(p, exif_transpose) for p in paths]
    sizes = [(int(im.shape[2]), int(im.shape[1])) for im in imgs]
    counts = Counter(sizes)
    ref_w, ref_h = max(counts, key=lambda s: (counts[s], s[0] * s[1]))
    ref_aspect = ref_w / ref_h
    off = [(p.name, s) for p, s in zip(paths, sizes) if abs((s[0] / s[1]) / ref_aspect - 1) > max_aspect_diff]
    if off and size_policy == "error":
        desc = ", ".join(f"{n} ({w}x{h})" for n, (w, h) in off[:5])
        raise ValueError(
            f"{where}: image aspect ratios differ by more than {max_aspect_diff:.0%} from the most common size "
            f"{ref_w}x{ref_h}: {desc}{' ...' if len(off) > 5 else ''}; pass size_policy='crop' to centre-crop them"
        )
    if size_policy not in ("error", "crop"):
        raise ValueError(f"load_images: size_policy must be 'error' or 'crop', got {size_policy!r}")
    out_imgs, out_cams = [], []
    for p, im, (w, h) in zip(paths, imgs, sizes):
        cam = _fit_camera(known[p.name.lower()], w, h, str(p)) if known is not None else None
        x, cam = resize_and_center_crop(im[None], cam, (ref_h, ref_w), resample)
        if image_shape is not None:
            x, cam = resize_and_center_crop((x * 255 + 0.5).to(torch.uint8), cam, image_shape, resample)
        out_imgs.append(x[0])
        out_cams.append(cam)
    cams = Cameras.cat(out_cams, 0) if known is not None else None
    return ImageSet(torch.stack(out_imgs), [p.name for p in paths], cams, where)


def load_image_folder(
    folder: str | os.PathLike,
    *,
    max_images: int | None = None,
    cameras: str | os.PathLike | None = None,
    **kwargs,
) -> ImageSet:
    """Every image of ``folder`` (or ``max_images`` spread evenly over the sorted list)."""
    paths = list_images(folder)
    if len(paths) < 2:
        raise ValueError(
            f"{folder}: found {len(paths)} image(s) with extensions {', '.join(IMAGE_EXTENSIONS)}; "
            "reconstruction needs at least two"
        )
    if max_images is not None and len(paths) > max_images:
        keep = np.unique(np.round(np.linspace(0, len(paths) - 1, max_images)).astype(int))
        paths = [paths[i] for i in keep]
    return load_images(paths, cameras=cameras, source=folder, **kwargs)


def laplacian_variance(gray: np.ndarray) -> float:  # [H, W] uint8
    """Sharpness: variance of the 3x3 Laplacian of a grey image (higher is sharper)."""
    import cv2

    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def load_video(
    path: str | os.PathLike,
    num_frames: int = 16,
    *,
    sharpness_window: int = 1,
    image_shape: tuple[int, int] | None = None,
    resample: str = "area",
    max_side_for_sharpness: int = 512,
) -> ImageSet:
    """``num_frames`` evenly spread frames of a video (OpenCV), optionally the sharpest per window."""
    import cv2

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: video not found")
    if num_frames < 2:
        raise ValueError(f"{p}: num_frames must be at least 2, got {num_frames}")
    cap = cv2.VideoCapture(str(p))
    if not cap.isOpened():
        raise ValueError(f"{p}: OpenCV cannot open the video")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:  # some containers do not report a count: read through once
            total = 0
            while cap.grab():
                total += 1
            cap.release()
            cap = cv2.VideoCapture(str(p))
        if total < 2:
            raise ValueError(f"{p}: the video has {total} frame(s); need at least two")
        k = max(1, int(sharpness_window))
        if k == 1:  # evenly spread, first and last frame included
            windows = [np.array([j]) for j in np.unique(np.round(np.linspace(0, total - 1, num_frames)).astype(int))]
        else:  # num_frames equal segments, k evenly spread candidates in each
            windows = []
            for seg in np.array_split(np.arange(total), min(num_frames, total)):
                windows.append(np.unique(seg[np.round(np.linspace(0, len(seg) - 1, k)).astype(int)]))
        cand = np.unique(np.concatenate(windows))
        wanted = set(cand.tolist())
        frames: dict[int, np.ndarray] = {}
        i = 0
        last = int(cand[-1])
        while i <= last:
            if not cap.grab():
                break
            if i in wanted:
                ok, bgr = cap.retrieve()
                if ok:
                    frames[i] = bgr
            i += 1
    finally:
        cap.release()
    chosen: list[int] = []
    for win in windows:
        avail = [int(j) for j in win if int(j) in frames]
        if not avail:
            continue
        if len(avail) == 1:
            chosen.append(avail[0])
            continue
        scores = []
        for j in avail:
            g = cv2.cvtColor(frames[j], cv2.COLOR_BGR2GRAY)
            s = max_side_for_sharpness / max(g.shape)
            if s < 1:
                g = cv2.resize(g, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
            scores.append(laplacian_variance(g))
        chosen.append(avail[int(np.argmax(scores))])
    if len(chosen) < 2:
        raise ValueError(f"{p}: decoded {len(chosen)} frame(s); need at least two (is the video corrupt?)")
    imgs = torch.stack([torch.from_numpy(np.ascontiguousarray(frames[j][..., ::-1])).permute(2, 0, 1) for j in chosen])
    x, _ = resize_and_center_crop(imgs, None, image_shape, resample)
    return ImageSet(x, [f"frame_{j:06d}" for j in chosen], None, p, torch.tensor(chosen, dtype=torch.int64))
