"""Photos or a video -> posed images -> a fitted 3D Gaussian scene -> a run folder.

The library side of ``vision3d reconstruct``. Stages:

1. **Input** (:mod:`vision3d.data.folder`): an image folder (EXIF orientation; every photo keeps its
   own size and intrinsics by default, as gsplat's COLMAP parser and nerfstudio do, so mixed sizes
   travel as lists through every stage; unreadable files are listed at once) or a video (evenly spread frames, the sharpest per window); optional known cameras
   (``--cameras``, or ``transforms.json`` / ``sparse/0`` / ``cameras.txt`` found beside the photos);
   downscaled so the longest side is at most ``pose_max_size`` for pose estimation, then to ``max_size``.
2. **Poses** (:mod:`vision3d.poses`): a registered pose estimator (``known``, ``colmap``...). Its
   result is written to the run folder as ``images/`` (the posed, undistorted, resized images as
   PNG) and ``cameras/`` (a COLMAP text model with the sparse points, and a ``transforms.json``
   pointing at ``../images``); every later stage, and ``--resume``, reads them back from there.
3. **Initial Gaussians**: on the SfM points (3DGS's initialisation, scales from the 3 nearest
   neighbours) or uniformly random in a cube around the point the cameras look at (gsplat's
   ``init_type="random"``, ``examples/simple_trainer.py``, nerfstudio-project/gsplat v1.5.3, Apache-2.0).
4. **Refinement**: :func:`vision3d.train.scene_fit.fit_scene` on every image except each
   ``holdout_every``-th (index ``i % holdout_every == 0`` is held out, as in gsplat's and
   nerfstudio's parsers). Checkpoints (``ckpt/state.pt``, the whole
   :class:`~vision3d.train.scene_fit.FitState`: raw tensors, Adam moments, densification statistics,
   view order and RNG states; ``ckpt/scene.ply``, its Gaussians) every ``ckpt_every`` steps, after the
   last step and on Ctrl-C; ``resume`` continues exactly (bit-identical to an uninterrupted run on the
   CPU) and refuses a config that would change the result.
   With ``fit.appearance`` each training photo gets an appearance embedding
   (:class:`~vision3d.train.scene_fit.AppearanceModel`), ``scene.ply`` holds the Gaussians with
   the mean embedding's colour transform baked in, and the held-out photos are also scored by the
   protocol of collections with varying appearance (embedding fitted on the left half, PSNR/SSIM
   of the right half; NeRF-W, Martin-Brualla et al., CVPR 2021, arXiv 2008.02268), beside the plain
   metric; ``fit.pose_opt`` refines the training cameras (gsplat's ``pose_opt``).
5. **Outputs** (every file written atomically): ``scene.ply`` (INRIA layout), ``renders/<name>.png``
   (held-out render | photo), ``metrics.json``, ``video.mp4`` along a smooth path through the
   cameras (:func:`vision3d.poses.path.smooth_camera_path`), and with ``mesh`` a TSDF fusion of the
   rendered depth with open3d (Zhou, Park, Koltun, "Open3D", arXiv 1801.09847; MIT) saved as
   ``mesh.ply``.

**Run folder life cycle.** ``run.json`` marks the folder as ours and keeps the time of earlier,
interrupted runs (the summary's total covers all of them). A pose stage that did not finish
(Ctrl-C, a failed SfM: no ``cameras/poses.json``) is started again by the same command, with or
without ``--resume``; after the pose stage ``--resume`` continues the fit from ``ckpt/state.pt``.
Invalid input leaves no run folder behind.

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras
from vision3d.train.scene_fit import SceneFitConfig
from vision3d.utils.io import to_plain

log = logging.getLogger(__name__)

__all__ = [
    "ReconstructConfig",
    "VIDEO_EXTENSIONS",
    "reconstruct",
    "find_known_cameras",
    "load_input",
    "holdout_split",
    "random_init",
    "load_run",
]

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
MIN_IMAGES = 3


def _default_fit() -> SceneFitConfig:
    return SceneFitConfig(
        steps=1000,
        batch_views=1,
        lr_means_final_factor=0.01,
        lr_scales=5e-3,
        lr_opacities=5e-2,
        lr_sh0=5e-3,
        ssim_weight=0.2,
        sh_degree=0,
        densify="default",
        refine_start=200,
        refine_every=100,
        reset_every=3000,
        log_every=10,
    )


@dataclass
class ReconstructConfig:
    input: Path
    """A folder of photos or a video file."""

    out: Path
    """Run folder to write (refused if it is not empty, unless --resume or --overwrite)."""

    poses: str = "colmap"
    """Pose estimator: colmap (incremental SfM with pycolmap, the [sfm] extra), known (given cameras), or a feed-forward network: vggt | flashvggt (needs --pose-weights)."""

    pose_weights: Path | None = None
    """--poses vggt|flashvggt: the model weights (the authors' checkpoint or a `vision3d convert` output)."""

    cameras: Path | None = None
    """Known cameras: a COLMAP model folder or a transforms.json (default: looked for beside the photos)."""

    sfm_threads: int = 1
    """--poses colmap: CPU threads of feature extraction, matching and mapping. 1 (default): the same command registers the same photos every run (COLMAP is seeded with --seed); -1 uses every core, faster, but multi-threaded mapping may register a different set from run to run."""

    camera_mode: Literal["auto", "single", "per-folder", "per-image"] = "auto"
    """--poses colmap: which photos share one camera (intrinsics). auto: single when every photo has the same size and the same EXIF camera and focal length (a walk with one camera, a video, frames without EXIF), else per-image (internet photos, several cameras or zooms)."""

    min_registered_fraction: float = 0.6
    """--poses colmap: refuse the run (listing the photos left out) when SfM registers fewer than this share of the photos."""

    allow_partial: bool = False
    """--poses colmap: continue with the registered photos even when fewer than --min-registered-fraction register."""

    keep_sfm: bool = True
    """Keep sfm/ (COLMAP's work folder: the images it saw, database.db, sparse/ models, undistorted/, colmap.log; often most of the run folder's size); --no-keep-sfm deletes it once the poses are in images/ and cameras/."""

    verbose: bool = False
    """Show COLMAP's own log on the terminal (otherwise it is written to sfm/colmap.log)."""

    skip_unreadable: bool = False
    """Leave out photos that cannot be decoded (they are listed) instead of stopping."""

    pose_ba: bool = False
    """--poses vggt|flashvggt: refine the predicted cameras by bundle adjustment on SIFT matches (pycolmap, the [sfm] extra), as VGGT's demo does."""

    init: str = "sfm"
    """Initial Gaussians: sfm (on the SfM / known sparse points; random when there are none), random, or a feed-forward reconstructor whose output is Gaussians (ilrm_re10k, ilrm_dl3dv, ilrm_dl3dv_wide; needs --init-weights)."""

    init_weights: Path | None = None
    """--init <reconstructor>: its weights (the authors' checkpoint or a `vision3d convert` output)."""

    steps: int | None = None
    """Optimisation steps (None: 7000 on a GPU, 1000 on the CPU)."""

    device: str = "auto"
    """Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1..."""

    holdout_every: int = 8
    """Hold out every Nth image (index % N == 0) for evaluation; 0 holds out none."""

    max_size: int | None = None
    """Downscale so the longest image side is at most this (None: 1600 on a GPU, 320 on the CPU)."""

    pose_max_size: int = 1024
    """Longest image side for pose estimation (SfM features); the posed images are then downscaled to --max-size for the fit. SIFT on 320-px images registers far fewer photos (kitchen: 10/25 at 318 px)."""

    size_policy: Literal["keep", "crop", "error"] = "keep"
    """Photos of different sizes: keep (each keeps its own size and intrinsics through SfM, fitting, evaluation and export), crop (centre-crop every photo to the size of the majority aspect ratio), or error."""

    video_frames: int = 48
    """Frames taken from a video (spread evenly)."""

    sharpness_window: int = 5
    """Video: candidates per frame slot; the sharpest (variance of the Laplacian) is kept."""

    max_init_gaussians: int | None = None
    """Most initial Gaussians (points subsampled; None: 300k on a GPU, 20k on the CPU)."""

    random_init_count: int | None = None
    """Gaussians of the random initialisation (None: 100k on a GPU, 5k on the CPU)."""

    init_opacity: float = 0.1
    """Opacity of every initial Gaussian."""

    ckpt_every: int = 500
    """Steps between checkpoints (ckpt/state.pt: the whole fit state; ckpt/scene.ply: its Gaussians); one is also written after the last step and on Ctrl-C."""

    resume: bool = False
    """Continue an interrupted run in --out from its images/, cameras/ and ckpt/state.pt, exactly as if it had not stopped; refused when a setting that changes the result differs (the outputs' settings may change)."""

    overwrite: bool = False
    """Write into a non-empty --out, replacing files of the same names."""

    video: bool = True
    """Write video.mp4 along a smooth path through the cameras."""

    video_path_frames: int = 120
    """Frames of video.mp4."""

    video_width: int | None = None
    """Width of video.mp4 (None: the training width); the height keeps the aspect ratio."""

    fps: float = 30.0
    """Frame rate of video.mp4."""

    mesh: bool = False
    """Also fuse the rendered depth into a mesh (TSDF, open3d; the [mesh] extra) -> mesh.ply."""

    mesh_voxel: float | None = None
    """TSDF voxel size in world units (None: 1/256 of the scene's extent)."""

    lpips: bool = True
    """Report LPIPS in metrics.json when its weights are on disk (never downloads)."""

    seed: int = 0
    """Seed of the random initialisation, the view order and SfM."""

    progress: bool = True
    """Show progress bars."""

    view: bool = False
    """Open the viewer (the [viewer] extra) on the scene being fitted, updated every fit.log-every steps, with a
    pause button; it closes when the fit ends (then: vision3d view OUT)."""

    view_port: int = 8080
    """Port of the --view viewer (on 127.0.0.1; 0 picks a free one)."""

    fit: SceneFitConfig = field(default_factory=_default_fit)
    """Refinement settings (fit.steps and fit.seed come from --steps and --seed). Default: the 3DGS loss, gsplat's DefaultStrategy refining every 100 steps from step 200 (mcmc needs a GPU)."""


# ------------------------------------------------------------------ input
def find_known_cameras(source: Path) -> Path | None:
    """A camera file beside the photos: ``transforms.json``, ``sparse/0``, ``sparse`` or a COLMAP model."""
    from vision3d.geometry.colmap import find_colmap_model

    folder = source if source.is_dir() else source.parent
    for d in (folder, folder.parent):
        if (d / "transforms.json").is_file():
            return d / "transforms.json"
        try:
            return find_colmap_model(d)[0]
        except ValueError:
            continue
    return None


def _is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def load_input(cfg: ReconstructConfig, max_size: int | None, with_cameras: bool):
    """The input as a :class:`~vision3d.poses.base.PoseInput` (images downscaled to ``max_size``)."""
    from vision3d.data.folder import IMAGE_EXTENSIONS, list_images, load_images, load_video, unread_files_hint
    from vision3d.poses.base import PoseInput

    src = Path(cfg.input)
    points = colors = None
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such photo folder or video")
    if src.is_file():
        if src.suffix.lower() not in VIDEO_EXTENSIONS:
            raise ValueError(
                f"{src}: not a folder of photos nor a video (expected a folder, or a file ending in "
                f"{', '.join(VIDEO_EXTENSIONS)})"
            )
        if with_cameras:
            raise ValueError(f"{src}: --poses known needs photos with cameras; a video has none (use --poses colmap)")
        if cfg.video_frames < MIN_IMAGES:
            raise ValueError(f"--video-frames must be at least {MIN_IMAGES}, got {cfg.video_frames}")
        try:
            s = load_video(src, cfg.video_frames, sharpness_window=cfg.sharpness_window)
        except ValueError as e:
            raise ValueError(f"{e}. Re-encode it (e.g. ffmpeg -i {src.name} -c:v libx264 out.mp4) or extract the "
                             "frames into a folder and pass the folder") from e
        if len(s.names) < cfg.video_frames:
            log.warning("%s: %d distinct frames decoded, fewer than --video-frames %d", src, len(s.names),
                        cfg.video_frames)
        is_video, cams = True, None
    else:
        files = list_images(src)
        if len(files) < MIN_IMAGES:
            raise ValueError(
                f"{src}: found {len(files)} image(s) with extensions {', '.join(IMAGE_EXTENSIONS)}; "
                f"reconstruction needs at least {MIN_IMAGES} overlapping photos"
                + (f" ({hint})" if (hint := unread_files_hint(src)) else "")
            )
        cam_path = None
        if with_cameras:
            cam_path = Path(cfg.cameras) if cfg.cameras is not None else find_known_cameras(src)
            if cam_path is None:
                raise ValueError(
                    f"{src}: --poses known needs cameras: pass --cameras PATH (a COLMAP model folder or a "
                    "transforms.json), or put transforms.json or sparse/0 beside the photos; or use --poses colmap"
                )
            if not cam_path.exists():
                raise FileNotFoundError(f"{cam_path}: --cameras not found")
        s = load_images(files, cameras=cam_path, size_policy=cfg.size_policy, source=src,
                        skip_unreadable=cfg.skip_unreadable)
        is_video, cams = False, s.cameras
        if cam_path is not None and cam_path.suffix.lower() != ".json":
            from vision3d.geometry.colmap import read_colmap
            from vision3d.poses.base import float_colors

            model = read_colmap(cam_path)
            if model.points3D:
                points, colors = model.points_xyz().float(), float_colors(model.points_rgb())
    images, cams = _cap_size(s.images, cams, max_size)
    names = list(s.names)
    if len(names) < MIN_IMAGES:
        raise ValueError(f"{src}: only {len(names)} usable image(s); reconstruction needs at least {MIN_IMAGES}")
    return PoseInput(images=images, names=names, source=src, cameras=cams, is_video=is_video, points=points,
                     colors=colors)


def holdout_split(n: int, every: int) -> tuple[list[int], list[int]]:
    """``(train, test)`` indices: ``i % every == 0`` is held out (none when ``every <= 0``)."""
    test = [i for i in range(n) if every > 0 and i % every == 0]
    train = [i for i in range(n) if i not in set(test)]
    if len(train) < 2:
        raise ValueError(
            f"holding out every {every}th of {n} images leaves {len(train)} for training; need at least 2 "
            "(raise --holdout-every or pass 0)"
        )
    return train, test


# ------------------------------------------------------------------ initialisation
def look_target(cameras: Cameras) -> Tensor:  # -> [3] world
    """The point nearest (least squares) to every optical axis; the centres' mean + forward for parallel axes."""
    c = cameras.flatten().to(dtype=torch.float64)
    o, d = c.centers, c.rotation[..., :, 2]  # [V, 3], [V, 3] unit forward
    eye = torch.eye(3, dtype=torch.float64)
    P = eye - d[:, :, None] * d[:, None, :]  # [V, 3, 3] projectors orthogonal to each axis
    A, b = P.sum(0), (P @ o[:, :, None]).sum(0)[:, 0]
    ev = torch.linalg.eigvalsh(A)
    if float(ev[0]) > 1e-3 * float(ev[-1]):
        x = torch.linalg.solve(A, b)
        if bool(((x - o) * d).sum(-1).median() > 0):  # in front of most cameras
            return x
    from vision3d.train.scene_fit import camera_scene_scale

    return o.mean(0) + d.mean(0) * camera_scene_scale(c)


def random_init(
    cameras: Cameras | list[Cameras],  # [V] training cameras (or V of batch [1])
    images: Tensor | list[Tensor],  # [V, 3, H, W] in [0, 1] (or V of [3, H_i, W_i])
    num: int,
    opacity: float,
    generator: torch.Generator,
    sh_degree: int = 0,
) -> Gaussians:
    """``num`` Gaussians uniform in a cube around :func:`look_target` (half-size: the camera scene scale)."""
    from vision3d.train.scene_fit import camera_scene_scale, gaussians_from_points

    cameras = _common_size_cameras(cameras)
    centre = look_target(cameras).float()
    half = camera_scene_scale(cameras)
    pts = centre + (torch.rand(num, 3, generator=generator) * 2 - 1) * half
    if isinstance(images, (list, tuple)):
        mean_rgb = torch.stack([im.mean(dim=(1, 2)) for im in images]).mean(0)
    else:
        mean_rgb = images.mean(dim=(0, 2, 3))
    rgb = (mean_rgb + 0.1 * (torch.rand(num, 3, generator=generator) - 0.5)).clamp(0, 1)
    return gaussians_from_points(pts, rgb, opacity=opacity, sh_degree=sh_degree)


# ------------------------------------------------------------------ run folder
def _downscale_result(result, max_size: int | None):
    """The pose result with its images (and cameras) downscaled so the longest side is at most ``max_size``."""
    images, cams = _cap_size(result.images, result.cameras, max_size)
    return replace(result, images=images, cameras=cams)


def _cap_size(images, cameras, max_size: int | None):
    """Images (``[V, 3, H, W]`` or a list of ``[3, H_i, W_i]``) and their cameras (or None) downscaled so
    each longest side is at most ``max_size``, aspect kept."""
    from vision3d.data.preprocess import resize_and_center_crop

    def one(x, cam):  # [V, 3, H, W]
        h, w = x.shape[-2:]
        if max_size is None or max(h, w) <= max_size:
            return x, cam
        f = max_size / max(h, w)
        return resize_and_center_crop(x, cam, (max(1, round(h * f)), max(1, round(w * f))), "area")

    if not isinstance(images, (list, tuple)):
        return one(images, cameras)
    out = [one(im[None], None if cameras is None else cameras[i]) for i, im in enumerate(images)]
    return [x[0] for x, _ in out], None if cameras is None else [c for _, c in out]


def _stack_if_uniform(images, cameras):
    """Lists of one size become ``[V, 3, H, W]`` and a batch-``[V]`` Cameras; mixed sizes stay lists."""
    if not isinstance(images, (list, tuple)):
        return images, cameras
    if len({tuple(im.shape) for im in images}) == 1:
        return torch.stack(list(images)), Cameras.cat(list(cameras), 0)
    return list(images), list(cameras)


def _common_size_cameras(cameras) -> Cameras:
    """A batch-``[V]`` Cameras of the views' poses at one size (the first view's), for the video path and the mesh."""
    if isinstance(cameras, Cameras):
        return cameras
    w, h = cameras[0].width, cameras[0].height
    return Cameras.cat([c.resize_and_center_crop(w, h) for c in cameras], 0)


def _views(images, cameras, idx: list[int]):
    if isinstance(images, (list, tuple)):
        return [images[i] for i in idx], [cameras[i] for i in idx]
    return images[idx], cameras[torch.tensor(idx, dtype=torch.long)]


def colmap_model_of(cameras, files: list[str], points: Tensor | None = None, colors: Tensor | None = None):
    """COLMAP model of a run's cameras: a batch ``[V]`` Cameras, or one Cameras per photo when sizes differ
    (then one COLMAP camera per photo)."""
    from vision3d.geometry.colmap import ColmapModel

    if isinstance(cameras, Cameras):
        return ColmapModel.from_cameras(cameras, files, points, colors)
    model = ColmapModel.from_cameras(cameras[0], files[:1], points, colors)
    for i, (c, f) in enumerate(zip(cameras[1:], files[1:]), start=2):
        one = ColmapModel.from_cameras(c, [f])
        cam, im = one.cameras[1], one.images[1]
        cam.id, im.id, im.camera_id = i, i, i
        model.cameras[i], model.images[i] = cam, im
    return model


def write_posed(out: Path, result, progress: bool) -> None:
    from vision3d.geometry.colmap import write_colmap
    from vision3d.geometry.transforms_json import write_transforms_json
    from vision3d.poses.colmap import sfm_file_names
    from vision3d.utils.images import save_png
    from vision3d.utils.io import write_text_atomic

    files = sfm_file_names(result.names)
    for f, im in zip(files, result.images):
        save_png(out / "images" / f, im)
    model = colmap_model_of(result.cameras, files, result.points, result.colors)
    write_transforms_json(out / "cameras" / "transforms.json", result.cameras, [f"../images/{f}" for f in files])
    write_colmap(model, out / "cameras", binary=False)
    write_text_atomic(out / "cameras" / "poses.json",
                      json.dumps({"names": result.names, "files": files, "info": result.info}, indent=2, default=str))


def load_run(run: str | os.PathLike):
    """``(images [V, 3, H, W], files [V], cameras [V], points [P, 3] or None, colors [P, 3] or None, info)``
    of a run folder's ``images/`` and ``cameras/`` (per-photo sizes: images and cameras are lists, one each)."""
    from vision3d.data.folder import load_images
    from vision3d.geometry.colmap import read_colmap
    from vision3d.poses.base import float_colors

    run = Path(run)
    meta_path = run / "cameras" / "poses.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; {run} is not a finished pose stage of vision3d reconstruct")
    meta = json.loads(meta_path.read_text())
    files = meta["files"]
    s = load_images([run / "images" / f for f in files], cameras=run / "cameras", source=run, size_policy="keep")
    images, cams = _stack_if_uniform(s.images, s.cameras)
    model = read_colmap(run / "cameras")
    pts = cols = None
    if model.points3D:
        pts, cols = model.points_xyz().float(), float_colors(model.points_rgb())
    return images, files, cams, pts, cols, meta.get("info", {})


