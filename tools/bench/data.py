"""Data-loading throughput: images/s and scenes/s with 0, 2, 4 DataLoader workers at 256² and 512².

Synthetic RE10K-format chunks (:mod:`vision3d.data.synthetic`) are written to a temporary folder
(a few unique rendered scenes, copied under new keys to fill ``--scenes``), then read through
:class:`vision3d.data.ChunkDataset` + :class:`vision3d.data.SceneSampler` + ``collate_views``
exactly as training does: per example 2 context + 4 target views are decoded (JPEG) and, with
``--crop``, resized + centre-cropped. Prints a Markdown table and writes JSON.

    python tools/bench/data.py --out bench_data.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def build(root: Path, size: int, scenes: int, unique: int, views: int, render: int) -> None:
    from vision3d.data.re10k import write_chunk, write_index
    from vision3d.data.synthetic import synthetic_example, synthetic_scenes

    base = [
        synthetic_example(key, s, num_views=views, width=size, height=size, density=0.25, render_scale=render / size)
        for key, s in synthetic_scenes(0, unique)
    ]
    index, chunk, cid = {}, [], 0
    for i in range(scenes):
        ex = dict(base[i % unique])
        ex["key"] = f"{i:016x}"
        chunk.append(ex)
        if len(chunk) == 8 or i == scenes - 1:
            name = f"{cid:06d}.torch"
            write_chunk(root / "train" / name, chunk)
            index.update({e["key"]: name for e in chunk})
            chunk, cid = [], cid + 1
    write_index(root / "train", index)


def measure(root: Path, size: int, workers: int, batch: int, crop: bool, seconds: float, resample: str) -> dict:
    import torch

    from vision3d.data import BoundedViewSampler, RE10KDataset, SceneSampler, collate_views

    shape = (size * 3 // 4, size * 3 // 4) if crop else None
    ds = RE10KDataset(root, "train", BoundedViewSampler(num_context_views=2, num_target_views=4, min_gap=4, max_gap=10,
                                                        warm_up_steps=0), image_shape=shape, resample=resample)
    sampler = SceneSampler.for_dataset(ds, seed=0, epochs=None, batch_size=batch)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                         collate_fn=collate_views, persistent_workers=False,
                                         prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first chunk load) not timed
    n_scenes = n_images = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        n_scenes += len(b)
        n_images += len(b) * (b.context_images.shape[1] + b.target_images.shape[1])
    dt = time.perf_counter() - t0
    del it, loader
    return {"size": size, "workers": workers, "crop": shape, "scenes_per_s": n_scenes / dt, "images_per_s": n_images / dt,
            "seconds": dt}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--scenes", type=int, default=64)
    p.add_argument("--unique", type=int, default=2, help="rendered scenes (the rest are copies)")
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--render", type=int, default=64, help="render resolution before upsampling")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per setting")
    p.add_argument("--crop", action="store_true", help="also resize + centre crop to 3/4 of the size")
    p.add_argument("--resample", default="bilinear", choices=["bilinear", "area", "lanczos"])
    p.add_argument("--data", type=Path, default=None, help="reuse/keep the synthetic data here")
    p.add_argument("--out", type=Path, default=Path("bench_data.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            root = (args.data or Path(tmp)) / f"synthetic_{size}"
            if not (root / "train" / "index.json").is_file():
                t = time.perf_counter()
                build(root, size, args.scenes, args.unique, args.views, args.render)
                print(f"wrote {args.scenes} scenes at {size}² in {time.perf_counter() - t:.1f}s", flush=True)
            for crop in ([False, True] if args.crop else [False]):
                for w in args.workers:
                    r = measure(root, size, w, args.batch, crop, args.seconds, args.resample)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    env = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
           "machine": platform.machine(), "batch": args.batch, "views_per_example": 6,
           "resample": args.resample, "load_avg": os.getloadavg()}
    args.out.write_text(json.dumps({"env": env, "results": rows}, indent=1))
    print("\n| size | crop | workers | scenes/s | images/s |\n|---|---|---|---|---|")
    for r in rows:
        crop = "-" if r["crop"] is None else f"{r['crop'][0]}²"
        print(f"| {r['size']}² | {crop} | {r['workers']} | {r['scenes_per_s']:.1f} | {r['images_per_s']:.1f} |")
    print(f"\n({env['cpus']} CPUs, load {env['load_avg'][0]:.1f}, batch {args.batch}, 2 context + 4 target views "
          f"per scene, JPEG q95, crop resample {args.resample})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
