"""Training objectives, and the recipe that says which one each reconstructor trains with.

A :class:`TrainRecipe` is what the engine needs to know about a model family: which
:class:`~vision3d.data.example.ViewsBatch` fields it reads, how to build its objective from the
``loss`` section of the config, which scalars it logs, which one is its headline number, and which
``vision3d eval`` protocol fits it. Recipes are registered against reconstructor-name patterns
(:func:`register_recipe`, next to the names of :func:`vision3d.recon.register`);
:func:`recipe_for` refuses a model without one before any work starts, listing the models that
train (and, for a family that cannot train here, saying why).

Two recipes exist:

* ``gaussians``: the model predicts Gaussians from the context views; they are rendered into the
  target cameras and compared with the target images (MSE, optional LPIPS, opacity regulariser).
  Every feed-forward 3DGS reconstructor (iLRM, the DepthSplat host, ZPressor, VolSplat) uses it.
* ``vggt``: VGGT's multi-task loss on the context views, as in the authors' training code
  (github.com/facebookresearch/vggt at 105a198, ``training/loss.py``,
  ``training/train_utils/normalization.py``, ``training/config/*.yaml``; VGGT License; read for
  facts, written anew here):

  - the ground truth is expressed in the first camera's frame and divided by the mean distance of
    the valid ground-truth points from it (with no depth in the data: by the mean distance of the
    other cameras' centres from the first -- our choice, the authors always have depth);
  - **camera loss** on the ``absT_quaR_FoV`` pose encoding of every camera-head iteration, weighted
    ``gamma ** (n - 1 - i)`` (``gamma = 0.6``) and averaged over iterations: L1 of translation
    (clamped at 100), quaternion and fields of view, weighted 1, 1, 0.5; the config's camera
    weight is 5;
  - **depth and point losses** with aleatoric confidence: ``gamma * |err| * c - alpha * log c``
    (``gamma = 1``, ``alpha = 0.2``) plus the plain ``|err|``, both after dropping errors above the
    0.98 quantile, plus a multi-scale gradient term (depth: L1 of the spatial gradient of the
    error over 4 scales; points: ``1 - cos`` between surface normals over 3 scales);
  - non-finite values are zeroed and values clamped to +-100 (the authors' ``check_and_fix_inf_nan``);
    a batch with fewer than 100 valid depth pixels contributes a zero depth/point loss.

  Camera-only fine-tuning (RE10K, DL3DV: no depth) sets ``loss.depth = loss.point = 0``; the
  depth and point heads are then skipped and frozen (the authors' ``enable_depth/point``).

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision3d.geometry import Cameras
from vision3d.geometry.conventions import cameras_to_vggt_pose_encoding
from vision3d.geometry.rotations import rigid_inverse

log = logging.getLogger("vision3d.train")

__all__ = [
    "TrainRecipe",
    "StepResult",
    "Objective",
    "RenderObjective",
    "VGGTObjective",
    "register_recipe",
    "refuse_training",
    "recipe_for",
    "trainable_models",
    "NotTrainable",
]


# ------------------------------------------------------------------------------------------ protocol
@dataclass
class StepResult:
    loss: Tensor  # scalar to back-propagate
    logs: dict[str, float]  # scalars for the log (every recipe's `primary` among them)
    preview: Tensor | None = None  # [V, 3, H, W'] in [0, 1] image for TensorBoard (first example), or None


class Objective(nn.Module):
    """One training step's loss for one model family.

    ``step(model, batch, step, autocast)`` runs the model (possibly wrapped in DDP: always call
    the wrapper, never ``model.module``) on the batch and returns a :class:`StepResult`.
    ``prepare(model)`` is called once on the bare model before the optimiser is built (switch off
    heads the objective does not supervise and freeze their parameters). ``check_batch(batch)``
    raises a clear error when the data lacks a field this objective needs.
    """

    requires: tuple[str, ...] = ()

    def prepare(self, model: nn.Module) -> list[str]:  # -> names of parameters it froze
        return []

    def check_batch(self, batch) -> None:
        missing = [f for f in self.requires if getattr(batch, f, None) is None]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: the training data has no {', '.join(missing)} "
                f"(needed by this configuration); {self.missing_hint(missing)}"
            )

    def missing_hint(self, missing: list[str]) -> str:
        return "use a dataset that provides them"

    def step(self, model: nn.Module, batch, step: int, autocast) -> StepResult:
        raise NotImplementedError


@dataclass(frozen=True)
class TrainRecipe:
    """How a model family trains."""

    name: str
    """Short name (``gaussians``, ``vggt``)."""
    requires: tuple[str, ...]
    """:class:`~vision3d.data.example.ViewsBatch` fields every configuration of the objective reads."""
    build: Callable[..., Objective]
    """``build(loss_cfg, device) -> Objective``."""
    metrics: tuple[str, ...]
    """Scalars the objective logs (``train/<name>`` in TensorBoard and ``metrics.json``)."""
    primary: str
    """The logged scalar shown on the progress bar and checked to be finite every step."""
    evaluation: Literal["render", "geometry"]
    """The ``vision3d eval`` protocol: novel-view rendering metrics, or camera/depth metrics."""
    description: str = ""
    """One line for listings."""


class NotTrainable(ValueError):
    """The named model has no training recipe (or cannot be trained with this installation)."""


_RECIPES: list[tuple[str, TrainRecipe]] = []
_REFUSED: list[tuple[str, str]] = []


def register_recipe(pattern: str, recipe: TrainRecipe) -> None:
    """Train reconstructors whose registry name matches ``pattern`` (fnmatch) with ``recipe``."""
    _RECIPES.append((pattern, recipe))


def refuse_training(pattern: str, reason: str) -> None:
    """Reconstructors matching ``pattern`` are refused by :func:`recipe_for` with ``reason``."""
    _REFUSED.append((pattern, reason))


def trainable_models() -> list[str]:
    """Registered reconstructors that have a training recipe."""
    from vision3d import recon

    return [m for m in recon.list_models() if _match(m) is not None]


def _match(name: str) -> TrainRecipe | None:
    if any(fnmatch.fnmatchcase(name, p) for p, _ in _REFUSED):
        return None
    for p, r in _RECIPES:
        if fnmatch.fnmatchcase(name, p):
            return r
    return None


def recipe_for(name: str) -> TrainRecipe:
    """The recipe of reconstructor ``name``; raises :class:`NotTrainable` naming the models that train."""
    from vision3d import recon

    models = recon.list_models()
    if name not in models:
        raise NotTrainable(f"unknown reconstructor '{name}'; models that train: {', '.join(trainable_models())}")
    for p, reason in _REFUSED:
        if fnmatch.fnmatchcase(name, p):
            raise NotTrainable(f"'{name}' cannot be trained by vision3d train: {reason}. "
                               f"Models that train: {', '.join(trainable_models())}")
    r = _match(name)
    if r is None:
        raise NotTrainable(f"'{name}' has no training recipe (vision3d.train.objectives.register_recipe); "
                           f"models that train: {', '.join(trainable_models())}")
    return r


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------- renders Gaussians
def render_kwargs(model: nn.Module, device: torch.device) -> dict:
    """The model's rendering settings (background, near/far, mode) as rasterize() keywords."""
    kw = dict(getattr(model, "render_kwargs", {}))
    bg = kw.get("background")
    if bg is not None and not isinstance(bg, Tensor):
        kw["background"] = torch.tensor(bg, dtype=torch.float32, device=device)
    return kw


