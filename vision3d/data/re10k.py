"""RealEstate10K / ACID (and chunked DL3DV) in the published ``.torch`` chunk format.

Format (pixelSplat, Charatan et al., arXiv:2312.12337, github.com/dcharatan/pixelsplat @2331f53,
MIT, ``src/dataset/dataset_re10k.py``; written by ``src/convert.py`` of
github.com/dcharatan/real_estate_10k_tools @021d556; used unchanged by MVSplat,
github.com/donydchen/mvsplat @175b17a, and DepthSplat, github.com/cvg/depthsplat @2dad25a, both
MIT)::

    <root>/<split>/index.json        {"<scene key>": "000123.torch", ...}
    <root>/<split>/000123.torch      torch.save(list of examples)

and each example is a dict::

    "key":        str              scene key (RE10K: 16 hex digits)
    "url":        str              source video URL ("" when there is none)
    "timestamps": int64 [V]        frame timestamps (RE10K: microseconds; DL3DV: frame numbers)
    "cameras":    float32 [V, 18]  fx fy cx cy (normalised by width/height), 0, 0, then the
                                   3x4 world-to-camera matrix (OpenCV axes), row-major
    "images":     list of V uint8 1-D tensors, each an encoded image (JPEG; DL3DV chunks may
                                   hold PNG bytes)
    "depths":     optional float16 [V, H, W] camera z-depth in world units at the stored image
                                   size, 0 where unknown (a vision3d extension: the synthetic
                                   data carries it; the published RE10K/DL3DV chunks do not)

Camera rows are converted by :func:`vision3d.geometry.conventions.cameras_from_re10k` (and back by
``cameras_to_re10k``), never here. Images are decoded lazily, only for the sampled views.

**Safety**: chunks are read with ``torch.load(..., weights_only=True)``, which only rebuilds
tensors and plain containers/strings/numbers and refuses to unpickle arbitrary objects, so a
malicious chunk cannot run code. Chunks are written atomically (temporary file + rename).

Near/far: MVSplat's RE10K/ACID setting ``near=1, far=100`` (``config/experiment/re10k.yaml``;
DepthSplat uses 0.5/100). Evaluation indices: see :mod:`vision3d.data.samplers`.
Written for vision3d (Apache-2.0); no code copied.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from vision3d.errors import InputError, guard, inside, short
from vision3d.geometry import Cameras
from vision3d.geometry.conventions import cameras_from_re10k
from vision3d.utils.io import atomic_path, write_text_atomic

from .example import ViewsExample
from .preprocess import (
    BadSceneError,
    ColorJitter,
    decode_image,
    hflip,
    normalize_scene_scale,
    resize_and_center_crop,
    resize_and_center_crop_depth,
)
from .samplers import BoundedViewSampler, NotEnoughViews, SampleKey, SceneSkipped

log = logging.getLogger(__name__)

__all__ = [
    "CHUNK_FIELDS",
    "RE10K_NEAR",
    "RE10K_FAR",
    "read_chunk",
    "write_chunk",
    "read_index",
    "write_index",
    "validate_example",
    "ChunkDatasetConfig",
    "ChunkDataset",
    "RE10KDataset",
]

CHUNK_FIELDS = ("key", "url", "timestamps", "cameras", "images")
RE10K_NEAR, RE10K_FAR = 1.0, 100.0


# ------------------------------------------------------------------------------------ format
def validate_example(ex: Any, where: str) -> dict:
    """Check one chunk record against the published layout; ``where`` names the chunk file."""
    if not isinstance(ex, dict):
        raise BadSceneError(f"{where}: expected each example to be a dict, got {type(ex).__name__}")
    key = ex.get("key", "<no key>")
    key = key if isinstance(key, str) and len(key) <= 200 else short(key)
    missing = [f for f in CHUNK_FIELDS if f not in ex]
    if missing:
        raise BadSceneError(f"{where}: scene {key}: missing field(s) {missing}; expected {list(CHUNK_FIELDS)}")
    if not isinstance(ex["key"], str):
        raise BadSceneError(f"{where}: scene key must be a str, got {type(ex['key']).__name__}", path=where, field="key")
    cams = ex["cameras"]
    if not isinstance(cams, Tensor) or cams.ndim != 2 or cams.shape[1] != 18 or not cams.dtype.is_floating_point:
        got = f"{cams.dtype} {tuple(cams.shape)}" if isinstance(cams, Tensor) else type(cams).__name__
        raise BadSceneError(
            f"{where}: scene {key}: 'cameras' must be a float tensor [V, 18] (fx fy cx cy 0 0 and a 3x4 "
            f"world-to-camera), got {got}",
            path=where, field="cameras", expected="a float tensor [V, 18]", got=got,
        )
    v = cams.shape[0]
    if v == 0:
        raise BadSceneError(f"{where}: scene {key}: 'cameras' has no views", path=where, field="cameras")
    c = cams.double()
    if not torch.isfinite(c).all():
        raise BadSceneError(
            f"{where}: scene {key}: 'cameras' holds non-finite values (NaN or inf) in row(s) "
            f"{torch.nonzero(~torch.isfinite(c).all(1)).flatten()[:5].tolist()}",
            path=where, field="cameras", expected="finite values",
        )
    if not (c[:, :2] > 0).all():
        bad = int(torch.nonzero(~(c[:, :2] > 0).all(1))[0])
        raise BadSceneError(
            f"{where}: scene {key}: 'cameras' row {bad}: focal lengths fx, fy must be > 0 (normalised by the "
            f"image size), got {c[bad, :2].tolist()}",
            path=where, field="cameras", expected="fx, fy > 0",
        )
    rot = c[:, 6:].reshape(v, 3, 4)[:, :, :3]
    det = torch.linalg.det(rot)
    if not ((det - 1).abs() < 1e-2).all():
        bad = int(torch.nonzero(~((det - 1).abs() < 1e-2))[0])
        raise BadSceneError(
            f"{where}: scene {key}: 'cameras' row {bad}: the world-to-camera rotation must be a rotation "
            f"(determinant 1), got determinant {float(det[bad]):.4g}",
            path=where, field="cameras", expected="a rotation matrix",
        )
    ts = ex["timestamps"]
    if not isinstance(ts, Tensor) or ts.shape != (v,) or ts.dtype.is_floating_point or ts.dtype.is_complex:
        got = f"{ts.dtype} {tuple(ts.shape)}" if isinstance(ts, Tensor) else short(ts)
        raise BadSceneError(f"{where}: scene {key}: 'timestamps' must be an int64 tensor [{v}], got {got}", path=where, field="timestamps")
    imgs = ex["images"]
    if not isinstance(imgs, (list, tuple)) or len(imgs) != v:
        n = len(imgs) if isinstance(imgs, (list, tuple)) else type(imgs).__name__
        raise BadSceneError(f"{where}: scene {key}: 'images' must be a list of {v} encoded images, got {n}", path=where, field="images")
    for i, im in enumerate(imgs):
        if not isinstance(im, Tensor) or im.dtype != torch.uint8 or im.ndim != 1:
            got = f"{im.dtype} {tuple(im.shape)}" if isinstance(im, Tensor) else short(im)
            raise BadSceneError(
                f"{where}: scene {key}: 'images'[{i}] must be encoded bytes as a 1-D uint8 tensor, got {got}",
                path=where, field=f"images[{i}]", expected="a 1-D uint8 tensor", got=got,
            )
    depths = ex.get("depths")
    if depths is not None and (not isinstance(depths, Tensor) or depths.ndim != 3 or depths.shape[0] != v
                               or not depths.is_floating_point()):
        raise BadSceneError(f"{where}: scene {key}: optional 'depths' must be a float tensor [{v}, H, W] (z-depth, "
                            f"0 = unknown), got {getattr(depths, 'shape', type(depths).__name__)}", path=where, field="depths")
    return ex


def read_chunk(path: str | os.PathLike, validate: bool = True) -> list[dict]:
    """Load one ``.torch`` chunk safely (``weights_only=True``) and check its records."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: chunk file not found")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise BadSceneError(
            f"{p}: cannot load chunk safely with torch.load(weights_only=True): {type(e).__name__}: {short(str(e), 300)}",
            path=p, field="file", expected="a torch.save list of scene dicts",
        ) from e
    if not isinstance(data, (list, tuple)):
        raise BadSceneError(f"{p}: expected a list of example dicts, got {type(data).__name__}", path=p, field="file")
    if validate:
        for ex in data:
            validate_example(ex, str(p))
    return list(data)


