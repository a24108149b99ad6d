"""MP4 video writing through OpenCV (``mp4v`` fourcc), atomic and verified.

Frames go to a temporary ``.mp4`` beside the target; the file is opened again with
``cv2.VideoCapture`` and its first frame read before it is renamed to its final name, so a
video that exists under the final name is one OpenCV can play back.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from torch import Tensor

from .images import to_uint8_hwc
from .io import atomic_path

__all__ = ["write_video", "read_video_info"]


def write_video(
    path: str | os.PathLike,
    frames: Iterable[Tensor | np.ndarray],  # each [3, H, W] / [H, W, 3] float in [0, 1] or uint8 RGB
    fps: float = 24.0,
) -> Path:
    """Encode ``frames`` as an MP4 (``mp4v``) at ``path``; returns the path.

    All frames must share one size. Raises ``ValueError`` for no frames or mixed sizes, and
    ``RuntimeError`` if OpenCV cannot open the encoder or cannot read the result back.
    """
    import cv2

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: video path must end in .mp4")
    if not fps > 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    with atomic_path(path) as tmp:
        writer = None
        size = None
        count = 0
        try:
            for i, frame in enumerate(frames):
                rgb = to_uint8_hwc(frame)
                h, w = rgb.shape[:2]
                if writer is None:
                    size = (w, h)
                    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), size)
                    if not writer.isOpened():
                        raise RuntimeError(f"{path}: OpenCV could not open an mp4v encoder for {w}x{h} frames")
                elif (w, h) != size:
                    raise ValueError(f"{path}: frame {i} is {w}x{h}, expected {size[0]}x{size[1]} like frame 0")
                writer.write(np.ascontiguousarray(rgb[..., ::-1]))
                count += 1
        finally:
            if writer is not None:
                writer.release()
        if count == 0:
            raise ValueError(f"{path}: no frames to write")
        info = read_video_info(tmp)
        if info["frames"] < 1:
            raise RuntimeError(f"{path}: OpenCV wrote a video it cannot read back")
    return path


def read_video_info(path: str | os.PathLike) -> dict:
    """Open ``path`` with ``cv2.VideoCapture`` and return ``{"frames", "width", "height", "fps"}``.

    ``frames`` counts frames actually decoded (0 if the file does not open).
    """
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return {"frames": 0, "width": 0, "height": 0, "fps": 0.0}
        n = 0
        while True:
            ok, _ = cap.read()
            if not ok:
                break
            n += 1
        return {
            "frames": n,
            "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            "fps": float(cap.get(cv2.CAP_PROP_FPS)),
        }
    finally:
        with contextlib.suppress(Exception):
            cap.release()
