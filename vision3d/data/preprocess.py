"""Image decoding and per-example preprocessing shared by every dataset.

- :func:`decode_image`: encoded bytes (JPEG, PNG, ...) -> ``[3, H, W]`` uint8, with errors that
  name the chunk/file and the scene.
- :func:`resize_and_center_crop`: pixelSplat's crop policy (``src/dataset/shims/crop_shim.py`` of
  github.com/dcharatan/pixelsplat, MIT): scale by ``max(H_out / H, W_out / W)``, round the scaled
  size, resample (PIL Lanczos on 8-bit images, as the authors do), then cut the centre window
  starting at ``((H_s - H_out) // 2, (W_s - W_out) // 2)``. Intrinsics follow through
  :meth:`Cameras.resize` and :meth:`Cameras.crop` in pixels, so the principal point shift of an odd
  crop is exact (the authors' normalised K keeps ``cx = 0.5`` and ignores it).
- :func:`normalize_scene_scale`: MVSplat's ``make_baseline_1`` (Chen et al., arXiv:2403.14627,
  github.com/donydchen/mvsplat, MIT): divide world translations by the distance between the
  context cameras (two views; with more, the largest pairwise distance) and, with
  ``scale_bounds`` (their ``baseline_scale_bounds``), the near/far planes too.
- :func:`hflip` (the authors' ``augmentation_shim``: mirror images and reflect the world's x axis)
  and :class:`ColorJitter`, both off by default.

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from vision3d.errors import InputError, check_size, short
from vision3d.geometry import Cameras

__all__ = [
    "BadSceneError",
    "decode_image",
    "resize_and_center_crop",
    "normalize_scene_scale",
    "hflip",
    "ColorJitter",
]


class BadSceneError(InputError):
    """A scene cannot be read (corrupt image, malformed record, inconsistent sizes).

    The dataset-level :class:`~vision3d.errors.InputError`: ``skip_bad`` datasets catch it. The
    message names the chunk/folder and the scene.
    """

    def __init__(self, message: str, path=None, field: str = "scene", expected: str = "a readable scene", got=None):
        super().__init__(path, field, expected, message if got is None else got, message=message)


def _encoded_size(buf: Tensor, where: str) -> tuple[int, int]:
    """(width, height) from an encoded image's header, read without decoding the pixels."""
    import io

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(buf.numpy().tobytes())) as im:
                return im.size
    except Image.DecompressionBombError as e:
        raise BadSceneError(f"{where}: image too large to decode ({e})", field="images", expected="an image of at most 64 Mpx") from e
    except Exception:  # noqa: BLE001 - PIL cannot parse it: OpenCV gets its chance (and reports it)
        return (0, 0)


def decode_image(data: Tensor | bytes | np.ndarray, where: str = "image") -> Tensor:  # [3, H, W] uint8
    """Decode an encoded image (JPEG, PNG, ...) to RGB ``[3, H, W]`` uint8.

    JPEGs go through ``torchvision.io.decode_jpeg`` (libjpeg-turbo); anything else, or a JPEG
    torchvision rejects, through OpenCV. ``where`` names the chunk/scene/frame in errors.
    """
    if isinstance(data, Tensor):
        if data.dtype != torch.uint8 or data.ndim != 1:
            raise BadSceneError(f"{where}: expected encoded bytes as a 1-D uint8 tensor, got {data.dtype} {tuple(data.shape)}")
        buf = data.contiguous()
    elif isinstance(data, (bytes, bytearray, memoryview)) or (isinstance(data, np.ndarray) and data.dtype == np.uint8):
        # never bytes(int): an integer N where the bytes belong would allocate N bytes
        buf = torch.frombuffer(bytearray(data.tobytes() if isinstance(data, np.ndarray) else data), dtype=torch.uint8)
    else:
        raise BadSceneError(
            f"{where}: expected encoded image bytes (1-D uint8 tensor, bytes or uint8 array), got {short(data)}",
            field="images",
            expected="encoded image bytes",
            got=type(data).__name__,
        )
    if buf.numel() < 4:
        raise BadSceneError(f"{where}: empty or truncated image ({buf.numel()} bytes)")
    w, h = _encoded_size(buf, where)
    if w or h:
        try:
            check_size(where, "image size", w, h)
        except InputError as e:
            raise BadSceneError(str(e), field="images", expected=e.expected, got=e.got) from None
    head = bytes(buf[:3].tolist())
    if head == b"\xff\xd8\xff":
        try:
            with warnings.catch_warnings():  # torchvision >= 0.29 flags its codecs as deprecated
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchvision.io import ImageReadMode, decode_jpeg

                img = decode_jpeg(buf, mode=ImageReadMode.RGB)
            if img.shape[0] == 3:
                return img
        except (RuntimeError, ValueError, ImportError):
            pass  # fall through to OpenCV, which reports corrupt data as None
    import cv2

    try:
        arr = cv2.imdecode(buf.numpy(), cv2.IMREAD_COLOR)
    except cv2.error as e:
        raise BadSceneError(f"{where}: corrupt or unsupported image data ({buf.numel()} bytes; OpenCV: {e})") from e
    if arr is None:
        raise BadSceneError(f"{where}: corrupt or unsupported image data ({buf.numel()} bytes)")
    return torch.from_numpy(np.ascontiguousarray(arr[..., ::-1])).permute(2, 0, 1).contiguous()


