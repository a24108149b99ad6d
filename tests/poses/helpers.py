"""A tiny posed photo folder rendered from the procedural scene, for the reconstruct/export/view tests."""

from __future__ import annotations

from pathlib import Path

import torch


def photo_cameras(n: int, width: int, height: int, target=(0.0, -0.1, 0.35)):
    """The cameras :func:`make_photo_folder` renders from (procedural_scene's target by default)."""
    from vision3d.gaussians.procedural import hemisphere_cameras

    return hemisphere_cameras(n, torch.as_tensor(target), (2.0, 2.6), (20.0, 55.0), width, height, 55.0)


def make_photo_folder(
    root: Path,
    n: int = 10,
    width: int = 48,
    height: int = 40,
    cameras: str = "colmap",  # "colmap" (sparse/0 with points), "transforms" (transforms.json), or "none"
    num_points: int = 1500,
    density: float = 0.35,
) -> tuple[Path, object]:
    """Render ``n`` views into ``root/photos/img_XX.png`` with their cameras beside; returns (folder, Cameras)."""
    from vision3d.gaussians.procedural import procedural_scene
    from vision3d.geometry.colmap import ColmapModel, write_colmap
    from vision3d.geometry.transforms_json import write_transforms_json
    from vision3d.render import rasterize
    from vision3d.utils.images import save_png

    scene = procedural_scene(seed=3, density=density)
    cams = photo_cameras(n, width, height, scene.target)
    with torch.no_grad():
        imgs = rasterize(scene.gaussians, cams, mode="RGB", backend="torch").colors.clamp(0, 1)
    folder = root / "photos"
    names = [f"img_{i:02d}.png" for i in range(n)]
    for name, im in zip(names, imgs):
        save_png(folder / name, im)
    if cameras == "colmap":
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(scene.gaussians.num, generator=g)[:num_points]
        pts, rgb = scene.gaussians.means[idx], scene.gaussians.rgb[idx]
        write_colmap(ColmapModel.from_cameras(cams, names, pts, rgb), folder / "sparse" / "0", binary=False)
    elif cameras == "transforms":
        write_transforms_json(folder / "transforms.json", cams, names)
    return folder, cams


_RUNS: dict = {}


def tiny_run(steps: int = 6) -> Path:
    """A finished tiny ``vision3d reconstruct`` run (known COLMAP cameras + points), built once per session."""
    import atexit
    import shutil
    import tempfile

    if steps in _RUNS:
        return _RUNS[steps]
    from vision3d.cli.main import main

    root = Path(tempfile.mkdtemp(prefix="v3d_recon_"))
    atexit.register(shutil.rmtree, root, True)
    folder, _ = make_photo_folder(root, n=8, width=32, height=24, num_points=300)
    rc = main(run_args(folder, root / "run", steps))
    if rc != 0:
        raise RuntimeError(f"tiny reconstruct run failed with exit code {rc}")
    _RUNS[steps] = root / "run"
    return _RUNS[steps]


def run_args(folder: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "reconstruct", str(folder), "--out", str(out), "--poses", "known", "--steps", str(steps),
        "--holdout-every", "4", "--video-path-frames", "4", "--fit.ssim-weight", "0", "--fit.log-every", "1",
        "--no-progress", "--no-lpips", *extra,
    ]


def make_video_like_folder(root: Path, n: int = 14, width: int = 160, height: int = 120, density: float = 1.5,
                           arc_deg: float = 90.0) -> Path:
    """Frames along a smooth arc (like a hand-held video), textured enough for SIFT; no cameras written."""
    from vision3d.data.synthetic import synthetic_cameras
    from vision3d.gaussians.procedural import procedural_scene
    from vision3d.render import rasterize
    from vision3d.utils.images import save_png

    scene = procedural_scene(seed=3, density=density)
    cams = synthetic_cameras(n, scene.target, 2.4, width, height, seed=1, arc_deg=arc_deg)
    with torch.no_grad():
        imgs = rasterize(scene.gaussians, cams, mode="RGB", backend="torch", background=torch.ones(3)).colors
    folder = root / "frames"
    for i, im in enumerate(imgs.clamp(0, 1)):
        save_png(folder / f"f{i:02d}.png", im)
    return folder
