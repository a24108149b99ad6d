"""Camera and depth metrics, and the evaluation protocol for models that predict cameras and depth
(VGGT, FlashVGGT).

Camera metrics as the VGGT paper reports them (Wang et al., arXiv:2503.11651, Sec. 4.1, following
PoseDiffusion/PoseReg): for every pair ``i < j`` of views of a scene, the relative rotation error
(RRE, the geodesic angle between the predicted and true relative rotations) and the relative
translation error (RTE, the angle between the predicted and true relative translation
directions, taken as ``min(a, 180 - a)`` so the sign ambiguity of a direction is not counted);
RRA@t / RTA@t are the fractions of pairs below ``t`` degrees, and AUC@30 is the mean over the
thresholds 1..30 degrees of the fraction of pairs whose larger error, ``max(RRE, RTE)``, is below
the threshold. Both errors are invariant to the choice of world frame and scale, so predictions
need no alignment.

Depth metrics (the monocular/multi-view depth convention): AbsRel ``mean(|d - d*| / d*)`` and
``delta < 1.25`` (the fraction of pixels with ``max(d / d*, d* / d) < 1.25``) over the pixels with
known depth, after aligning each predicted map to its ground truth by the ratio of medians
(VGGT predicts depth up to scale).

:func:`evaluate_geometry` runs a model over an evaluation dataset (the views of each
:class:`~vision3d.data.example.ViewsExample`, context then target, form one sequence) and writes
``per_scene.csv`` and ``metrics.json`` (AUC over all pairs of all scenes, which is what the paper
reports, plus means). Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from vision3d.geometry.rotations import rigid_inverse, rotation_angle
from vision3d.utils.io import check_writable_dir, write_text_atomic

__all__ = ["camera_errors", "pose_auc", "accuracy_at", "depth_metrics", "evaluate_geometry"]


def camera_errors(
    pred_c2w: Tensor,  # [..., S, 4, 4] predicted cam-to-world (any world frame and scale)
    gt_c2w: Tensor,  # [..., S, 4, 4] true cam-to-world
) -> tuple[Tensor, Tensor]:  # RRE, RTE in degrees, [..., S * (S - 1) / 2] over pairs i < j
    """Relative rotation and translation angle errors over all view pairs."""
    if pred_c2w.shape != gt_c2w.shape or pred_c2w.shape[-2:] != (4, 4):
        raise ValueError(f"camera_errors: expected two [..., S, 4, 4] tensors of one shape, got "
                         f"{tuple(pred_c2w.shape)} and {tuple(gt_c2w.shape)}")
    s = pred_c2w.shape[-3]
    i, j = torch.triu_indices(s, s, 1, device=pred_c2w.device)

    def relative(c2w: Tensor) -> Tensor:  # camera i -> camera j, [..., P, 4, 4]
        c2w = c2w.double()
        return rigid_inverse(c2w[..., j, :, :]) @ c2w[..., i, :, :]

    rp, rg = relative(pred_c2w), relative(gt_c2w)
    rre = torch.rad2deg(rotation_angle(rp[..., :3, :3], rg[..., :3, :3]))
    tp, tg = rp[..., :3, 3], rg[..., :3, 3]
    cos = (tp * tg).sum(-1) / (tp.norm(dim=-1) * tg.norm(dim=-1)).clamp_min(1e-12)
    ang = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    rte = torch.minimum(ang, (180.0 - ang).abs())
    return rre.float(), rte.float()


def pose_auc(rre: Tensor, rte: Tensor, max_threshold: int = 30) -> float:
    """AUC@max_threshold: mean over t = 1..max_threshold degrees of the fraction of pairs with
    ``max(RRE, RTE) < t`` (PoseDiffusion's histogram definition, as VGGT reports it)."""
    if rre.shape != rte.shape:
        raise ValueError(f"pose_auc: rotation errors {tuple(rre.shape)} and translation errors {tuple(rte.shape)} "
                         "differ; expected one error per pair in each")
    err = torch.maximum(rre.flatten(), rte.flatten())
    if err.numel() == 0:
        raise ValueError("pose_auc: no view pairs (every scene needs at least 2 views)")
    err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
    thresholds = torch.arange(1, max_threshold + 1, dtype=err.dtype, device=err.device)
    return float((err[None] < thresholds[:, None]).float().mean(1).mean())


def accuracy_at(err: Tensor, threshold: float = 30.0) -> float:
    """Fraction of entries below ``threshold`` degrees (RRA@t or RTA@t)."""
    return float((err.flatten() < threshold).float().mean())


def depth_metrics(
    pred: Tensor,  # [V, 1, H, W] predicted depth (any scale)
    gt: Tensor,  # [V, 1, H, W] true z-depth, 0 = unknown
    align: str = "median",  # "median" (per view ratio of medians) or "none"
) -> dict[str, Tensor]:  # "abs_rel", "delta1" per view [V] (NaN for a view with no known depth)
    """AbsRel and delta < 1.25 per view after median scaling."""
    if pred.shape != gt.shape:
        raise ValueError(f"depth_metrics: prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ")
    if align not in ("median", "none"):
        raise ValueError(f"depth_metrics: align must be 'median' or 'none', got {align!r}")
    abs_rel, delta = [], []
    for p, g in zip(pred.float(), gt.float()):
        m = torch.isfinite(g) & (g > 0) & torch.isfinite(p) & (p > 0)
        if not m.any():
            abs_rel.append(float("nan")), delta.append(float("nan"))
            continue
        pv, gv = p[m], g[m]
        if align == "median":
            pv = pv * (gv.median() / pv.median())
        abs_rel.append(float(((pv - gv).abs() / gv).mean()))
        delta.append(float((torch.maximum(pv / gv, gv / pv) < 1.25).float().mean()))
    return {"abs_rel": torch.tensor(abs_rel), "delta1": torch.tensor(delta)}


def _nanmean(xs: list[float]) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


@torch.no_grad()
def evaluate_geometry(
    model: nn.Module,
    dataset,  # yields ViewsExample (context + target views form the sequence)
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    progress: bool = True,
    views: str = "all",  # "all" (context then target) or "context"
) -> dict:
    """Camera (and, where the data has depth, depth) metrics of a camera-predicting model."""
    from vision3d.geometry import Cameras

    if views not in ("all", "context"):
        raise ValueError(f"evaluate_geometry: views must be 'all' or 'context', got {views!r}")
    out = check_writable_dir(out_dir)
    device = torch.device(device)
    model = model.to(device).eval()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="eval", dynamic_ncols=True)
    rows, all_rre, all_rte, all_rel, all_d1 = [], [], [], [], []
    t0 = time.time()
    for k in it:
        ex = dataset[k]
        imgs, cams, depth = ex.context_images, ex.context_cameras, ex.context_depths
        if views == "all":
            imgs = torch.cat([imgs, ex.target_images])
            cams = Cameras.cat([cams, ex.target_cameras])
            depth = None if depth is None or ex.target_depths is None else torch.cat([depth, ex.target_depths])
        if imgs.shape[0] < 2:
            raise ValueError(f"evaluate_geometry: scene {ex.scene} has {imgs.shape[0]} view; camera metrics need >= 2")
        res = model(imgs[None].to(device), cams[None].to(device))
        if res.cameras is None:
            raise TypeError(f"{type(model).__name__} predicts no cameras; evaluate it with the rendering protocol")
        rre, rte = camera_errors(res.cameras.cam_to_world[0].cpu(), cams.cam_to_world)
        all_rre.append(rre), all_rte.append(rte)
        row = {"scene": ex.scene, "views": int(imgs.shape[0]), "pairs": int(rre.numel()),
               "rre_deg": float(rre.mean()), "rte_deg": float(rte.mean()), "auc30": pose_auc(rre, rte)}
        if depth is not None and res.depth is not None:
            dm = depth_metrics(res.depth[0].cpu(), depth)
            all_rel += dm["abs_rel"].tolist()
            all_d1 += dm["delta1"].tolist()
            row.update(abs_rel=_nanmean(dm["abs_rel"].tolist()), delta1=_nanmean(dm["delta1"].tolist()))
        rows.append(row)
    if not rows:
        raise ValueError("evaluate_geometry: the dataset yielded no scenes (check the index file and the data root)")
    rre, rte = torch.cat(all_rre), torch.cat(all_rte)
    summary = {
        "auc30": pose_auc(rre, rte, 30),
        "auc15": pose_auc(rre, rte, 15),
        "auc5": pose_auc(rre, rte, 5),
        "rra30": accuracy_at(rre, 30.0),
        "rta30": accuracy_at(rte, 30.0),
        "rre_deg": float(rre.mean()),
        "rte_deg": float(rte.mean()),
        "scenes": len(rows),
        "pairs": int(rre.numel()),
        "seconds": time.time() - t0,
    }
    if all_rel:
        summary.update(abs_rel=_nanmean(all_rel), delta1=_nanmean(all_d1), depth_views=len(all_rel))
    names = sorted({key for r in rows for key in r}, key=lambda x: list(rows[0]).index(x) if x in rows[0] else 99)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "per_scene.csv", buf.getvalue())
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=1))
    return {"summary": summary, "per_scene": rows, "out_dir": out}