def _side_by_side(pred: Tensor, gt: Tensor) -> Tensor:  # [3, H, W] x2 -> [3, H, 2W + 2]
    return torch.cat([pred, torch.ones(3, pred.shape[1], 2), gt], -1)


# ------------------------------------------------------------------ checkpoints
_CKPT_FORMAT = "vision3d.reconstruct/fit-state-1"
# settings a resume may change: they shape the outputs, not the fitted Gaussians (fit.steps/seed are unused)
_RESUME_FREE = ("out", "resume", "overwrite", "progress", "ckpt_every", "video", "video_path_frames", "video_width",
                "fps", "mesh", "mesh_voxel", "lpips", "view", "view_port")
_RESUME_FREE_FIT = ("fit.progress", "fit.log_every", "fit.steps", "fit.seed")
# settings of stages 1-2, which a resume does not rerun (it reads the run folder's images/ and cameras/)
_POSE_STAGE = ("input", "poses", "pose_weights", "pose_ba", "cameras", "sfm_threads", "max_size", "pose_max_size", "size_policy",
               "video_frames", "sharpness_window")


def _save_fit_checkpoint(ckpt_dir: Path, state, run_config: dict, init_info: dict) -> None:
    """``ckpt/scene.ply`` (the state's Gaussians), then ``ckpt/state.pt`` (tensors and plain containers), atomically."""
    from vision3d.gaussians.ply import save_ply
    from vision3d.utils.io import atomic_path

    save_ply(ckpt_dir / "scene.ply", state.gaussians())
    with atomic_path(ckpt_dir / "state.pt") as tmp:
        torch.save({"format": _CKPT_FORMAT, "config": run_config, "init": init_info, "fit": state.state_dict()}, tmp)


