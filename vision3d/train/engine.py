"""The training engine: one loop for every reconstructor.

A step: the reconstructor turns the context views of a :class:`~vision3d.data.example.ViewsBatch`
into Gaussians; :func:`vision3d.render.rasterize` renders them into the target cameras; the loss
(MSE + optional LPIPS + regularisers) is back-propagated. DDP via ``torchrun`` (NCCL on GPUs, gloo
on the CPU), bf16 autocast on GPUs, gradient accumulation and clipping, AdamW (timm's optimiser
factory: no weight decay on biases and norms) with a warm-up + cosine schedule (timm's
``CosineLRScheduler``, stepped per update), optional EMA of the weights (timm's ``ModelEmaV3``),
per-rank seeding, atomic resumable checkpoints (weights, optimiser, scheduler, EMA, step, RNG and
the sampler position, so a resumed run continues bit-for-bit on the CPU), TensorBoard scalars and
images on rank 0, a progress bar, and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vision3d import recon
from vision3d.render import rasterize
from vision3d.utils.io import write_text_atomic

from .checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from .config import TrainConfig, diff_configs, dump_config, load_config
from .distributed import DistInfo, init_distributed, rng_state, seed_everything, set_rng_state

log = logging.getLogger("vision3d.train")


# ------------------------------------------------------------------------------------------------ pieces
def build_model(cfg: TrainConfig) -> recon.Reconstructor:
    model = recon.create(cfg.model, **cfg.model_kwargs)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    return model


def render_kwargs(model: nn.Module, device: torch.device) -> dict:
    """The model's rendering settings (background, near/far, mode) as rasterize() keywords."""
    kw = dict(getattr(model, "render_kwargs", {}))
    bg = kw.get("background")
    if bg is not None and not isinstance(bg, Tensor):
        kw["background"] = torch.tensor(bg, dtype=torch.float32, device=device)
    return kw


def render_views(model: nn.Module, gaussians, cameras) -> Tensor:  # -> [B, V, 3, H, W]
    """Render the predicted Gaussians (batch [B]) into cameras (batch [B, V]) in float32."""
    base = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    g = gaussians.to(dtype=torch.float32)
    out = rasterize(g, cameras.to(g.device), mode="RGB", **render_kwargs(base, g.device))
    return out.colors


class Loss(nn.Module):
    """Weighted sum of the configured terms; refuses LPIPS without its weights on disk."""

    def __init__(self, cfg, device: torch.device):
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


def forward_loss(model: nn.Module, loss_fn: Loss, batch, step: int, autocast) -> tuple[Tensor, dict, Tensor]:
    with autocast:
        out = model(batch.context_images, batch.context_cameras)
    pred = render_views(model, out.gaussians, batch.target_cameras)
    loss, logs = loss_fn(pred, batch.target_images, out.gaussians, step)
    for i, (weight, g) in enumerate(out.aux_gaussians):  # e.g. VolSplat's intermediate-depth Gaussians
        aux, aux_logs = loss_fn(render_views(model, g, batch.target_cameras), batch.target_images, g, step)
        loss = loss + weight * aux
        logs[f"aux{i}_psnr"] = aux_logs["psnr"]
    return loss, logs, pred


# ------------------------------------------------------------------------------------------------ run folder
def prepare_run_dir(cfg: TrainConfig, info: DistInfo) -> tuple[Path, Path | None]:
    """Create/validate the run folder; returns (run_dir, checkpoint to resume from or None)."""
    run = Path(cfg.out)
    resume_from = None
    if cfg.resume:
        saved = run / "config.yaml"
        if not saved.exists():
            raise FileNotFoundError(f"{run}: --resume was given but the folder has no config.yaml (not a run folder)")
        diffs = diff_configs(load_config(saved), cfg)
        if diffs:
            raise ValueError(f"{saved}: the run was started with another config; differences: " + "; ".join(diffs))
        resume_from = latest_checkpoint(run)
    elif run.exists() and any(run.iterdir()):
        if not cfg.overwrite:
            raise FileExistsError(
                f"{run}: run folder exists and is not empty; pass --resume to continue it or --overwrite to replace it"
            )
        if info.is_main:
            shutil.rmtree(run)
    if info.enabled:
        dist.barrier()
    if info.is_main:
        for sub in ("ckpts", "renders", "tb"):
            (run / sub).mkdir(parents=True, exist_ok=True)
        write_text_atomic(run / "config.yaml", dump_config(cfg))
    if info.enabled:
        dist.barrier()
    return run, resume_from