def write_chunk(path: str | os.PathLike, examples: Sequence[dict]) -> Path:
    """Write examples in the published layout, atomically. Each is validated first.

    ``images`` entries must be encoded bytes as 1-D uint8 tensors (see
    :func:`vision3d.data.preprocess.encode_jpeg`); ``cameras`` are stored float32, ``timestamps``
    int64.
    """
    p = Path(path)
    out = []
    for ex in examples:
        validate_example(ex, str(p))
        out.append(
            {
                "key": ex["key"],
                "url": str(ex.get("url", "")),
                "timestamps": ex["timestamps"].to(torch.int64).contiguous(),
                "cameras": ex["cameras"].to(torch.float32).contiguous(),
                "images": [im.to(torch.uint8).contiguous() for im in ex["images"]],
            }
        )
        if ex.get("depths") is not None:
            out[-1]["depths"] = ex["depths"].to(torch.float16).contiguous()
    with atomic_path(p) as tmp:
        torch.save(out, tmp)
    return p


def read_index(split_dir: str | os.PathLike) -> dict[str, Path]:
    """``index.json`` of a split: scene key -> chunk path (absolute)."""
    d = Path(split_dir)
    f = d / "index.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: index not found (expected <root>/<split>/index.json mapping keys to chunks)")
    with guard(f, "an index.json mapping scene keys to chunk file names"):
        raw = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise InputError(f, "top level", "an object scene key -> chunk file name", type(raw).__name__)
    out = {}
    for k, v in raw.items():
        if isinstance(v, (list, tuple)) and v:  # some forks store [chunk, num_frames]
            v = v[0]
        if not isinstance(v, str):
            raise InputError(f, f"scene {short(k)}", "a chunk file name (string)", v)
        # chunk names stay inside the split folder
        out[k] = inside(d, v, f"scene {short(k)}", path=f)
    return out