def _load_fit_checkpoint(ckpt_dir: Path, run_cfg: ReconstructConfig):
    """``(FitState, init info)`` of ``ckpt/state.pt``, or None without one; refuses a checkpoint of an older layout
    or of a run whose settings (those that change the result) differ from ``run_cfg``."""
    from vision3d.train.config import diff_configs, from_dict
    from vision3d.train.scene_fit import FitState
    from vision3d.utils.io import read_checkpoint

    path = ckpt_dir / "state.pt"
    if not path.is_file():
        if (ckpt_dir / "state.json").is_file():
            raise ValueError(f"{ckpt_dir}: a checkpoint of an older vision3d (state.json, no state.pt) that cannot be "
                             f"resumed exactly; delete {ckpt_dir} to refit from the posed images with --resume, or "
                             "start afresh with --overwrite")
        return None
    data = read_checkpoint(path)
    if not isinstance(data, dict) or data.get("format") != _CKPT_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not a vision3d reconstruct checkpoint (format {got!r}, expected {_CKPT_FORMAT!r}); "
                         f"delete {ckpt_dir} to refit with --resume, or start afresh with --overwrite")
    saved = dict(data["config"])
    saved_cfg = replace(from_dict(ReconstructConfig, {**saved, "fit": {}}, str(path)),
                        fit=from_dict(SceneFitConfig, saved["fit"], str(path), "fit."))
    diffs = [d for d in diff_configs(saved_cfg, run_cfg, ignore=_RESUME_FREE)
             if d.split(":", 1)[0] not in _RESUME_FREE_FIT]
    pose = [d for d in diffs if d.split(":", 1)[0] in _POSE_STAGE]
    other = [d for d in diffs if d not in pose]
    if other:
        raise ValueError(f"{path}: the run was started with another config; differences: {'; '.join(other)}. Resume "
                         "with the original settings, or start afresh with --overwrite")
    if pose:
        log.warning("resuming with the run folder's posed images and cameras; ignored: %s", "; ".join(pose))
    return FitState.from_state_dict(data["fit"], source=str(path)), dict(data["init"])


