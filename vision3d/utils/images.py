"""Image files: 8-bit RGB PNG, 16-bit depth PNG, float depth as NPY or EXR. Every write is atomic.

Tensors follow vision3d's image convention (channels first, float32 in [0, 1]); numpy arrays
``[H, W, 3]`` uint8/float are accepted too. PNG encoding goes through OpenCV (a core
dependency). OpenCV's wheels ship without an OpenEXR codec, so EXR depth is written and read here
directly: one ``FLOAT`` channel named ``Z``, scanline layout, no compression, as laid out in the
OpenEXR file-format specification ("The OpenEXR File Layout", openexr.com, BSD-3-Clause).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import atomic_path, write_bytes_atomic

__all__ = [
    "to_uint8_hwc",
    "save_png",
    "load_png",
    "save_depth_png16",
    "load_depth_png16",
    "save_depth_npy",
    "save_depth_exr",
    "load_depth_exr",
    "save_depth",
]


def to_uint8_hwc(image: Tensor | np.ndarray) -> np.ndarray:
    """``[3, H, W]`` / ``[H, W, 3]`` float in [0, 1] (or uint8) -> ``[H, W, 3]`` uint8 RGB."""
    if isinstance(image, Tensor):
        a = image.detach().float().cpu()
        if a.ndim == 3 and a.shape[0] in (1, 3):  # channels first, vision3d's convention
            a = a.permute(1, 2, 0)
        a = a.numpy()
    else:
        a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected [3, H, W] or [H, W, 3], got shape {tuple(a.shape)}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0)
    return np.ascontiguousarray((np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _encode_png(array: np.ndarray, path: Path) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode a PNG of shape {array.shape} and dtype {array.dtype}")
    return buf.tobytes()


def save_png(path: str | os.PathLike, image: Tensor | np.ndarray) -> Path:
    """Write an 8-bit RGB PNG atomically. ``image``: ``[3, H, W]`` or ``[H, W, 3]`` in [0, 1] or uint8."""
    path = Path(path)
    rgb = to_uint8_hwc(image)
    write_bytes_atomic(path, _encode_png(np.ascontiguousarray(rgb[..., ::-1]), path))
    return path


def load_png(path: str | os.PathLike) -> Tensor:  # [3, H, W] float32 in [0, 1]
    """Read an 8-bit PNG (or any image OpenCV reads) as RGB ``[3, H, W]`` float32 in [0, 1]."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    a = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if a is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    return torch.from_numpy(np.ascontiguousarray(a[..., ::-1])).permute(2, 0, 1).float() / 255.0


def _depth_hw(depth: Tensor | np.ndarray, path: Path) -> np.ndarray:
    d = depth.detach().float().cpu().numpy() if isinstance(depth, Tensor) else np.asarray(depth, np.float32)
    d = np.squeeze(d)
    if d.ndim != 2:
        raise ValueError(f"{path}: depth must be [H, W] (or [1, H, W]), got shape {tuple(np.shape(depth))}")
    return d.astype(np.float32)


def save_depth_png16(
    path: str | os.PathLike,
    depth: Tensor | np.ndarray,  # [H, W] or [1, H, W] z-depth in world units; <= 0 or non-finite = no depth
    scale: float | None = None,  # metres per count; None: chosen so the largest depth maps to 65535
) -> float:
    """Write depth as a 16-bit single-channel PNG, ``value = round(depth / scale)``; 0 means no depth.

    Returns the ``scale`` used (``depth = value * scale``) so the caller can record it.
    """
    path = Path(path)
    d = _depth_hw(depth, path)
    valid = np.isfinite(d) & (d > 0)
    if scale is None:
        dmax = float(d[valid].max()) if valid.any() else 1.0
        scale = dmax / 65535.0 if dmax > 0 else 1.0
    if not scale > 0:
        raise ValueError(f"{path}: depth scale must be positive, got {scale}")
    q = np.zeros(d.shape, np.uint16)
    q[valid] = np.clip(np.round(d[valid] / scale), 1, 65535).astype(np.uint16)
    write_bytes_atomic(path, _encode_png(q, path))
    return float(scale)


def load_depth_png16(path: str | os.PathLike, scale: float) -> Tensor:  # [H, W] float32, 0 = no depth
    import cv2

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: depth file not found")
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if a is None or a.dtype != np.uint16 or a.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel 16-bit PNG")
    return torch.from_numpy(a.astype(np.float32) * float(scale))


def save_depth_npy(path: str | os.PathLike, depth: Tensor | np.ndarray) -> Path:
    """Write float32 depth ``[H, W]`` as ``.npy`` atomically."""
    path = Path(path)
    d = _depth_hw(depth, path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, d)
    return path


# ------------------------------------------------------------------ EXR (uncompressed, one FLOAT channel)
_EXR_MAGIC = 20000630
_EXR_FLOAT = 2


