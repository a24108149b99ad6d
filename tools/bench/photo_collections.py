"""``vision3d reconstruct`` on a procedural photo collection with mixed cameras and lighting.

The collection: the procedural scene photographed on a walk around it by three cameras (landscape
and portrait sizes, three zooms), each photo with its own exposure and white balance
(:func:`vision3d.gaussians.procedural.collection_cameras` and ``collection_exposures``). Two checks,
both in one run:

1. **SfM registration and determinism**: pycolmap incremental SfM ``--runs`` times with per-image
   cameras and with one shared camera (the old hard-coded setting), single-threaded and seeded;
   the table gives registered/total per run and whether the runs' poses are identical.
2. **Appearance**: the pipeline fitted twice on the known cameras, plain and with
   ``--fit.appearance``; held-out PSNR on the right half of each held-out photo (the appearance
   run fits the photo's embedding on its left half first, the NeRF-W protocol), the plain run
   scored on the same right halves.

    python tools/bench/photo_collections.py --json collections.json
    python tools/bench/photo_collections.py --quick               # fewer SfM runs and steps
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def make_collection(root: Path, n: int, scale: float, density: float, strength: float, write_cameras: bool):
    from vision3d.gaussians.procedural import collection_cameras, collection_exposures, procedural_scene
    from vision3d.geometry.colmap import ColmapModel, write_colmap
    from vision3d.render import rasterize
    from vision3d.utils.images import save_png

    scene = procedural_scene(seed=3, density=density)
    sizes = tuple((round(w * scale), round(h * scale)) for w, h in ((160, 120), (120, 160), (144, 108)))
    cams = collection_cameras(n, scene.target, arc_deg=80, sizes=sizes, fovs_deg=(55.0, 48.0, 60.0))
    gain, off = collection_exposures(n, strength=strength, seed=0)
    names = [f"p{i:02d}.png" for i in range(n)]
    for i, c in enumerate(cams):
        with torch.no_grad():
            im = rasterize(scene.gaussians, c, mode="RGB", backend="torch", background=torch.ones(3)).colors[0]
        save_png(root / names[i], (gain[i][:, None, None] * im.clamp(0, 1) + off[i][:, None, None]).clamp(0, 1))
    if write_cameras:
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(scene.gaussians.num, generator=g)[:3000]
        model = ColmapModel.from_cameras(cams[0], names[:1], scene.gaussians.means[idx], scene.gaussians.rgb[idx])
        for i, (c, nm) in enumerate(zip(cams[1:], names[1:]), start=2):
            one = ColmapModel.from_cameras(c, [nm])
            cam, img = one.cameras[1], one.images[1]
            cam.id, img.id, img.camera_id = i, i, i
            model.cameras[i], model.images[i] = cam, img
        write_colmap(model, root / "sparse" / "0", binary=False)
    return cams


def sfm_runs(folder: Path, work: Path, runs: int) -> list[dict]:
    from vision3d.data.folder import list_images, load_images
    from vision3d.poses.base import PoseEstimationError, PoseInput
    from vision3d.poses.colmap import ColmapPoses

    s = load_images(list_images(folder), size_policy="keep")
    inp = PoseInput(images=s.images, names=s.names, source=folder)
    rows = []
    for mode in ("per-image", "single"):
        regs, poses, t0 = [], [], time.perf_counter()
        for r in range(runs):
            est = ColmapPoses(camera_mode=mode, num_threads=1, seed=0, progress=False, allow_partial=True)
            try:
                res = est.estimate(inp, work / f"{mode}_{r}")
                regs.append(int(res.info["registered"]))
                poses.append(torch.cat([c.cam_to_world for c in res.cameras]))
            except PoseEstimationError:
                regs.append(0)
                poses.append(None)
        same = all(p is not None and poses[0] is not None and p.shape == poses[0].shape and torch.equal(p, poses[0])
                   for p in poses)
        rows.append({"camera_mode": mode, "registered": regs, "total": len(s.names), "identical_runs": same,
                     "time_s": time.perf_counter() - t0})
    return rows


def appearance_runs(folder: Path, out: Path, steps: int) -> dict:
    from vision3d.cli.main import main

    res = {}
    for name, extra in (("plain", []), ("appearance", ["--fit.appearance"])):
        args = ["reconstruct", str(folder), "--out", str(out / name), "--poses", "known", "--steps", str(steps),
                "--holdout-every", "4", "--no-video", "--no-progress", "--no-lpips", "--max-size", "80",
                "--fit.background", "1", "1", "1", "--fit.densify", "none", *extra]
        t0 = time.perf_counter()
        if main(args) != 0:
            raise RuntimeError(f"reconstruct {name} failed")
        m = json.loads((out / name / "metrics.json").read_text())
        res[name] = {"metrics": m["test"], "time_s": time.perf_counter() - t0}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        a.runs, a.steps = 2, 150
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="v3d_collection_"))
    t0 = time.perf_counter()
    make_collection(root / "sfm_photos", 14, 2.0, 3.0, 0.35, write_cameras=False)
    sfm = sfm_runs(root / "sfm_photos", root / "sfm_work", a.runs)
    make_collection(root / "fit_photos", 16, 1.0, 1.0, 0.4, write_cameras=True)
    app = appearance_runs(root / "fit_photos", root / "runs", a.steps)
    plain_half = app["plain"]["metrics"]["psnr_right_half"]
    app_m = app["appearance"]["metrics"]["appearance"]
    print("\nSfM on 14 photos (3 sizes, 3 zooms, per-photo exposure), 1 thread, seed 0")
    print(f"{'camera mode':<12} {'registered per run':<28} {'identical':<10} {'time s':>7}")
    for r in sfm:
        print(f"{r['camera_mode']:<12} {str(r['registered']) + ' of ' + str(r['total']):<28} "
              f"{str(r['identical_runs']):<10} {r['time_s']:7.1f}")
    print(f"\nHeld-out right halves, {a.steps} steps, 16 photos (4 held out)")
    print(f"{'fit':<34} {'PSNR dB':>8}")
    print(f"{'plain':<34} {plain_half:8.2f}")
    print(f"{'appearance, mean embedding':<34} {app_m['psnr_right_half_mean_embedding']:8.2f}")
    print(f"{'appearance, fitted on left half':<34} {app_m['psnr_right_half_fitted']:8.2f}")
    gain = app_m["psnr_right_half_fitted"] - plain_half
    print(f"ratio/margin: appearance (fitted) - plain = {gain:+.2f} dB; total {time.perf_counter() - t0:.0f} s")
    if a.json:
        a.json.write_text(json.dumps({"sfm": sfm, "appearance": {"plain_right_half_psnr": plain_half, **app_m,
                                                                 "margin_db": gain},
                                      "steps": a.steps, "platform": platform.platform(),
                                      "torch": torch.__version__}, indent=2, default=str))


if __name__ == "__main__":
    main()