# ------------------------------------------------------------------ the pipeline
_RUN_FILE = "run.json"  # marks a run folder of ours; holds the time spent by earlier (interrupted) runs
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


def _check_out(cfg: ReconstructConfig) -> Path:
    from vision3d.utils.io import check_writable_dir

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is a file; expected a run folder")
    ours = (out / _RUN_FILE).is_file()
    posed = (out / "cameras" / "poses.json").is_file()
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        if ours and not posed:  # an interrupted or failed pose stage: start it again, with or without --resume
            log.warning("%s: the pose stage did not finish last time; starting it again", out)
            for d in ("sfm", "images", "cameras"):
                shutil.rmtree(out / d, ignore_errors=True)
        elif not cfg.resume:
            raise FileExistsError(f"{out}: run folder exists and is not empty; add --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out")
        elif not posed:
            raise FileExistsError(f"{out}: not a vision3d reconstruct run folder (no {_RUN_FILE}); choose another "
                                  "--out, or add --overwrite to write into it")
    return check_writable_dir(out)


def _pose_stage(cfg: ReconstructConfig, out: Path, dev: torch.device, max_size: int) -> None:
    """Stages 1-2: load the input, estimate the poses, write ``images/`` and ``cameras/`` (``poses.json`` last)."""
    from vision3d.poses.base import create_pose_estimator

    kw: dict = {}
    if cfg.poses == "colmap":
        kw = {"seed": cfg.seed, "num_threads": cfg.sfm_threads, "camera_mode": _camera_mode(cfg),
              "min_registered_fraction": cfg.min_registered_fraction, "allow_partial": cfg.allow_partial,
              "verbose": cfg.verbose, "progress": cfg.progress}
    elif cfg.poses in ("vggt", "flashvggt"):
        kw = {"weights": cfg.pose_weights, "device": dev}
        if cfg.pose_ba:
            kw.update(bundle_adjust=True,
                      ba_options={"num_threads": cfg.sfm_threads, "seed": cfg.seed, "progress": cfg.progress})
    estimator = create_pose_estimator(cfg.poses, **kw)
    pose_size = max_size if cfg.poses == "known" else max(max_size, cfg.pose_max_size)
    load_cfg = cfg
    if cfg.poses not in ("colmap", "known") and cfg.size_policy == "keep":  # a network takes one size
        load_cfg = replace(cfg, size_policy="crop")
    inputs = load_input(load_cfg, pose_size, with_cameras=estimator.needs_known_cameras)
    result = _downscale_result(estimator.estimate(inputs, out / "sfm"), max_size)
    result.info.setdefault("input_images", len(inputs.names))
    write_posed(out, result, cfg.progress)


