"""The end-to-end demo: procedural scene -> posed views -> fit a fresh Gaussian scene -> run folder.

No arguments, no downloads. Steps:

1. build the procedural scene (:func:`vision3d.gaussians.procedural.procedural_scene`: a striped
   torus, a checkered sphere and a gradient box on a checkerboard ground plane, deterministic in
   ``--seed``);
2. render ``--train-views`` training views and ``--test-views`` held-out views on interleaved
   Fibonacci spirals over the upper hemisphere (known OpenCV cameras), colour and depth;
3. initialise a **fresh** scene as an RGB-D capture would allow: unproject the training views'
   pixels at their rendered depth (pixels with accumulated opacity >= 0.5), keep a random
   ``--num-init`` of them, and put an isotropic Gaussian on each (scale from the 3 nearest
   neighbours, identity rotation, opacity ``--init-opacity``, colour of the pixel). The true
   Gaussians are never read by the fit: only the training images, their depth and the cameras;
4. fit it to the training views with :func:`vision3d.train.scene_fit.fit_scene` (3DGS recipe,
   Adam with per-parameter learning rates, decayed position rate);
5. evaluate on the held-out views (PSNR and SSIM from :mod:`vision3d.eval.metrics`) and write the
   run folder ``--out``: ``scene.ply``, ``images/`` and ``cameras/`` (as ``vision3d reconstruct``
   writes them: every run folder opens the same way in ``vision3d view``), ``renders/test_XX.png`` (fitted render | ground truth |
   5x absolute error), ``metrics.json``, ``config.yaml`` (the resolved config; load it back with
   :func:`load_config`) and ``video.mp4`` (an orbit of the fitted scene).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
import torch

from vision3d.train.scene_fit import SceneFitConfig
from vision3d.utils.io import to_plain


def _demo_fit_config() -> SceneFitConfig:
    # Tuned for 2 CPU cores and the default resolution: faster learning rates than 3DGS's
    # (hundreds of steps, not 30k), L1 only (SSIM doubles the CPU cost of a step), a few views
    # per step to use both cores, no densification (the RGB-D init already covers the surfaces).
    return SceneFitConfig(
        steps=400,
        batch_views=2,
        lr_means=1.6e-4,
        lr_means_final_factor=0.1,
        lr_scales=1e-2,
        lr_quats=2e-3,
        lr_opacities=5e-2,
        lr_sh0=1e-2,
        lr_shN=5e-4,
        ssim_weight=0.0,
        sh_degree=0,
        densify="none",
        background=(0.0, 0.0, 0.0),
        backend="auto",
        log_every=10,
    )


@dataclass
class Args:
    out: Path = Path("runs/demo")
    """Run folder to write (refused if it exists and is not empty, unless --overwrite)."""

    steps: int = 400
    """Optimisation steps of the fit (overrides fit.steps)."""

    seed: int = 0
    """Seed of the scene, the initialisation and the fit (overrides fit.seed)."""

    overwrite: bool = False
    """Write into an existing non-empty run folder, replacing files of the same names."""

    width: int = 80
    """Width of the training and held-out views, pixels."""

    height: int = 60
    """Height of the training and held-out views, pixels."""

    fov_deg: float = 55.0
    """Horizontal field of view of every camera, degrees."""

    train_views: int = 28
    """Number of training views."""

    test_views: int = 8
    """Number of held-out views (never seen by the fit)."""

    camera_distance: tuple[float, float] = (2.2, 2.8)
    """Range of camera distances from the scene centre (world units)."""

    elevation_deg: tuple[float, float] = (15.0, 60.0)
    """Range of camera elevations above the ground plane's horizon, degrees."""

    scene_density: float = 0.7
    """Sampling density of the true procedural scene (0.7: about 7.7k Gaussians; 1.0: about 15.6k)."""

    num_init: int = 6000
    """Gaussians in the fresh initial scene (points unprojected from the training views' RGB-D)."""

    init_opacity: float = 0.5
    """Opacity of every initial Gaussian."""

    video_frames: int = 48
    """Frames of the orbit video of the fitted scene."""

    video_width: int = 160
    """Width of the orbit video (height keeps the views' aspect ratio)."""

    fps: float = 16.0
    """Frame rate of the orbit video."""

    device: str = "auto"
    """Torch device; auto: cuda when available, else cpu."""

    threads: int | None = 1
    """CPU threads for torch during the run (restored afterwards); None keeps torch's setting. The
    default 1 is deliberate: the demo's ops are small, and on a CPU shared with other jobs two OpenMP
    threads waiting on each other made a step ~7x slower than one thread (measured on 2 cores)."""

    fit: SceneFitConfig = field(default_factory=_demo_fit_config)
    """Fitting configuration (fit.steps and fit.seed are set from --steps and --seed)."""


