"""Incremental structure-from-motion with pycolmap (the ``[sfm]`` extra).

The classic COLMAP pipeline (Schönberger and Frahm, "Structure-from-Motion Revisited", CVPR 2016;
github.com/colmap/colmap, BSD-3-Clause; Python bindings ``pycolmap``), run on the CPU:

1. SIFT features of every image at its own size; ``camera_mode`` says which photos share one
   ``SIMPLE_RADIAL`` camera: ``per-image`` (each photo its own intrinsics, as photo collections from
   several cameras and zooms need), ``per-folder`` or ``single`` (one camera for all; only right when
   every photo comes from one camera at one zoom);
2. matching: exhaustive for unordered photo sets, sequential (with overlap) for video frames;
3. incremental mapping; the largest model is kept. When no model registers ``min_registered``
   images, mapping starts again with a relaxed initial pair (triangulation angle 8, then 4 degrees,
   instead of COLMAP's 16), which forward-facing captures with a small baseline need;
4. undistortion to pinhole (``PINHOLE`` cameras and resampled images), read back with
   :func:`vision3d.geometry.colmap.read_colmap`.

The images are written to ``work_dir/images`` as PNG first (so videos and resized photos go
through the same path). Fewer registered images than ``min_registered``, or than
``min_registered_fraction`` of the input (unless ``allow_partial``), raise
:class:`~vision3d.poses.base.PoseEstimationError` listing the photos left out and what to try.

**Determinism.** COLMAP's random generator is seeded (``pycolmap.set_random_seed``, the matcher's
RANSAC and the mapper's ``random_seed``); SIFT extraction and matching are deterministic per image
and per pair whatever the thread count. Incremental mapping with several threads is not (the
multi-threaded bundle adjustment and triangulation change the order of floating-point sums), so
``num_threads=1`` gives the same registration, run after run; more threads are faster but may
register a different set. COLMAP's own log goes to ``work_dir/colmap.log`` unless ``verbose``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .base import PoseEstimationError, PoseEstimator, PoseInput, PoseResult, float_colors, register_pose_estimator
from .bundle_adjust import extract_sift, match_features

log = logging.getLogger(__name__)

__all__ = ["ColmapPoses", "sfm_file_names"]

# initial-pair settings tried in turn: COLMAP's defaults (16 degrees, 100 inliers), then relaxed ones (LLFF
# flower, 25 photos at 706 px: no model with the defaults, 25/25 registered with 8 degrees)
CAMERA_MODES = ("single", "per-folder", "per-image")
_INIT_LADDER = ((None, None), (8.0, 100), (4.0, 50))


def sfm_file_names(names: list[str]) -> list[str]:
    """PNG file names for the SfM work folder, unique and filesystem-safe, order kept."""
    out, seen = [], set()
    for i, n in enumerate(names):
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(n).stem) or f"image_{i:05d}"
        cand = f"{stem}.png"
        if cand.lower() in seen:
            cand = f"{i:05d}_{stem}.png"
        seen.add(cand.lower())
        out.append(cand)
    return out


@register_pose_estimator("colmap")
class ColmapPoses(PoseEstimator):
    def __init__(
        self,
        matcher: str = "auto",  # "auto" (sequential for videos, else exhaustive), "exhaustive", "sequential"
        camera_model: str = "SIMPLE_RADIAL",
        camera_mode: str = "per-image",  # "single", "per-folder" or "per-image": which photos share intrinsics
        min_registered: int = 3,
        min_registered_fraction: float = 0.6,  # fewer registered photos than this share raise, unless allow_partial
        allow_partial: bool = False,
        sequential_overlap: int = 10,
        max_num_features: int = 8192,
        num_threads: int = -1,
        seed: int = 0,
        verbose: bool = False,  # COLMAP's own log on stderr; otherwise it goes to work_dir/colmap.log
        progress: bool = True,  # one line per stage on stderr
    ):
        if matcher not in ("auto", "exhaustive", "sequential"):
            raise ValueError(f"ColmapPoses: matcher must be auto, exhaustive or sequential, got {matcher!r}")
        self.matcher = matcher
        if camera_mode not in CAMERA_MODES:
            raise ValueError(f"ColmapPoses: camera_mode must be one of {', '.join(CAMERA_MODES)}, got {camera_mode!r}")
        self.camera_model = camera_model
        self.camera_mode = camera_mode
        self.min_registered = int(min_registered)
        if not 0 <= min_registered_fraction <= 1:
            raise ValueError(f"ColmapPoses: min_registered_fraction must be in [0, 1], got {min_registered_fraction}")
        self.min_registered_fraction = float(min_registered_fraction)
        self.allow_partial = bool(allow_partial)
        self.progress = bool(progress)
        self.sequential_overlap = int(sequential_overlap)
        self.max_num_features = int(max_num_features)
        self.num_threads = int(num_threads)
        self.seed = int(seed)
        self.verbose = bool(verbose)

    def estimate(self, inputs: PoseInput, work_dir: str | os.PathLike) -> PoseResult:
        from vision3d.utils.optional import require

        pycolmap = require("pycolmap", "--poses colmap (structure from motion)")
        work = Path(work_dir)
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        level = pycolmap.logging.minloglevel
        pycolmap.logging.minloglevel = 0  # COLMAP's INFO lines: into colmap.log, or on stderr with verbose
        self._say = _stage_printer(self.progress)
        try:
            with contextlib.nullcontext() if self.verbose else _stderr_to(work / "colmap.log") as real_stderr:
                if real_stderr is not None:
                    self._say = _stage_printer(self.progress, real_stderr)
                return self._estimate(pycolmap, inputs, work)
        finally:
            pycolmap.logging.minloglevel = level

    def _estimate(self, pycolmap, inputs: PoseInput, work: Path) -> PoseResult:
        from vision3d.data.folder import load_images
        from vision3d.geometry.colmap import read_colmap
        from vision3d.utils.images import save_png

        t0 = time.perf_counter()
        pycolmap.set_random_seed(self.seed)
        img_dir = work / "images"
        img_dir.mkdir(parents=True)
        files = sfm_file_names(inputs.names)
        for f, im in zip(files, inputs.images):
            save_png(img_dir / f, im)
        n = len(files)
        self._say(f"SfM 1/3: SIFT features of {n} images ({self.camera_mode} cameras)")
        db = work / "database.db"
        extract_sift(pycolmap, db, img_dir, files, camera_model=self.camera_model, camera_mode=self.camera_mode,
                     max_num_features=self.max_num_features, num_threads=self.num_threads)
        sequential = self.matcher == "sequential" or (self.matcher == "auto" and inputs.is_video)
        self._say(f"SfM 2/3: {'sequential' if sequential else 'exhaustive'} matching "
                  f"({n * (n - 1) // 2 if not sequential else n * self.sequential_overlap} pairs at most)")
        match_features(pycolmap, db, "sequential" if sequential else "exhaustive", num_threads=self.num_threads, seed=self.seed,
                       sequential_overlap=self.sequential_overlap)
        t_match = time.perf_counter() - t0

        # COLMAP's initial pair needs a 16-degree triangulation angle; forward-facing captures (LLFF-style, a
        # small baseline) often have none, so mapping starts again with relaxed initialisation when it fails
        best, models, init_used = None, {}, None
        self._say(f"SfM 3/3: incremental mapping ({'1 thread, deterministic' if self.num_threads == 1 else 'threads'})")
        for tri_angle, inliers in _INIT_LADDER:
            opts = pycolmap.IncrementalPipelineOptions()
            opts.num_threads = self.num_threads
            opts.random_seed = self.seed
            opts.min_model_size = 3
            if tri_angle is not None:
                opts.mapper.init_min_tri_angle, opts.mapper.init_min_num_inliers = tri_angle, inliers
            sparse = work / "sparse"
            if sparse.exists():
                shutil.rmtree(sparse)
            sparse.mkdir()
            models = pycolmap.incremental_mapping(db, img_dir, sparse, options=opts)
            best = max(models.values(), key=lambda r: r.num_reg_images(), default=None)
            init_used = {"min_tri_angle": float(opts.mapper.init_min_tri_angle),
                         "min_num_inliers": int(opts.mapper.init_min_num_inliers)}
            if best is not None and best.num_reg_images() >= self.min_registered:
                break
            log.info("SfM: no model from the initialisation %s; relaxing it", init_used)
        registered = 0 if best is None else int(best.num_reg_images())
        reg_names = set() if best is None else {im.name for im in best.images.values() if im.has_pose}
        dropped = [inputs.names[i] for i, f in enumerate(files) if f not in reg_names]
        sizes = sorted((int(r.num_reg_images()) for r in models.values()), reverse=True)
        self._say(f"SfM: registered {registered}/{n} images in the largest of {len(models)} model(s) {sizes}")
        fixes = ("Fixes: take more photos with more overlap (60-80% between neighbours), avoid blur and textureless or "
                 "reflective surfaces, keep the scene static; try another --camera-mode; pose the photos with a "
                 "feed-forward network instead (--poses vggt --pose-weights PATH, see the README); or give known "
                 "cameras with --poses known --cameras PATH")
        if registered < self.min_registered:
            raise PoseEstimationError(
                f"{inputs.source}: structure from motion registered {registered} of {n} images "
                f"(need at least {self.min_registered}). {fixes}"
            )
        need = math.ceil(self.min_registered_fraction * n)
        if registered < need and not self.allow_partial:
            shown = ", ".join(dropped[:20]) + (" ..." if len(dropped) > 20 else "")
            raise PoseEstimationError(
                f"{inputs.source}: structure from motion registered only {registered} of {n} images "
                f"({registered / n:.0%}, below {self.min_registered_fraction:.0%}; {len(models)} separate model(s) of "
                f"{sizes} images); not registered: {shown}. Continue with the {registered} registered photos by "
                f"adding --allow-partial to the same command, or: {fixes}"
            )
        if dropped:
            log.warning("SfM left out %d of %d images: %s", len(dropped), n, ", ".join(dropped))
        model_dir = sparse / "best"
        model_dir.mkdir()
        best.write_text(str(model_dir))
        und = work / "undistorted"
        pycolmap.undistort_images(und, model_dir, img_dir)
        t_sfm = time.perf_counter() - t0

        und_sparse = und / "sparse"
        model = read_colmap(und_sparse)
        reg_files = {im.name for im in model.images.values()}
        order = [i for i, f in enumerate(files) if f in reg_files]
        loaded = load_images([und / "images" / files[i] for i in order], cameras=und_sparse, size_policy="keep",
                             source=inputs.source)
        if not isinstance(inputs.images, (list, tuple)):  # one size in: one size out (undistortion may vary it)
            loaded = load_images([und / "images" / files[i] for i in order], cameras=und_sparse, size_policy="crop",
                                 source=inputs.source)
        pts, rgb = model.points_xyz().float(), model.points_rgb()
        return PoseResult(
            images=loaded.images,
            names=[inputs.names[i] for i in order],
            cameras=loaded.cameras,
            points=pts if pts.shape[0] > 0 else None,
            colors=float_colors(rgb) if pts.shape[0] > 0 else None,
            info={
                "estimator": "colmap",
                "pycolmap": getattr(pycolmap, "__version__", "?"),
                "matcher": "sequential" if sequential else "exhaustive",
                "camera_model": self.camera_model,
                "registered": registered,
                "input_images": len(files),
                "dropped": dropped,
                "models": len(models),
                "model_sizes": sizes,
                "camera_mode": self.camera_mode,
                "threads": self.num_threads,
                "seed": self.seed,
                "initialisation": init_used,
                "points": int(pts.shape[0]),
                "mean_reprojection_error": float(best.compute_mean_reprojection_error()),
                "time_s": {"features_and_matching": t_match, "total": t_sfm},
                "work_dir": str(work),
            },
        )



def _stage_printer(enabled: bool, stream=None):
    def say(msg: str) -> None:
        if enabled:
            print(msg, file=stream or sys.stderr, flush=True)

    return say


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 (where COLMAP's glog writes) to ``path`` for the block; yields a stream on the
    real stderr for our own progress lines."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield real
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        real.close()
