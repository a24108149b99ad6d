"""Every feed-forward 3DGS reconstructor, trained from scratch for the same budget on the same scenes.

Each row is one reconstructor (tiny sizes on the CPU): iLRM, the DepthSplat host with its DINOv2-style
ViT, the host with each vision3d backbone family (AFFNet, FFNet, TransNeXt, EWA ViT) through the timm
seam, the host with ZPressor, VolSplat when it is registered, and the trivial baseline (every target
pixel = the mean colour of the context views). All train with ``vision3d.train`` on the same synthetic
RE10K-format scenes (``vision3d.data.synthetic``) for the same number of steps with the same seed,
batch and learning rate (each in its authors' world frame: iLRM's mean-camera frame, the others the
dataset's), and are evaluated with the published protocol (``vision3d.eval.protocol``) on the same
held-out scenes and views. Reported: held-out PSNR / SSIM, Gaussians per scene, parameters, training
time, time per forward (one held-out scene, median of 3 after a warm-up) and memory of a forward
(CUDA: peak ``max_memory_allocated`` above the weights; CPU: total bytes the forward allocates, from the
PyTorch profiler, an upper bound of its peak since the CPU allocator reuses freed blocks).

    python tools/bench/recon.py --quick                  # a few CPU minutes
    python tools/bench/recon.py --steps 300 --size 64    # longer
    python tools/bench/recon.py --device cuda --steps 2000 --size 128
    python tools/bench/recon.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vision3d import recon  # noqa: E402
from vision3d.data import ChunkDataset, ChunkDatasetConfig, EvaluationViewSampler  # noqa: E402
from vision3d.data.synthetic import synthetic_scenes, write_synthetic_dataset  # noqa: E402
from vision3d.data.transforms import with_scene_transform  # noqa: E402
from vision3d.eval.metrics import ssim  # noqa: E402
from vision3d.eval.protocol import evaluate  # noqa: E402
from vision3d.train.config import DataConfig, OptimConfig, TrainConfig  # noqa: E402
from vision3d.train.engine import train  # noqa: E402

# name -> (registered model, model kwargs, scene transform of its authors)
TINY_HOST = "depthsplat_tiny"
MODELS: dict[str, tuple[str, dict, str]] = {
    "ilrm": ("ilrm_tiny", {}, "mean_camera"),
    "depthsplat+dinov2": (TINY_HOST, {}, "none"),
    "depthsplat+affnet_t": (TINY_HOST, {"backbone": "affnet_t", "backbone_kwargs": {}}, "none"),
    "depthsplat+ffnet_1": (TINY_HOST, {"backbone": "ffnet_1", "backbone_kwargs": {}}, "none"),
    "depthsplat+transnext_micro": (TINY_HOST, {"backbone": "transnext_micro", "backbone_kwargs": {}}, "none"),
    "depthsplat+ewa_vit_tiny": (TINY_HOST, {"backbone": "ewa_vit_tiny_patch16_224", "backbone_kwargs": {}}, "none"),
    "depthsplat+zpressor": (TINY_HOST, {"zpressor": {"num_anchors": 2, "embed_dim": 32, "num_layers": 1}}, "none"),
    "volsplat": ("volsplat_tiny", {}, "none"),
}


def mean_colour(dataset) -> dict:
    """The trivial baseline: each target is its context views' mean colour."""
    psnrs, ssims = [], []
    for i in range(len(dataset)):
        ex = dataset[i]
        pred = ex.context_images.mean(dim=(0, 2, 3))[None, :, None, None].expand_as(ex.target_images)
        mse = (pred - ex.target_images).square().mean(dim=(1, 2, 3)).clamp_min(1e-10)
        psnrs += (-10 * torch.log10(mse)).tolist()
        ssims += ssim(pred, ex.target_images).tolist()
    return {"psnr": statistics.fmean(psnrs), "ssim": statistics.fmean(ssims)}


