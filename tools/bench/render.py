"""Benchmark of :func:`vision3d.render.rasterize`: the PyTorch twin (and gsplat's CUDA kernels on a GPU).

For each number of Gaussians and resolution: median time of a forward pass and of forward+backward,
the process CPU time of both (on a shared machine closer to the cost than wall time), and the peak
memory (CPU: growth of the peak RSS of a fresh worker process; GPU: peak allocated).
Prints a table and writes JSON.

    python tools/bench/render.py --quick --out bench_render.json
    python tools/bench/render.py --counts 1000 10000 100000 1000000 --sizes 128 256 512 1024

Scenes: Gaussians uniformly inside the view frustum at depths 2..4, SH degree 3, opacities in
[0.1, 0.9], world scales log-uniform around ``1.5 / sqrt(N)`` (so the image coverage is similar for
every N). Each configuration runs in its own subprocess so the CPU memory peak is its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUICK = {"counts": [1000, 10000, 20000], "sizes": [128, 256]}
FULL = {"counts": [1000, 10000, 100000, 1000000], "sizes": [128, 256, 512, 1024]}


def make_scene(n: int, res: int, device: str, seed: int = 0):
    import torch

    from vision3d.gaussians import Gaussians
    from vision3d.geometry import Cameras

    g = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=g) * 2 + 2
    xy = (torch.rand(n, 2, generator=g) * 2 - 1) * z[:, None] * 0.55
    means = torch.cat([xy, z[:, None]], -1)
    base = 1.5 / math.sqrt(n)
    scales = base * torch.exp(torch.randn(n, 3, generator=g) * 0.5)
    quats = torch.randn(n, 4, generator=g)
    opac = torch.rand(n, generator=g) * 0.8 + 0.1
    sh = torch.randn(n, 16, 3, generator=g) * 0.1
    sh[:, 0] = torch.randn(n, 3, generator=g) * 0.8
    gs = Gaussians(means, quats, scales, opac, sh).to(device)
    f = res / (2 * 0.55)
    K = torch.tensor([[f, 0, res / 2], [0, f, res / 2], [0, 0, 1.0]])
    cams = Cameras(K[None], torch.eye(4)[None], res, res).to(device)
    return gs, cams


def run_one(n: int, res: int, backend: str, device: str, repeats: int, tile_size: int | None) -> dict:
    import torch

    from vision3d.render import rasterize

    gs, cams = make_scene(n, res, device)
    params = [t.requires_grad_() for t in gs.tensors().values()]
    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def fwd():
        return rasterize(gs, cams, sh_degree=3, mode="RGB", backend=backend, tile_size=tile_size)

    def fwd_bwd():
        out = fwd()
        out.colors.mean().backward()
        for p in params:
            p.grad = None
        return out

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    out = fwd_bwd()  # warm-up (and JIT build of gsplat's kernels on first use)
    sync()
    t_f, t_fb, c_f, c_fb = [], [], [], []
    for _ in range(repeats):
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            fwd()
            sync()
            t_f.append(time.perf_counter() - t0)
            c_f.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        fwd_bwd()
        sync()
        t_fb.append(time.perf_counter() - t0)
        c_fb.append(time.process_time() - c0)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - mem0) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return {
        "backend": backend,
        "device": device,
        "n": n,
        "res": res,
        "tile_size": tile_size,
        "threads": torch.get_num_threads(),
        "forward_ms": 1e3 * statistics.median(t_f),
        "forward_backward_ms": 1e3 * statistics.median(t_fb),
        # CPU time of this process (all threads): on a shared machine, closer to the cost than wall time
        "forward_cpu_ms": 1e3 * statistics.median(c_f),
        "forward_backward_cpu_ms": 1e3 * statistics.median(c_fb),
        "peak_mem_mb": peak_mb,
        "n_isects": out.info.get("n_isects"),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"small subset: {QUICK}")
    ap.add_argument("--counts", type=int, nargs="+", help="numbers of Gaussians")
    ap.add_argument("--sizes", type=int, nargs="+", help="square resolutions")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--tile-size", type=int, default=None, help="default: each backend's own")
    ap.add_argument("--out", type=Path, default=Path("bench_render.json"))
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # one configuration in this process; print its JSON
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        n, res, backend, device = args.worker.split(",")
        print(json.dumps(run_one(int(n), int(res), backend, device, args.repeats, args.tile_size)))
        return

    import torch

    from vision3d.render.rasterize import gsplat_cuda_usable

    grid = QUICK if args.quick else FULL
    counts = args.counts or grid["counts"]
    sizes = args.sizes or grid["sizes"]
    runs = [("torch", "cpu")]
    if torch.cuda.is_available():
        runs.append(("torch", "cuda"))
        if gsplat_cuda_usable():
            runs.append(("gsplat", "cuda"))
    rows = []
    for res in sizes:
        for n in counts:
            for backend, device in runs:
                cmd = [sys.executable, __file__, "--worker", f"{n},{res},{backend},{device}", "--repeats", str(args.repeats)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if args.tile_size:
                    cmd += ["--tile-size", str(args.tile_size)]
                env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    row = {"backend": backend, "device": device, "n": n, "res": res, "error": proc.stderr.strip()[-300:]}
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                _print_row(row)
    for r in rows:  # gsplat ratio
        if r.get("backend") == "torch" and "error" not in r:
            ref = [q for q in rows if q.get("backend") == "gsplat" and q["n"] == r["n"] and q["res"] == r["res"] and "error" not in q]
            if ref:
                r["fb_ratio_vs_gsplat"] = r["forward_backward_ms"] / ref[0]["forward_backward_ms"]
    args.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__, "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {args.out}")


_HEADER = False


def _print_row(r: dict) -> None:
    global _HEADER
    if not _HEADER:
        print(
            f"{'backend':8} {'device':6} {'N':>8} {'res':>5} {'thr':>3} {'fwd ms':>9} {'fwd+bwd ms':>11} "
            f"{'fwd cpu':>9} {'f+b cpu':>9} {'peak MB':>8} {'isects':>9}"
        )
        _HEADER = True
    if "error" in r:
        print(f"{r['backend']:8} {r['device']:6} {r['n']:>8} {r['res']:>5}  error: {r['error'][-120:]}")
        return
    print(
        f"{r['backend']:8} {r['device']:6} {r['n']:>8} {r['res']:>5} {r['threads']:>3} {r['forward_ms']:>9.1f} "
        f"{r['forward_backward_ms']:>11.1f} {r['forward_cpu_ms']:>9.1f} {r['forward_backward_cpu_ms']:>9.1f} "
        f"{r['peak_mem_mb']:>8.0f} {str(r['n_isects']):>9}",
        flush=True,
    )


if __name__ == "__main__":
    main()
