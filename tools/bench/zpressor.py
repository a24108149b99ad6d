"""Time and peak memory of the DepthSplat host with and without ZPressor as context views grow.

ZPressor turns ``V`` context views into ``K`` anchor views (``--anchors``, released: 6), so the
host's depth network and Gaussian head see ``K`` views whatever ``V`` is. For each view count the
run measures, on the same random images and cameras (views on a noisy circle):

- ``zp``: the ZPressor module alone, on ``[1, V, C, H/8, W/8]`` features (C = the host's width);
- ``host``: ``DepthSplat.forward`` without ZPressor (all ``V`` views);
- ``host+zp``: ``DepthSplat.forward`` with ZPressor (``K`` anchors; the host skips it when
  ``V <= K``); both hosts share every weight;

and the ratio ``host+zp / host``. Weights are random (timing only).

CPU (default): ``depthsplat_tiny`` at 32x32, views 2 6 12 24 36 100 (about a minute on two
cores); peak memory is the process's peak resident set
(``VmHWM`` reset through ``/proc/self/clear_refs``, Linux), the script re-running itself under
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set (otherwise glibc
keeps the warm-up's memory and later peaks read as 0). CUDA (``--device cuda``): ``depthsplat_small``
at 256x256 and 480x640 (``--sizes``), bf16 autocast and ``precision="bf16"`` (the authors'
default), views 2 6 12 24 36 100 by default; peak memory from ``torch.cuda.max_memory_allocated``.
An out-of-memory run reads ``oom`` and the sweep goes on.

    python tools/bench/zpressor.py                          # CPU
    python tools/bench/zpressor.py --device cuda --views 2 6 12 24 36 100 200 --json zp.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from vision3d import recon
from vision3d.geometry import Cameras
from vision3d.recon.zpressor import ZPressor, ZPressorConfig
from vision3d.utils.io import write_text_atomic


def _bench_vggt():  # the resident-set helpers live in the VGGT benchmark; reuse them
    spec = importlib.util.spec_from_file_location("_bench_vggt", Path(__file__).with_name("vggt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(fn, repeat: int, device: torch.device, rss) -> dict:
    """Best-of-``repeat`` wall time (s) and peak memory (MiB above the pre-run level), after a warm-up."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with torch.no_grad(), amp:
            fn()
        times, peak = [], 0.0
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                ok = rss._rss_peak_reset()
                base = rss._rss_kib("VmRSS")
            t0 = time.perf_counter()
            with torch.no_grad(), amp:
                out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
            else:
                peak = max(peak, (rss._rss_kib("VmHWM") - base) / 1024 if ok else float("nan"))
            times.append(time.perf_counter() - t0)
            del out
        return {"time_s": min(times), "peak_mib": peak}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"time_s": float("nan"), "peak_mib": float("nan"), "oom": True}


def _cameras(V: int, H: int, W: int, device) -> Cameras:  # batch [1, V], on a noisy circle looking inwards
    g = torch.Generator().manual_seed(V)
    ang = torch.linspace(0, 2 * torch.pi, V + 1)[:V]
    centre = torch.stack([2 * ang.sin(), 0.05 * torch.randn(V, generator=g), -2 * ang.cos()], -1)
    fwd = -centre / centre.norm(dim=-1, keepdim=True)  # z axis towards the origin
    right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]).expand(V, 3), fwd)
    right = right / right.norm(dim=-1, keepdim=True)
    c2w = torch.eye(4).repeat(V, 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, torch.linalg.cross(fwd, right), fwd, centre
    K = torch.tensor([[1.0 * W, 0, W / 2], [0, 1.0 * W, H / 2], [0, 0, 1]]).expand(1, V, 3, 3)
    return Cameras(K.to(device), c2w[None].to(device), W, H, near=0.5, far=10.0)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--views", type=int, nargs="+", default=None, help="context view counts to sweep")
    ap.add_argument("--sizes", type=str, nargs="+", default=None, help="image sizes HxW (CPU 32x32, CUDA 256x256 480x640)")
    ap.add_argument("--host", default=None, help="registered DepthSplat variant (CPU depthsplat_tiny, CUDA depthsplat_small)")
    ap.add_argument("--anchors", type=int, default=6, help="K (released DepthSplat/MVSplat: 6)")
    ap.add_argument("--layers", type=int, default=6, help="ZPressor blocks (released: 6)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/bench/zpressor.py: --device cuda given but CUDA is not available")
    if device.type == "cpu" and argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    views = a.views or [2, 6, 12, 24, 36, 100]
    sizes = a.sizes or (["256x256", "480x640"] if cuda else ["32x32"])
    host_name = a.host or ("depthsplat_small" if cuda else "depthsplat_tiny")
    rss = _bench_vggt()
    torch.manual_seed(0)
    host = recon.create(host_name).to(device).eval()
    C = host.cfg.feature_channels
    precision = "bf16" if cuda else "fp32"
    zcfg = ZPressorConfig(num_anchors=a.anchors, embed_dim=C, num_layers=a.layers, precision=precision)
    host_zp = recon.create(host_name, zpressor=zcfg).to(device).eval()
    missing, unexpected = host_zp.load_state_dict(host.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("zpressor.") for k in missing)
    host_zp.zpressor = ZPressor.from_config(zcfg).to(device).eval()  # the configured precision
    zp = host_zp.zpressor
    stride = host.cfg.lowest_feature_resolution
    rows = []
    print(f"device={device} host={host_name} (C={C}, features at 1/{stride}) K={a.anchors} "
          f"ZPressor blocks={a.layers} precision={precision}")
    print(f"{'size':>8} {'V':>4} {'zp s':>8} {'zp MiB':>8} {'host s':>8} {'host MiB':>9} "
          f"{'host+zp s':>10} {'host+zp MiB':>11} {'time':>6} {'memory':>7}")
    for size in sizes:
        h, w = (int(s) for s in size.lower().split("x"))
        m = host.size_multiple
        if h % m or w % m:
            raise SystemExit(f"tools/bench/zpressor.py: size {size} is not a multiple of {m} for {host_name}")
        for V in views:
            images = torch.rand(1, V, 3, h, w, device=device)
            cams = _cameras(V, h, w, device)
            feats = torch.randn(1, V, C, h // stride, w // stride, device=device)
            r_zp = measure(lambda: zp(feats, cams.cam_to_world, min(a.anchors, V)), a.repeat, device, rss)
            r_h = measure(lambda: host(images, cams), a.repeat, device, rss)
            r_hz = measure(lambda: host_zp(images, cams), a.repeat, device, rss)
            row = {"size": size, "views": V, "anchors": min(a.anchors, V), "device": str(device), "host": host_name,
                   **{f"zp_{k}": v for k, v in r_zp.items()}, **{f"host_{k}": v for k, v in r_h.items()},
                   **{f"hostzp_{k}": v for k, v in r_hz.items()}}
            row["time_ratio"] = row["hostzp_time_s"] / row["host_time_s"]
            row["memory_ratio"] = row["hostzp_peak_mib"] / row["host_peak_mib"] if row["host_peak_mib"] else float("nan")
            rows.append(row)
            print(f"{size:>8} {V:>4} {row['zp_time_s']:>8.3f} {row['zp_peak_mib']:>8.1f} {row['host_time_s']:>8.3f} "
                  f"{row['host_peak_mib']:>9.1f} {row['hostzp_time_s']:>10.3f} {row['hostzp_peak_mib']:>11.1f} "
                  f"{row['time_ratio']:>6.2f} {row['memory_ratio']:>7.2f}", flush=True)
    if a.json:
        write_text_atomic(a.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
