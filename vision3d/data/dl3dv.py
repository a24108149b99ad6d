"""DL3DV-10K: the raw release (scene folders with nerfstudio ``transforms.json``) and the chunked
form the feed-forward papers train on.

Sources: DL3DV-10K (Ling et al., CVPR 2024, arXiv:2312.16256, github.com/DL3DV-10K/Dataset;
data under the DL3DV-10K terms of use, non-commercial). Chunked form and near/far: DepthSplat
(Xu et al., arXiv:2410.13862, github.com/cvg/depthsplat @2dad25a, MIT:
``src/scripts/convert_dl3dv_{train,test}.py``, ``config/experiment/dl3dv.yaml``). No code copied.

**Raw layout** (one folder per scene, named by its hash, possibly under ``1K/``, ``2K/``... and
possibly inside a ``nerfstudio/`` sub-folder)::

    <scene>/transforms.json          nerfstudio: fl_x fl_y cx cy w h at full resolution, frames
                                     with file_path "images/frame_00001.png" and an OpenGL
                                     cam-to-world transform_matrix
    <scene>/images/ images_2/ images_4/ images_8/   the frames at 1/1, 1/2, 1/4, 1/8 resolution

Cameras come from :func:`vision3d.geometry.transforms_json.read_transforms_json` (OpenGL -> OpenCV
at that boundary; the world frame is kept as in the file, like DepthSplat's converter which
only flips the camera axes); K follows the chosen ``images_<N>`` folder.

**Chunked form**: the RE10K chunk layout of :mod:`vision3d.data.re10k` with the timestamps set to
the frame numbers of the file names (``frame_00042.png`` -> 42) and, in DepthSplat's training
split, keys prefixed ``dl3dv_`` (their test split uses the bare hash; ``key_prefix`` picks).
DepthSplat stores ``images_8`` (270x480) as-is; :func:`convert_dl3dv` can also resize + centre
crop and re-encodes JPEG. Near/far: DepthSplat's 0.5 / 200.
Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from vision3d.geometry import Cameras
from vision3d.geometry.conventions import cameras_to_re10k

from .preprocess import BadSceneError, decode_image, encode_jpeg, resize_and_center_crop
from .re10k import ChunkDataset, ChunkDatasetConfig, read_chunk, read_index, validate_example, write_chunk, write_index

log = logging.getLogger(__name__)

__all__ = [
    "DL3DV_NEAR",
    "DL3DV_FAR",
    "DL3DVScene",
    "find_dl3dv_scenes",
    "read_dl3dv_scene",
    "scene_to_example",
    "convert_dl3dv",
    "DL3DVDataset",
    "DL3DVRawDataset",
]

DL3DV_NEAR, DL3DV_FAR = 0.5, 200.0
_SUBFOLDERS = ("nerfstudio", "gaussian_splat")


@dataclass
class DL3DVScene:
    key: str  # scene hash (folder name)
    root: Path  # folder holding transforms.json
    image_paths: list[Path]  # [V] frames at the chosen resolution
    cameras: Cameras  # batch [V], sized as the chosen resolution (nominal, from transforms.json)
    timestamps: Tensor  # [V] int64 frame numbers from the file names


def _scene_key(folder: Path) -> str:
    return folder.parent.name if folder.name in _SUBFOLDERS else folder.name


def find_dl3dv_scenes(raw_root: str | os.PathLike, max_depth: int = 3) -> dict[str, Path]:
    """Scene key -> folder holding ``transforms.json``, searched up to ``max_depth`` levels down."""
    root = Path(raw_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: DL3DV folder not found")
    found: dict[str, Path] = {}

    def walk(d: Path, depth: int) -> None:
        if (d / "transforms.json").is_file():
            key = _scene_key(d)
            if key in found:
                raise ValueError(f"{d}: scene key {key} also found at {found[key]}")
            found[key] = d
            return
        if depth >= max_depth:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            walk(sub, depth + 1)

    walk(root, 0)
    return found


def _frame_number(path: Path, fallback: int) -> int:
    m = re.search(r"(\d+)$", path.stem)
    return int(m.group(1)) if m else fallback


def read_dl3dv_scene(scene_dir: str | os.PathLike, downscale: int = 8, key: str | None = None) -> DL3DVScene:
    """One raw DL3DV scene at ``images_<downscale>`` (``downscale=1``: ``images``)."""
    from vision3d.geometry.transforms_json import read_transforms_json

    d = Path(scene_dir)
    key = key or _scene_key(d)
    tj = read_transforms_json(d / "transforms.json", downscale=downscale)
    paths = [Path(p) for p in tj.image_paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise BadSceneError(
            f"{d}: scene {key}: {len(missing)} of {len(paths)} frames listed in transforms.json are missing, "
            f"e.g. {missing[0]}"
        )
    if len(paths) < 2:
        raise BadSceneError(f"{d}: scene {key}: {len(paths)} frame(s); a scene needs at least two")
    stamps = torch.tensor([_frame_number(p, i) for i, p in enumerate(paths)], dtype=torch.int64)
    cams = tj.cameras
    if tj.distortion is not None and bool((tj.distortion.abs() > 0).any()):
        log.debug("%s: distortion %s ignored (DL3DV frames are treated as pinhole, as in DepthSplat)", d, tj.camera_model)
    return DL3DVScene(key, d, paths, cams, stamps)


MAX_FRAME_BYTES = 256 << 20  # an encoded frame larger than this is refused before it is read


def _read_bytes(path: Path) -> Tensor:  # [n] uint8
    size = path.stat().st_size
    if size > MAX_FRAME_BYTES:
        raise BadSceneError(
            f"{path}: frame file of {size} bytes exceeds {MAX_FRAME_BYTES} bytes (an encoded image that large would "
            "decode to gigabytes); re-encode it or use a downscaled images_<n> folder",
            path=path, field="file size", expected=f"at most {MAX_FRAME_BYTES} bytes", got=size,
        )
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def _raw_record(scene: DL3DVScene) -> dict:
    """A chunk-format record whose images are the files' own bytes (decoded lazily)."""
    return {
        "key": scene.key,
        "url": str(scene.root),
        "timestamps": scene.timestamps,
        "cameras": cameras_to_re10k(scene.cameras.to(torch.float64)).float(),
        "images": _LazyFiles(scene.image_paths),
    }


