"""Benchmark vision3d's timm backbones beside comparable timm models.

For every vision3d-registered variant (models whose module is under ``vision3d.backbones``) and
the reference timm models, in one run: parameters (counted on the meta device), GMACs (counted
with ``torch.utils.flop_counter.FlopCounterMode`` at batch 1: MACs = counted FLOPs / 2; it counts
convolutions, matmuls/einsums and SDPA, not element-wise ops, norms or FFTs, so AFFNet's
``rfft2``/``irfft2`` are NOT included and are listed separately as an analytic estimate), and
throughput (images/s, eval mode, ``torch.inference_mode``) for several batch sizes. FFNet is also
timed after ``reparameterize()`` (its deploy structure). With ``--device cuda`` the forward runs
under bf16 autocast.

    python tools/bench/backbones.py --quick                       # smallest variant per family
    python tools/bench/backbones.py --json bench.json --batches 1 2 4 8
    python tools/bench/backbones.py --peers --threads 1 --json peers.json   # speed per GMAC vs timm peers

``--peers`` times each family's model beside a timm model of similar GMACs (not a smaller one), batch
1, eval, interleaved rounds (median of per-round times, so load on a shared machine hits both alike),
and prints time per GMAC and the ratio ours / peer (goal: <= 1.2): the median over rounds of the
per-round ratio (ours and the peer timed back to back), with its interquartile range as the spread.
Models with ``reparameterize()`` are also timed in their inference structure, EWA in its
training-time MoE form (eval). ``--only ffnet_1`` restricts the pairs to the named families.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import timm
import torch
from timm.models._registry import model_entrypoint
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import vision3d.backbones  # noqa: E402,F401  (registers the models)

REFERENCE = ["mobilevit_xs", "convnext_atto", "pvt_v2_b0", "vit_tiny_patch16_224"]
# (ours, timm peer of similar GMACs) for the speed-per-MAC comparison
PEERS = [
    ("transnext_micro", "pvt_v2_b1"),
    ("ffnet_1", "convnext_nano"),
    ("affnet_et", "mobilevit_xxs"),
    ("ewa_vit_tiny_patch16_224", "vit_tiny_patch16_224"),
]


def vision3d_models() -> list[str]:
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("vision3d.backbones"))


def meta_params(name: str) -> int:
    try:
        with torch.device("meta"):
            model = timm.create_model(name)
    except (RuntimeError, NotImplementedError):  # a model that cannot be built on the meta device
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: torch.nn.Module, size: int) -> float:
    x = torch.randn(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def fft_gmacs_estimate(model: torch.nn.Module, size: int) -> float:
    """Analytic cost of AFFNet's FFT pairs: 2 transforms x 2.5 N log2 N real MACs per channel (N = H W)."""
    from vision3d.backbones.affnet import AdaptiveFrequencyFilter

    shapes: list[tuple[int, int, int]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(inp[0].shape[1:])))
        for m in model.modules()
        if isinstance(m, AdaptiveFrequencyFilter)
    ]
    with torch.inference_mode():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return sum(2 * 2.5 * c * h * w * math.log2(max(h * w, 2)) for c, h, w in shapes) / 1e9


def throughput(model: torch.nn.Module, batch: int, size: int, device: str, iters: int, warmup: int) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), amp:
        for _ in range(warmup):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    return batch * iters / dt