def write_index(split_dir: str | os.PathLike, index: dict[str, str | Path]) -> Path:
    """Write ``index.json`` atomically (chunk names relative to the split folder)."""
    d = Path(split_dir)
    rel = {k: (Path(v).name if Path(v).parent in (d, Path(".")) else os.path.relpath(v, d)) for k, v in index.items()}
    write_text_atomic(d / "index.json", json.dumps(rel, indent=0, sort_keys=True))
    return d / "index.json"


# ------------------------------------------------------------------------------------ dataset
@dataclass
class ChunkDatasetConfig:
    """Options shared by the chunked RE10K / ACID / DL3DV datasets."""

    roots: Sequence[str | os.PathLike] = ()
    """Dataset roots, each holding ``<split>/index.json`` and chunk files."""
    split: str = "train"
    """Split folder name (``train`` or ``test``)."""
    image_shape: tuple[int, int] | None = (256, 256)
    """``(H, W)`` after resize + centre crop; ``None`` keeps the stored size."""
    resample: str = "lanczos"
    """``lanczos`` (PIL, the authors' choice), ``area`` (OpenCV, fastest) or ``bilinear`` (torch)."""
    near: float = RE10K_NEAR
    far: float = RE10K_FAR
    make_baseline_1: bool = False
    """Divide the world by the context baseline (MVSplat's option; off in its released configs)."""
    baseline_scale_bounds: bool = True
    """With ``make_baseline_1``, divide near/far by the same scale."""
    baseline_epsilon: float = 1e-3
    max_fov: float | None = None
    """Treat scenes with a wider field of view (degrees) as bad (the papers use 100)."""
    hflip_prob: float = 0.0
    """Probability of the left-right mirror augmentation (the papers train with 0.5)."""
    color_jitter: ColorJitter = field(default_factory=ColorJitter)
    skip_bad: bool = False
    """Replace a bad scene (corrupt image, malformed record, too few frames) by the next scene of
    its chunk, with a logged warning and a count in ``example.skipped``; else raise."""
    max_skips: int = 16
    cache_chunks: int = 2
    """Chunks kept in memory per process (a chunk holds ~100 MB of JPEGs)."""
    allow_missing_eval_scenes: bool = False
    """With an evaluation sampler, drop index scenes missing from the data instead of raising."""