class _LazyFiles(list):
    """A list of image paths that reads a file's bytes when indexed (keeps raw scenes lazy)."""

    def __getitem__(self, i):  # type: ignore[override]
        return _read_bytes(super().__getitem__(i))


def scene_to_example(
    scene: DL3DVScene,
    image_shape: tuple[int, int] | None = None,  # (H, W) after resize + centre crop; None keeps the size
    quality: int = 95,
    key_prefix: str = "",
    resample: str = "area",
) -> dict:
    """Decode, optionally resize + crop, re-encode as JPEG: one chunk record."""
    images, rows = [], []
    for i, p in enumerate(scene.image_paths):
        img = decode_image(_read_bytes(p), f"{p}: scene {scene.key}: frame {i}")[None]
        h, w = img.shape[-2:]
        cam = scene.cameras[i : i + 1]
        if (cam.width, cam.height) != (w, h):
            # transforms.json size / downscale may be off by the flooring; scale K to the real file
            cam = cam.resize(w, h)
        img, cam = resize_and_center_crop(img, cam, image_shape, resample)
        images.append(encode_jpeg(img[0], quality))
        rows.append(cameras_to_re10k(cam.to(torch.float64))[0].float())
    ex = {
        "key": key_prefix + scene.key,
        "url": "",
        "timestamps": scene.timestamps.clone(),
        "cameras": torch.stack(rows),
        "images": images,
    }
    return validate_example(ex, str(scene.root))


