"""EWA (Experts Weights Averaging) vs dense training of a small ViT on a procedural classification task.

What the paper says (Huang et al., arXiv:2308.06093, abstract; the body was not reachable here):
during training some FFNs of a ViT are replaced by MoEs that assign tokens to experts by random
uniform partition, Experts Weights Averaging is performed on these MoEs at the end of each iteration,
and after training each MoE is converted back into an FFN by averaging the experts, so inference costs
what the plain ViT costs. Its share rates and MoE placements are not known to us, so this script
settles vision3d's defaults by experiment.

Task: 10 classes = 5 shapes (square, disc, ring, cross, bar) x 2 textures (horizontal / vertical
stripes inside the shape, period 2-4 px), random position, size and colour, dark background, pixel
noise, 32 x 32 RGB. A small fixed training set (``--train``, default 1000 images, random horizontal
flips) and a held-out set (``--test``): the dense ViT overfits (training accuracy well above held-out
accuracy), the regime where a regulariser should show.

Model: timm ``VisionTransformer`` (patch 8, width 64, depth 4, 2 heads, MLP ratio 4; 4 experts per MoE
for EWA). MoE placements: ``every-other`` = blocks (1, 3) (vision3d's default rule ``1, 3, 5, ...``),
``last-half`` = blocks (2, 3). Every configuration of one seed uses the same data, the same initial
weights (the experts start as copies of the dense FFN), the same batches and flips, the same optimiser
(AdamW, linear warm-up then cosine decay) and the same number of steps; the EWA models average after
every optimiser step through the automatic hook (a plain loop) and are evaluated after collapsing to a
dense timm ViT (``ewa_to_vit``), i.e. the deployed model.

Reported per configuration: held-out accuracy (mean +- std over seeds), the per-seed paired difference
to dense (mean +- std, how many seeds beat dense, a paired two-sided t-test p-value), training accuracy
and CPU seconds per run.

    python tools/bench/ewa.py --json ewa.json          # the recorded experiment (45 runs, ~27 CPU minutes, 1 thread)
    python tools/bench/ewa.py --steps 60 --seeds 0 --betas 0.5 --placements every-other  # smoke run (~15 s)
    python tools/bench/ewa.py --seeds 0 1 2 --json a.json & python tools/bench/ewa.py --seeds 3 4 --json b.json
    python tools/bench/ewa.py --merge a.json b.json --json ewa.json  # the same table from two processes
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vision3d.backbones.ewa import EWAMoE, ewa_to_vit, vit_to_ewa  # noqa: E402

DEPTH = 4
PLACEMENTS = {"every-other": (1, 3), "last-half": (2, 3)}


def make_data(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:  # [n, 3, H, W] in [0, 1], [n]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    shape, texture = labels // 2, labels % 2
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    cy = torch.rand(n, generator=g) * size * 0.5 + size * 0.25
    cx = torch.rand(n, generator=g) * size * 0.5 + size * 0.25
    r = torch.rand(n, generator=g) * size * 0.15 + size * 0.15
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    rr = r[:, None, None]
    d = torch.sqrt(dy**2 + dx**2)
    masks = torch.stack(
        [
            (dy.abs() < rr) & (dx.abs() < rr),  # square
            d < rr,  # disc
            (d < rr) & (d > 0.55 * rr),  # ring
            ((dy.abs() < 0.3 * rr) | (dx.abs() < 0.3 * rr)) & (dy.abs() < rr) & (dx.abs() < rr),  # cross
            (dy.abs() < 0.35 * rr) & (dx.abs() < 1.3 * rr),  # bar
        ],
        1,
    )[torch.arange(n), shape]
    period = 2.0 + torch.rand(n, generator=g)[:, None, None] * 2
    coord = torch.where(texture[:, None, None] == 0, yy[None], xx[None])
    stripes = (torch.sin(coord * 2 * math.pi / period) > 0).float()
    fg = 0.6 + 0.4 * torch.rand(n, 3, generator=g)[:, :, None, None]
    bg = 0.3 * torch.rand(n, 3, generator=g)[:, :, None, None]
    img = torch.where(masks[:, None], fg * (0.4 + 0.6 * stripes[:, None]), bg)
    img = (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    return img, labels


def make_vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=DEPTH, num_heads=2, mlp_ratio=4, num_classes=10
    )


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:  # x [N, 3, 32, 32], y [N]
    model.eval()
    pred = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, x.shape[0], 500)])
    return (pred == y).float().mean().item() * 100


def train_eval(cfg: dict, seed: int, data, args) -> dict:
    """Train one configuration with one seed; accuracies of the deployed (collapsed) model."""
    (xtr, ytr), (xte, yte) = data
    t0 = time.process_time()
    torch.manual_seed(seed)
    model = make_vit()  # same initial weights for every configuration of this seed
    if cfg["moe_blocks"]:
        vit_to_ewa(model, cfg["moe_blocks"], num_experts=args.experts, share_rate=cfg["share_rate"])
        for i, moe in enumerate(m for m in model.modules() if isinstance(m, EWAMoE)):
            moe.router.generator = torch.Generator().manual_seed(seed * 100 + i)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warm = max(1, round(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    g = torch.Generator().manual_seed(seed)  # same batches and flips for every configuration of this seed
    for _ in range(args.steps):  # a plain loop: the EWA averaging runs in the optimiser step hook
        model.train()
        idx = torch.randint(0, xtr.shape[0], (args.batch,), generator=g)
        flip = torch.rand(args.batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], xtr[idx].flip(-1), xtr[idx])
        loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if cfg["moe_blocks"]:
        ewa_to_vit(model)
    return {
        "test": accuracy(model, xte, yte),
        "train": accuracy(model, xtr, ytr),
        "final_loss": loss.item(),
        "cpu_s": time.process_time() - t0,
    }


def t_two_sided_p(t: float, dof: int) -> float:
    """Two-sided p-value of Student's t with an integer number of degrees of freedom (closed-form series)."""
    if dof < 1:
        return float("nan")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(dof))
    s, c = math.sin(theta), math.cos(theta)
    if dof % 2 == 1:  # P(|T| <= t) = 2/pi * (theta + sin * (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 + ...))
        term, series = c, 0.0
        for k in range(1, (dof - 1) // 2 + 1):
            series += term
            term *= c * c * (2 * k) / (2 * k + 1)
        inside = 2 / math.pi * (theta + s * series) if dof > 1 else 2 * theta / math.pi
    else:  # P(|T| <= t) = sin * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, series = 1.0, 0.0
        for k in range(1, dof // 2 + 1):
            series += term
            term *= c * c * (2 * k - 1) / (2 * k)
        inside = s * series
    return max(0.0, 1.0 - inside)


def summarise(results: list[dict], seeds: list[int]) -> list[dict]:
    """Mean +- std over seeds and the per-seed paired comparison with dense (seeds every row has)."""
    dense = {r["seed"]: r["test"] for r in results if r["config"] == "dense"}
    rows = []
    names = list(dict.fromkeys(r["config"] for r in results))
    for name in names:
        runs = {r["seed"]: r for r in results if r["config"] == name}
        acc = [runs[s]["test"] for s in seeds if s in runs]
        row = {
            "config": name,
            "seeds": [s for s in seeds if s in runs],
            "test": acc,
            "mean": statistics.mean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "train_mean": statistics.mean(runs[s]["train"] for s in runs),
            "cpu_s_mean": statistics.mean(runs[s]["cpu_s"] for s in runs),
        }
        paired = [runs[s]["test"] - dense[s] for s in seeds if s in runs and s in dense]
        if name != "dense" and paired:
            row["diff"] = paired
            row["diff_mean"] = statistics.mean(paired)
            row["diff_std"] = statistics.stdev(paired) if len(paired) > 1 else 0.0
            row["wins"] = sum(d > 0 for d in paired)
            if len(paired) > 1:
                se = row["diff_std"] / math.sqrt(len(paired))
                t = row["diff_mean"] / se if se > 0 else math.copysign(math.inf, row["diff_mean"] or 1.0)
                row["t"], row["p"] = t, t_two_sided_p(t, len(paired) - 1)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    n = max(len(r["seeds"]) for r in rows)
    lines = [
        f"| configuration | held-out acc. % ({n} seeds) | paired diff. vs dense | seeds > dense | p (paired t) "
        "| train acc. % | CPU s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "diff_mean" in r:
            diff = f"{r['diff_mean']:+.2f} +- {r['diff_std']:.2f}"
            wins = f"{r['wins']}/{len(r['diff'])}"
            p = f"{r['p']:.3f}" if "p" in r else "-"
        else:
            diff, wins, p = "-", "-", "-"
        lines.append(
            f"| {r['config']} | {r['mean']:.2f} +- {r['std']:.2f} | {diff} | {wins} | {p} | {r['train_mean']:.1f} "
            f"| {r['cpu_s_mean']:.0f} |"
        )
    return "\n".join(lines)


def merge(paths: list[Path], out: Path | None) -> None:
    """One table from the runs of several ``--json`` files (a run = one configuration and one seed)."""
    results: list[dict] = []
    seen: set[tuple[str, int]] = set()
    for path in paths:
        for run in json.loads(path.read_text())["runs"]:
            key = (run["config"], run["seed"])
            if key in seen:
                raise ValueError(f"bench/ewa --merge: {path} repeats config {key[0]!r} seed {key[1]}")
            seen.add(key)
            results.append(run)
    seeds = sorted({r["seed"] for r in results})
    rows = summarise(results, seeds)
    text = table(rows)
    print(text)
    if out:
        out.write_text(json.dumps({"merged": [str(p) for p in paths], "runs": results, "summary": rows, "table": text}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per run (same for every configuration)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    ap.add_argument("--warmup", type=float, default=0.1, help="linear warm-up, fraction of the steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--train", type=int, default=1000, help="training images (small: the overfitting regime)")
    ap.add_argument("--test", type=int, default=2000, help="held-out images")
    ap.add_argument("--experts", type=int, default=4, help="experts per MoE")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.8], help="share rates")
    ap.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the runs and the summary here (after every run)")
    ap.add_argument(
        "--merge", type=Path, nargs="+", default=None,
        help="train nothing: summarise the runs of these --json files (e.g. seeds split over processes)",
    )
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.json)
        return
    for beta in args.betas:
        if not 0.0 <= beta <= 1.0:
            ap.error(f"--betas: share rates must be in [0, 1], got {beta}")
    torch.set_num_threads(args.threads)
    data = (make_data(args.train, 1000), make_data(args.test, 2000))
    configs = [dict(config="dense", moe_blocks=(), share_rate=None)]
    for where in args.placements:
        for beta in args.betas:
            configs.append(dict(config=f"EWA beta={beta:g} {where} {PLACEMENTS[where]}", moe_blocks=PLACEMENTS[where], share_rate=beta))
    results: list[dict] = []
    t0 = time.time()
    for seed in args.seeds:  # seed-major: a cut-short run still holds complete paired comparisons
        for cfg in configs:
            run = {**cfg, "seed": seed, **train_eval(cfg, seed, data, args)}
            results.append(run)
            print(
                f"  seed {seed} {cfg['config']:38s} test {run['test']:6.2f}  train {run['train']:6.2f}  "
                f"cpu {run['cpu_s']:5.1f}s  ({time.time() - t0:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": results}, indent=1))
    rows = summarise(results, args.seeds)
    text = table(rows)
    print(text)
    if args.json:
        out = {"args": vars(args) | {"json": str(args.json)}, "runs": results, "summary": rows, "table": text}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
