"""Bundle adjustment of given cameras (e.g. VGGT's) with pycolmap: SIFT tracks, triangulation, refinement.

Feed-forward pose networks give every camera in one pass but are off by a degree or two and a few
percent in focal length. VGGT's own demo (facebookresearch/vggt ``demo_colmap.py``, Wang et al.,
arXiv 2503.11651) fixes that with a bundle adjustment on tracks from its tracking head; we have no
tracking head, so the tracks come from COLMAP's SIFT features and matches instead (Schönberger and
Frahm, "Structure-from-Motion Revisited", CVPR 2016; github.com/colmap/colmap, BSD-3-Clause, through
its Python bindings ``pycolmap`` 4.x, the ``[sfm]`` extra). The refinement mirrors COLMAP's mapper:

1. SIFT features of every image; matching exhaustive for small sets, else between neighbours by the
   given poses (or sequential for video);
2. a COLMAP model of the given cameras (:meth:`vision3d.geometry.colmap.ColmapModel.from_cameras`),
   one shared or one per-image ``SIMPLE_PINHOLE``/``PINHOLE`` camera, read by pycolmap;
3. triangulation with the poses fixed (``pycolmap.triangulate_points``) under thresholds loosened by
   ``initial_error_scale`` (the poses are still off), then ``rounds`` times: bundle adjustment of
   poses, points and (optionally) focal length with the first image's pose fixed and the scale held
   (Cauchy loss in the first round), filtering by reprojection error, retriangulation; then a last
   adjustment and filter;
4. the refined cameras read back through :func:`vision3d.geometry.colmap.read_colmap`.

Orbit-like captures (every camera looking at one point from one distance) are critical motions
for focal self-calibration: if a refined focal length moves more than ``max_focal_change`` the
adjustment is redone with the intrinsics fixed. Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from vision3d.geometry import Cameras

from .base import PoseEstimationError, float_colors

log = logging.getLogger(__name__)

__all__ = [
    "BundleAdjustOptions",
    "BundleAdjustResult",
    "bundle_adjust",
    "extract_sift",
    "match_features",
    "pose_neighbour_pairs",
]

_MATCHERS = ("auto", "exhaustive", "sequential", "poses")
_CAMERA_MODELS = ("auto", "SIMPLE_PINHOLE", "PINHOLE")


@dataclass
class BundleAdjustOptions:
    """How :func:`bundle_adjust` refines cameras."""

    refine_focal: bool = True
    """Refine the focal length(s) (undone, with a warning, when one moves more than ``max_focal_change``)."""

    refine_principal: bool = False
    """Refine the principal point (poorly constrained; off as in COLMAP)."""

    shared_camera: bool = True
    """One camera (the mean of the given intrinsics) for all images, as for photos of one camera;
    else one camera per image (per-image focal lengths are weakly constrained)."""

    camera_model: str = "auto"
    """COLMAP camera model: SIMPLE_PINHOLE (one focal, fx = fy = their geometric mean), PINHOLE, or auto
    (SIMPLE_PINHOLE when focal lengths are refined and fx, fy agree to 1%, else PINHOLE)."""

    max_reproj_error: float = 4.0
    """Points with a larger mean reprojection error (pixels) are dropped after each adjustment."""

    min_tri_angle: float = 1.5
    """Points whose rays meet at a smaller angle (degrees) are dropped."""

    initial_error_scale: float = 3.0
    """Loosens the triangulation and filter thresholds of the first pass, made with the given poses."""

    rounds: int = 2
    """Adjust, filter and retriangulate this many times before the last adjustment."""

    max_focal_change: float = 0.25
    """Relative focal change beyond which the result is rejected and redone with fixed intrinsics."""

    matcher: str = "auto"
    """exhaustive, sequential (video order), poses (nearest cameras by the given poses), or auto:
    exhaustive up to ``max_exhaustive`` images, else poses."""

    max_exhaustive: int = 50
    """auto matching: the largest image count matched exhaustively."""

    num_neighbors: int = 20
    """poses matching: neighbours matched per image."""

    sequential_overlap: int = 10
    """sequential matching: following frames matched per frame."""

    max_num_features: int = 8192
    """SIFT features per image at most."""

    min_points: int = 20
    """Fewer triangulated points than this is an error."""

    num_threads: int = -1
    """CPU threads of extraction, matching, triangulation and the solver (-1: all)."""

    seed: int = 0
    """Seed of COLMAP's RANSAC and triangulation."""

    progress: bool = True
    """Show a progress bar."""

    verbose: bool = False
    """COLMAP's own log (very chatty) on stderr."""

    def __post_init__(self) -> None:
        if self.matcher not in _MATCHERS:
            raise ValueError(f"BundleAdjustOptions.matcher: expected one of {_MATCHERS}, got {self.matcher!r}")
        if self.camera_model not in _CAMERA_MODELS:
            raise ValueError(
                f"BundleAdjustOptions.camera_model: expected one of {_CAMERA_MODELS}, got {self.camera_model!r}"
            )
        for name in ("max_reproj_error", "min_tri_angle", "max_focal_change"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BundleAdjustOptions.{name}: must be > 0, got {getattr(self, name)}")
        if self.initial_error_scale < 1:
            raise ValueError(f"BundleAdjustOptions.initial_error_scale: must be >= 1, got {self.initial_error_scale}")
        for name in ("rounds", "min_points"):
            if getattr(self, name) < 0:
                raise ValueError(f"BundleAdjustOptions.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("max_exhaustive", "num_neighbors", "sequential_overlap", "max_num_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"BundleAdjustOptions.{name}: must be >= 1, got {getattr(self, name)}")


class BundleAdjustResult(NamedTuple):
    cameras: Cameras  # batch [V] refined, input order and size, OpenCV cam_to_world, K in pixels
    points: Tensor  # [P, 3] float32 world, triangulated and adjusted
    colors: Tensor  # [P, 3] float32 in [0, 1]
    info: dict  # reprojection errors before/after, counts, focal change, times


# ---------------------------------------------------------------------------------------- features
def extract_sift(
    pycolmap,
    database: Path,
    image_dir: Path,
    files: Sequence[str],  # [V] names relative to image_dir, as stored in the database
    *,
    camera_model: str,
    single_camera: bool = False,
    camera_mode: str | None = None,  # "single", "per-folder" or "per-image"; overrides single_camera
    max_num_features: int = 8192,
    num_threads: int = -1,
) -> None:
    """SIFT features of ``files`` into ``database`` on the CPU (one camera for all, or one per image)."""
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.use_gpu = False
    extraction.num_threads = num_threads
    extraction.sift.max_num_features = max_num_features
    if camera_mode is None:
        camera_mode = "single" if single_camera else "per-image"
    modes = {"single": pycolmap.CameraMode.SINGLE, "per-folder": pycolmap.CameraMode.PER_FOLDER,
             "per-image": pycolmap.CameraMode.PER_IMAGE}
    if camera_mode not in modes:
        raise ValueError(f"extract_sift: camera_mode must be one of {', '.join(modes)}, got {camera_mode!r}")
    mode = modes[camera_mode]
    pycolmap.extract_features(
        database, image_dir, image_names=list(files), camera_mode=mode, reader_options=reader,
        extraction_options=extraction, device=pycolmap.Device.cpu,
    )


def match_features(
    pycolmap,
    database: Path,
    method: str,  # "exhaustive", "sequential" or "pairs"
    *,
    num_threads: int = -1,
    seed: int = -1,
    sequential_overlap: int = 10,
    pairs_file: Path | None = None,  # method "pairs": a text file, "name1 name2" per line
) -> None:
    """Match the SIFT features in ``database`` on the CPU and verify the pairs geometrically."""
    matching = pycolmap.FeatureMatchingOptions()
    matching.use_gpu = False
    matching.num_threads = num_threads
    verification = pycolmap.TwoViewGeometryOptions()
    verification.ransac.random_seed = seed
    cpu = pycolmap.Device.cpu
    if method == "exhaustive":
        pycolmap.match_exhaustive(database, matching_options=matching, verification_options=verification, device=cpu)
    elif method == "sequential":
        pairing = pycolmap.SequentialPairingOptions()
        pairing.overlap = sequential_overlap
        pycolmap.match_sequential(database, matching_options=matching, pairing_options=pairing,
                                  verification_options=verification, device=cpu)
    elif method == "pairs":
        if pairs_file is None:
            raise ValueError("match_features: method 'pairs' needs pairs_file")
        pairing = pycolmap.ImportedPairingOptions()
        pairing.match_list_path = pairs_file
        pycolmap.match_image_pairs(database, matching_options=matching, pairing_options=pairing,
                                   verification_options=verification, device=cpu)
    else:
        raise ValueError(f"match_features: method must be exhaustive, sequential or pairs, got {method!r}")


def pose_neighbour_pairs(cameras: Cameras, k: int) -> list[tuple[int, int]]:
    """Index pairs ``(i, j)``, ``i < j``: each camera with its ``k`` nearest cameras that look the same way.

    Nearness is the centre distance in units of the typical spacing between neighbouring cameras plus
    the angle between optical axes in units of 0.2 rad; cameras whose axes differ by 90 degrees or more
    are never paired.
    """
    cams = cameras.flatten() if len(cameras.batch_shape) != 1 else cameras
    n = cams.batch_shape[0]
    if n < 2:
        return []
    c = cams.centers.detach().double().cpu()  # [n, 3]
    z = cams.rotation.detach().double().cpu()[..., :, 2]  # [n, 3] optical axes in world
    dist = torch.cdist(c, c)  # [n, n]
    eye = torch.eye(n, dtype=torch.bool)
    spacing = float(dist.masked_fill(eye, float("inf")).amin(1).median().clamp_min(1e-12))
    angle = torch.acos((z @ z.T).clamp(-1, 1))  # [n, n]
    score = (dist / spacing + angle / 0.2).masked_fill(eye | (angle >= math.pi / 2), float("inf"))
    nearest = score.topk(min(k, n - 1), dim=1, largest=False)
    out = set()
    for i in range(n):
        for s, j in zip(nearest.values[i].tolist(), nearest.indices[i].tolist()):
            if math.isfinite(s):
                out.add((min(i, j), max(i, j)))
    return sorted(out)


# ---------------------------------------------------------------------------------------- the model
def _colmap_input(cameras: Cameras, files: list[str], o: BundleAdjustOptions):
    """The ColmapModel of the given cameras, with the camera model and sharing of ``o``."""
    from vision3d.geometry.colmap import CameraDistortion, ColmapModel

    K = cameras.K.detach().to("cpu", torch.float64).clone()  # [V, 3, 3]
    if o.shared_camera:
        K[:] = K.mean(0)
    fx, fy = K[:, 0, 0], K[:, 1, 1]
    if (fx <= 0).any() or (fy <= 0).any() or not torch.isfinite(K).all():
        raise ValueError(f"bundle_adjust: cameras.K must have finite positive focal lengths, got fx {fx.tolist()}")
    model = o.camera_model
    if model == "auto":
        model = "SIMPLE_PINHOLE" if o.refine_focal and bool(((fx / fy) - 1).abs().max() < 0.01) else "PINHOLE"
    distortion = None
    if model == "SIMPLE_PINHOLE":
        f = (fx * fy).sqrt()
        K[:, 0, 0], K[:, 1, 1] = f, f
        distortion = CameraDistortion("SIMPLE_PINHOLE", torch.zeros(K.shape[0], 0, dtype=torch.float64))
    cams = Cameras(K, cameras.cam_to_world.detach().to("cpu", torch.float64), cameras.width, cameras.height)
    return ColmapModel.from_cameras(cams, files, distortion=distortion, share_cameras=o.shared_camera), model


def _to_database_ids(pycolmap, model, database: Path, label: dict[str, str], width: int, height: int, where: str):
    """``model`` renumbered with the database's image and camera ids (COLMAP matches them by id), and the
    images without features. ``label`` maps database names to the caller's names, in input order."""
    from vision3d.geometry.colmap import ColmapCamera, ColmapImage, ColmapModel

    db = pycolmap.Database.open(str(database))
    try:
        by_name = {im.name: im for im in db.read_all_images()}
        db_cams = {c.camera_id: c for c in db.read_all_cameras()}
        keypoints = {im.image_id: db.num_keypoints_for_image(im.image_id) for im in by_name.values()}
    finally:
        db.close()
    missing = [label[f] for f in label if f not in by_name]
    if missing:
        raise PoseEstimationError(f"{where}: COLMAP could not read {', '.join(missing[:5])} (no features extracted)")
    out = ColmapModel()
    for im in model.images.values():
        dbi = by_name[im.name]
        cam = model.cameras[im.camera_id]
        dbc = db_cams[dbi.camera_id]
        if (dbc.width, dbc.height) != (width, height):
            raise ValueError(
                f"{where}: {label[im.name]} is {dbc.width}x{dbc.height} but its camera is {width}x{height}; "
                "give cameras of the images' size"
            )
        if dbi.camera_id not in out.cameras:
            out.cameras[dbi.camera_id] = ColmapCamera(dbi.camera_id, cam.model, cam.width, cam.height, cam.params)
        out.images[dbi.image_id] = ColmapImage(dbi.image_id, im.qvec, im.tvec, dbi.camera_id, im.name)
    names_without = [label[f] for f in label if keypoints[by_name[f].image_id] == 0]
    return out, names_without


def _check_frames(pycolmap, rec, database: Path) -> None:
    db = pycolmap.Database.open(str(database))
    try:
        db_frames = {f.frame_id: f for f in db.read_all_frames()}
    finally:
        db.close()
    for image_id in rec.reg_image_ids():
        fid = rec.image(image_id).frame_id
        if fid not in db_frames or db_frames[fid].rig_id != rec.frame(fid).rig_id:
            raise RuntimeError(
                f"bundle_adjust: pycolmap {getattr(pycolmap, '__version__', '?')} numbered the database frames "
                f"differently from the model (image {rec.image(image_id).name}); please report this"
            )


def _verified_pairs(pycolmap, database: Path) -> dict[int, int]:
    """Image id -> number of geometrically verified partners."""
    db = pycolmap.Database.open(str(database))
    try:
        pair_ids, geoms = db.read_two_view_geometries()
    finally:
        db.close()
    count: dict[int, int] = {}
    for pid, g in zip(pair_ids, geoms):
        if len(g.inlier_matches) > 0:
            for i in pycolmap.pair_id_to_image_pair(pid):
                count[i] = count.get(i, 0) + 1
    return count


# ---------------------------------------------------------------------------------------- refinement
def _pipeline_options(pycolmap, o: BundleAdjustOptions, scale: float, num_images: int):
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = o.num_threads
    opts.random_seed = o.seed
    opts.mapper.random_seed = o.seed
    opts.mapper.filter_max_reproj_error = o.max_reproj_error * scale
    opts.mapper.filter_min_tri_angle = o.min_tri_angle
    tri = opts.triangulation
    tri.random_seed = o.seed
    tri.create_max_angle_error *= scale
    tri.continue_max_angle_error *= scale
    tri.re_max_angle_error *= scale
    tri.merge_max_reproj_error = o.max_reproj_error * scale
    tri.complete_max_reproj_error = o.max_reproj_error * scale
    tri.min_angle = o.min_tri_angle
    tri.ignore_two_view_tracks = num_images > 4  # few images: two-view tracks are most of the data
    return opts


def _adjust(pycolmap, rec, o: BundleAdjustOptions, refine_focal: bool, anchor_frame: int, robust: bool):
    ba = pycolmap.BundleAdjustmentOptions()
    ba.refine_focal_length = refine_focal
    ba.refine_principal_point = o.refine_principal
    ba.refine_extra_params = False
    ba.print_summary = o.verbose
    ba.ceres.solver_options.num_threads = o.num_threads
    if robust:
        ba.ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
        ba.ceres.loss_function_scale = 1.0
    config = pycolmap.BundleAdjustmentConfig()
    for image_id in rec.reg_image_ids():
        config.add_image(image_id)
    config.set_constant_rig_from_world_pose(anchor_frame)  # the gauge: this pose and one baseline coordinate
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    pycolmap.ObservationManager(rec).filter_observations_with_negative_depth()
    summary = pycolmap.create_default_bundle_adjuster(ba, config, rec).solve()
    rec.update_point_3d_errors()
    return summary


def _refine(pycolmap, input_dir: Path, database: Path, image_dir: Path, work: Path, order: list[int],
            o: BundleAdjustOptions, refine_focal: bool, where: str, bar, labels: list[str],
            no_features: list[str]) -> tuple:
    rec = pycolmap.Reconstruction(str(input_dir))
    _check_frames(pycolmap, rec, database)
    tri_dir = work / "triangulated"
    tri_dir.mkdir(exist_ok=True)
    V = len(order)

    def triangulate(rec, scale, clear):
        try:
            return pycolmap.triangulate_points(
                rec, database, image_dir, tri_dir, clear_points=clear,
                options=_pipeline_options(pycolmap, o, scale, V), refine_intrinsics=False,
            )
        except (RuntimeError, ValueError) as e:
            raise PoseEstimationError(f"{where}: triangulation failed ({e}); {_advice(no_features)}") from e

    rec = triangulate(rec, o.initial_error_scale, True)
    before = float(rec.compute_mean_reprojection_error())
    points_before, obs_before = int(rec.num_points3D()), int(rec.compute_num_observations())
    bar.update()
    if rec.num_points3D() < max(o.min_points, 1):
        seen = [n for n, i in zip(labels, order) if rec.image(i).num_points3D == 0]
        raise PoseEstimationError(
            f"{where}: bundle adjustment triangulated {rec.num_points3D()} points (need {o.min_points}); images "
            f"with none: {', '.join(seen[:8]) or '-'}{' ...' if len(seen) > 8 else ''}. {_advice(no_features)}"
        )
    seen = [i for i in order if rec.image(i).num_points3D > 0]
    anchor = rec.image(seen[0]).frame_id
    for r in range(o.rounds + 1):
        last = r == o.rounds
        _adjust(pycolmap, rec, o, refine_focal, anchor, robust=r == 0)
        scale = o.initial_error_scale if r == 0 and not last else 1.0
        pycolmap.ObservationManager(rec).filter_all_points3D(o.max_reproj_error * scale, o.min_tri_angle)
        if not last:
            rec = triangulate(rec, 1.0, False)
        bar.set_postfix(reproj=f"{rec.compute_mean_reprojection_error():.2f}px", points=rec.num_points3D())
        bar.update()
    rec.update_point_3d_errors()
    rec.extract_colors_for_all_images(str(image_dir))
    stats = {
        "reprojection_error_before": before,
        "points_before": points_before,
        "observations_before": obs_before,
        "anchor_image": labels[order.index(seen[0])],
    }
    return rec, stats


def _link_images(source: Path, names: list[str], dest: Path) -> tuple[list[str], Path]:
    """Links (copies where links fail) to ``source/names`` under safe names in ``dest``: COLMAP's pair lists
    are space-separated, so names with spaces cannot be matched by list."""
    from .colmap import sfm_file_names

    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    files = [str(Path(safe).with_suffix(Path(n).suffix.lower())) for safe, n in zip(sfm_file_names(names), names)]
    for f, n in zip(files, names):
        src = (source / n).resolve()
        try:
            os.symlink(src, dest / f)
        except OSError:
            shutil.copy2(src, dest / f)
    return files, dest


def _focal_change(rec, model) -> float:
    """The largest relative change of a focal length between ``model`` (the input) and ``rec``."""
    out = 0.0
    for cid, cam in model.cameras.items():
        n = cam.info.num_focal
        for a, b in zip(rec.camera(cid).params[:n], cam.params[:n]):
            out = max(out, abs(float(a) / float(b) - 1.0))
    return out


def _advice(no_features: list[str]) -> str:
    why = f"no SIFT features in {', '.join(no_features[:5])}; " if no_features else ""
    return (
        f"{why}the images may overlap too little or lack texture for SIFT tracks. Run without bundle adjustment "
        "(drop --pose-ba) to keep the network's poses"
    )


def bundle_adjust(
    images: Tensor | str | os.PathLike,  # [V, 3, H, W] float in [0, 1], or a folder holding the image files
    cameras: Cameras,  # batch [V], W x H, OpenCV cam_to_world, K in pixels; the initial guess
    work_dir: str | os.PathLike,  # scratch folder (database, models; the images when given as tensors)
    options: BundleAdjustOptions | None = None,
    *,
    names: Sequence[str] | None = None,  # [V] folder: files in it (default: all); tensors: names to write
    **overrides,  # fields of BundleAdjustOptions, e.g. refine_focal=False
) -> BundleAdjustResult:
    """Refine ``cameras`` (poses and focal lengths) by bundle adjustment on SIFT tracks.

    Returns the refined cameras in the input order (the first image's pose is kept, and the scale),
    the triangulated points with their colours, and an info dict. Raises
    :class:`~vision3d.poses.base.PoseEstimationError` when too few points can be triangulated.
    """
    from vision3d.geometry.colmap import read_colmap, write_colmap
    from vision3d.utils.optional import require

    known = {f.name for f in fields(BundleAdjustOptions)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"bundle_adjust: unknown option(s) {bad}; BundleAdjustOptions has {sorted(known)}")
    o = replace(options or BundleAdjustOptions(), **overrides)
    pycolmap = require("pycolmap", "bundle adjustment of estimated poses")
    t0 = time.perf_counter()
    cams = cameras.flatten() if len(cameras.batch_shape) != 1 else cameras
    V = cams.batch_shape[0]
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("database.db", "database.db-wal", "database.db-shm", "pairs.txt"):
        (work / stale).unlink(missing_ok=True)
    for sub in ("input", "triangulated", "refined"):
        shutil.rmtree(work / sub, ignore_errors=True)

    if isinstance(images, Tensor):
        from .colmap import sfm_file_names
        from vision3d.utils.images import save_png

        if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != V:
            raise ValueError(f"bundle_adjust: images must be [{V}, 3, H, W] for {V} cameras, got {tuple(images.shape)}")
        if (images.shape[-1], images.shape[-2]) != (cams.width, cams.height):
            raise ValueError(
                f"bundle_adjust: images are {images.shape[-1]}x{images.shape[-2]}, cameras {cams.width}x{cams.height}"
            )
        labels = list(names) if names is not None else [f"{i:05d}.png" for i in range(V)]
        if len(labels) != V:
            raise ValueError(f"bundle_adjust: {len(labels)} names for {V} images")
        files = sfm_file_names(labels)
        image_dir = work / "images"
        shutil.rmtree(image_dir, ignore_errors=True)
        image_dir.mkdir()
        for f, im in zip(files, images.detach().cpu()):
            save_png(image_dir / f, im)
        where = str(work)
    else:
        source = Path(images)
        if names is None:
            from vision3d.data.folder import list_images

            labels = [p.name for p in list_images(source)]
        else:
            labels = [str(n) for n in names]
            absent = [f for f in labels if not (source / f).is_file()]
            if absent:
                raise FileNotFoundError(f"{source}: images {absent[:5]} not found")
        if len(labels) != V:
            raise ValueError(f"{source}: {len(labels)} images for {V} cameras")
        files, image_dir = _link_images(source, labels, work / "images")
        where = str(source)
    if V < 2:
        raise ValueError(f"{where}: bundle adjustment needs at least 2 images, got {V}")

    from tqdm.auto import tqdm

    level = pycolmap.logging.minloglevel
    if not o.verbose:
        pycolmap.logging.minloglevel = 2  # errors only
    bar = tqdm(total=o.rounds + 4, desc="bundle adjust", disable=not o.progress, leave=False)
    try:
        pycolmap.set_random_seed(o.seed)
        input_model, model_name = _colmap_input(cams, files, o)
        database = work / "database.db"
        extract_sift(pycolmap, database, image_dir, files, camera_model=model_name, single_camera=o.shared_camera,
                     max_num_features=o.max_num_features, num_threads=o.num_threads)
        bar.update()
        method = o.matcher if o.matcher != "auto" else ("exhaustive" if V <= o.max_exhaustive else "poses")
        pairs_file = None
        if method == "poses":
            from vision3d.utils.io import write_text_atomic

            pairs_file = work / "pairs.txt"
            pairs = pose_neighbour_pairs(cams, o.num_neighbors)
            write_text_atomic(pairs_file, "".join(f"{files[i]} {files[j]}\n" for i, j in pairs))
        match_features(pycolmap, database, "pairs" if method == "poses" else method, num_threads=o.num_threads,
                       seed=o.seed, sequential_overlap=o.sequential_overlap, pairs_file=pairs_file)
        bar.update()
        t_match = time.perf_counter() - t0

        label = dict(zip(files, labels))
        model, no_features = _to_database_ids(pycolmap, input_model, database, label, cams.width, cams.height, where)
        db_id = {im.name: i for i, im in model.images.items()}
        order = [db_id[f] for f in files]  # database image ids in input order
        partners = _verified_pairs(pycolmap, database)
        unmatched = [n for n, i in zip(labels, order) if partners.get(i, 0) == 0]
        if len(unmatched) == V:
            raise PoseEstimationError(f"{where}: no image pair could be matched; {_advice(no_features)}")
        input_dir = work / "input"
        write_colmap(model, input_dir, binary=False)

        rec, stats = _refine(pycolmap, input_dir, database, image_dir, work, order, o, o.refine_focal, where, bar,
                             labels, no_features)
        focal_change = _focal_change(rec, model)
        fallback = False
        if o.refine_focal and focal_change > o.max_focal_change:
            log.warning(
                "bundle adjustment moved a focal length by %.0f%% (> %.0f%%): ill-conditioned (e.g. an orbit around "
                "one point); redone with the focal lengths fixed", 100 * focal_change, 100 * o.max_focal_change,
            )
            bar.reset(total=o.rounds + 4)
            bar.update(2)
            rec, stats = _refine(pycolmap, input_dir, database, image_dir, work, order, o, False, where, bar,
                                 labels, no_features)
            fallback, rejected, focal_change = True, focal_change, 0.0
    finally:
        bar.close()
        pycolmap.logging.minloglevel = level

    out_dir = work / "refined"
    out_dir.mkdir()
    rec.write_text(str(out_dir))
    refined = read_colmap(out_dir)
    new, _, _ = refined.to_cameras(order, sort_by_name=False, dtype=torch.float64)
    like = {"dtype": cams.K.dtype, "device": cams.K.device}
    result_cams = Cameras(new.K.to(**like), new.cam_to_world.to(**like), cams.width, cams.height, cams.near, cams.far)
    pts = refined.points_xyz().float()
    cols = float_colors(refined.points_rgb())
    unrefined = [n for n, i in zip(labels, order) if rec.image(i).num_points3D == 0]
    if unrefined:
        log.warning("bundle adjustment: %d image(s) saw no points and keep their poses: %s", len(unrefined),
                    ", ".join(unrefined[:8]))
    info = {
        "pycolmap": getattr(pycolmap, "__version__", "?"),
        "matcher": method,
        "camera_model": model_name,
        "shared_camera": o.shared_camera,
        **stats,
        "reprojection_error_after": float(rec.compute_mean_reprojection_error()),
        "points": int(pts.shape[0]),
        "observations": int(rec.compute_num_observations()),
        "mean_track_length": float(rec.compute_mean_track_length()),
        "focal_refined": o.refine_focal and not fallback,
        "focal_change": focal_change,
        "unmatched_images": unmatched,
        "unrefined_images": unrefined,
        "time_s": {"features_and_matching": t_match, "total": time.perf_counter() - t0},
        "work_dir": str(work),
    }
    if fallback:
        info["rejected_focal_change"] = rejected
    return BundleAdjustResult(result_cams, pts, cols, info)