def convert_dl3dv(
    raw_root: str | os.PathLike,
    out_root: str | os.PathLike,
    split: str = "train",
    *,
    downscale: int = 8,
    image_shape: tuple[int, int] | None = None,
    quality: int = 95,
    key_prefix: str = "",
    scenes: Sequence[str] | None = None,  # keys to convert (default: every scene found)
    exclude: Sequence[str] = (),  # keys to leave out (e.g. the 140 benchmark scenes from train)
    target_bytes_per_chunk: int = int(1e8),
    resample: str = "area",
    progress: bool = True,
) -> dict[str, str]:
    """Convert raw DL3DV scenes to ``<out_root>/<split>/NNNNNN.torch`` + ``index.json``.

    Resumable: scenes already in the split's ``index.json`` are skipped and new chunks are
    numbered after the existing ones; each chunk is written atomically and the index is
    rewritten (atomically) after every chunk, so an interrupted run loses at most one chunk's
    work (a chunk written just before an interruption but missing from the index is adopted). Bad scenes (missing frames, unreadable images or json) are logged and listed in
    ``<split>/skipped.json``, not fatal. Returns the index (key -> chunk name).
    """
    from tqdm import tqdm

    out = Path(out_root) / split
    out.mkdir(parents=True, exist_ok=True)
    found = find_dl3dv_scenes(raw_root)
    if scenes is not None:
        unknown = [k for k in scenes if k not in found]
        if unknown:
            raise ValueError(f"{raw_root}: scene(s) {unknown[:5]} not found ({len(found)} scenes present)")
        found = {k: found[k] for k in scenes}
    excluded = set(exclude)
    index: dict[str, str] = {}
    if (out / "index.json").is_file():
        index = {k: v.name for k, v in read_index(out).items()}
    # a run interrupted between writing a chunk and rewriting the index left an orphan chunk:
    # adopt its scenes instead of converting them again
    referenced = set(index.values())
    for orphan in sorted(p for p in out.glob("*.torch") if p.name not in referenced):
        try:
            keys = [ex["key"] for ex in read_chunk(orphan)]
        except (BadSceneError, OSError) as e:
            log.warning("DL3DV: ignoring unreadable chunk %s (%s)", orphan, e)
            continue
        index.update({k: orphan.name for k in keys})
        log.info("DL3DV: adopted %d scenes from %s", len(keys), orphan.name)
    if set(index.values()) != referenced:
        write_index(out, index)
    skipped_file = out / "skipped.json"
    skipped: dict[str, str] = json.loads(skipped_file.read_text()) if skipped_file.is_file() else {}
    todo = [k for k in sorted(found) if k not in excluded and key_prefix + k not in index]
    existing = [int(p.stem) for p in out.glob("*.torch") if p.stem.isdigit()]
    chunk_id = max(existing) + 1 if existing else 0
    chunk: list[dict] = []
    size = 0

    def flush() -> None:
        nonlocal chunk, size, chunk_id
        if not chunk:
            return
        name = f"{chunk_id:06d}.torch"
        write_chunk(out / name, chunk)
        for ex in chunk:
            index[ex["key"]] = name
        write_index(out, index)
        chunk_id, chunk, size = chunk_id + 1, [], 0

    bar = tqdm(todo, desc=f"DL3DV -> {out}", unit="scene", disable=not progress)
    for key in bar:
        try:
            scene = read_dl3dv_scene(found[key], downscale, key)
            ex = scene_to_example(scene, image_shape, quality, key_prefix, resample)
        except (BadSceneError, ValueError, OSError) as e:
            log.warning("DL3DV: skipping scene %s: %s", key, e)
            skipped[key] = str(e)
            from vision3d.utils.io import write_text_atomic

            write_text_atomic(skipped_file, json.dumps(skipped, indent=1))
            continue
        chunk.append(ex)
        size += sum(int(im.numel()) for im in ex["images"])
        bar.set_postfix(chunk=chunk_id, mb=f"{size / 1e6:.0f}")
        if size >= target_bytes_per_chunk:
            flush()
    flush()
    if not (out / "index.json").is_file():
        write_index(out, index)
    return index


def DL3DVDataset(
    roots: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "train",
    view_sampler=None,
    **overrides,
) -> ChunkDataset:
    """Chunked DL3DV with DepthSplat's defaults (near 0.5, far 200, stored 270x480 kept)."""
    from .samplers import BoundedViewSampler

    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    if view_sampler is None:
        if split != "train":
            raise ValueError(f"DL3DVDataset: give an EvaluationViewSampler for split={split!r}")
        view_sampler = BoundedViewSampler(
            num_context_views=2, min_gap=20, max_gap=50, initial_min_gap=15, initial_max_gap=30,
            warm_up_steps=10_000, extra_views="farthest_point",
        )
    cfg = ChunkDatasetConfig(roots=list(roots), split=split, near=DL3DV_NEAR, far=DL3DV_FAR, image_shape=(270, 480))
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"DL3DVDataset: unknown option {k!r}")
        setattr(cfg, k, v)
    return ChunkDataset(cfg, view_sampler)


class DL3DVRawDataset(ChunkDataset):
    """The raw DL3DV folders read directly (no conversion), yielding the same :class:`ViewsExample`.

    Each scene's ``transforms.json`` is parsed on first use; frames are decoded only when sampled.
    """

    def __init__(
        self,
        raw_root: str | os.PathLike,
        view_sampler=None,
        *,
        downscale: int = 8,
        key_prefix: str = "",
        config: ChunkDatasetConfig | None = None,
        **overrides,
    ) -> None:
        cfg = config or ChunkDatasetConfig(roots=[str(raw_root)], near=DL3DV_NEAR, far=DL3DV_FAR, image_shape=None)
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ValueError(f"DL3DVRawDataset: unknown option {k!r}")
            setattr(cfg, k, v)
        self.cfg = cfg
        from .samplers import BoundedViewSampler

        self.view_sampler = view_sampler if view_sampler is not None else BoundedViewSampler(
            min_gap=20, max_gap=50, initial_min_gap=15, initial_max_gap=30, warm_up_steps=10_000
        )
        self.downscale, self.key_prefix = downscale, key_prefix
        found = find_dl3dv_scenes(raw_root)
        if not found:
            raise ValueError(f"{raw_root}: no DL3DV scene (a folder with transforms.json) found")
        self._folders = {key_prefix + k: v for k, v in found.items()}
        self._init_scenes(dict(self._folders), check_files=False)
        self._records: dict[str, dict] = {}

    def record(self, key: str) -> dict:
        if key not in self._records:
            scene = read_dl3dv_scene(self._folders[key], self.downscale, key)
            self._records[key] = _raw_record(scene)
        return self._records[key]
