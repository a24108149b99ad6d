"""Time and peak memory of VGGT vs FlashVGGT as the number of frames grows, in the same run.

Both models share one set of random weights (FlashVGGT reuses every VGGT parameter), so the
comparison isolates the global attention: dense over all tokens (VGGT) vs cross-attention to
per-frame descriptors (FlashVGGT, ``--downfactor``, frame 0 as key frame), and optionally
FlashVGGT's chunk-recursive mode (``--chunk``).

By default only the aggregator is timed (the heads do the same per-frame work in both models;
``--heads`` times the full predict). CPU (default): the tiny configuration at 112x112 (8x8
patches, 69 tokens per frame), frames 4 -> 128; peak memory is the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before each run, Linux only).
GPU (``--gpu``): the 1B configuration at 518x518 in bf16 autocast, frames 32 -> 1000 -> 3000
(``--gpu-sizes``) where memory allows; peak memory is ``torch.cuda.max_memory_allocated``. A run
that runs out of memory is reported as ``oom`` and the sweep goes on. The paper reports FlashVGGT at
9.3% of VGGT's inference time at 1,000 images (arXiv:2512.01540).

    python tools/bench/vggt.py                       # CPU, tiny, frames 4 16 64 128
    python tools/bench/vggt.py --gpu --gpu-sizes     # GPU, 1B, 518 px, 32 100 300 1000 3000
    python tools/bench/vggt.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vision3d.recon.flashvggt import FlashVGGT, FlashVGGTConfig
from vision3d.recon.vggt import VGGT, VGGT_TINY, VGGTConfig


def _rss_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run(model, images: torch.Tensor, chunk: int | None, heads: bool):
    """One forward: the full ``predict`` with ``heads``, else the aggregator only (the part that differs)."""
    if heads:
        return model.predict(images, **({} if chunk is None else {"chunk_size": chunk}))
    if chunk is None:
        return model.aggregate(images)
    caches = [dict() for _ in range(model.cfg.depth)]
    keep = {model.cfg.depth - 1}
    return [model.aggregator.forward_chunk(images[:, f0:f0 + chunk], caches, f0 == 0, keep)[-1]
            for f0 in range(0, images.shape[1], chunk)]


def measure(model, images: torch.Tensor, chunk: int | None, repeat: int, device: torch.device,
            heads: bool = False) -> dict:
    """Best-of-``repeat`` wall time (s) and peak memory (MiB above the pre-run level), after one warm-up."""
    times, peak = [], 0.0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        run(model, images[:, :2], None if chunk is None else 1, heads)
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            ok = _rss_peak_reset()
            base = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = run(model, images, chunk, heads)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            peak = max(peak, (_rss_kib("VmHWM") - base) / 1024 if ok else float("nan"))
        times.append(time.perf_counter() - t0)
        del out
    return {"time_s": min(times), "peak_mib": peak}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="CUDA, 1B configuration, 518 px, bf16")
    ap.add_argument("--gpu-sizes", action="store_true", help="frames 32 100 300 1000 3000 (with --gpu)")
    ap.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts to sweep")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size")
    ap.add_argument("--downfactor", type=int, default=None, help="FlashVGGT kv_downfactor (tiny: 2, 1B: 4)")
    ap.add_argument("--chunk", type=int, default=0, help="also time FlashVGGT chunk-recursive with this chunk size")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--heads", action="store_true", help="time the full predict (camera + DPT heads too)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    a = ap.parse_args(argv)

    torch.manual_seed(0)
    if a.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("tools/bench/vggt.py: --gpu given but CUDA is not available")
        device, base = torch.device("cuda"), {}
        frames = a.frames or ([32, 100, 300, 1000, 3000] if a.gpu_sizes else [8, 32])
        h, w = a.size or (518, 518)
        df = a.downfactor or 4
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        device, base = torch.device("cpu"), dict(VGGT_TINY)
        frames = a.frames or [4, 16, 64, 128]
        h, w = a.size or (112, 112)
        df = a.downfactor or 2
    vggt = VGGT(VGGTConfig(**base, max_frames=10**9)).to(device).eval()
    flash = FlashVGGT(FlashVGGTConfig(**base, kv_downfactor=df, keyframe_every=0, max_frames=10**9)).to(device).eval()
    flash.load_state_dict(vggt.state_dict())
    rows = []
    print(f"device={device} size={h}x{w} kv_downfactor={df} params={sum(p.numel() for p in vggt.parameters()):,}")
    print(f"{'frames':>7} {'vggt s':>9} {'flash s':>9} {'ratio':>6} {'vggt MiB':>9} {'flash MiB':>9}"
          + (f" {'chunk s':>8} {'chunk MiB':>9}" if a.chunk else ""))
    for s in frames:
        images = torch.rand(1, s, 3, h, w, device=device)
        row = {"frames": s, "height": h, "width": w, "device": str(device), "kv_downfactor": df}
        for name, model, chunk in (("vggt", vggt, None), ("flash", flash, None)) + (
                (("chunk", flash, a.chunk),) if a.chunk else ()):
            try:
                r = measure(model, images, chunk, a.repeat, device, a.heads)
            except torch.OutOfMemoryError:
                r = {"time_s": float("nan"), "peak_mib": float("nan"), "oom": True}
                torch.cuda.empty_cache()
            row.update({f"{name}_{k}": v for k, v in r.items()})
        row["time_ratio"] = row["flash_time_s"] / row["vggt_time_s"]
        rows.append(row)
        line = (f"{s:>7} {row['vggt_time_s']:>9.3f} {row['flash_time_s']:>9.3f} {row['time_ratio']:>6.2f} "
                f"{row['vggt_peak_mib']:>9.1f} {row['flash_peak_mib']:>9.1f}")
        if a.chunk:
            line += f" {row['chunk_time_s']:>8.3f} {row['chunk_peak_mib']:>9.1f}"
        print(line, flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
