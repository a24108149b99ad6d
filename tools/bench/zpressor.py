"""Time and peak memory of ZPressor, and of the multi-view stage it shields, as context views grow.

ZPressor turns ``V`` context views into ``K`` anchor views, so whatever runs after it sees ``K``
views whatever ``V`` is. For each view count the run measures, on the same random features:

- ``zp``: the ZPressor module itself (released configuration: width 128, 1 head, 6 blocks);
- ``host(V)``: a stand-in for the host's multi-view stage on all ``V`` views: ``--host-layers``
  pre-norm transformer blocks with global attention over every view's tokens (the cross-view
  attention of DepthSplat/MVSplat's multi-view transformer, whose cost grows as ``(V*H*W)^2``);
- ``host(K)``: the same stand-in on the ``K`` compressed views;

and the ratio ``(zp + host(K)) / host(V)``. The stand-in is named as such in the printout; it is
not the real host (``vision3d.recon.depthsplat``), whose cost volume and U-Net add per-view work.

CPU (default): 8x8 feature maps (a 64x64 image at 1/8), views 2 6 12 24 36 100; peak memory is the
process's peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs``, Linux), with the
script re-run under ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set
(otherwise glibc keeps the warm-up's memory and later peaks read as 0). CUDA
(``--device cuda``): feature maps at 1/8 of 256x256 and of 480x640 (``--sizes``), bf16 attention
(``precision="bf16"``, the authors' default), peak memory from ``torch.cuda.max_memory_allocated``.
Views with ``V <= K`` use ``K = V`` (nothing to compress). An out-of-memory run reads ``oom``.

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
from torch import nn

from vision3d.layers.attention import attention, merge_heads, split_heads
from vision3d.recon.zpressor import ZPressor
from vision3d.utils.io import write_text_atomic


def _bench_vggt():  # the resident-set helpers live in the VGGT benchmark; reuse them
    spec = importlib.util.spec_from_file_location("_bench_vggt", Path(__file__).with_name("vggt.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class GlobalAttentionStandIn(nn.Module):
    """Pre-norm blocks, global self-attention over all views' tokens + MLP: the host stand-in."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm1": nn.LayerNorm(dim), "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                    "norm2": nn.LayerNorm(dim),
                    "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
                }
            )
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, V, C, H, W] -> [B, V*H*W, C]
        t = x.flatten(3).transpose(2, 3).flatten(1, 2)
        for b in self.blocks:
            q, k, v = (split_heads(u, self.heads) for u in b["qkv"](b["norm1"](t)).chunk(3, -1))
            t = t + b["proj"](merge_heads(attention(q, k, v)))
            t = t + b["mlp"](b["norm2"](t))
        return t


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


def _cameras(B: int, V: int, device) -> torch.Tensor:  # [B, V, 4, 4] on a noisy circle
    g = torch.Generator().manual_seed(V)
    ang = torch.linspace(0, 2 * torch.pi, V + 1)[:V]
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    c2w[..., 0, 3], c2w[..., 2, 3] = ang.cos(), ang.sin()
    c2w[..., :3, 3] += 0.05 * torch.randn(B, V, 3, generator=g)
    return c2w.to(device)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--views", type=int, nargs="+", default=[2, 6, 12, 24, 36, 100])
    ap.add_argument("--sizes", type=str, nargs="+", default=None,
                    help="image sizes HxW (features at 1/--stride); CPU default 64x64, CUDA 256x256 480x640")
    ap.add_argument("--stride", type=int, default=8, help="feature stride of the host (DepthSplat: 8 at 1/8 res.)")
    ap.add_argument("--anchors", type=int, default=6, help="K (released DepthSplat/MVSplat: 6)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--host-layers", type=int, default=6, help="blocks of the host stand-in")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tools/bench/zpressor.py: --device cuda given but CUDA is not available")
    if device.type == "cpu" and argv is None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    sizes = a.sizes or (["256x256", "480x640"] if device.type == "cuda" else ["64x64"])
    rss = _bench_vggt()
    torch.manual_seed(0)
    precision = "bf16" if device.type == "cuda" else "fp32"
    zp = ZPressor(a.dim, 1, 6, precision=precision).to(device).eval()
    host = GlobalAttentionStandIn(a.dim, a.host_layers, heads=1).to(device).eval()
    rows = []
    print(f"device={device} width={a.dim} K={a.anchors} zpressor precision={precision} "
          f"host=stand-in ({a.host_layers} global-attention blocks)")
    print(f"{'size':>8} {'feat':>6} {'V':>4} {'K':>3} {'zp s':>8} {'zp MiB':>8} {'host(V) s':>10} {'host(V) MiB':>11} "
          f"{'host(K) s':>10} {'host(K) MiB':>11} {'(zp+hK)/hV':>10}")
    for size in sizes:
        h, w = (int(s) for s in size.lower().split("x"))
        fh, fw = h // a.stride, w // a.stride
        for V in a.views:
            K = min(a.anchors, V)
            x = torch.randn(1, V, a.dim, fh, fw, device=device)
            c2w = _cameras(1, V, device)
            r_zp = measure(lambda: zp(x, c2w, K), a.repeat, device, rss)
            z = torch.randn(1, K, a.dim, fh, fw, device=device)
            r_hv = measure(lambda: host(x), a.repeat, device, rss)
            r_hk = measure(lambda: host(z), a.repeat, device, rss)
            row = {"size": size, "feature": f"{fh}x{fw}", "views": V, "anchors": K, "device": str(device),
                   **{f"zp_{k}": v for k, v in r_zp.items()}, **{f"hostV_{k}": v for k, v in r_hv.items()},
                   **{f"hostK_{k}": v for k, v in r_hk.items()}}
            row["ratio"] = (row["zp_time_s"] + row["hostK_time_s"]) / row["hostV_time_s"]
            rows.append(row)
            print(f"{size:>8} {row['feature']:>6} {V:>4} {K:>3} {row['zp_time_s']:>8.4f} {row['zp_peak_mib']:>8.1f} "
                  f"{row['hostV_time_s']:>10.4f} {row['hostV_peak_mib']:>11.1f} {row['hostK_time_s']:>10.4f} "
                  f"{row['hostK_peak_mib']:>11.1f} {row['ratio']:>10.3f}", flush=True)
    if a.json:
        write_text_atomic(a.json, json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
