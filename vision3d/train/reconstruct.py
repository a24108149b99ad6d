"""Photos or a video -> posed images -> a fitted 3D Gaussian scene -> a run folder.

The library side of ``vision3d reconstruct``. Stages:

1. **Input** (:mod:`vision3d.data.folder`): an image folder (EXIF orientation, the mixed-size
   policy) or a video (evenly spread frames, the sharpest per window); optional known cameras
   (``--cameras``, or ``transforms.json`` / ``sparse/0`` / ``cameras.txt`` found beside the photos);
   downscaled so the longest side is at most ``max_size``.
2. **Poses** (:mod:`vision3d.poses`): a registered pose estimator (``known``, ``colmap``...). Its
   result is written to the run folder as ``images/`` (the posed, undistorted, resized images as
   PNG) and ``cameras/`` (a COLMAP text model with the sparse points, and a ``transforms.json``
   pointing at ``../images``); every later stage, and ``--resume``, reads them back from there.
3. **Initial Gaussians**: on the SfM points (3DGS's initialisation, scales from the 3 nearest
   neighbours) or uniformly random in a cube around the point the cameras look at (gsplat's
   ``init_type="random"``, ``examples/simple_trainer.py``, nerfstudio-project/gsplat v1.5.3, Apache-2.0).
4. **Refinement**: :func:`vision3d.train.scene_fit.fit_scene` on every image except each
   ``holdout_every``-th (index ``i % holdout_every == 0`` is held out, as in gsplat's and
   nerfstudio's parsers). Checkpoints (``ckpt/scene.ply`` + ``ckpt/state.json``) every
   ``ckpt_every`` steps and on Ctrl-C; ``resume`` continues from them with the learning-rate
   schedule at the same position (Adam's moments and the densification statistics restart).
5. **Outputs** (every file written atomically): ``scene.ply`` (INRIA layout), ``renders/<name>.png``
   (held-out render | photo), ``metrics.json``, ``video.mp4`` along a smooth path through the
   cameras (:func:`vision3d.poses.path.smooth_camera_path`), and with ``mesh`` a TSDF fusion of the
   rendered depth with open3d (Zhou, Park, Koltun, "Open3D", arXiv 1801.09847; MIT) saved as
   ``mesh.ply``.

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import json
import logging
import os
import platform
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
    "tsdf_mesh",
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
    """Pose estimator: colmap (incremental SfM with pycolmap, the [sfm] extra), known (given cameras), or a
    feed-forward network: vggt | flashvggt (needs --pose-weights)."""

    pose_weights: Path | None = None
    """--poses vggt|flashvggt: the model weights (the authors' checkpoint or a `vision3d convert` output)."""

    cameras: Path | None = None
    """Known cameras: a COLMAP model folder or a transforms.json (default: looked for beside the photos)."""

    sfm_threads: int = -1
    """--poses colmap: CPU threads of feature extraction, matching and mapping (-1: all; 1 is deterministic)."""

    init: Literal["sfm", "random"] = "sfm"
    """Initial Gaussians: on the SfM / known sparse points (random when there are none), or random."""

    steps: int | None = None
    """Optimisation steps (None: 7000 on a GPU, 1000 on the CPU)."""

    device: str = "auto"
    """Torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1..."""

    holdout_every: int = 8
    """Hold out every Nth image (index % N == 0) for evaluation; 0 holds out none."""

    max_size: int | None = None
    """Downscale so the longest image side is at most this (None: 1600 on a GPU, 320 on the CPU)."""

    size_policy: Literal["error", "crop"] = "error"
    """Photos whose aspect ratio differs from the most common one: error, or centre-crop them."""

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
    """Steps between checkpoints (ckpt/scene.ply, ckpt/state.json)."""

    resume: bool = False
    """Continue an interrupted run in --out from its images/, cameras/ and latest checkpoint."""

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

    fit: SceneFitConfig = field(default_factory=_default_fit)
    """Refinement settings (fit.steps and fit.seed come from --steps and --seed). Default: the 3DGS loss, gsplat's
    DefaultStrategy refining every 100 steps from step 200 (mcmc needs a GPU)."""


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
    from vision3d.data.folder import IMAGE_EXTENSIONS, list_images, load_images, load_video
    from vision3d.data.preprocess import resize_and_center_crop
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
        is_video, cams = True, None
    else:
        files = list_images(src)
        if len(files) < MIN_IMAGES:
            raise ValueError(
                f"{src}: found {len(files)} image(s) with extensions {', '.join(IMAGE_EXTENSIONS)}; "
                f"reconstruction needs at least {MIN_IMAGES} overlapping photos"
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
        s = load_images(files, cameras=cam_path, size_policy=cfg.size_policy, source=src)
        is_video, cams = False, s.cameras
        if cam_path is not None and cam_path.suffix.lower() != ".json":
            from vision3d.geometry.colmap import read_colmap
            from vision3d.poses.base import float_colors

            model = read_colmap(cam_path)
            if model.points3D:
                points, colors = model.points_xyz().float(), float_colors(model.points_rgb())
    images = s.images
    h, w = images.shape[-2:]
    if max_size is not None and max(h, w) > max_size:
        f = max_size / max(h, w)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        images, cams = resize_and_center_crop(images, cams, (nh, nw), "area")
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
    cameras: Cameras,  # [V] training cameras
    images: Tensor,  # [V, 3, H, W] in [0, 1]
    num: int,
    opacity: float,
    generator: torch.Generator,
    sh_degree: int = 0,
) -> Gaussians:
    """``num`` Gaussians uniform in a cube around :func:`look_target` (half-size: the camera scene scale)."""
    from vision3d.train.scene_fit import camera_scene_scale, gaussians_from_points

    centre = look_target(cameras).float()
    half = camera_scene_scale(cameras)
    pts = centre + (torch.rand(num, 3, generator=generator) * 2 - 1) * half
    mean_rgb = images.mean(dim=(0, 2, 3))
    rgb = (mean_rgb + 0.1 * (torch.rand(num, 3, generator=generator) - 0.5)).clamp(0, 1)
    return gaussians_from_points(pts, rgb, opacity=opacity, sh_degree=sh_degree)


# ------------------------------------------------------------------ run folder
def _write_posed(out: Path, result, progress: bool) -> None:
    from vision3d.geometry.colmap import ColmapModel, write_colmap
    from vision3d.geometry.transforms_json import write_transforms_json
    from vision3d.poses.colmap import sfm_file_names
    from vision3d.utils.images import save_png
    from vision3d.utils.io import write_text_atomic

    files = sfm_file_names(result.names)
    for f, im in zip(files, result.images):
        save_png(out / "images" / f, im)
    model = ColmapModel.from_cameras(result.cameras, files, result.points, result.colors)
    write_colmap(model, out / "cameras", binary=False)
    write_transforms_json(out / "cameras" / "transforms.json", result.cameras, [f"../images/{f}" for f in files])
    write_text_atomic(out / "cameras" / "poses.json",
                      json.dumps({"names": result.names, "files": files, "info": result.info}, indent=2, default=str))


def load_run(run: str | os.PathLike):
    """``(images [V, 3, H, W], files [V], cameras [V], points [P, 3] or None, colors [P, 3] or None, info)``
    of a run folder's ``images/`` and ``cameras/``."""
    from vision3d.data.folder import load_images
    from vision3d.geometry.colmap import read_colmap
    from vision3d.poses.base import float_colors

    run = Path(run)
    meta_path = run / "cameras" / "poses.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; {run} is not a finished pose stage of vision3d reconstruct")
    meta = json.loads(meta_path.read_text())
    files = meta["files"]
    s = load_images([run / "images" / f for f in files], cameras=run / "cameras" / "transforms.json", source=run)
    model = read_colmap(run / "cameras")
    pts = cols = None
    if model.points3D:
        pts, cols = model.points_xyz().float(), float_colors(model.points_rgb())
    return s.images, files, s.cameras, pts, cols, meta.get("info", {})


