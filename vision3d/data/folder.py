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

**Mixed sizes policy** (``size_policy``). ``"keep"``: every photo keeps its own size and
intrinsics (as gsplat's COLMAP parser and nerfstudio do); ``images`` and ``cameras`` are then lists
with one ``[3, H_i, W_i]`` image and one batch-``[1]`` camera per photo. ``"crop"`` and ``"error"``
give one size: the reference aspect ratio is the **majority aspect** (photos grouped by aspect
ratio within ``max_aspect_diff``, relative, default 1%; the largest group wins, ties: the larger
area) and the reference size the most common ``W x H`` in that group. Photos of another size are
resized to cover it and centre-cropped (pixelSplat's policy, K updated through
:class:`~vision3d.geometry.Cameras`) when their aspect is in the group; the others raise a
ValueError listing them (``"error"``) or are cropped too, losing their borders (``"crop"``).

Unreadable files are all listed in one error; ``skip_unreadable=True`` leaves them out with a warning.

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
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
    "majority_size",
    "exif_camera",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class ImageSet:
    """Images ready for a reconstructor."""

    images: Tensor | list[Tensor]  # [V, 3, H, W] float32 in [0, 1]; size_policy "keep": V tensors [3, H_i, W_i]
    names: list[str]  # [V] file names (videos: "frame_000123")
    cameras: Cameras | list[Cameras] | None  # batch [V] sized W x H (K in pixels, OpenCV); "keep": V of batch [1]; None: unknown
    source: Path  # folder, video or file list origin
    frame_indices: Tensor | None = None  # [V] int64, video frame numbers

    skipped: list[str] = field(default_factory=list)  # unreadable files left out (skip_unreadable=True)

    def __len__(self) -> int:
        return len(self.names)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in ``folder``, in natural order."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: image folder not found")
    files = [p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]
    return sorted(files, key=lambda p: _natural_key(p.name))


def unread_files_hint(folder: str | os.PathLike) -> str:
    """Why a folder's files were not taken as images, for "found N image(s)" errors ("" when nothing to say).

    Names the other file types present (HEIC/HEIF/RAW photos are common: say how to convert them) and
    sub-folders that hold images (the user may have pointed at a dataset's parent folder)."""
    d = Path(folder)
    if not d.is_dir():
        return ""
    counts: dict[str, int] = {}
    with_images = []
    for p in sorted(d.iterdir(), key=lambda p: _natural_key(p.name)):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            try:
                if any(q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir()):
                    with_images.append(p.name)
            except OSError:
                continue
        elif p.suffix.lower() not in IMAGE_EXTENSIONS:
            counts[p.suffix.lower() or "(no extension)"] = counts.get(p.suffix.lower() or "(no extension)", 0) + 1
    parts = []
    if counts:
        listed = ", ".join(f"{n} {ext}" for ext, n in sorted(counts.items(), key=lambda kv: -kv[1])[:5])
        parts.append(f"not read: {listed} file(s)")
        if any(ext in counts for ext in (".heic", ".heif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2")):
            parts.append("HEIC/HEIF and camera RAW photos are not decoded: export them as JPEG or PNG first "
                         "(e.g. `heif-convert in.heic out.jpg`, or your photo app's export)")
    if with_images:
        parts.append(f"sub-folder(s) with images: {', '.join(with_images[:3])} (pass that folder instead)")
    return "; ".join(parts)


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