class ChunkDataset(torch.utils.data.Dataset):
    """Map-style dataset over the scenes of ``.torch`` chunks, yielding :class:`ViewsExample`.

    Index with an ``int`` (views drawn with a generator seeded by the index) or a
    :class:`~vision3d.data.samplers.SampleKey` from :class:`~vision3d.data.samplers.SceneSampler`
    (seed, epoch, position and training step come with it). Scenes are ordered chunk by chunk;
    ``groups`` lists the dataset indices of each chunk so the sampler keeps chunk locality.
    """

    def __init__(self, config: ChunkDatasetConfig, view_sampler=None) -> None:
        self.cfg = config
        self.view_sampler = view_sampler if view_sampler is not None else BoundedViewSampler()
        if not config.roots:
            raise ValueError("ChunkDataset: config.roots is empty")
        merged: dict[str, Path] = {}
        for root in config.roots:
            idx = read_index(Path(root) / config.split)
            dup = set(idx) & set(merged)
            if dup:
                raise ValueError(f"{root}/{config.split}/index.json: scene keys already in another root: {sorted(dup)[:3]}")
            merged.update(idx)
        self._init_scenes(merged, check_files=True)

    def _init_scenes(self, merged: dict[str, Path], check_files: bool) -> None:
        """Order scenes source by source (chunk file or scene folder) and group them."""
        config = self.cfg
        missing_chunks: dict[Path, str] = {}
        for k, c in merged.items():
            if check_files and not c.is_file():
                missing_chunks.setdefault(c, k)
        if missing_chunks:
            c, k = next(iter(missing_chunks.items()))
            raise FileNotFoundError(
                f"{c}: chunk named in index.json (e.g. for scene {k}) does not exist "
                f"({len(missing_chunks)} missing chunk file(s))"
            )
        keys = sorted(merged, key=lambda k: (str(merged[k]), k))
        scenes = getattr(self.view_sampler, "scenes", None)
        if scenes is not None:  # an evaluation index decides which scenes exist
            absent = [k for k in scenes if k not in merged]
            if absent and not config.allow_missing_eval_scenes:
                raise ValueError(
                    f"evaluation index {getattr(self.view_sampler, 'path', '')}: {len(absent)} scene(s) are not "
                    f"in the dataset index, e.g. {absent[:3]} (set allow_missing_eval_scenes=True to drop them)"
                )
            wanted = set(scenes)
            keys = [k for k in keys if k in wanted]
        self.keys: list[str] = keys
        self.chunk_of: dict[str, Path] = {k: merged[k] for k in keys}
        groups: OrderedDict[Path, list[int]] = OrderedDict()
        for i, k in enumerate(keys):
            groups.setdefault(self.chunk_of[k], []).append(i)
        self.groups: list[list[int]] = list(groups.values())
        self._group_of: list[tuple[int, int]] = [(0, 0)] * len(keys)  # index -> (group, slot)
        for gi, g in enumerate(self.groups):
            for slot, i in enumerate(g):
                self._group_of[i] = (gi, slot)
        self._cache: OrderedDict[Path, dict[str, dict]] = OrderedDict()
        self.num_skipped = 0

    def __len__(self) -> int:
        return len(self.keys)

    # ---------------------------------------------------------------- chunk access
    def _chunk(self, path: Path) -> dict[str, dict]:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        records = read_chunk(path, validate=False)
        by_key = {}
        for ex in records:
            if isinstance(ex, dict) and isinstance(ex.get("key"), str):
                by_key[ex["key"]] = ex
        self._cache[path] = by_key
        while len(self._cache) > max(1, self.cfg.cache_chunks):
            self._cache.popitem(last=False)
        return by_key

    def record(self, key: str) -> dict:
        """The raw, validated chunk record of scene ``key``."""
        path = self.chunk_of[key]
        by_key = self._chunk(path)
        if key not in by_key:
            raise BadSceneError(f"{path}: index.json names scene {key} but the chunk does not contain it")
        return validate_example(by_key[key], str(path))

    # ---------------------------------------------------------------- examples
    def __getitem__(self, item: int | SampleKey) -> ViewsExample:
        key = item if isinstance(item, SampleKey) else SampleKey(int(item), 0, -1, 0, int(item))
        if not self.cfg.skip_bad:
            return self._load(key.index, key, skipped=0)
        # deterministic substitutes: the following scenes of the same chunk
        gi, start = self._group_of[key.index]
        group = self.groups[gi]
        errors = []
        for attempt in range(min(self.cfg.max_skips, len(group))):
            idx = group[(start + attempt) % len(group)]
            try:
                return self._load(idx, key, skipped=attempt)
            except (InputError, NotEnoughViews, SceneSkipped) as e:  # BadSceneError is an InputError
                self.num_skipped += 1
                errors.append(str(e))
                log.warning("skipping bad scene (%d skipped in this process): %s", self.num_skipped, e)
        raise BadSceneError(f"{len(errors)} consecutive bad scenes starting at {self.keys[key.index]}: {errors[-1]}")

    def _load(self, index: int, key: SampleKey, skipped: int) -> ViewsExample:
        scene = self.keys[index]
        rec = self.record(scene)
        where = f"{self.chunk_of[scene]}: scene {scene}"
        rows = rec["cameras"]
        num_views = rows.shape[0]
        g = torch.Generator().manual_seed(int(key.seed))
        # unit-size cameras for view sampling (farthest-point needs the centres only)
        all_cams = cameras_from_re10k(rows.double(), 1, 1)
        ctx, tgt = self.view_sampler.sample(scene, num_views, all_cams.cam_to_world, g, key.step)

        def load(indices: Tensor, what: str) -> tuple[Tensor, Cameras]:
            imgs = []
            for i in indices.tolist():
                imgs.append(decode_image(rec["images"][i], f"{where}: {what} frame {i}"))
            sizes = {tuple(im.shape) for im in imgs}
            if len(sizes) != 1:
                raise BadSceneError(f"{where}: {what} frames have different sizes {sorted(sizes)}")
            stack = torch.stack(imgs)
            h, w = stack.shape[-2:]
            cams = cameras_from_re10k(rows[indices].float(), w, h)
            return stack, cams

        def load_depth(indices: Tensor, images: Tensor, what: str) -> Tensor | None:
            if rec.get("depths") is None:
                return None
            d = rec["depths"][indices].float()[:, None]  # [V, 1, h, w]
            if d.shape[-2:] != images.shape[-2:]:
                raise BadSceneError(f"{where}: {what} depth maps are {tuple(d.shape[-2:])}, images "
                                    f"{tuple(images.shape[-2:])}; depths must have the stored image size")
            return resize_and_center_crop_depth(d, self.cfg.image_shape)

        c_img, c_cam = load(ctx, "context")
        t_img, t_cam = load(tgt, "target")
        c_dep, t_dep = load_depth(ctx, c_img, "context"), load_depth(tgt, t_img, "target")
        if self.cfg.max_fov is not None:
            fov = torch.cat([c_cam.fov, t_cam.fov]).rad2deg()
            if (fov > self.cfg.max_fov).any():
                raise BadSceneError(f"{where}: field of view {float(fov.max()):.1f} deg exceeds max_fov={self.cfg.max_fov}")
        c_img, c_cam = resize_and_center_crop(c_img, c_cam, self.cfg.image_shape, self.cfg.resample)
        t_img, t_cam = resize_and_center_crop(t_img, t_cam, self.cfg.image_shape, self.cfg.resample)
        near, far, scale = self.cfg.near, self.cfg.far, 1.0
        if self.cfg.make_baseline_1:
            c_cam, t_cam, near, far, scale = normalize_scene_scale(
                c_cam,
                t_cam,
                near,
                far,
                scale_bounds=self.cfg.baseline_scale_bounds,
                epsilon=self.cfg.baseline_epsilon,
                where=where,
            )
            c_dep, t_dep = [None if d is None else d / scale for d in (c_dep, t_dep)]
        if self.cfg.hflip_prob > 0 and float(torch.rand((), generator=g)) < self.cfg.hflip_prob:
            c_img, c_cam = hflip(c_img, c_cam)
            t_img, t_cam = hflip(t_img, t_cam)
            c_dep, t_dep = [None if d is None else d.flip(-1) for d in (c_dep, t_dep)]
        if self.cfg.color_jitter.enabled:
            both = self.cfg.color_jitter(torch.cat([c_img, t_img]), g)
            c_img, t_img = both[: len(c_img)], both[len(c_img) :]
        return ViewsExample(
            scene=scene,
            context_images=c_img,
            context_cameras=replace(c_cam, near=near, far=far),
            target_images=t_img,
            target_cameras=replace(t_cam, near=near, far=far),
            context_indices=ctx,
            target_indices=tgt,
            near=near,
            far=far,
            scale=scale,
            epoch=key.epoch,
            position=key.position,
            skipped=skipped,
            context_depths=c_dep,
            target_depths=t_dep,
        )

    def scene_views(self, key: str) -> tuple[Tensor, Cameras]:
        """Every frame of a scene, decoded: ``[V, 3, H, W]`` uint8 and its cameras (stored size)."""
        rec = self.record(key)
        where = f"{self.chunk_of[key]}: scene {key}"
        imgs = torch.stack([decode_image(b, f"{where}: frame {i}") for i, b in enumerate(rec["images"])])
        return imgs, cameras_from_re10k(rec["cameras"].float(), imgs.shape[-1], imgs.shape[-2])


def RE10KDataset(
    roots: str | os.PathLike | Sequence[str | os.PathLike],
    split: str = "train",
    view_sampler=None,
    **overrides,
) -> ChunkDataset:
    """RealEstate10K/ACID chunks with MVSplat's defaults (near 1, far 100, 256x256).

    ``view_sampler`` defaults to :class:`BoundedViewSampler` (train) or, for ``split="test"``,
    raises unless given (use :class:`EvaluationViewSampler` with the published index).
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    if view_sampler is None and split != "train":
        raise ValueError(
            "RE10KDataset: give view_sampler=EvaluationViewSampler('evaluation_index_re10k.json') for "
            f"split={split!r} (see vision3d.data.samplers for where the index files come from)"
        )
    cfg = ChunkDatasetConfig(roots=list(roots), split=split, near=RE10K_NEAR, far=RE10K_FAR)
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"RE10KDataset: unknown option {k!r}")
        setattr(cfg, k, v)
    return ChunkDataset(cfg, view_sampler)
