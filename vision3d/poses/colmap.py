"""Incremental structure-from-motion with pycolmap (the ``[sfm]`` extra).

The classic COLMAP pipeline (Schönberger and Frahm, "Structure-from-Motion Revisited", CVPR 2016;
github.com/colmap/colmap, BSD-3-Clause; Python bindings ``pycolmap``), run on the CPU:

1. SIFT features of every image (one shared camera, ``SIMPLE_RADIAL`` by default, since the input
   policy gives every image one size);
2. matching: exhaustive for unordered photo sets, sequential (with overlap) for video frames;
3. incremental mapping; the largest model is kept. When no model registers ``min_registered``
   images, mapping starts again with a relaxed initial pair (triangulation angle 8, then 4 degrees,
   instead of COLMAP's 16), which forward-facing captures with a small baseline need;
4. undistortion to pinhole (``PINHOLE`` cameras and resampled images), read back with
   :func:`vision3d.geometry.colmap.read_colmap`.

The images are written to ``work_dir/images`` as PNG first (so videos and resized photos go
through the same path). Fewer registered images than ``min_registered`` raise
:class:`~vision3d.poses.base.PoseEstimationError` with what to try.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

from .base import PoseEstimationError, PoseEstimator, PoseInput, PoseResult, float_colors, register_pose_estimator
from .bundle_adjust import extract_sift, match_features

log = logging.getLogger(__name__)

__all__ = ["ColmapPoses", "sfm_file_names"]

# initial-pair settings tried in turn: COLMAP's defaults (16 degrees, 100 inliers), then relaxed ones (LLFF
# flower, 25 photos at 706 px: no model with the defaults, 25/25 registered with 8 degrees)
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
        min_registered: int = 3,
        sequential_overlap: int = 10,
        max_num_features: int = 8192,
        num_threads: int = -1,
        seed: int = 0,
        verbose: bool = False,  # COLMAP's own INFO log (very chatty) on stderr
    ):
        if matcher not in ("auto", "exhaustive", "sequential"):
            raise ValueError(f"ColmapPoses: matcher must be auto, exhaustive or sequential, got {matcher!r}")
        self.matcher = matcher
        self.camera_model = camera_model
        self.min_registered = int(min_registered)
        self.sequential_overlap = int(sequential_overlap)
        self.max_num_features = int(max_num_features)
        self.num_threads = int(num_threads)
        self.seed = int(seed)
        self.verbose = bool(verbose)

    def estimate(self, inputs: PoseInput, work_dir: str | os.PathLike) -> PoseResult:
        from vision3d.utils.optional import require

        pycolmap = require("pycolmap", "--poses colmap (structure from motion)")
        level = pycolmap.logging.minloglevel
        if not self.verbose:
            pycolmap.logging.minloglevel = 2  # errors only
        try:
            return self._estimate(pycolmap, inputs, Path(work_dir))
        finally:
            pycolmap.logging.minloglevel = level

    def _estimate(self, pycolmap, inputs: PoseInput, work: Path) -> PoseResult:
        from vision3d.data.folder import load_images
        from vision3d.geometry.colmap import read_colmap
        from vision3d.utils.images import save_png

        t0 = time.perf_counter()
        if work.exists():
            shutil.rmtree(work)
        img_dir = work / "images"
        img_dir.mkdir(parents=True)
        files = sfm_file_names(inputs.names)
        for f, im in zip(files, inputs.images):
            save_png(img_dir / f, im)
        db = work / "database.db"
        extract_sift(pycolmap, db, img_dir, files, camera_model=self.camera_model, single_camera=True,
                     max_num_features=self.max_num_features, num_threads=self.num_threads)
        sequential = self.matcher == "sequential" or (self.matcher == "auto" and inputs.is_video)
        match_features(pycolmap, db, "sequential" if sequential else "exhaustive", num_threads=self.num_threads,
                       sequential_overlap=self.sequential_overlap)
        t_match = time.perf_counter() - t0

        # COLMAP's initial pair needs a 16-degree triangulation angle; forward-facing captures (LLFF-style, a
        # small baseline) often have none, so mapping starts again with relaxed initialisation when it fails
        best, models, init_used = None, {}, None
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
        if registered < self.min_registered:
            raise PoseEstimationError(
                f"{inputs.source}: structure from motion registered {registered} of {len(files)} images "
                f"(need at least {self.min_registered}). Fixes: take more photos with more overlap (60-80% "
                "between neighbours), avoid blur and textureless or reflective surfaces, keep the scene static; "
                "or give known cameras with --poses known --cameras PATH"
            )
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
                "models": len(models),
                "initialisation": init_used,
                "points": int(pts.shape[0]),
                "mean_reprojection_error": float(best.compute_mean_reprojection_error()),
                "time_s": {"features_and_matching": t_match, "total": t_sfm},
                "work_dir": str(work),
            },
        )