def exif_camera(path: str | os.PathLike) -> tuple | None:
    """``(width, height, make, model, focal_length)`` of a photo from its header (upright size; the EXIF fields
    None when absent), or None when it cannot be opened; photos with equal keys come from one camera at one zoom."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            exif = im.getexif()
            make, model = exif.get(0x010F), exif.get(0x0110)
            focal = exif.get_ifd(0x8769).get(0x920A)
            if exif.get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                w, h = h, w
    except (OSError, ValueError, SyntaxError):
        return None
    return (w, h, str(make or "").strip() or None, str(model or "").strip() or None,
            None if focal is None else float(focal))


def _known_cameras(source: str | os.PathLike, where: Path) -> dict[str, Cameras]:
    """File name (lower case) -> Cameras [1] from a COLMAP model or a transforms.json."""
    src = Path(source)
    out: dict[str, Cameras] = {}
    colmap_here = src.is_dir() and any((src / f).is_file() for f in ("cameras.txt", "cameras.bin"))
    if src.suffix.lower() == ".json" or (src.is_dir() and (src / "transforms.json").is_file() and not colmap_here):
        from vision3d.geometry.transforms_json import read_transforms_json

        # only the names are used: the paths may point anywhere under the folders the user named
        json_dir = (src if src.is_dir() else src.parent).resolve()
        tj = read_transforms_json(src, root=os.path.commonpath([json_dir, Path(where).resolve()]))
        for i, p in enumerate(tj.image_paths):
            out[Path(p).name.lower()] = tj.camera(i)
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
    size_policy: Literal["keep", "error", "crop"] = "error",
    max_aspect_diff: float = 0.01,
    exif_transpose: bool = True,
    drop_unposed: bool = False,
    skip_unreadable: bool = False,
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
    imgs, bad = [], []
    for p in paths:
        try:
            imgs.append(read_image(p, exif_transpose))
        except ValueError as e:
            bad.append((p, e))
            imgs.append(None)
    if bad and not skip_unreadable:
        lines = "\n".join(f"  {e}" for _, e in bad)
        raise ValueError(f"{where}: {len(bad)} of {len(paths)} image(s) cannot be read:\n{lines}\n"
                         "remove or fix them, or skip them (skip_unreadable=True; vision3d reconstruct: --skip-unreadable)")
    skipped = [p.name for p, _ in bad]
    if bad:
        log.warning("%s: skipping %d unreadable image(s): %s", where, len(bad), ", ".join(skipped))
        paths = [p for p, im in zip(paths, imgs) if im is not None]
        imgs = [im for im in imgs if im is not None]
        if len(paths) < 2:
            raise ValueError(f"{where}: only {len(paths)} readable image(s); reconstruction needs at least two")
    if size_policy not in ("keep", "error", "crop"):
        raise ValueError(f"load_images: size_policy must be 'keep', 'error' or 'crop', got {size_policy!r}")
    sizes = [(int(im.shape[2]), int(im.shape[1])) for im in imgs]
    if size_policy == "keep":
        out_imgs, out_cams = [], []
        for p, im, (w, h) in zip(paths, imgs, sizes):
            cam = _fit_camera(known[p.name.lower()], w, h, str(p)) if known is not None else None
            shape = None if image_shape is None else _fit_longest(h, w, max(image_shape))
            x, cam = resize_and_center_crop(im[None], cam, shape, resample)
            out_imgs.append(x[0])
            out_cams.append(cam)
        return ImageSet(out_imgs, [p.name for p in paths], out_cams if known is not None else None, where,
                        skipped=skipped)
    ref_w, ref_h = majority_size(sizes, max_aspect_diff)
    ref_aspect = ref_w / ref_h
    off = [(p.name, s) for p, s in zip(paths, sizes) if abs((s[0] / s[1]) / ref_aspect - 1) > max_aspect_diff]
    if off and size_policy == "error":
        desc = ", ".join(f"{n} ({w}x{h})" for n, (w, h) in off[:5])
        raise ValueError(
            f"{where}: image aspect ratios differ by more than {max_aspect_diff:.0%} from the majority size "
            f"{ref_w}x{ref_h}: {desc}{' ...' if len(off) > 5 else ''}; keep every size (size_policy='keep'; "
            "vision3d reconstruct: --size-policy keep) or centre-crop them (size_policy='crop'; --size-policy crop)"
        )
    out_imgs, out_cams = [], []
    for p, im, (w, h) in zip(paths, imgs, sizes):
        cam = _fit_camera(known[p.name.lower()], w, h, str(p)) if known is not None else None
        x, cam = resize_and_center_crop(im[None], cam, (ref_h, ref_w), resample)
        if image_shape is not None:
            x, cam = resize_and_center_crop((x * 255 + 0.5).to(torch.uint8), cam, image_shape, resample)
        out_imgs.append(x[0])
        out_cams.append(cam)
    cams = Cameras.cat(out_cams, 0) if known is not None else None
    return ImageSet(torch.stack(out_imgs), [p.name for p in paths], cams, where, skipped=skipped)


def _fit_longest(h: int, w: int, longest: int) -> tuple[int, int] | None:
    """``(H', W')`` with the longest side at most ``longest`` and the aspect kept (None: no change)."""
    if max(h, w) <= longest:
        return None
    f = longest / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def majority_size(sizes: Sequence[tuple[int, int]], max_aspect_diff: float = 0.01) -> tuple[int, int]:
    """The reference ``(W, H)`` of a set of image sizes: the most common size among the photos of the
    majority aspect ratio (aspects within ``max_aspect_diff`` of each other form a group; ties: larger area)."""
    if not sizes:
        raise ValueError("majority_size: no sizes given")
    groups: list[list[tuple[int, int]]] = []
    for s in sorted(sizes, key=lambda s: s[0] / s[1]):
        if groups and abs((s[0] / s[1]) / (groups[-1][0][0] / groups[-1][0][1]) - 1) <= max_aspect_diff:
            groups[-1].append(s)
        else:
            groups.append([s])
    best = max(groups, key=lambda g: (len(g), max(w * h for w, h in g)))
    counts = Counter(best)
    return max(counts, key=lambda s: (counts[s], s[0] * s[1]))


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
            "reconstruction needs at least two" + (f" ({hint})" if (hint := unread_files_hint(folder)) else "")
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