def resolved_fit_config(args: Args) -> SceneFitConfig:
    return SceneFitConfig(**{**asdict(args.fit), "steps": args.steps, "seed": args.seed})


def config_to_dict(args: Args) -> dict:
    """Plain YAML/JSON values of the resolved config (tuples as lists, paths as strings)."""

    d = {f.name: to_plain(getattr(args, f.name)) for f in fields(args) if f.name != "fit"}
    d["fit"] = to_plain(asdict(resolved_fit_config(args)))
    return d


def load_config(path: str | os.PathLike) -> Args:
    """Read a run folder's ``config.yaml`` back into :class:`Args`."""
    import yaml

    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of demo options")

    def build(cls, values: dict, where: str):
        known = {f.name: f for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"{path}: unknown {where} keys {sorted(unknown)}")
        kw = {}
        for k, v in values.items():
            default = getattr(cls(), k) if cls is SceneFitConfig else getattr(Args(), k)
            if isinstance(default, tuple) and isinstance(v, list):
                v = tuple(v)
            elif isinstance(default, Path):
                v = Path(v)
            kw[k] = v
        return kw

    fit = SceneFitConfig(**build(SceneFitConfig, d.pop("fit", {}) or {}, "fit"))
    return Args(**build(Args, d, "demo"), fit=fit)


# ------------------------------------------------------------------ the pipeline
INCOMPLETE = "INCOMPLETE"  # marker file: present while a run is writing, removed when it has finished