def _camera_mode(cfg: ReconstructConfig) -> str:
    """--camera-mode auto: single when every photo has one size and the same EXIF camera and focal length (or
    none of them has EXIF, as frames extracted from one video), else per-image."""
    if cfg.camera_mode != "auto":
        return cfg.camera_mode
    src = Path(cfg.input)
    if src.is_file():
        return "single"  # one video, one camera
    from vision3d.data.folder import exif_camera, list_images

    keys = {exif_camera(p) for p in list_images(src)}
    return "single" if len(keys) == 1 and None not in keys else "per-image"  # e.g. frames of one video


def _progress(it, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="view" if desc == "eval" else "frame", dynamic_ncols=True, leave=False)


def _evaluate(cfg, out: Path, fitted, app, test_imgs, test_cams, names: list[str], bg: Tensor, backend: str):
    """Held-out metrics and ``renders/<name>.png`` (render | photo). With an appearance model the renders use the
    mean training embedding, and the collection protocol (NeRF-W) is reported beside: each held-out photo's
    embedding is fitted on its left half and PSNR/SSIM scored on its right half, with and without that fit."""
    from vision3d.eval.metrics import Metrics, psnr, ssim
    from vision3d.train.scene_fit import fit_view_appearance
    from vision3d.utils.images import save_png

    metrics_obj = Metrics(lpips_net="vgg" if cfg.lpips else None, require_lpips="auto")
    per_view, halves = [], {"fitted": [], "mean": []}
    for j in _progress(range(len(names)), cfg.progress, "eval"):
        im, cam = _views(test_imgs, test_cams, [j])
        cam = cam[0] if isinstance(cam, list) else cam
        gt = (im[0][None] if isinstance(im, list) else im).to(bg.device)
        with torch.no_grad():
            raw = rasterize_view(fitted, cam, bg, backend)
            pred = raw if app is None else app.apply(raw, app.mean_code()[None])
        pred = pred.clamp(0, 1)
        m = metrics_obj(pred.cpu(), gt.cpu())
        w = gt.shape[-1] // 2
        entry = {"image": names[j], **m, "psnr_right_half": float(psnr(pred[..., w:], gt[..., w:]))}
        if app is not None:
            mask = torch.zeros(gt.shape[-2:], dtype=torch.bool, device=gt.device)
            mask[:, :w] = True
            with torch.enable_grad():
                code = fit_view_appearance(app, raw[0], gt[0], mask)
            with torch.no_grad():
                fit_pred = app.apply(raw, code[None]).clamp(0, 1)
            for key, p in (("fitted", fit_pred), ("mean", pred)):
                halves[key].append((float(psnr(p[..., w:], gt[..., w:])), float(ssim(p[..., w:], gt[..., w:]).mean())))
            entry["psnr_right_half_fitted_appearance"] = halves["fitted"][-1][0]
        per_view.append(entry)
        save_png(out / "renders" / f"{Path(names[j]).stem}.png", _side_by_side(pred[0].cpu(), gt[0].cpu()))
    app_metrics = None
    if app is not None and names:
        n = len(names)
        app_metrics = {
            "protocol": "appearance embedding fitted on the left half of each held-out photo, scored on the right half",
            "psnr_right_half_fitted": sum(p for p, _ in halves["fitted"]) / n,
            "ssim_right_half_fitted": sum(q for _, q in halves["fitted"]) / n,
            "psnr_right_half_mean_embedding": sum(p for p, _ in halves["mean"]) / n,
            "ssim_right_half_mean_embedding": sum(q for _, q in halves["mean"]) / n,
        }
    summary = metrics_obj.compute()
    if per_view:
        summary["psnr_right_half"] = sum(v["psnr_right_half"] for v in per_view) / len(per_view)
    return summary, per_view, app_metrics