def build_dataset(cfg: TrainConfig, split: str = "train", rank: int = 0):
    """The training dataset described by ``cfg.data`` (RE10K/DL3DV chunks, bounded view sampler).

    ``rank`` seeds this rank's sequence of per-batch context counts (``data.num_context_max``).
    """
    from vision3d.data import BoundedViewSampler, ChunkDataset, ChunkDatasetConfig

    d = cfg.data
    if d.num_context_max is not None and d.num_context_max < d.num_context:
        raise ValueError(
            f"config data.num_context_max={d.num_context_max} is below data.num_context={d.num_context}; "
            "set it >= num_context, or null for a fixed count"
        )
    sampler = BoundedViewSampler(
        num_context_views=d.num_context, num_target_views=d.num_target, min_gap=d.min_gap, max_gap=d.max_gap,
        warm_up_steps=d.gap_warmup_steps, initial_min_gap=d.initial_min_gap, initial_max_gap=d.initial_max_gap,
        extra_views=d.extra_views, targets_with_replacement=d.targets_with_replacement,
        num_context_views_max=d.num_context_max, shrink_gap=d.shrink_gap, count_seed=cfg.seed, count_rank=rank,
    )
    data_cfg = ChunkDatasetConfig(
        roots=[d.root], split=split, image_shape=tuple(d.image_shape), near=d.near, far=d.far, skip_bad=d.skip_bad
    )
    return ChunkDataset(data_cfg, sampler)


# ------------------------------------------------------------------------------------------------ the loop
@dataclass
class TrainResult:
    step: int
    history: list[dict]
    run_dir: Path
    model: nn.Module


def _logger(run: Path, info: DistInfo):
    if not info.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is the [tensorboard] extra
        log.warning("tensorboard is not installed (pip install tensorboard): scalars go to metrics.json only")
        return None
    return SummaryWriter(str(run / "tb"))