def encode_jpeg(image: Tensor, quality: int = 95) -> Tensor:  # [3, H, W] uint8 or float in [0,1] -> [n] uint8
    """JPEG bytes as a 1-D uint8 tensor (the chunk format's image field)."""
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"encode_jpeg: expected [3, H, W], got {tuple(image.shape)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import encode_jpeg as _enc

        return _enc(image.contiguous(), quality=quality)


def _resize_uint8(images: Tensor, h: int, w: int, resample: str) -> Tensor:  # [V, 3, H, W] uint8 -> float
    if resample == "lanczos":
        from PIL import Image

        out = []
        for im in images:
            pil = Image.fromarray(im.permute(1, 2, 0).numpy())
            out.append(torch.from_numpy(np.array(pil.resize((w, h), Image.LANCZOS))).permute(2, 0, 1))
        return torch.stack(out).float() / 255.0
    if resample == "area":  # OpenCV's pixel-area resampling on 8-bit images (exact box filter)
        import cv2

        hwc = images.contiguous(memory_format=torch.channels_last)  # [V, 3, H, W] stored as HWC
        out = [cv2.resize(im.permute(1, 2, 0).numpy(), (w, h), interpolation=cv2.INTER_AREA) for im in hwc]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0
    if resample == "bilinear":  # torch's antialiased bilinear, computed on uint8 (its fast path)
        x = torch.nn.functional.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return x.float() / 255.0
    raise ValueError(f"resize: resample must be 'lanczos', 'area' or 'bilinear', got {resample!r}")