def _check_out(out: Path, overwrite: bool) -> Path:
    from vision3d.utils.io import check_writable_dir

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is a file; expected a run folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        if (out / INCOMPLETE).exists():
            raise FileExistsError(
                f"{out}: holds an unfinished run ({INCOMPLETE} marker: it was killed or failed); pass --overwrite to "
                "run again into it (files of the same names are replaced, others kept) or choose another --out"
            )
        raise FileExistsError(f"{out}: run folder exists and is not empty; pass --overwrite or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        print(f"vision3d demo: --overwrite: replacing the run files in {out} (other files there are kept)", file=sys.stderr)
    return check_writable_dir(out)


def _mark_incomplete(out: Path) -> None:
    import datetime

    from vision3d.utils.io import write_text_atomic

    write_text_atomic(
        out / INCOMPLETE,
        f"vision3d demo started {datetime.datetime.now(datetime.timezone.utc).isoformat()} (pid {os.getpid()}); "
        "this file is removed when the run finishes. If it is still here, the run was killed or failed: the other "
        "files may be partial.\n",
    )


def rgbd_init(
    images,  # [V, 3, H, W] in [0, 1]
    depths,  # [V, 1, H, W] z-depth (world units)
    alphas,  # [V, 1, H, W] accumulated opacity
    cameras,  # Cameras [V], OpenCV
    num: int,
    opacity: float,
    generator: torch.Generator,
):
    """Fresh Gaussians from an RGB-D capture: unprojected pixels, subsampled to ``num``."""
    from vision3d.train.scene_fit import gaussians_from_points

    pts = cameras.unproject(depths[:, 0])  # [V, H, W, 3]
    rgb = images.permute(0, 2, 3, 1)  # [V, H, W, 3]
    keep = (alphas[:, 0] >= 0.5) & torch.isfinite(depths[:, 0]) & (depths[:, 0] > 0)
    pts, rgb = pts[keep], rgb[keep]
    if pts.shape[0] < 2:
        raise ValueError("rgbd_init: the training views show (almost) nothing; check the cameras")
    if pts.shape[0] > num:
        idx = torch.randperm(pts.shape[0], generator=generator)[:num]
        pts, rgb = pts[idx], rgb[idx]
    return gaussians_from_points(pts, rgb, opacity=opacity, sh_degree=0)


def _side_by_side(pred, gt):  # [3, H, W] x2 -> [3, H, 3W + 4]
    err = ((pred - gt).abs() * 5).clamp(0, 1)
    sep = torch.ones(3, pred.shape[1], 2)
    return torch.cat([pred, sep, gt, sep, err], -1)


def run_demo(args: Args) -> dict:
    """Run the demo and write the run folder; returns the metrics dict (also in metrics.json)."""
    import yaml

    from vision3d.eval.metrics import psnr, ssim
    from vision3d.geometry import Cameras
    from vision3d.poses.base import PoseResult
    from vision3d.train.reconstruct import write_posed
    from vision3d.gaussians.ply import save_ply
    from vision3d.gaussians.procedural import hemisphere_cameras, orbit_cameras, procedural_scene
    from vision3d.render import rasterize
    from vision3d.train.scene_fit import fit_scene
    from vision3d.utils.images import save_png
    from vision3d.utils.io import write_text_atomic
    from vision3d.utils.video import write_video

    t_start = time.perf_counter()
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if args.train_views < 1 or args.test_views < 1:
        raise ValueError(f"--train-views and --test-views must be >= 1, got {args.train_views}, {args.test_views}")
    if min(args.width, args.height) < 16:
        raise ValueError(f"--width/--height must be >= 16 pixels (SSIM window), got {args.width}x{args.height}")
    out = _check_out(Path(args.out), args.overwrite)
    _mark_incomplete(out)
    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    fit_cfg = resolved_fit_config(args)
    bg = torch.tensor(fit_cfg.background, dtype=torch.float32, device=dev)

    # 1-2. scene and its views (ground truth)
    scene = procedural_scene(seed=args.seed, density=args.scene_density)
    truth = scene.gaussians.to(dev)
    rig = dict(
        target=scene.target,
        radius=tuple(args.camera_distance),
        elevation_range_deg=tuple(args.elevation_deg),
        width=args.width,
        height=args.height,
        fov_deg=args.fov_deg,
    )
    train_cams = hemisphere_cameras(args.train_views, **rig).to(dev)
    test_cams = hemisphere_cameras(args.test_views, offset=0.5, **rig).to(dev)
    t0 = time.perf_counter()
    with torch.no_grad():
        gt_train = rasterize(truth, train_cams, background=bg, mode="RGB+ED", backend=fit_cfg.backend)
        gt_test = rasterize(truth, test_cams, background=bg, mode="RGB", backend=fit_cfg.backend)
    t_gt = time.perf_counter() - t0
    train_images = gt_train.colors.clamp(0, 1)
    test_images = gt_test.colors.clamp(0, 1)

    # 3. fresh initialisation from the training RGB-D
    gen = torch.Generator().manual_seed(args.seed)
    init = rgbd_init(
        train_images.cpu(), gt_train.depths.cpu(), gt_train.alphas.cpu(), train_cams.to("cpu"),
        args.num_init, args.init_opacity, gen,
    ).to(dev)
    del truth

    # 4. fit
    result = fit_scene(init, train_images, train_cams, fit_cfg)
    fitted = result.gaussians

    # 5. evaluate on held-out views
    t0 = time.perf_counter()
    with torch.no_grad():
        pred = rasterize(fitted, test_cams, background=bg, mode="RGB", backend=fit_cfg.backend).colors.clamp(0, 1)
        pred_train = rasterize(fitted, train_cams, background=bg, mode="RGB", backend=fit_cfg.backend).colors.clamp(0, 1)
    p = psnr(pred, test_images).cpu()
    s = ssim(pred, test_images).cpu()
    p_train = psnr(pred_train, train_images).cpu()
    with torch.no_grad():
        init_pred = rasterize(init, test_cams, background=bg, mode="RGB", backend=fit_cfg.backend).colors.clamp(0, 1)
    p_init = psnr(init_pred, test_images).cpu()
    t_eval = time.perf_counter() - t0

    # run folder (images/ and cameras/ written as reconstruct writes them, so every run folder views the same way)
    save_ply(out / "scene.ply", fitted.to("cpu"))
    names = [f"train_{i:02d}.png" for i in range(args.train_views)] + [f"test_{i:02d}.png" for i in range(args.test_views)]
    posed = PoseResult(torch.cat([train_images, test_images]).cpu(), names,
                       Cameras.cat([train_cams.to("cpu"), test_cams.to("cpu")]), info={"estimator": "known (demo rig)"})
    write_posed(out, posed, False)
    (out / "renders").mkdir(exist_ok=True)
    for i in range(pred.shape[0]):
        save_png(out / "renders" / f"test_{i:02d}.png", _side_by_side(pred[i].cpu(), test_images[i].cpu()))
    t0 = time.perf_counter()
    vh = max(16, round(args.video_width * args.height / args.width / 2) * 2)
    orbit = orbit_cameras(
        args.video_frames, scene.target, float(sum(args.camera_distance)) / 2, 30.0,
        args.video_width, vh, args.fov_deg,
    ).to(dev)

    def frames():
        for i in range(len(orbit)):
            with torch.no_grad():
                yield rasterize(fitted, orbit[i : i + 1], background=bg, mode="RGB", backend=fit_cfg.backend).colors[0].clamp(0, 1).cpu()

    write_video(out / "video.mp4", frames(), fps=args.fps)
    t_video = time.perf_counter() - t0
    total = time.perf_counter() - t_start

    metrics = {
        "test": {
            "psnr": [round(float(x), 4) for x in p],
            "ssim": [round(float(x), 5) for x in s],
            "psnr_mean": float(p.mean()),
            "ssim_mean": float(s.mean()),
            "views": [{"image": names[args.train_views + i], "psnr": float(p[i]), "ssim": float(s[i])}
                      for i in range(len(p))],
        },
        "train": {"psnr_mean": float(p_train.mean())},
        "init": {"test_psnr_mean": float(p_init.mean()), "num_gaussians": init.num, "method": "rgbd-unprojection"},
        "num_gaussians": fitted.num,
        "num_gaussians_truth": scene.gaussians.num,
        "steps": fit_cfg.steps,
        "views": {"train": args.train_views, "test": args.test_views, "width": args.width, "height": args.height},
        "time_s": {
            "total": total,
            "render_ground_truth": t_gt,
            "fit": result.time_s,
            "eval": t_eval,
            "video": t_video,
        },
        "history": result.history,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "config": config_to_dict(args),
    }
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    write_text_atomic(out / "config.yaml", yaml.safe_dump(config_to_dict(args), sort_keys=False))
    (out / INCOMPLETE).unlink()  # last: the folder is complete
    return metrics


def run(args: Args) -> int:
    previous = torch.get_num_threads()
    try:
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
        m = run_demo(args)
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"vision3d demo: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)
    t = m["test"]
    print(
        f"vision3d demo: held-out PSNR {t['psnr_mean']:.2f} dB, SSIM {t['ssim_mean']:.4f} over {len(t['psnr'])} views "
        f"(train {m['train']['psnr_mean']:.2f} dB, init {m['init']['test_psnr_mean']:.2f} dB); "
        f"{m['num_gaussians']} Gaussians, {m['steps']} steps, {m['time_s']['total']:.1f} s total "
        f"-> {Path(args.out)}"
    )
    return 0