def rasterize_view(g, cam: Cameras, bg: Tensor, backend: str) -> Tensor:  # -> [1, 3, H, W]
    from vision3d.render import rasterize

    return rasterize(g, cam.to(bg.device), background=bg, mode="RGB", backend=backend).colors


def reconstruct(cfg: ReconstructConfig) -> dict:
    """Run the pipeline and write the run folder; returns the metrics (also in ``metrics.json``).

    Raises ``KeyboardInterrupt`` after writing a checkpoint when interrupted during the fit.
    """
    from vision3d.eval.metrics import psnr
    from vision3d.gaussians.ply import save_ply
    from vision3d.mesh.tsdf import tsdf_mesh
    from vision3d.poses.path import smooth_camera_path
    from vision3d.render import rasterize
    from vision3d.train.config import to_dict
    from vision3d.train.scene_fit import camera_scene_scale, fit_scene, gaussians_from_points
    from vision3d.utils.io import write_text_atomic
    from vision3d.utils.optional import require
    from vision3d.utils.video import write_video

    t_start = time.perf_counter()
    dev = _device(cfg.device)
    gpu = dev.type == "cuda"
    steps = cfg.steps if cfg.steps is not None else (7000 if gpu else 1000)
    max_size = cfg.max_size if cfg.max_size is not None else (1600 if gpu else 320)
    max_init = cfg.max_init_gaussians if cfg.max_init_gaussians is not None else (300_000 if gpu else 20_000)
    n_random = cfg.random_init_count if cfg.random_init_count is not None else (100_000 if gpu else 5_000)
    if steps < 0 or cfg.ckpt_every < 1 or cfg.holdout_every < 0:
        raise ValueError(f"--steps and --holdout-every must be >= 0 and --ckpt-every >= 1, got {steps}, "
                         f"{cfg.holdout_every}, {cfg.ckpt_every}")
    if cfg.mesh:
        require("open3d", "--mesh (TSDF fusion of rendered depth)")
    if cfg.pose_ba and cfg.poses not in ("vggt", "flashvggt"):
        raise ValueError(f"--pose-ba refines feed-forward poses (--poses vggt|flashvggt), not --poses {cfg.poses}")
    if cfg.pose_ba:
        require("pycolmap", "--pose-ba (bundle adjustment of the predicted cameras)")
    init_model = None
    if cfg.init not in ("sfm", "random"):
        from vision3d.train.recon_init import check_init, load_init_reconstructor

        check_init(cfg.init, cfg.init_weights)
        if not cfg.resume:  # read the weights now: a bad file fails before the (long) pose stage writes anything
            init_model = load_init_reconstructor(cfg.init, cfg.init_weights, device="cpu")
    src = Path(cfg.input)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such photo folder or video")
    created = not Path(cfg.out).exists()
    out = _check_out(cfg)
    run_file = out / _RUN_FILE
    before = json.loads(run_file.read_text()).get("time_s_before", 0.0) if run_file.is_file() else 0.0

    def record_time() -> None:  # the time so far, for the total across resumes (after a pose stage, each checkpoint)
        if out.is_dir():
            write_text_atomic(run_file, json.dumps({"time_s_before": before + time.perf_counter() - t_start,
                                                    "config": to_plain(asdict(cfg))}, default=str))

    record_time()
    times: dict[str, float] = {}

    # 1-2. input and poses (or the run folder's, when resuming)
    t0 = time.perf_counter()
    posed_here = (out / "cameras" / "poses.json").is_file()
    if not (cfg.resume and posed_here):
        try:
            _pose_stage(cfg, out, dev, max_size)
        except BaseException:
            if created and all(p.name == _RUN_FILE for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)  # invalid input: leave nothing behind
            else:
                record_time()
            raise
        if not cfg.keep_sfm:
            shutil.rmtree(out / "sfm", ignore_errors=True)
    images, files, cameras, points, colors, pose_info = load_run(out)
    times["poses"] = time.perf_counter() - t0
    V = len(images)
    if V < MIN_IMAGES:
        raise ValueError(f"{out}: only {V} posed image(s); need at least {MIN_IMAGES}")
    train_idx, test_idx = holdout_split(V, cfg.holdout_every)
    train_imgs, train_cams = _views(images, cameras, train_idx)
    test_imgs, test_cams = _views(images, cameras, test_idx)

    # 3. initial Gaussians, or the checkpoint
    fit_cfg = replace(cfg.fit, seed=cfg.seed, progress=cfg.progress)
    if fit_cfg.scene_scale is None:
        fit_cfg = replace(fit_cfg, scene_scale=camera_scene_scale(_common_size_cameras(train_cams)))
    ckpt_dir = out / "ckpt"
    # the settings the result depends on, with the device-dependent defaults resolved
    run_cfg = replace(cfg, steps=steps, max_size=max_size, max_init_gaussians=max_init, random_init_count=n_random,
                      device=dev.type)
    resumed = _load_fit_checkpoint(ckpt_dir, run_cfg) if cfg.resume else None
    start = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    init_method, recon_info = cfg.init, None
    if resumed is not None:
        init, init_info = resumed  # a FitState
        start, init_method, recon_info = init.step, init_info["method"], init_info.get("reconstructor")
    elif cfg.init not in ("sfm", "random"):
        from vision3d.train.recon_init import init_from_reconstructor

        if isinstance(train_imgs, list):
            raise ValueError(f"--init {cfg.init}: a feed-forward reconstructor needs photos of one size; these have "
                             "several, so add --size-policy crop to the command")
        t0 = time.perf_counter()
        init, recon_info = init_from_reconstructor(
            cfg.init, cfg.init_weights, train_imgs, train_cams, device=dev, max_gaussians=max_init,
            sh_degree=fit_cfg.sh_degree, generator=gen, progress=cfg.progress, model=init_model,
        )
        times["init"] = time.perf_counter() - t0
    else:
        if cfg.init == "sfm" and points is not None and points.shape[0] >= 4:
            if points.shape[0] > max_init:
                keep = torch.randperm(points.shape[0], generator=gen)[:max_init]
                points, colors = points[keep], colors[keep]
            init = gaussians_from_points(points, colors, opacity=cfg.init_opacity, sh_degree=fit_cfg.sh_degree)
            init_method = "sfm"
        else:
            if cfg.init == "sfm":
                log.warning("no sparse points to initialise from; using a random initialisation")
            init = random_init(train_cams, train_imgs, n_random, cfg.init_opacity, gen, fit_cfg.sh_degree)
            init_method = "random"
    num_init = init.num if resumed is None else int(resumed[1]["num_gaussians"])

    # 4. refinement with checkpoints: fit_scene writes one every ckpt_every steps, after the last step and on
    # Ctrl-C (then re-raises), each the state of a whole step, so --resume continues exactly
    fit_run = replace(fit_cfg, steps=steps)
    if fit_run.densify == "mcmc" and not gpu:
        raise ValueError("--fit.densify mcmc needs a CUDA device; use default or none on the CPU")
    run_config = to_dict(run_cfg)
    init_info = {"method": init_method, "num_gaussians": num_init}
    if recon_info is not None:
        init_info["reconstructor"] = recon_info
    t0 = time.perf_counter()
    live = None
    if cfg.view:  # the scene being fitted, in the browser (vision3d.viewer.live)
        from vision3d.viewer.live import LiveViewer

        live = LiveViewer(out, port=cfg.view_port, total_steps=steps, held_out=test_idx)
    try:
        result = fit_scene(init.to(dev), train_imgs, train_cams, fit_run,
                           checkpoint=lambda state: (_save_fit_checkpoint(ckpt_dir, state, run_config, init_info),
                                                     record_time()),
                           checkpoint_every=cfg.ckpt_every, callback=live)
    finally:
        if live is not None:
            live.close()
    fitted, history = result.gaussians, result.history
    pose_opt = None
    if result.cameras is not None:  # --fit.pose-opt: how far the training cameras moved (cameras/ keeps SfM's)
        new = _common_size_cameras(result.cameras).cam_to_world.cpu()
        old = _common_size_cameras(train_cams).cam_to_world.cpu()
        dR = old[:, :3, :3].transpose(-1, -2) @ new[:, :3, :3]
        ang = torch.rad2deg(torch.acos(((dR.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)))
        pose_opt = {"mean_translation_change": float((new[:, :3, 3] - old[:, :3, 3]).norm(dim=-1).mean()),
                    "mean_rotation_change_deg": float(ang.mean())}
    times["fit"] = time.perf_counter() - t0

    # 5. outputs
    app = result.appearance
    save_ply(out / "scene.ply", (fitted if app is None else app.bake(fitted)).to("cpu"))
    bg = torch.tensor(fit_cfg.background, dtype=torch.float32, device=dev)
    t0 = time.perf_counter()
    test_metrics, per_view, app_metrics = _evaluate(cfg, out, fitted, app, test_imgs, test_cams,
                                                    [files[i] for i in test_idx], bg, fit_cfg.backend)
    train_psnr = []
    for i in train_idx[:: max(1, len(train_idx) // 8)]:
        im, cam = _views(images, cameras, [i])
        with torch.no_grad():
            pred = rasterize(fitted, cam[0] if isinstance(cam, list) else cam, background=bg, mode="RGB",
                             backend=fit_cfg.backend).colors
            if app is not None:
                pred = app.apply(pred, app.embeds[train_idx.index(i)][None])
        gt = im[0][None] if isinstance(im, list) else im
        train_psnr.append(float(psnr(pred.clamp(0, 1).cpu(), gt)))
    times["eval"] = time.perf_counter() - t0

    path_cams = _common_size_cameras(cameras)
    if cfg.video:
        t0 = time.perf_counter()
        vw = cfg.video_width or path_cams.width
        vh = max(2, round(vw * path_cams.height / path_cams.width / 2) * 2)
        vw = max(2, vw // 2 * 2)
        path = smooth_camera_path(path_cams, cfg.video_path_frames, vw, vh,
                                  order="given" if pose_info.get("matcher") == "sequential" else "nearest")
        shown = fitted if app is None else app.bake(fitted)

        def frames():
            for k in _progress(range(len(path)), cfg.progress, "video"):
                with torch.no_grad():
                    o = rasterize(shown, path[k : k + 1].to(dev), background=bg, mode="RGB", backend=fit_cfg.backend)
                yield o.colors[0].clamp(0, 1).cpu()

        write_video(out / "video.mp4", frames(), fps=cfg.fps)
        times["video"] = time.perf_counter() - t0
    mesh_info = None
    if cfg.mesh:
        t0 = time.perf_counter()
        mesh_info = tsdf_mesh(fitted, path_cams.to(dev), out / "mesh.ply", cfg.mesh_voxel,
                              background=fit_cfg.background, backend=fit_cfg.backend, progress=cfg.progress)
        times["mesh"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start
    times["total_all_runs"] = before + times["total"]
    write_text_atomic(run_file, json.dumps({"time_s_before": times["total_all_runs"], "finished": True,
                                            "config": to_plain(asdict(cfg))}, default=str))
    sizes = sorted({(int(im.shape[-1]), int(im.shape[-2])) for im in images})

    metrics = {
        "test": {**test_metrics, "views": per_view, "count": len(test_idx),
                 **({"appearance": app_metrics} if app_metrics else {})},
        "train": {"psnr_mean": sum(train_psnr) / max(len(train_psnr), 1), "count": len(train_idx)},
        "images": {"input": pose_info.get("input_images", V), "registered": V, "width": sizes[0][0],
                   "height": sizes[0][1], "sizes": [list(x) for x in sizes],
                   "dropped": pose_info.get("dropped", [])},
        "poses": pose_info,
        "init": init_info,
        "pose_opt": pose_opt,
        "num_gaussians": fitted.num,
        "steps": steps,
        "resumed_from_step": start,
        "time_s": times,
        "history": history,
        "mesh": mesh_info,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "config": to_plain(asdict(cfg)) | {"steps": steps, "max_size": max_size},
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, default=str))
    return metrics