def _side_by_side(pred: Tensor, gt: Tensor) -> Tensor:  # [3, H, W] x2 -> [3, H, 2W + 2]
    return torch.cat([pred, torch.ones(3, pred.shape[1], 2), gt], -1)


# ------------------------------------------------------------------ mesh
def tsdf_mesh(
    gaussians: Gaussians,
    cameras: Cameras,  # [V] OpenCV
    path: Path,
    voxel: float | None = None,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    backend: str = "auto",
) -> dict:
    """Fuse the rendered colour and expected depth of every camera into a TSDF (open3d) and save its mesh."""
    from vision3d.render import rasterize
    from vision3d.utils.io import atomic_path
    from vision3d.utils.optional import require

    o3d = require("open3d", "--mesh (TSDF fusion of rendered depth)")
    import numpy as np

    if voxel is None:
        lo, hi = gaussians.means.quantile(0.02, 0), gaussians.means.quantile(0.98, 0)
        voxel = float((hi - lo).norm()) / 256
    vol = o3d.pipelines.integration.ScalableTSDFVolume(
        voxel_length=voxel, sdf_trunc=4 * voxel, color_type=o3d.pipelines.integration.TSDFVolumeColorType.RGB8
    )
    bg = torch.tensor(background, dtype=torch.float32, device=gaussians.device)
    far = 0.0
    for i in range(len(cameras)):
        cam = cameras[i : i + 1]
        with torch.no_grad():
            out = rasterize(gaussians, cam, background=bg, mode="RGB+ED", backend=backend)
        depth = out.depths[0, 0].clone()
        depth[(out.alphas[0, 0] < 0.5) | ~torch.isfinite(depth)] = 0.0
        far = max(far, float(depth.max()))
        rgb = (out.colors[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        rgbd = o3d.geometry.RGBDImage.create_from_color_and_depth(
            o3d.geometry.Image(np.ascontiguousarray(rgb)),
            o3d.geometry.Image(np.ascontiguousarray(depth.cpu().numpy().astype(np.float32))),
            depth_scale=1.0, depth_trunc=1e9, convert_rgb_to_intensity=False,
        )
        K = cam.K[0].double().cpu()
        intr = o3d.camera.PinholeCameraIntrinsic(  # open3d puts pixel centres at integers: shift by half a pixel
            cam.width, cam.height, float(K[0, 0]), float(K[1, 1]), float(K[0, 2]) - 0.5, float(K[1, 2]) - 0.5
        )
        vol.integrate(rgbd, intr, cam.world_to_cam[0].double().cpu().numpy())
    mesh = vol.extract_triangle_mesh()
    mesh.compute_vertex_normals()
    with atomic_path(path) as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh):
            raise RuntimeError(f"{path}: open3d could not write the mesh")
    return {"vertices": len(mesh.vertices), "triangles": len(mesh.triangles), "voxel": voxel, "path": str(path)}


# ------------------------------------------------------------------ the pipeline
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
    if cfg.resume:
        if not (out / "cameras" / "poses.json").is_file() and out.is_dir() and any(out.iterdir()):
            raise ValueError(f"{out}: nothing to resume (no cameras/poses.json); run without --resume and --overwrite")
    elif out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{out}: run folder exists and is not empty; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
    return check_writable_dir(out)


def reconstruct(cfg: ReconstructConfig) -> dict:
    """Run the pipeline and write the run folder; returns the metrics (also in ``metrics.json``).

    Raises ``KeyboardInterrupt`` after writing a checkpoint when interrupted during the fit.
    """
    from vision3d.eval.metrics import Metrics, psnr
    from vision3d.gaussians.ply import load_ply, save_ply
    from vision3d.poses.base import create_pose_estimator
    from vision3d.poses.path import smooth_camera_path
    from vision3d.render import rasterize
    from vision3d.train.scene_fit import camera_scene_scale, fit_scene, gaussians_from_points
    from vision3d.utils.images import save_png
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
    out = _check_out(cfg)
    times: dict[str, float] = {}

    # 1-2. input and poses (or the run folder's, when resuming)
    t0 = time.perf_counter()
    posed_here = (out / "cameras" / "poses.json").is_file()
    if not (cfg.resume and posed_here):
        kw: dict = {}
        if cfg.poses == "colmap":
            kw = {"seed": cfg.seed, "num_threads": cfg.sfm_threads}
        elif cfg.poses in ("vggt", "flashvggt"):
            kw = {"weights": cfg.pose_weights, "device": dev}
        estimator = create_pose_estimator(cfg.poses, **kw)
        inputs = load_input(cfg, max_size, with_cameras=estimator.needs_known_cameras)
        result = estimator.estimate(inputs, out / "sfm")
        result.info.setdefault("input_images", len(inputs.names))
        _write_posed(out, result, cfg.progress)
    images, files, cameras, points, colors, pose_info = load_run(out)
    times["poses"] = time.perf_counter() - t0
    V = images.shape[0]
    if V < MIN_IMAGES:
        raise ValueError(f"{out}: only {V} posed image(s); need at least {MIN_IMAGES}")
    train_idx, test_idx = holdout_split(V, cfg.holdout_every)
    train_cams, test_cams = cameras[torch.tensor(train_idx)], cameras[torch.tensor(test_idx, dtype=torch.long)]
    train_imgs, test_imgs = images[train_idx], images[test_idx]

    # 3. initial Gaussians, or the checkpoint
    fit_cfg = replace(cfg.fit, seed=cfg.seed, progress=cfg.progress)
    if fit_cfg.scene_scale is None:
        fit_cfg = replace(fit_cfg, scene_scale=camera_scene_scale(train_cams))
    ckpt_dir = out / "ckpt"
    state_path = ckpt_dir / "state.json"
    start, history = 0, []
    gen = torch.Generator().manual_seed(cfg.seed)
    init_method = cfg.init
    if cfg.resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if int(state.get("total_steps", steps)) != steps:
            log.warning("resuming a run of %s steps with --steps %s", state.get("total_steps"), steps)
        init = load_ply(ckpt_dir / "scene.ply")
        start, history, init_method = int(state["step"]), list(state.get("history", [])), state.get("init", cfg.init)
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
    num_init = init.num

    # 4. refinement with checkpoints
    remaining = max(steps - start, 0)
    f = fit_cfg.lr_means_final_factor
    run_cfg = replace(
        fit_cfg,
        steps=remaining,
        lr_means=fit_cfg.lr_means * f ** (start / max(steps, 1)),
        lr_means_final_factor=f ** (remaining / max(steps, 1)),
        refine_start=max(fit_cfg.refine_start - start, 0),
        refine_stop=fit_cfg.refine_stop - start,
    )
    if run_cfg.densify == "mcmc" and not gpu:
        raise ValueError("--fit.densify mcmc needs a CUDA device; use default or none on the CPU")
    last = {"step": start, "g": None, "saved": start}

    def save_ckpt(step: int, g: Gaussians) -> None:
        save_ply(ckpt_dir / "scene.ply", g.to("cpu"))
        write_text_atomic(state_path, json.dumps(
            {"step": step, "total_steps": steps, "init": init_method, "history": history}, indent=1))
        last["saved"] = step

    def on_log(step: int, g: Gaussians, entry: dict) -> None:
        entry = {**entry, "step": start + step}
        history.append(entry)
        last["step"], last["g"] = start + step, g
        if last["step"] - last["saved"] >= cfg.ckpt_every:
            save_ckpt(last["step"], g)

    t0 = time.perf_counter()
    try:
        result = fit_scene(init.to(dev), train_imgs, train_cams, run_cfg, callback=on_log)
    except KeyboardInterrupt:
        if last["g"] is not None and last["step"] > last["saved"]:
            save_ckpt(last["step"], last["g"])
        raise
    fitted = result.gaussians
    times["fit"] = time.perf_counter() - t0
    save_ckpt(steps, fitted)

    # 5. outputs
    save_ply(out / "scene.ply", fitted.to("cpu"))
    bg = torch.tensor(fit_cfg.background, dtype=torch.float32, device=dev)
    t0 = time.perf_counter()
    metrics_obj = Metrics(lpips_net="vgg" if cfg.lpips else None, require_lpips="auto")
    per_view = []
    for j, i in enumerate(test_idx):
        with torch.no_grad():
            pred = rasterize(fitted, test_cams[j : j + 1], background=bg, mode="RGB", backend=fit_cfg.backend)
        pred = pred.colors.clamp(0, 1).cpu()
        m = metrics_obj(pred, test_imgs[j : j + 1])
        per_view.append({"image": files[i], **m})
        save_png(out / "renders" / f"{Path(files[i]).stem}.png", _side_by_side(pred[0], test_imgs[j]))
    test_metrics = metrics_obj.compute()
    train_psnr = []
    for i in train_idx[:: max(1, len(train_idx) // 8)]:
        with torch.no_grad():
            pred = rasterize(fitted, cameras[i : i + 1], background=bg, mode="RGB", backend=fit_cfg.backend)
        train_psnr.append(float(psnr(pred.colors.clamp(0, 1).cpu(), images[i : i + 1])))
    times["eval"] = time.perf_counter() - t0

    if cfg.video:
        t0 = time.perf_counter()
        vw = cfg.video_width or cameras.width
        vh = max(2, round(vw * cameras.height / cameras.width / 2) * 2)
        vw = max(2, vw // 2 * 2)
        path = smooth_camera_path(cameras, cfg.video_path_frames, vw, vh,
                                  order="given" if pose_info.get("matcher") == "sequential" else "nearest")

        def frames():
            for k in range(len(path)):
                with torch.no_grad():
                    o = rasterize(fitted, path[k : k + 1].to(dev), background=bg, mode="RGB", backend=fit_cfg.backend)
                yield o.colors[0].clamp(0, 1).cpu()

        write_video(out / "video.mp4", frames(), fps=cfg.fps)
        times["video"] = time.perf_counter() - t0
    mesh_info = None
    if cfg.mesh:
        t0 = time.perf_counter()
        mesh_info = tsdf_mesh(fitted, cameras.to(dev), out / "mesh.ply", cfg.mesh_voxel, fit_cfg.background,
                              fit_cfg.backend)
        times["mesh"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - t_start

    metrics = {
        "test": {**test_metrics, "views": per_view, "count": len(test_idx)},
        "train": {"psnr_mean": sum(train_psnr) / max(len(train_psnr), 1), "count": len(train_idx)},
        "images": {"input": pose_info.get("input_images", V), "registered": V, "width": cameras.width,
                   "height": cameras.height},
        "poses": pose_info,
        "init": {"method": init_method, "num_gaussians": num_init},
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
