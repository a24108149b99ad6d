"""Benchmark of the viewer's server-side costs: vision3d's renderer per frame (rgb, depth) at the preview
and at-rest widths, against the old viewer's only path (a 320-px rgb frame on every camera change), and
the one-off conversion of the scene to viser's splats (what the default mode costs the server).

    python tools/bench/viewer.py --quick --out bench_viewer.json
    python tools/bench/viewer.py --density 1.0 --widths 160 320 640 1280

The scene is :func:`vision3d.gaussians.procedural.procedural_scene` seen from one of its hemisphere
cameras (4:3). Prints a table (median wall time of ``--repeats`` frames, and its ratio to the
320-px rgb frame measured in the same run) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="widths 160 320 640, 2 repeats")
    ap.add_argument("--widths", type=int, nargs="+", default=[160, 320, 640, 1280])
    ap.add_argument("--density", type=float, default=0.7, help="procedural scene density (0.7: about 7.7k Gaussians)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("bench_viewer.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.widths, args.repeats = [160, 320, 640], 2

    import torch

    from vision3d.gaussians.procedural import hemisphere_cameras, procedural_scene
    from vision3d.viewer.app import camera_from_pose, fov_y_of, render_view, splat_arrays
    from vision3d.geometry.rotations import matrix_to_quat

    scene = procedural_scene(seed=0, density=args.density)
    g = scene.gaussians.to(args.device)
    cam = hemisphere_cameras(1, scene.target, (2.5, 2.5), (30.0, 30.0), 640, 480, 55.0)
    q, c = matrix_to_quat(cam.rotation[0].double()).numpy(), cam.centers[0].double().numpy()
    fov = float(fov_y_of(cam)[0])
    backend = "gsplat" if args.device.startswith("cuda") else "torch"
    rows = []
    widths = sorted(set(args.widths) | {320})
    for mode in ("rgb", "depth"):
        for w in widths:
            vc = camera_from_pose(q, c, fov, w, round(w * 3 / 4))
            t = _median_time(lambda: render_view(g, vc, mode, backend=backend), args.repeats)
            rows.append({"what": f"{mode} frame", "width": w, "seconds": t})
    t_splat = _median_time(lambda: splat_arrays(g), args.repeats)
    rows.append({"what": "splat conversion (once)", "width": None, "seconds": t_splat})
    ref = next(r["seconds"] for r in rows if r["what"] == "rgb frame" and r["width"] == 320)
    print(f"{g.num} Gaussians, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'what':<26}{'width':>7}{'median s':>11}{'x 320-px rgb':>14}")
    for r in rows:
        r["ratio_to_320_rgb"] = r["seconds"] / ref
        print(f"{r['what']:<26}{r['width'] or '-':>7}{r['seconds']:>11.4f}{r['ratio_to_320_rgb']:>14.2f}")
    args.out.write_text(json.dumps({"num_gaussians": g.num, "device": args.device, "cpus": os.cpu_count(),
                                    "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