def _ms_per_image(model: torch.nn.Module, x: torch.Tensor, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / x.shape[0]


def bench_peers(args) -> tuple[list[dict], str]:
    """Speed per GMAC of each (ours, peer) pair: interleaved rounds, median ms, ratio of ms/GMAC."""
    import statistics

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    rows = []
    pairs = [(o, p) for o, p in PEERS if not args.only or o in args.only]
    if args.only and len(pairs) != len(args.only):
        raise SystemExit(f"--only: expected names among {[o for o, _ in PEERS]}, got {args.only}")
    for ours, peer in pairs:
        torch.manual_seed(0)
        models = {ours: timm.create_model(ours).eval(), peer: timm.create_model(peer).eval()}
        if hasattr(models[ours], "reparameterize"):
            import copy

            models[f"{ours} (deploy)"] = copy.deepcopy(models[ours]).reparameterize()
        size = timm.get_pretrained_cfg(peer).input_size[-1] if args.peer_size is None else args.peer_size
        x = torch.randn(1, 3, size, size, device=args.device)
        gmacs = {k: count_gmacs(m, size) for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in models}
        with torch.inference_mode(), amp:
            for m in models.values():
                m.to(args.device)
                for _ in range(args.warmup):
                    m(x)
            for _ in range(args.iters):
                for k, m in models.items():
                    times[k].append(_ms_per_image(m, x, args.device))
        for k in models:
            ms = statistics.median(times[k])
            # per-round ratio of time per GMAC, ours / peer (both timed in the same round)
            per_round = sorted((t / gmacs[k]) / (tp / gmacs[peer]) for t, tp in zip(times[k], times[peer]))
            q1, q3 = statistics.quantiles(per_round, n=4)[0::2] if len(per_round) > 1 else (per_round[0],) * 2
            rows.append(dict(model=k, peer=peer, size=size, gmacs=gmacs[k], ms=ms, ms_per_gmac=ms / gmacs[k],
                             ratio=statistics.median(per_round) if k != peer else 1.0,
                             ratio_iqr=[q1, q3] if k != peer else [1.0, 1.0], ms_rounds=times[k]))
            print(f"  {k:34s} {gmacs[k]:6.2f} GMACs {ms:8.2f} ms  {ms / gmacs[k]:7.2f} ms/GMAC", file=sys.stderr)
        del models
    header = ["model", "peer", "size", "GMACs", "ms (b1)", "ms/GMAC", "ours/peer per GMAC", "IQR over rounds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        peer_row = r["model"] == r["peer"]
        ratio = "(peer)" if peer_row else f"{r['ratio']:.2f}x"
        iqr = "" if peer_row else f"{r['ratio_iqr'][0]:.2f}-{r['ratio_iqr'][1]:.2f}"
        lines.append(f"| {r['model']} | {r['peer']} | {r['size']} | {r['gmacs']:.2f} | {r['ms']:.2f} | {r['ms_per_gmac']:.2f} | {ratio} | {iqr} |")
    return rows, "\n".join(lines)


def bench_one(name: str, label: str, model: torch.nn.Module, args, params: int) -> dict:
    model.eval()
    row = {"model": label, "params_M": params / 1e6, "gmacs": count_gmacs(model, args.size)}
    if any(type(m).__name__ == "AdaptiveFrequencyFilter" for m in model.modules()):
        row["fft_gmacs_estimate"] = fft_gmacs_estimate(model, args.size)
    model.to(args.device)
    row["img_per_s"] = {
        str(b): throughput(model, b, args.size, args.device, args.iters, args.warmup) for b in args.batches
    }
    print(f"  {label:28s} {row['params_M']:7.2f}M {row['gmacs']:6.2f} GMACs " + " ".join(
        f"b{b}:{v:7.1f}" for b, v in row["img_per_s"].items()), file=sys.stderr)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest vision3d variant per family, batches 1 and 8, 3 iterations")
    ap.add_argument("--models", nargs="*", default=None, help="vision3d models to time (default: all registered)")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--peers", action="store_true", help="speed per GMAC against timm peers of similar GMACs (batch 1)")
    ap.add_argument("--peer-size", type=int, default=None, help="--peers input size (default: the peer's cfg size)")
    ap.add_argument("--only", nargs="*", default=None, help="--peers: only these of our models (e.g. ffnet_1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")

    if args.peers:
        args.iters = 20 if args.iters == 10 else args.iters
        print(f"speed per GMAC on {args.device}, batch 1, threads={torch.get_num_threads()}", file=sys.stderr)
        rows, table = bench_peers(args)
        print(table)
        meta = {"device": args.device, "threads": torch.get_num_threads(), "iters": args.iters, "torch": torch.__version__,
                "timm": timm.__version__, "cpu": platform.processor() or platform.machine(),
                "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
                "macs_counter": "torch.utils.flop_counter.FlopCounterMode, MACs = FLOPs / 2"}
        if args.json:
            args.json.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=1))
        return

    names = args.models or vision3d_models()
    unknown = [n for n in names if n not in vision3d_models()]
    if unknown:
        raise SystemExit(f"--models: not vision3d models: {unknown}")
    params = {n: meta_params(n) for n in names}
    if args.quick:
        smallest: dict[str, str] = {}
        for n in names:
            fam = model_entrypoint(n).__module__
            if fam not in smallest or params[n] < params[smallest[fam]]:
                smallest[fam] = n
        names = sorted(smallest.values())
        args.batches = [1, 8] if args.batches == [1, 2, 4, 8] else args.batches
        args.iters, args.warmup = 3, 1

    rows = []
    print(f"benchmark at {args.size}x{args.size} on {args.device}, threads={torch.get_num_threads()}", file=sys.stderr)
    for n in names + REFERENCE:
        torch.manual_seed(0)
        model = timm.create_model(n)
        p = params.get(n) or sum(q.numel() for q in model.parameters())
        group = "vision3d" if n in params else "timm"
        rows.append({"group": group, **bench_one(n, n, model, args, p)})
        if hasattr(model, "reparameterize") and group == "vision3d":
            model.cpu().reparameterize()
            p = sum(q.numel() for q in model.parameters())
            rows.append({"group": group, **bench_one(n, f"{n} (deploy)", model, args, p)})
        del model

    header = ["model", "params (M)", "GMACs"] + [f"img/s b{b}" for b in args.batches]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        g = f"{r['gmacs']:.2f}" + (f" (+{r['fft_gmacs_estimate']:.3f} FFT est.)" if "fft_gmacs_estimate" in r else "")
        lines.append(
            "| " + " | ".join([r["model"], f"{r['params_M']:.2f}", g] + [f"{r['img_per_s'][str(b)]:.1f}" for b in args.batches]) + " |"
        )
    table = "\n".join(lines)
    print(table)
    meta = {
        "size": args.size,
        "device": args.device,
        "dtype": "bf16 autocast" if args.device == "cuda" else "float32",
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "warmup": args.warmup,
        "batches": args.batches,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu": platform.processor() or platform.machine(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "macs_counter": "torch.utils.flop_counter.FlopCounterMode, batch 1, MACs = FLOPs / 2 (FFTs and element-wise ops not counted)",
    }
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "table": table}, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