def time_forward(model, ex, device: torch.device, repeats: int = 3) -> tuple[float, float, int]:
    """(median seconds, peak MB, Gaussians) of one forward on a held-out scene."""
    imgs = ex.context_images[None].to(device)
    cams = ex.context_cameras.reshape(1, -1).to(device)
    model = model.to(device).eval()
    times = []
    with torch.no_grad():
        model(imgs, cams)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(imgs, cams)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            model(imgs, cams)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:  # the CPU allocator reuses freed blocks, so report what the forward allocates in total
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                model(imgs, cams)
            peak = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events()) / 2**20
    return statistics.median(times), peak, int(out.gaussians.means.shape[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 px, 25 steps: a few CPU minutes")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--size", type=int, default=32, help="image side (a multiple of 16)")
    ap.add_argument("--views", type=int, default=3, help="context views")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="*", default=None, help=f"subset of {list(MODELS)}")
    ap.add_argument("--json", type=Path, default=Path("bench_recon.json"))
    args = ap.parse_args()
    if args.quick:
        args.steps, args.size = 25, 32
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    available = set(recon.list_models())
    names = [n for n in (args.models or MODELS) if MODELS[n][0] in available]
    skipped = [n for n in (args.models or MODELS) if n not in names]
    work = Path(tempfile.mkdtemp(prefix="bench_recon_"))
    S, V = args.size, args.views
    kw = dict(num_views=12, width=S, height=S, density=0.1)
    write_synthetic_dataset(work, "train", num_scenes=6, seed=1, **kw)
    write_synthetic_dataset(work, "test", num_scenes=2, seed=2, **kw)
    ctx = [3, 5, 7][:V] if V <= 3 else list(range(1, 1 + 2 * V, 2))[:V]
    index = {k: {"context": ctx, "target": [4, 6]} for k, _ in synthetic_scenes(2, 2)}
    (work / "index.json").write_text(json.dumps(index))
    near, far = 0.5, 20.0
    test = ChunkDataset(
        ChunkDatasetConfig(roots=[work], split="test", image_shape=(S, S), near=near, far=far),
        EvaluationViewSampler(work / "index.json"),
    )
    base = mean_colour(test)
    rows = [{"model": "mean context colour", "psnr": base["psnr"], "ssim": base["ssim"], "gaussians": 0,
             "params_M": 0.0, "train_s": 0.0, "forward_ms": 0.0, "peak_MB": 0.0}]
    for name in names:
        model_name, model_kwargs, transform = MODELS[name]
        cfg = TrainConfig(
            model=model_name, model_kwargs=model_kwargs, out=str(work / "runs" / name), device=args.device,
            progress=False, seed=args.seed,
            data=DataConfig(root=str(work), image_shape=(S, S), num_context=V, num_target=2, min_gap=4, max_gap=6,
                            gap_warmup_steps=0, batch_size=1, num_workers=0, near=near, far=far,
                            scene_transform=transform),
            optim=OptimConfig(lr=args.lr, warmup_steps=min(10, args.steps // 5), max_steps=args.steps, weight_decay=0.0),
            log_every=max(args.steps // 5, 1), ckpt_every=10**9, image_every=0,
        )
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - t0
        held = with_scene_transform(test, transform)
        ev = evaluate(result.model, held, work / "eval" / name, device=args.device, lpips=False, progress=False,
                      save_renders=False)
        sec, peak, n = time_forward(result.model, held[0], device)
        m = ev.summary["mean_over_images"]
        rows.append({"model": name, "psnr": m["psnr"], "ssim": m.get("ssim", float("nan")), "gaussians": n,
                     "params_M": sum(p.numel() for p in result.model.parameters()) / 1e6, "train_s": train_s,
                     "forward_ms": 1000 * sec, "peak_MB": peak})
        print(f"  {name}: {m['psnr']:.2f} dB in {train_s:.0f} s", flush=True)
    mem_col = "peak MB" if device.type == "cuda" else "alloc MB"
    head = f"{'model':<28} {'PSNR':>7} {'SSIM':>6} {'Gaussians':>10} {'params M':>9} {'train s':>8} {'fwd ms':>8} {mem_col:>8}"
    print(f"\n{args.steps} steps, {S}x{S}, {V} context views, device {device}, held-out: 2 scenes x 2 targets")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<28} {r['psnr']:7.2f} {r['ssim']:6.3f} {r['gaussians']:10d} {r['params_M']:9.2f} "
              f"{r['train_s']:8.1f} {r['forward_ms']:8.1f} {r['peak_MB']:8.1f}")
    for r in rows[1:]:
        r["psnr_vs_baseline_db"] = r["psnr"] - base["psnr"]
    if skipped:
        print(f"not registered here (skipped): {', '.join(skipped)}")
    out = {"steps": args.steps, "size": S, "context_views": V, "device": str(device), "seed": args.seed,
           "rows": rows, "skipped": skipped}
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