def render_views(model: nn.Module, gaussians, cameras) -> Tensor:  # -> [B, V, 3, H, W]
    """Render the predicted Gaussians (batch [B]) into cameras (batch [B, V]) in float32."""
    from vision3d.render import rasterize

    if gaussians is None:
        raise TypeError(f"{type(_unwrap(model)).__name__} returned no Gaussians; it cannot be trained or "
                        "evaluated by rendering (see vision3d.train.objectives.recipe_for)")
    g = gaussians.to(dtype=torch.float32)
    out = rasterize(g, cameras.to(g.device), mode="RGB", **render_kwargs(_unwrap(model), g.device))
    return out.colors


class RenderObjective(Objective):
    """Render the predicted Gaussians into the target views: MSE + optional LPIPS + opacity regulariser.

    Refuses LPIPS without its weights on disk.
    """

    requires = ("context_images", "context_cameras", "target_images", "target_cameras")

    def __init__(self, cfg, device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        self.use_lpips = cfg.lpips > 0
        if self.use_lpips:
            from vision3d.eval import metrics

            if not metrics.lpips_available("vgg"):
                raise metrics.LPIPSWeightsMissing(
                    "the config asks for an LPIPS loss (loss.lpips > 0) but its weights are missing. "
                    + metrics.lpips_missing_message("vgg")
                    + "\nOr train without it: --loss.lpips 0"
                )

    def forward(self, pred: Tensor, target: Tensor, gaussians, step: int) -> tuple[Tensor, dict[str, float]]:
        # pred/target [B, V, 3, H, W] in [0, 1]
        terms: dict[str, Tensor] = {}
        mse = (pred - target).square().mean()
        terms["mse"] = mse
        total = self.cfg.mse * mse
        if self.use_lpips and step >= self.cfg.lpips_after:
            from vision3d.eval.metrics import lpips

            lp = lpips(pred, target, net="vgg").mean()
            terms["lpips"] = lp
            total = total + self.cfg.lpips * lp
        if self.cfg.opacity_reg > 0:
            reg = gaussians.opacities.mean()
            terms["opacity"] = reg
            total = total + self.cfg.opacity_reg * reg
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["psnr"] = float(-10 * torch.log10(mse.detach().clamp_min(1e-10)))
        return total, logs

    def step(self, model: nn.Module, batch, step: int, autocast) -> StepResult:
        with autocast:
            out = model(batch.context_images, batch.context_cameras)
        pred = render_views(model, out.gaussians, batch.target_cameras)
        loss, logs = self(pred, batch.target_images, out.gaussians, step)
        for i, (weight, g) in enumerate(out.aux_gaussians):  # e.g. VolSplat's intermediate-depth Gaussians
            aux, aux_logs = self(render_views(model, g, batch.target_cameras), batch.target_images, g, step)
            loss = loss + weight * aux
            logs[f"aux{i}_psnr"] = aux_logs["psnr"]
        preview = torch.cat([pred[0].detach().float(), batch.target_images[0].float()], -1)  # [V, 3, H, 2W]
        return StepResult(loss, logs, preview)


GAUSSIANS = TrainRecipe(
    name="gaussians",
    requires=RenderObjective.requires,
    build=RenderObjective,
    metrics=("mse", "lpips", "opacity", "psnr"),
    primary="mse",
    evaluation="render",
    description="render the predicted Gaussians into the target views (MSE + LPIPS)",
)


# ------------------------------------------------------------------------------------- VGGT losses
def fix_nonfinite(x: Tensor, hard_max: float | None = 100.0) -> Tensor:
    """Zero NaN/inf entries and clamp to ``[-hard_max, hard_max]`` (the authors' guard on every term)."""
    x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
    return x.clamp(-hard_max, hard_max) if hard_max is not None else x


def quantile_filter(values: Tensor, q: float, min_elements: int = 1000, hard_max: float = 100.0) -> Tensor:
    """Keep the entries of 1-D ``values`` below their ``q`` quantile (nearest rank), after clamping
    at ``hard_max``; unchanged when there are ``min_elements`` or fewer entries, or when fewer would remain."""
    if values.numel() <= min_elements:
        return values
    values = values.clamp(max=hard_max)
    k = round(q * (values.numel() - 1)) + 1
    thresh = min(float(torch.kthvalue(values.detach().flatten(), k).values), hard_max)
    keep = values < thresh
    return values[keep] if int(keep.sum()) > min_elements else values


def gradient_term(
    diff_pred: Tensor,  # [N, H, W, C] prediction
    target: Tensor,  # [N, H, W, C]
    mask: Tensor,  # [N, H, W] bool
    conf: Tensor | None = None,  # [N, H, W]
    gamma: float = 1.0,
    alpha: float = 0.2,
) -> Tensor:
    """L1 of the horizontal and vertical differences of the masked error, per valid pixel."""
    m = mask[..., None].expand_as(diff_pred).to(diff_pred.dtype)
    err = (diff_pred - target) * m
    gx = (err[:, :, 1:] - err[:, :, :-1]).abs() * (m[:, :, 1:] * m[:, :, :-1])
    gy = (err[:, 1:] - err[:, :-1]).abs() * (m[:, 1:] * m[:, :-1])
    gx, gy = gx.clamp(max=100), gy.clamp(max=100)
    if conf is not None:
        c = conf[..., None].expand_as(diff_pred)
        gx = gamma * gx * c[:, :, 1:] - alpha * torch.log(c[:, :, 1:])
        gy = gamma * gy * c[:, 1:] - alpha * torch.log(c[:, 1:])
    n = m.sum()
    if n == 0:
        return diff_pred.sum() * 0.0
    return (gx.sum() + gy.sum()) / n


def point_normals(points: Tensor, mask: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Four unit normals per pixel from the cross products of the up/left/down/right neighbour
    directions of a point map ``[N, H, W, 3]``; returns ``([4, N, H, W, 3], valid [4, N, H, W])``."""
    pm = F.pad(mask, (1, 1, 1, 1), value=False)
    p = F.pad(points.float().permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    c = p[:, 1:-1, 1:-1]
    up, left, down, right = p[:, :-2, 1:-1] - c, p[:, 1:-1, :-2] - c, p[:, 2:, 1:-1] - c, p[:, 1:-1, 2:] - c
    n = torch.stack([torch.cross(up, left, dim=-1), torch.cross(left, down, dim=-1),
                     torch.cross(down, right, dim=-1), torch.cross(right, up, dim=-1)])
    mc = pm[:, 1:-1, 1:-1]
    mu, ml, md, mr = pm[:, :-2, 1:-1], pm[:, 1:-1, :-2], pm[:, 2:, 1:-1], pm[:, 1:-1, 2:]
    valid = torch.stack([mu & mc & ml, ml & mc & md, md & mc & mr, mr & mc & mu])
    return F.normalize(n, dim=-1, eps=eps), valid


def normal_term(pred: Tensor, target: Tensor, mask: Tensor, conf: Tensor | None = None, gamma: float = 1.0,
                alpha: float = 0.2, cos_eps: float = 1e-8) -> Tensor:
    """Mean ``1 - cos`` between the surface normals of two point maps ``[N, H, W, 3]`` (0 with < 10 valid)."""
    pn, pv = point_normals(pred, mask, cos_eps)
    gn, gv = point_normals(target, mask, cos_eps)
    valid = pv & gv
    if int(valid.sum()) < 10:
        return pred.sum() * 0.0
    dot = (pn[valid] * gn[valid]).sum(-1).clamp(-1 + cos_eps, 1 - cos_eps)
    loss = fix_nonfinite(1 - dot)
    if conf is not None:
        c = conf[None].expand(4, -1, -1, -1)[valid]
        loss = gamma * loss * c - alpha * torch.log(c)
    return loss.mean()


def multiscale(fn, pred: Tensor, target: Tensor, mask: Tensor, conf: Tensor | None, scales: int) -> Tensor:
    """``fn`` averaged over ``scales`` subsamplings by 2**s (pixels ``[::2**s, ::2**s]``)."""
    total = 0.0
    for s in range(scales):
        k = 2 ** s
        total = total + fn(pred[:, ::k, ::k], target[:, ::k, ::k], mask[:, ::k, ::k],
                           conf=conf[:, ::k, ::k] if conf is not None else None)
    return total / scales


def confidence_regression(
    pred: Tensor,  # [B, S, H, W, C]
    gt: Tensor,  # [B, S, H, W, C]
    mask: Tensor,  # [B, S, H, W] bool
    conf: Tensor,  # [B, S, H, W] > 0
    gradient: str = "none",  # "none" | "grad" | "normal", with "_conf" to weight it by the confidence
    gamma: float = 1.0,
    alpha: float = 0.2,
    valid_range: float = -1.0,
) -> tuple[Tensor, Tensor, Tensor]:  # (confidence-weighted, gradient, plain) means
    """VGGT's regression loss: ``gamma * ||err|| * c - alpha * log c`` on valid pixels, the plain
    ``||err||`` and an optional multi-scale gradient term; both per-pixel terms lose their
    entries above the ``valid_range`` quantile when ``valid_range > 0``."""
    b, s, h, w, c = pred.shape
    err = fix_nonfinite(torch.linalg.vector_norm(gt[mask] - pred[mask], dim=-1))
    cm = conf[mask]
    conf_term = fix_nonfinite(gamma * err * cm - alpha * torch.log(cm))
    grad = pred.sum() * 0.0
    if gradient != "none":
        gconf = conf.reshape(b * s, h, w) if "conf" in gradient else None
        args = (pred.reshape(b * s, h, w, c), gt.reshape(b * s, h, w, c), mask.reshape(b * s, h, w), gconf)
        if gradient.startswith("normal"):
            grad = multiscale(normal_term, *args, scales=3)
        elif gradient.startswith("grad"):
            grad = multiscale(gradient_term, *args, scales=4)
        else:
            raise ValueError(f"loss gradient term {gradient!r}: expected none, grad, grad_conf, normal or normal_conf")

    def reduce(x: Tensor) -> Tensor:
        if x.numel() == 0:
            return pred.sum() * 0.0
        if valid_range > 0:
            x = quantile_filter(x, valid_range)
        return fix_nonfinite(x).mean()

    return reduce(conf_term), grad, reduce(err)


@dataclass
class VGGTTargets:
    """Ground truth of a batch in VGGT's normalised frame (first camera, unit mean point distance)."""

    pose_enc: Tensor  # [B, S, 9] absT_quaR_FoV of the normalised cameras
    depth: Tensor | None  # [B, S, H, W, 1] normalised z-depth
    points: Tensor | None  # [B, S, H, W, 3] points in the first camera's frame, normalised
    mask: Tensor | None  # [B, S, H, W] bool: valid depth
    scale: Tensor  # [B] the world was divided by this


@torch.no_grad()
def vggt_targets(cameras: Cameras, depths: Tensor | None) -> VGGTTargets:
    """Normalise ground-truth cameras (batch ``[B, S]``) and optional depths ``[B, S, 1, H, W]``
    (0 = unknown) like the authors' ``normalize_camera_extrinsics_and_points_batch``."""
    c2w = cameras.cam_to_world.float()
    rel = rigid_inverse(c2w[:, :1]) @ c2w  # [B, S, 4, 4]: world = the first camera's frame
    cams = replace(cameras, K=cameras.K.float(), cam_to_world=rel, near=None, far=None)
    b = c2w.shape[0]
    points = mask = depth = None
    if depths is not None:
        depth = depths[:, :, 0].float()
        mask = torch.isfinite(depth) & (depth > 0)
        depth = torch.where(mask, depth, torch.zeros_like(depth))
        points = cams.unproject(depth)  # [B, S, H, W, 3]
        dist = (points.norm(dim=-1) * mask).flatten(1).sum(1)
        count = mask.flatten(1).sum(1)
        scale = torch.where(count > 0, dist / count.clamp(min=1), torch.ones_like(dist))
    else:
        centres = rel[:, 1:, :3, 3].norm(dim=-1)  # [B, S-1]
        scale = centres.mean(1) if centres.shape[1] else torch.ones(b, device=c2w.device)
    scale = scale.clamp(1e-6, 1e6)
    rel = rel.clone()
    rel[..., :3, 3] = rel[..., :3, 3] / scale[:, None, None]
    if depth is not None:
        depth = (depth / scale[:, None, None, None])[..., None]
        points = points / scale[:, None, None, None, None]
    pose = cameras_to_vggt_pose_encoding(replace(cams, cam_to_world=rel))
    return VGGTTargets(pose, depth, points, mask, scale)


def camera_loss(
    pose_iters: Tensor,  # [n, B, S, 9] every camera-head iteration
    gt: Tensor,  # [B, S, 9]
    valid: Tensor | None = None,  # [B] bool: examples to use
    gamma: float = 0.6,
    loss_type: str = "l1",
    weights: tuple[float, float, float] = (1.0, 1.0, 0.5),
) -> dict[str, Tensor]:
    """Iteration-weighted pose-encoding loss: ``loss_T``, ``loss_R``, ``loss_FL`` and their weighted sum ``loss_camera``."""
    n = pose_iters.shape[0]
    tot = {"T": 0.0, "R": 0.0, "FL": 0.0}
    for i in range(n):
        w = gamma ** (n - 1 - i)
        p, g = pose_iters[i], gt
        if valid is not None:
            p, g = p[valid], g[valid]
        if p.numel() == 0:
            parts = {k: pose_iters[i].sum() * 0.0 for k in tot}
        elif loss_type == "l1":
            parts = {"T": (p[..., :3] - g[..., :3]).abs(), "R": (p[..., 3:7] - g[..., 3:7]).abs(),
                     "FL": (p[..., 7:] - g[..., 7:]).abs()}
        elif loss_type == "l2":
            parts = {"T": (p[..., :3] - g[..., :3]).norm(dim=-1), "R": (p[..., 3:7] - g[..., 3:7]).norm(dim=-1),
                     "FL": (p[..., 7:] - g[..., 7:]).norm(dim=-1)}
        else:
            raise ValueError(f"loss.camera_loss_type {loss_type!r}: expected l1 or l2")
        if p.numel():
            parts = {k: fix_nonfinite(v) for k, v in parts.items()}
            parts["T"] = parts["T"].clamp(max=100)
            parts = {k: v.mean() for k, v in parts.items()}
        for k in tot:
            tot[k] = tot[k] + w * parts[k]
    out = {f"loss_{k}": v / n for k, v in tot.items()}
    out["loss_camera"] = weights[0] * out["loss_T"] + weights[1] * out["loss_R"] + weights[2] * out["loss_FL"]
    return out


class VGGTObjective(Objective):
    """VGGT's multi-task loss (camera, depth, point; see the module docstring) on the context views.

    The model sees the context views only (their order is the data's: frame 0 is the reference);
    target views are not used.
    """

    MIN_VALID = 100  # fewer valid depth pixels in a batch: zero depth/point loss (the authors')

    def __init__(self, cfg, device: torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.camera <= 0 and cfg.depth <= 0 and cfg.point <= 0:
            raise ValueError("loss.camera, loss.depth and loss.point are all 0: nothing to train")
        req = ["context_images", "context_cameras"]
        if cfg.depth > 0 or cfg.point > 0:
            req.append("context_depths")
        self.requires = tuple(req)

    def missing_hint(self, missing: list[str]) -> str:
        return ("RE10K/DL3DV chunks carry no depth: fine-tune the cameras only with --loss.depth 0 --loss.point 0 "
                "(configs/re10k/vggt_finetune.yaml), or train on data with depth (write_synthetic_dataset carries it)")

    def prepare(self, model: nn.Module) -> list[str]:
        heads = {"camera": self.cfg.camera > 0, "depth": self.cfg.depth > 0, "point": self.cfg.point > 0}
        model.set_heads(**heads)
        frozen = []
        for head, on in heads.items():
            if not on:
                for n, p in getattr(model, f"{head}_head").named_parameters():
                    p.requires_grad_(False)
                    frozen.append(f"{head}_head.{n}")
        return frozen

    def step(self, model: nn.Module, batch, step: int, autocast) -> StepResult:
        cfg = self.cfg
        images = batch.context_images
        with autocast:
            out = model(images, batch.context_cameras)
        use_depth = cfg.depth > 0 or cfg.point > 0
        gt = vggt_targets(batch.context_cameras, batch.context_depths if use_depth else None)
        terms: dict[str, Tensor] = {}
        total = images.new_zeros(())
        enough = gt.mask is not None and int(gt.mask.sum()) >= self.MIN_VALID
        if cfg.camera > 0:
            valid = None
            if gt.mask is not None:  # examples whose first frame has enough valid depth (the authors')
                valid = gt.mask[:, 0].flatten(1).sum(1) > self.MIN_VALID
            cam = camera_loss(out.extras["pose_enc_list"].float(), gt.pose_enc, valid, cfg.camera_gamma,
                              cfg.camera_loss_type, (cfg.camera_trans, cfg.camera_rot, cfg.camera_focal))
            terms.update(cam)
            total = total + cfg.camera * cam["loss_camera"]
        for what, w, pred, conf, target, grad in (
            ("depth", cfg.depth, out.depth, out.confidence, gt.depth, cfg.depth_gradient),
            ("point", cfg.point, out.extras.get("world_points"), out.extras.get("world_points_conf"), gt.points,
             cfg.point_gradient),
        ):
            if w <= 0:
                continue
            if what == "depth":
                pred, conf = pred.permute(0, 1, 3, 4, 2), conf[:, :, 0]  # [B, S, H, W, 1], [B, S, H, W]
            if enough:
                lc, lg, lr = confidence_regression(pred.float(), target, gt.mask, conf.float(), grad, cfg.conf_gamma,
                                                   cfg.conf_alpha, cfg.valid_range)
            else:
                lc = lg = lr = pred.sum() * 0.0
            terms.update({f"loss_conf_{what}": lc, f"loss_reg_{what}": lr, f"loss_grad_{what}": lg})
            total = total + w * (lc + lr + lg)
        logs = {k: float(v.detach()) for k, v in terms.items()}
        logs["objective"] = float(total.detach())
        if cfg.camera > 0:
            with torch.no_grad():
                from vision3d.eval.geometry import camera_errors

                rre, rte = camera_errors(out.cameras.cam_to_world.float(), batch.context_cameras.cam_to_world.float())
                if rre.numel():
                    logs["rre_deg"], logs["rte_deg"] = float(rre.mean()), float(rte.mean())
        return StepResult(total, logs, self._preview(images, out.depth))

    @staticmethod
    def _preview(images: Tensor, depth: Tensor | None) -> Tensor:  # -> [S, 3, H, 2W]
        img = images[0].detach().float()
        if depth is None:
            return img
        d = depth[0].detach().float()
        d = (d - d.amin()) / (d.amax() - d.amin()).clamp_min(1e-8)
        return torch.cat([img, d.expand_as(img)], -1)


VGGT_RECIPE = TrainRecipe(
    name="vggt",
    requires=("context_images", "context_cameras"),
    build=VGGTObjective,
    metrics=("objective", "loss_camera", "loss_T", "loss_R", "loss_FL", "loss_conf_depth", "loss_reg_depth",
             "loss_grad_depth", "loss_conf_point", "loss_reg_point", "loss_grad_point", "rre_deg", "rte_deg"),
    primary="objective",
    evaluation="geometry",
    description="VGGT's camera (pose encoding), depth and point-map losses with confidence",
)


# ------------------------------------------------------------------------------------- the table
for _pattern in ("ilrm_*", "depthsplat*", "zpressor*", "volsplat*"):
    register_recipe(_pattern, GAUSSIANS)
for _pattern in ("vggt_*", "flashvggt_*"):
    register_recipe(_pattern, VGGT_RECIPE)
refuse_training(
    "dimer*",
    "DiMeR's training renders its FlexiCubes mesh with a differentiable mesh rasterizer to compare "
    "normals, depth and masks with ground truth (the authors use nvdiffrast: not on the Python package "
    "index, built from github.com/NVlabs/nvdiffrast against a local CUDA toolkit), and it takes normal "
    "maps of rendered objects as input, which RE10K/DL3DV-format data does not carry; neither is part of vision3d",
)