def train(cfg: TrainConfig, dataset=None, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) training as configured.

    Args:
        cfg: the resolved configuration.
        dataset: a dataset yielding :class:`ViewsExample` for a ``SampleKey`` (default: built from
            ``cfg.data``).
        max_steps: stop after this global step (tests use it to interrupt a run); the schedule still
            follows ``cfg.optim.max_steps``.
    """
    from vision3d.data import make_loader

    info = init_distributed(cfg.device)
    run, resume_from = prepare_run_dir(cfg, info)
    seed_everything(cfg.seed + info.rank)
    device = info.device

    model = build_model(cfg).to(device)
    base = model
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    o = cfg.optim
    optimizer = create_optimizer_v2(base, "adamw", lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=o.max_steps, lr_min=o.min_lr, warmup_t=o.warmup_steps,
        warmup_lr_init=o.lr * 1e-3 if o.warmup_steps else o.lr, warmup_prefix=True, t_in_epochs=False,
    )
    ema = None
    if o.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(base, decay=o.ema_decay)
    loss_fn = Loss(cfg.loss, device)

    step = 0
    sampler_state = resume_rng = None
    if resume_from is not None:
        weights, state, ema_w = load_checkpoint(resume_from)
        load_model_weights(base, weights, str(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and ema_w is not None:
            ema.module.load_state_dict(ema_w)
        step = int(state["step"])
        if int(state.get("world_size", 1)) != info.world_size:
            raise ValueError(
                f"{resume_from}: saved by {state.get('world_size')} processes, resumed with {info.world_size}; "
                "resume with the same number of processes"
            )
        sampler_state = state["sampler"][info.rank]
        resume_rng = state["rng"][info.rank]
        if info.is_main:
            log.info("resumed %s at step %d", resume_from, step)
    scheduler.step_update(step)

    if dataset is None:
        dataset = build_dataset(cfg, rank=info.rank)
    loader, sampler = make_loader(
        dataset, cfg.data.batch_size, rank=info.rank, world_size=info.world_size, seed=cfg.seed,
        num_workers=cfg.data.num_workers, epochs=None, state=sampler_state, pin_memory=device.type == "cuda",
    )
    use_bf16 = cfg.precision == "bf16" and device.type == "cuda"
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    writer = _logger(run, info)
    history: list[dict] = []
    end = min(o.max_steps, max_steps if max_steps is not None else o.max_steps)
    bar = None
    if info.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=o.max_steps, initial=step, desc="train", dynamic_ncols=True)
    it = iter(loader)  # draws the loader's base seed, so RNG state is restored after it
    if resume_rng is not None:
        set_rng_state(resume_rng)
    start_step = step
    last_batch = None
    t0, views_seen = time.time(), 0
    model.train()
    while step < end:
        optimizer.zero_grad(set_to_none=True)
        logs_acc: dict[str, float] = {}
        for micro in range(o.grad_accum):
            batch = next(it).to(device, non_blocking=True)
            last_batch = batch
            sync = micro == o.grad_accum - 1 or not info.enabled
            with (nullcontext() if sync else model.no_sync()):
                loss, logs, pred = forward_loss(model, loss_fn, batch, step, autocast)
                (loss / o.grad_accum).backward()
            logs["context_views"] = float(batch.context_images.shape[1])  # varies with data.num_context_max
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / o.grad_accum
            views_seen += batch.target_images.shape[0] * batch.target_images.shape[1] * info.world_size
        if not math.isfinite(logs_acc["mse"]):
            raise FloatingPointError(f"step {step}: non-finite loss {logs_acc}; lower the learning rate or check the data")
        grad_norm = torch.nn.utils.clip_grad_norm_(base.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
        optimizer.step()
        step += 1
        scheduler.step_update(step)
        if ema is not None:
            ema.update(base, step=step)
        logs_acc["grad_norm"] = float(grad_norm)
        logs_acc["lr"] = optimizer.param_groups[0]["lr"]
        if info.is_main:
            if step % cfg.log_every == 0 or step == end:
                rate = views_seen / max(time.time() - t0, 1e-9)
                entry = {"step": step, **logs_acc, "views_per_s": rate}
                history.append(entry)
                if writer is not None:
                    for k, v in entry.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step)
            if writer is not None and cfg.image_every and step % cfg.image_every == 0:
                grid = torch.cat([pred[0].detach().float(), batch.target_images[0].float()], -1)  # [V, 3, H, 2W]
                writer.add_images("train/render_vs_target", grid.clamp(0, 1), step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs_acc['mse']:.4f}", psnr=f"{logs_acc['psnr']:.2f}")
        if step % cfg.ckpt_every == 0 or step == end:
            _save(cfg, run, info, step, base, optimizer, scheduler, ema, sampler, last_batch)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    if info.is_main:
        metrics_path = run / "metrics.json"
        old = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        kept = [h for h in old.get("train", []) if h["step"] <= start_step]  # a resumed run appends
        write_text_atomic(metrics_path, json.dumps({**old, "train": kept + history}, indent=1))
    return TrainResult(step=step, history=history, run_dir=run, model=base)


def _save(cfg, run, info, step, base, optimizer, scheduler, ema, sampler, last_batch) -> None:
    from vision3d.data.samplers import SceneSampler

    samp = SceneSampler.state_after(last_batch) if last_batch is not None else sampler.state_dict()
    samp = {**samp, "seed": sampler.seed}
    rng = rng_state()
    if info.enabled:  # every rank's RNG and sampler position go into the one state file
        gathered: list = [None] * info.world_size
        dist.all_gather_object(gathered, (samp, rng))
        samplers, rngs = [g[0] for g in gathered], [g[1] for g in gathered]
    else:
        samplers, rngs = [samp], [rng]
    if info.is_main:
        state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler": samplers,
            "rng": rngs,
            "world_size": info.world_size,
        }
        save_checkpoint(
            run, step, base.state_dict(), state,
            ema_state=ema.module.state_dict() if ema is not None else None,
            config_yaml=dump_config(cfg), keep=cfg.keep_ckpts,
        )
    if info.enabled:
        dist.barrier()
