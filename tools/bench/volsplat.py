"""Gaussians per scene and time of VolSplat vs its pixel-aligned host, over voxel size and view count.

Both models run in the same process on the same views with one set of random weights: the host
(DepthSplat, one Gaussian per context pixel) and VolSplat, whose host is the very same module
(its weights are copied in), followed by the voxeliser, the sparse 3-D U-Net, the sparse head and
the adapter. So the ratios isolate what voxel-aligned prediction costs and how many Gaussians it
keeps.

The voxel count depends on where the depth puts the pixels, and random weights give no real
depth; by default (``--depth gt``) VolSplat voxelises the procedural scene's rendered depth
(``rasterize`` expected depth), so the counts are those of a real surface; ``--depth pred`` uses
the host's own (random-weight) depth. Voxel sizes are in world units; the synthetic scenes sit
2-5 units from the cameras, about 0.05 units per pixel at 64x64 and 55 degrees field of view.

CPU (default): ``volsplat_tiny`` / ``depthsplat_tiny``-sized host at 64x64, views 2 4 6, voxel
sizes 0.01 0.02 0.05 0.1, the PyTorch sparse convolution. GPU (``--gpu``): the released
``volsplat_re10k`` configuration (ViT-B host) at 256x256 with spconv when installed
(``--backend``), views 2 4 6 8. Times are medians over ``--repeat`` runs after a warm-up, forward
only, ``no_grad``.

    python tools/bench/volsplat.py                  # CPU
    python tools/bench/volsplat.py --gpu --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vision3d import recon
from vision3d.data.synthetic import render_synthetic_scene
from vision3d.geometry import Cameras
from vision3d.render import rasterize


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeat: int):
    fn()
    _sync(device)
    ts, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def scene_views(seed: int, views: int, size: int, device: torch.device):
    """Context views of one procedural scene (every other frame of a 2*views path) and their rendered depth."""
    from vision3d.gaussians.procedural import procedural_scene

    imgs, cams = render_synthetic_scene(seed, num_views=2 * views, width=size, height=size, density=0.25)
    sel = torch.arange(0, 2 * views, 2)
    cams = Cameras(cams.K[sel], cams.cam_to_world[sel], size, size, near=0.5, far=20.0)
    scene = procedural_scene(seed=seed, density=0.25)
    with torch.no_grad():
        d = rasterize(scene.gaussians, cams, mode="ED", backend="torch", near_plane=0.05).depths
    d = torch.where(torch.isfinite(d) & (d > 0), d, torch.zeros_like(d))  # empty pixels are not lifted
    batched = Cameras(cams.K[None], cams.cam_to_world[None], size, size, near=0.5, far=20.0).to(device)
    return imgs[sel][None].to(device), batched, d[None].to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--views", type=int, nargs="+", default=None)
    ap.add_argument("--voxels", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1])
    ap.add_argument("--depth", choices=["gt", "pred"], default="gt")
    ap.add_argument("--backend", choices=["auto", "torch", "spconv"], default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: CUDA is not available")
    size = args.size or (256 if args.gpu else 64)
    views_list = args.views or ([2, 4, 6, 8] if args.gpu else [2, 4, 6])
    name, host_name = ("volsplat_re10k", "depthsplat_base") if args.gpu else ("volsplat_tiny", "depthsplat_tiny")
    torch.manual_seed(0)
    vol = recon.create(name, sparse_backend=args.backend).to(device).eval()
    host = recon.create(host_name, **({} if args.gpu else dict(
        num_scales=vol.cfg.host.num_scales, upsample_factor=vol.cfg.host.upsample_factor,
        lowest_feature_resolution=vol.cfg.host.lowest_feature_resolution))).to(device).eval()
    missing, unexpected = host.load_state_dict(vol.host.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("gaussian_head.") for k in missing), (missing, unexpected)
    rows = []
    with torch.no_grad():
        for views in views_list:
            images, cams, depth_gt = scene_views(3, views, size, device)
            t_host, out_h = timed(lambda: host(images, cams), device, args.repeat)
            n_host = out_h.gaussians.means.shape[1]
            t_enc, enc = timed(lambda: vol.host.encode(images, cams), device, args.repeat)
            depth = depth_gt if args.depth == "gt" else enc.depth
            for voxel in args.voxels:
                vol.cfg.voxel_size = voxel

                def sparse_stage():
                    return vol.predict(enc, depth)

                t_sp, (g, vox, valid) = timed(sparse_stage, device, args.repeat)
                n_vol = int(vox.batch_counts()[0])
                t_vol = t_enc + t_sp
                rows.append(dict(
                    views=views, size=size, voxel=voxel, depth=args.depth,
                    gaussians_host=n_host, gaussians_volsplat=n_vol, gaussian_ratio=n_vol / n_host,
                    ms_host=1e3 * t_host, ms_volsplat=1e3 * t_vol, ms_sparse_stage=1e3 * t_sp, time_ratio=t_vol / t_host,
                ))
                r = rows[-1]
                print(f"views {views} voxel {voxel:<6} gaussians {n_vol:>7} / {n_host:<7} ({r['gaussian_ratio']:.3f})  "
                      f"time {r['ms_volsplat']:8.1f} / {r['ms_host']:8.1f} ms ({r['time_ratio']:.2f})", flush=True)
    backend = "spconv" if any(getattr(m, "backend", "") == "spconv" for m in vol.modules()) else args.backend
    print(f"\n{name} vs {host_name}, {size}x{size}, {device.type}, sparse backend {backend}, depth {args.depth}")
    head = f"{'views':>5} {'voxel':>7} {'G volsplat':>11} {'G host':>8} {'G ratio':>8} {'ms volsplat':>12} {'ms sparse':>10} {'ms host':>9} {'t ratio':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['views']:>5} {r['voxel']:>7} {r['gaussians_volsplat']:>11} {r['gaussians_host']:>8} {r['gaussian_ratio']:>8.3f} "
              f"{r['ms_volsplat']:>12.1f} {r['ms_sparse_stage']:>10.1f} {r['ms_host']:>9.1f} {r['time_ratio']:>8.2f}")
    if args.json:
        from vision3d.utils.io import write_text_atomic

        meta = dict(model=name, host=host_name, device=device.type, backend=args.backend, size=size,
                    torch=torch.__version__, threads=args.threads, repeat=args.repeat)
        write_text_atomic(Path(args.json), json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