def resize_and_center_crop(
    images: Tensor,  # [V, 3, H, W] uint8 (or float in [0, 1])
    cameras: Cameras | None,  # batch [V], sized W x H (None: images only)
    shape: tuple[int, int] | None,  # (H_out, W_out); None keeps the size
    resample: Literal["lanczos", "area", "bilinear"] = "lanczos",
) -> tuple[Tensor, Cameras | None]:  # [V, 3, H_out, W_out] float32 in [0, 1], cameras sized W_out x H_out
    """pixelSplat's resize-then-centre-crop, with K updated through :class:`Cameras`."""
    if images.dtype != torch.uint8:
        images = (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
    v, _, h, w = images.shape
    if cameras is not None and (cameras.width, cameras.height) != (w, h):
        raise ValueError(f"resize_and_center_crop: cameras are {cameras.width}x{cameras.height}, images {w}x{h}")
    if shape is None or tuple(shape) == (h, w):
        return images.float() / 255.0, cameras
    h_out, w_out = int(shape[0]), int(shape[1])
    h_s, w_s, top, left = _resize_crop_box(h, w, h_out, w_out)
    resized = images.float() / 255.0 if (h_s, w_s) == (h, w) else _resize_uint8(images, h_s, w_s, resample)
    out = resized[..., top : top + h_out, left : left + w_out].contiguous()
    cams = None if cameras is None else cameras.resize(w_s, h_s).crop(left, top, w_out, h_out)
    return out, cams


def _resize_crop_box(h: int, w: int, h_out: int, w_out: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, crop top, crop left) of the resize-then-centre-crop."""
    s = max(h_out / h, w_out / w)
    h_s, w_s = max(h_out, round(h * s)), max(w_out, round(w * s))
    return h_s, w_s, (h_s - h_out) // 2, (w_s - w_out) // 2


def resize_and_center_crop_depth(
    depths: Tensor,  # [V, 1, H, W] z-depth, 0 = unknown
    shape: tuple[int, int] | None,  # (H_out, W_out); None keeps the size
) -> Tensor:  # [V, 1, H_out, W_out] float32
    """The same resize-then-centre-crop as :func:`resize_and_center_crop`, for depth maps: nearest
    neighbour resampling, so no depth is invented between a surface and the unknown (0) background."""
    depths = depths.float()
    if shape is None or tuple(shape) == tuple(depths.shape[-2:]):
        return depths
    h, w = depths.shape[-2:]
    h_out, w_out = int(shape[0]), int(shape[1])
    h_s, w_s, top, left = _resize_crop_box(h, w, h_out, w_out)
    resized = depths if (h_s, w_s) == (h, w) else torch.nn.functional.interpolate(depths, size=(h_s, w_s), mode="nearest-exact")
    return resized[..., top : top + h_out, left : left + w_out].contiguous()


def normalize_scene_scale(
    context: Cameras,  # batch [Vc]
    target: Cameras,  # batch [Vt]
    near: float,
    far: float,
    *,
    scale_bounds: bool = True,
    epsilon: float = 1e-3,
    where: str = "scene",
) -> tuple[Cameras, Cameras, float, float, float]:
    """Divide world translations by the context baseline; returns ``(context, target, near, far, scale)``."""
    centres = context.centers.double()
    if centres.shape[0] < 2:
        return context, target, near, far, 1.0
    scale = float(torch.cdist(centres, centres).max())
    if scale < epsilon:
        raise BadSceneError(f"{where}: context baseline {scale:.6f} is below {epsilon} (cannot normalise scale)")

    def shrink(c: Cameras) -> Cameras:
        c2w = c.cam_to_world.clone()
        c2w[..., :3, 3] /= scale
        return replace(c, cam_to_world=c2w)

    if scale_bounds:
        near, far = near / scale, far / scale
    return shrink(context), shrink(target), near, far, scale


_REFLECT_X = (-1.0, 1.0, 1.0, 1.0)


def hflip(images: Tensor, cameras: Cameras) -> tuple[Tensor, Cameras]:  # [V, 3, H, W], batch [V]
    """Mirror images left-right and the world along x, so the cameras stay consistent with them.

    ``cam_to_world' = F cam_to_world F`` with ``F = diag(-1, 1, 1, 1)`` (a proper rotation again)
    and ``cx' = W - cx`` (exact in pixels).
    """
    f = cameras.cam_to_world.new_tensor(_REFLECT_X)
    c2w = cameras.cam_to_world * f[:, None] * f[None, :]
    K = cameras.K.clone()
    K[..., 0, 2] = cameras.width - K[..., 0, 2]
    return images.flip(-1), replace(cameras, K=K, cam_to_world=c2w)


@dataclass
class ColorJitter:
    """Brightness/contrast/saturation jitter, one draw per example (off unless a range is > 0)."""

    brightness: float = 0.0  # factor drawn in [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0

    @property
    def enabled(self) -> bool:
        return max(self.brightness, self.contrast, self.saturation) > 0

    def __call__(self, images: Tensor, g: torch.Generator) -> Tensor:  # [..., 3, H, W] in [0, 1]
        if not self.enabled:
            return images

        def draw(r: float) -> float:
            return 1.0 + (float(torch.rand((), generator=g)) * 2 - 1) * r

        b, c, s = draw(self.brightness), draw(self.contrast), draw(self.saturation)
        x = images * b
        gray = (0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :])[..., None, :, :]
        x = (x - gray.mean(dim=(-1, -2), keepdim=True)) * c + gray.mean(dim=(-1, -2), keepdim=True)
        gray = (0.299 * x[..., 0, :, :] + 0.587 * x[..., 1, :, :] + 0.114 * x[..., 2, :, :])[..., None, :, :]
        x = (x - gray) * s + gray
        return x.clamp(0, 1)
