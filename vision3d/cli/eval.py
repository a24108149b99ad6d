"""Evaluate a reconstructor with the published protocol (context/target frames from an index file).

Example:
    vision3d eval runs/ilrm_re10k --dataset re10k --root datasets/re10k \
        --index assets/evaluation_index_re10k.json --out runs/ilrm_re10k/eval

The index files are the ones pixelSplat / MVSplat / DepthSplat publish in their ``assets/`` folders
(``evaluation_index_re10k.json``, ``evaluation_index_acid.json``, DL3DV's from DepthSplat); they are
not shipped with vision3d.

Models that predict cameras (VGGT, FlashVGGT: the ``geometry`` protocol of their training recipe)
are scored on the listed frames (context then target, one sequence per scene) with the camera
metrics of the VGGT paper (AUC@30 over all view pairs, RRA/RTA@30, mean relative rotation and
translation angle errors) and, where the data has depth, AbsRel and delta<1.25 after median
scaling (:mod:`vision3d.eval.geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import tyro


@dataclass
class Args:
    ckpt: tyro.conf.Positional[str]
    """Run folder, checkpoint folder (ckpts/step_N) or .safetensors weights."""
    index: str
    """Evaluation-index JSON (scene key -> context/target frame indices)."""
    root: str
    """Dataset root holding test/index.json and the chunks."""
    dataset: Literal["re10k", "dl3dv"] = "re10k"
    """Which chunk dataset (sets near/far and the stored resolution defaults)."""
    out: str = ""
    """Output folder (default: <ckpt>/eval or ./eval)."""
    model: str | None = None
    """Model name when the weights have no config beside them."""
    weights: Literal["ema", "model"] = "ema"
    """Use the EMA weights when the checkpoint has them."""
    image_shape: tuple[int, int] | None = None
    """(H, W) after resize + centre crop (default: the training config's, else 256x256)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    limit: int | None = None
    """Evaluate only the first N scenes."""
    save_renders: bool = True
    """Write renders/<scene>/<frame>.png (render | ground truth)."""
    lpips: Literal["auto", "require", "off"] = "auto"
    """LPIPS when its weights are on disk (auto), always (require: fail without them), or never."""


def run(args: Args) -> int:
    from pathlib import Path

    from vision3d.data import ChunkDataset, ChunkDatasetConfig, EvaluationViewSampler
    from vision3d.eval.protocol import evaluate, load_model_for_eval
    from vision3d.train.distributed import resolve_device

    from vision3d.train.objectives import NotTrainable, recipe_for

    model, cfg = load_model_for_eval(args.ckpt, args.model, args.weights)
    name = args.model or cfg.model
    try:
        protocol = recipe_for(name).evaluation
    except NotTrainable:
        protocol = "render"
    shape = args.image_shape or (tuple(cfg.data.image_shape) if cfg is not None else (256, 256))
    near, far = (1.0, 100.0) if args.dataset == "re10k" else (0.5, 200.0)
    if cfg is not None:
        near, far = cfg.data.near, cfg.data.far
    ds = ChunkDataset(
        ChunkDatasetConfig(roots=[args.root], split="test", image_shape=shape, near=near, far=far),
        EvaluationViewSampler(args.index),
    )
    if cfg is not None:  # evaluate in the world frame the model was trained in (data.scene_transform)
        from vision3d.data.transforms import with_scene_transform

        ds = with_scene_transform(ds, getattr(cfg.data, "scene_transform", "none"))
    ck = Path(args.ckpt)
    out = args.out or str((ck if ck.is_dir() else ck.parent) / "eval")
    if protocol == "geometry":
        from vision3d.eval.geometry import evaluate_geometry

        res = evaluate_geometry(model, ds, out, resolve_device(args.device), args.limit)
        m = res["summary"]
        shown = [k for k in ("auc30", "rra30", "rta30", "rre_deg", "rte_deg", "abs_rel", "delta1") if k in m]
        print(f"{m['scenes']} scenes, {m['pairs']} view pairs: " + ", ".join(f"{k} {m[k]:.4f}" for k in shown)
              + f" -> {res['out_dir']}")
        return 0
    lp = {"auto": "auto", "require": True, "off": False}[args.lpips]
    res = evaluate(model, ds, out, resolve_device(args.device), args.save_renders, lp, args.limit)
    m = res.summary["mean_over_images"]
    print(f"{res.summary['scenes']} scenes, {res.summary['images']} target views: "
          + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) + f" -> {res.out_dir}")
    return 0
