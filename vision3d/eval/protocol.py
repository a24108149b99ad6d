"""The published evaluation protocol of feed-forward 3DGS papers (pixelSplat, MVSplat, DepthSplat,
iLRM, ...): for every scene of an evaluation-index file, reconstruct from the listed context
frames, render the listed target frames at the training resolution and crop, and score each
render against its ground truth with PSNR, SSIM and (when its weights are on disk) LPIPS.

Outputs in the evaluation folder: ``per_view.csv`` (scene, target frame, metrics),
``per_scene.csv`` (scene means), ``metrics.json`` (means over all target images, which is what the
papers report, plus means over scenes and counts) and ``renders/<scene>/<frame>.png`` (render
beside ground truth).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vision3d.utils.io import check_writable_dir, output_path, write_text_atomic

log = logging.getLogger("vision3d.eval")


@dataclass
class EvalResult:
    summary: dict
    per_view: list[dict]
    out_dir: Path


def load_model_for_eval(ckpt: str | Path, model_name: str | None = None, weights: str = "ema") -> tuple[nn.Module, object]:
    """A reconstructor from a run folder, a checkpoint step folder or a ``.safetensors`` file.

    Returns (model in eval mode, the training config or None). ``weights='ema'`` prefers the EMA
    weights when the checkpoint has them.
    """
    from vision3d import recon
    from vision3d.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, load_weights
    from vision3d.train.config import load_config

    p = Path(ckpt)
    cfg = None
    if p.is_dir() and (p / "ckpts").is_dir():  # run folder
        cfg = load_config(p / "config.yaml")
        step_dir = latest_checkpoint(p)
        if step_dir is None:
            raise FileNotFoundError(f"{p}: run folder has no complete checkpoint under ckpts/")
        p = step_dir
    if p.is_dir():  # checkpoint step folder
        if cfg is None and (p / "config.yaml").exists():
            cfg = load_config(p / "config.yaml")
        state, _, ema = load_checkpoint(p)
        if weights == "ema" and ema is not None:
            state = ema
    elif p.suffix == ".safetensors":
        state = load_weights(p)
    else:
        raise ValueError(f"{p}: expected a run folder, a checkpoint folder or a .safetensors file")
    name = model_name or (cfg.model if cfg is not None else None)
    if name is None:
        raise ValueError(f"{ckpt}: no config.yaml beside the weights; say which model with --model")
    kwargs = dict(cfg.model_kwargs) if cfg is not None else {}
    model = recon.create(name, **kwargs)
    load_model_weights(model, state, str(p))
    return model.eval(), cfg


def _side_by_side(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:  # [3, H, W] x2 -> [3, H, 2W]
    return torch.cat([pred, gt], -1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset,  # yields ViewsExample with the evaluation-index views (ChunkDataset + EvaluationViewSampler)
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    save_renders: bool = True,
    lpips: bool | str = "auto",
    limit: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Run the protocol over ``dataset`` and write the result files (see the module docstring)."""
    from vision3d.eval.metrics import Metrics
    from vision3d.train.engine import render_views
    from vision3d.utils.images import save_png

    out = check_writable_dir(out_dir)
    device = torch.device(device)
    model = model.to(device).eval()
    metrics = Metrics(lpips_net="vgg", require_lpips=lpips)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    rows: list[dict] = []
    scenes: list[dict] = []
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="eval", dynamic_ncols=True)
    t0 = time.time()
    for i in it:
        ex = dataset[i]
        ctx = ex.context_images[None].to(device)
        out_r = model(ctx, ex.context_cameras[None].to(device))
        pred = render_views(model, out_r.gaussians, ex.target_cameras[None].to(device))[0].clamp(0, 1)  # [Vt, 3, H, W]
        gt = ex.target_images.to(device)
        per = metrics.per_image(pred, gt)
        scene_rows = []
        for j in range(pred.shape[0]):
            frame = int(ex.target_indices[j])
            row = {"scene": ex.scene, "frame": frame, **{k: float(v[j]) for k, v in per.items()}}
            scene_rows.append(row)
            if save_renders:
                # the scene key comes from the dataset: it must not choose a folder outside --out
                dest = output_path(out / "renders", str(ex.scene), f"{frame:05d}.png", field="scene key")
                save_png(dest, _side_by_side(pred[j], gt[j]).cpu())
        rows += scene_rows
        names = [k for k in scene_rows[0] if k not in ("scene", "frame")]
        scenes.append({"scene": ex.scene, "views": len(scene_rows), **{k: sum(r[k] for r in scene_rows) / len(scene_rows) for k in names}})
        if progress and hasattr(it, "set_postfix"):
            it.set_postfix(psnr=f"{sum(r['psnr'] for r in rows) / len(rows):.2f}")
    if not rows:
        raise ValueError("evaluate: the dataset yielded no scenes (check the index file and the data root)")
    names = [k for k in rows[0] if k not in ("scene", "frame")]
    summary = {
        "mean_over_images": {k: sum(r[k] for r in rows) / len(rows) for k in names},
        "mean_over_scenes": {k: sum(s[k] for s in scenes) / len(scenes) for k in names},
        "scenes": len(scenes),
        "images": len(rows),
        "seconds": time.time() - t0,
        "lpips": "lpips" in names,
    }
    for name, table in (("per_view.csv", rows), ("per_scene.csv", scenes)):
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(table[0].keys()))
        w.writeheader()
        w.writerows(table)
        write_text_atomic(out / name, buf.getvalue())
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=1))
    return EvalResult(summary=summary, per_view=rows, out_dir=out)
