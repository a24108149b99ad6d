"""Dense2MoE end to end on the small DiT, one run: train dense -> convert -> distil; vs a magnitude-pruned baseline.

Rows (all from the same dense teacher):

- ``dense``: the teacher;
- ``moe_init``: stage 1, Taylor-initialised MoE FFNs (shared + top-k routed), no training;
- ``moe_kd``: stage 2, output distillation + load balancing;
- ``pruned_kd``: the teacher's FFNs magnitude-pruned to the MoE's activated FFN fraction, distilled with
  the same budget (the paper's comparison at equal activated parameters);
- ``moe_mob``: stage 3, Mixture of Blocks + group feature loss on top of ``moe_kd``;
- ``pruned_mob``: the baseline at the MoE+MoB budget: of each MoB group the ``top_k`` blocks of largest
  weight magnitude kept, the FFNs magnitude-pruned to the rest of the budget, distilled (output KD) for
  ``kd + mob`` steps, as many as ``moe_mob`` got.

Columns: activated / total parameters (and the activated ratio to dense), the held-out flow-matching
(denoising) loss, and the sample-quality proxy: accuracy of a classifier trained here on real
procedural images at recognising the requested class of 256 samples, and the Fréchet distance of its
features between samples and real images (lower is better).

    PYTHONPATH=. OMP_NUM_THREADS=2 python tools/bench/dense2moe.py --out runs/bench/dense2moe.json

Measured 2026-12-03 on the shared 2-core CPU machine, default preset (configs/gen/dense2moe.yaml:
dim 64, depth 6, 800 dense steps, 200 + 200 distillation steps, 256 samples; 9.5 min wall, one thread;
classifier accuracy on real held-out images 1.000, chance on samples 0.25)::

    model       activated     total act/dense  denoise    acc      FD
    dense          466.7k    466.7k     1.000   0.1789  0.379 410.293
    moe_init       345.5k    469.4k     0.740   0.3250  0.348 371.564
    moe_kd         345.5k    469.4k     0.740   0.1936  0.387 434.124
    pruned_kd      342.9k    342.9k     0.735   0.1874  0.375 428.463
    moe_mob        236.8k    469.6k     0.507   0.2444  0.328 573.956
    seconds: classifier 15, dense 180, convert 1.5, kd 59, pruned_kd 40, mob 36

Reading: distillation recovers most of the conversion loss (0.325 -> 0.194 vs the teacher's
0.179); at equal activated parameters the distilled MoE and the distilled magnitude-pruned model
are within noise of each other (0.194 vs 0.187), so the paper's advantage of MoE over pruning is
not reproduced at this scale and budget. The teacher is undertrained (samples are coloured blobs,
class accuracy 0.38), so the sample proxy separates little; MoB (51% activated) costs the most.
A shrunk run (dim 48, 400 dense / 120 + 120 distillation steps) gave the same ordering.

Longer-trained teacher, with the baseline at the MoE+MoB budget (``pruned_mob``: blocks 2 and 4
kept of the groups (1, 2), (3, 4); FFNs at 39% of their neurons), measured 2026-12-03 with
``--set train.steps=2000`` (24 min wall on the loaded machine, 15 CPU-min)::

    model       activated     total act/dense  denoise    acc      FD
    dense          466.7k    466.7k     1.000   0.1467  0.570 320.736
    moe_init       345.5k    469.4k     0.740   0.2638  0.504 258.784
    moe_kd         345.5k    469.4k     0.740   0.1614  0.551 322.867
    pruned_kd      342.9k    342.9k     0.735   0.1548  0.559 321.481
    moe_mob        236.8k    469.6k     0.507   0.1957  0.473 402.329
    pruned_mob     236.8k    236.8k     0.507   0.1844  0.406 391.262

Reading: the teacher is better (denoise 0.147, class accuracy 0.57 against 0.25 chance). At the
MoE budget pruning is again slightly ahead on the denoising loss (0.155 vs 0.161) with the same
sample accuracy; at the MoE+MoB budget pruning keeps the lower denoising loss (0.184 vs 0.196) but
its samples are recognised less often (0.41 vs 0.47 class accuracy) — one run, one seed, 256
samples (a 0.06 accuracy gap is about two standard errors), so not conclusive either way.

``--calib-memory`` measures calibration + conversion peak memory (RSS growth over the model and one
backward, fresh process per variant; DiT dim 256, depth 8, 8 batches of 2048 tokens, calib_tokens
4096), previous code (``--reference`` a copy of the old dense2moe.py) vs now; see the module
docstring of vision3d/gen/dense2moe.py for the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


def _calib_worker(variant: str, reference: str, dim: int, depth: int, batches: int, budget_mb: float) -> dict:
    """One calibration + conversion in this (fresh) process; peak RSS growth over the model and one backward."""
    import importlib.util
    import resource

    from vision3d.gen import dense2moe as d2m
    from vision3d.gen.dit import DiT, DiTConfig, procedural_shapes
    from vision3d.gen.recipe import calibration_loss

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = DiT(DiTConfig(image_size=16, patch_size=2, dim=dim, depth=depth, num_heads=4)).eval()
    x, y = procedural_shapes(32 * batches, size=16, seed=0)
    calib = [(x[i * 32 : (i + 1) * 32], y[i * 32 : (i + 1) * 32]) for i in range(batches)]
    calibration_loss(model, calib[0]).backward()  # the autograd graph of one batch is in the baseline
    model.zero_grad(set_to_none=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mod = d2m
    if variant == "before":
        spec = importlib.util.spec_from_file_location("dense2moe_before", reference)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        cfg = mod.Dense2MoEConfig()
    else:
        cfg = d2m.Dense2MoEConfig(calib_budget_mb=0 if variant == "one_pass" else budget_mb)
    t0 = time.time()
    mod.dense_to_moe(model, cfg, loss_fn=calibration_loss, calibration=calib)
    seconds = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    H, C = 4 * dim, dim
    return {"variant": variant, "peak_growth_mb": (peak - base) / 1024, "seconds": seconds,
            "stats_mb_per_ffn": d2m.calibration_bytes(H, C, cfg.calib_tokens) / 2**20}


def calib_memory(args) -> int:
    """Peak memory of Taylor calibration + conversion: the previous code (``--reference``) vs now, in fresh processes."""
    import subprocess

    from vision3d.utils.io import write_text_atomic

    variants = (["before"] if args.reference else []) + ["one_pass", "budget"]
    rows = []
    for v in variants:
        code = (f"import json, sys; sys.argv = ['x']; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import dense2moe as b; print(json.dumps(b._calib_worker({v!r}, {args.reference!r}, {args.calib_dim}, "
                f"{args.calib_depth}, {args.calib_batches}, {args.calib_budget_mb})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"calibration worker {v!r} failed (exit {out.returncode})")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"DiT dim {args.calib_dim} depth {args.calib_depth}, {args.calib_batches} calibration batches of 32 x 64 "
          f"tokens, calib_tokens 4096, budget {args.calib_budget_mb} MB")
    print(f"{'variant':<10} {'peak growth MB':>15} {'seconds':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['peak_growth_mb']:>15.1f} {r['seconds']:>8.1f}")
    print(f"statistics per FFN now: {rows[-1]['stats_mb_per_ffn']:.1f} MB")
    write_text_atomic(Path(args.out), json.dumps({"rows": rows, "args": vars(args)}, indent=1))
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=str(Path(__file__).resolve().parents[2] / "configs/gen/dense2moe.yaml"))
    ap.add_argument("--out", default="runs/bench/dense2moe.json")
    ap.add_argument("--quick", action="store_true", help="tiny sizes and steps (a smoke run, numbers meaningless)")
    ap.add_argument("--classifier-steps", type=int, default=300)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preset field, e.g. --set train.steps=400 --set dit.dim=48 (YAML values)")
    ap.add_argument("--calib-memory", action="store_true",
                    help="measure the peak memory of calibration + conversion instead (see --reference)")
    ap.add_argument("--reference", default="", help="with --calib-memory: a previous dense2moe.py to compare with")
    ap.add_argument("--calib-dim", type=int, default=256)
    ap.add_argument("--calib-depth", type=int, default=8)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--calib-budget-mb", type=float, default=64.0)
    args = ap.parse_args(argv)
    if args.calib_memory:
        return calib_memory(args)

    from vision3d.gen.quality import train_classifier
    from vision3d.gen.recipe import convert, distill, evaluate, load_gen_config, prune, sample_grid, train_dense, draw_samples
    from vision3d.utils.images import save_png
    from vision3d.utils.io import write_text_atomic

    cfg = load_gen_config(args.preset)
    if args.set:
        import yaml

        from vision3d.gen.recipe import _update

        for item in args.set:
            key, _, value = item.partition("=")
            nested: dict = {}
            node = nested
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = yaml.safe_load(value)
            cfg = _update(cfg, nested, f"--set {item}")
    if args.quick:
        cfg.dit.dim, cfg.dit.depth = 32, 4
        cfg.train.steps, cfg.kd.optim.steps, cfg.mob_stage.optim.steps = 20, 5, 5
        cfg.sample.num, args.classifier_steps = 32, 20
    cfg.progress = sys.stderr.isatty()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    times = {}

    t0 = time.time()
    clf, clf_acc = train_classifier(cfg.dit.num_classes, size=cfg.dit.image_size, steps=args.classifier_steps)
    times["classifier"] = time.time() - t0
    t0 = time.time()
    teacher, dense_hist = train_dense(cfg)
    times["dense"] = time.time() - t0
    t0 = time.time()
    moe = convert(teacher, cfg)
    times["convert"] = time.time() - t0

    rows = {"dense": evaluate(teacher, cfg, clf), "moe_init": evaluate(moe, cfg, clf)}
    t0 = time.time()
    moe, kd_hist = distill(moe, teacher, cfg, "kd")
    times["kd"] = time.time() - t0
    rows["moe_kd"] = evaluate(moe, cfg, clf)
    t0 = time.time()
    pruned, pr_hist = distill(prune(teacher, cfg), teacher, cfg, "kd")
    times["pruned_kd"] = time.time() - t0
    rows["pruned_kd"] = evaluate(pruned, cfg, clf)
    t0 = time.time()
    mob, mob_hist = distill(copy.deepcopy(moe), teacher, cfg, "mob")
    times["mob"] = time.time() - t0
    rows["moe_mob"] = evaluate(mob, cfg, clf)
    # the baseline at the MoE+MoB budget: blocks and FFNs magnitude-pruned, distilled for as many steps as
    # the MoE+MoB model got in total (kd + mob)
    t0 = time.time()
    pm_cfg = copy.deepcopy(cfg)
    pm_cfg.kd.optim.steps = cfg.kd.optim.steps + cfg.mob_stage.optim.steps
    pruned_mob, pm_hist = distill(prune(teacher, cfg, "mob"), teacher, pm_cfg, "kd")
    times["pruned_mob"] = time.time() - t0
    rows["pruned_mob"] = evaluate(pruned_mob, cfg, clf)

    dense_act = rows["dense"]["activated_params"]
    print(f"classifier accuracy on real held-out images: {clf_acc:.3f}")
    print(f"{'model':<10} {'activated':>10} {'total':>9} {'act/dense':>9} {'denoise':>8} {'acc':>6} {'FD':>7}")
    for name, r in rows.items():
        r["activated_ratio"] = r["activated_params"] / dense_act
        print(
            f"{name:<10} {r['activated_params'] / 1e3:>9.1f}k {r['total_params'] / 1e3:>8.1f}k {r['activated_ratio']:>9.3f} "
            f"{r['denoise_loss']:>8.4f} {r['sample_accuracy']:>6.3f} {r['sample_fd']:>7.3f}"
        )
    print("seconds:", {k: round(v, 1) for k, v in times.items()})
    out = Path(args.out)
    result = {
        "config": args.preset, "quick": args.quick, "classifier_real_accuracy": clf_acc, "rows": rows, "seconds": times,
        "history": {"dense": dense_hist, "kd": kd_hist, "pruned_kd": pr_hist, "mob": mob_hist, "pruned_mob": pm_hist},
        "pruned_mob_blocks": pruned_mob.pruned_blocks, "pruned_mob_ffn_fraction": pruned_mob.pruned_fraction,
    }
    write_text_atomic(out, json.dumps(result, indent=1))
    for name, model in (("dense", teacher), ("moe_kd", moe), ("pruned_kd", pruned), ("moe_mob", mob), ("pruned_mob", pruned_mob)):
        cfg.sample.num = 4 * cfg.dit.num_classes
        imgs, _ = draw_samples(model, cfg)
        order = torch.arange(imgs.shape[0]).reshape(4, cfg.dit.num_classes).T.reshape(-1)  # one row per class
        save_png(out.with_name(f"{out.stem}_{name}.png"), sample_grid(imgs[order], nrow=4))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