def _exr_attr(name: str, type_name: str, payload: bytes) -> bytes:
    return name.encode() + b"\0" + type_name.encode() + b"\0" + struct.pack("<i", len(payload)) + payload


def save_depth_exr(path: str | os.PathLike, depth: Tensor | np.ndarray, channel: str = "Z") -> Path:
    """Write float32 depth ``[H, W]`` as a single-channel, uncompressed scanline OpenEXR file."""
    path = Path(path)
    d = _depth_hw(depth, path)
    h, w = d.shape
    box = struct.pack("<iiii", 0, 0, w - 1, h - 1)
    chlist = channel.encode() + b"\0" + struct.pack("<iBBBBii", _EXR_FLOAT, 0, 0, 0, 0, 1, 1) + b"\0"
    header = b"".join(
        [
            struct.pack("<ii", _EXR_MAGIC, 2),
            _exr_attr("channels", "chlist", chlist),
            _exr_attr("compression", "compression", b"\0"),
            _exr_attr("dataWindow", "box2i", box),
            _exr_attr("displayWindow", "box2i", box),
            _exr_attr("lineOrder", "lineOrder", b"\0"),
            _exr_attr("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
            _exr_attr("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
            _exr_attr("screenWindowWidth", "float", struct.pack("<f", 1.0)),
            b"\0",
        ]
    )
    line_bytes = 4 * w
    first = len(header) + 8 * h
    offsets = np.arange(h, dtype=np.uint64) * np.uint64(8 + line_bytes) + np.uint64(first)
    rows = np.empty((h, 8 + line_bytes), np.uint8)
    rows[:, :4] = np.arange(h, dtype="<i4").view(np.uint8).reshape(h, 4)
    rows[:, 4:8] = np.frombuffer(struct.pack("<i", line_bytes), np.uint8)
    rows[:, 8:] = np.ascontiguousarray(d.astype("<f4")).view(np.uint8).reshape(h, line_bytes)
    write_bytes_atomic(path, header + offsets.astype("<u8").tobytes() + rows.tobytes())
    return path


def load_depth_exr(path: str | os.PathLike) -> Tensor:  # [H, W] float32
    """Read a single-channel FLOAT, uncompressed scanline EXR (what :func:`save_depth_exr` writes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: EXR file not found")
    data = path.read_bytes()
    if len(data) < 8 or struct.unpack_from("<i", data, 0)[0] != _EXR_MAGIC:
        raise ValueError(f"{path}: not an OpenEXR file")
    pos, attrs = 8, {}
    while True:
        end = data.index(b"\0", pos)
        name = data[pos:end].decode()
        pos = end + 1
        if not name:
            break
        end = data.index(b"\0", pos)
        pos = end + 1
        (size,) = struct.unpack_from("<i", data, pos)
        pos += 4
        attrs[name] = data[pos : pos + size]
        pos += size
    if attrs.get("compression", b"\1") != b"\0":
        raise ValueError(f"{path}: only uncompressed EXR files are supported here")
    chl = attrs["channels"]
    if chl.count(b"\0") < 2 or struct.unpack_from("<i", chl, chl.index(b"\0") + 1)[0] != _EXR_FLOAT:
        raise ValueError(f"{path}: expected one FLOAT channel")
    x0, y0, x1, y1 = struct.unpack("<iiii", attrs["dataWindow"])
    w, h = x1 - x0 + 1, y1 - y0 + 1
    offsets = np.frombuffer(data, "<u8", count=h, offset=pos)
    out = np.empty((h, w), np.float32)
    for i, off in enumerate(offsets):
        y, n = struct.unpack_from("<ii", data, int(off))
        if n != 4 * w:
            raise ValueError(f"{path}: scanline {y} holds {n} bytes, expected {4 * w} (one FLOAT channel)")
        out[y - y0] = np.frombuffer(data, "<f4", count=w, offset=int(off) + 8)
    return torch.from_numpy(out)


def save_depth(
    path_stem: str | os.PathLike,  # file name without extension
    depth: Tensor | np.ndarray,  # [H, W] or [1, H, W] z-depth
    fmt: str = "png16",  # "png16" | "npy" | "exr"
    scale: float | None = None,  # png16 only: world units per count (None: from the depth range)
) -> tuple[Path, float | None]:
    """Write depth in one of the supported formats; returns the file and the png16 scale (else None).

    The caller records the returned ``png16`` scale (``depth = value * scale``), e.g. in a json.
    """
    stem = Path(path_stem)
    if fmt == "png16":
        path = stem.with_name(stem.name + ".png")
        return path, save_depth_png16(path, depth, scale)
    if fmt == "npy":
        return save_depth_npy(stem.with_name(stem.name + ".npy"), depth), None
    if fmt == "exr":
        return save_depth_exr(stem.with_name(stem.name + ".exr"), depth), None
    raise ValueError(f"depth format {fmt!r}: expected 'png16', 'npy' or 'exr'")
