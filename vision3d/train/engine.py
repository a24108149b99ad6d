"""The training engine: one loop for every reconstructor.

A step: the model's training recipe (:mod:`vision3d.train.objectives`, looked up by model name
before any work starts; a model without one is refused with the list of models that train) turns a
:class:`~vision3d.data.example.ViewsBatch` into a loss -- for Gaussian reconstructors the context
views become Gaussians rendered into the target cameras (MSE + optional LPIPS + regularisers); for
VGGT/FlashVGGT the context views give cameras, depth and point maps scored by the authors'
multi-task loss -- and it is back-propagated. Parameters can be frozen by name pattern
(``freeze``; VGGT's frozen-aggregator fine-tuning). DDP via ``torchrun`` (NCCL on GPUs, gloo
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
from vision3d.utils.io import write_text_atomic

from .checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from .config import TrainConfig, diff_configs, dump_config, load_config
from .distributed import DistInfo, init_distributed, rng_state, seed_everything, set_rng_state
from .objectives import Objective, RenderObjective, recipe_for, render_kwargs, render_views  # noqa: F401 (re-exported)

log = logging.getLogger("vision3d.train")


# ------------------------------------------------------------------------------------------------ pieces
def build_model(cfg: TrainConfig) -> recon.Reconstructor:
    model = recon.create(cfg.model, **cfg.model_kwargs)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    return model


def load_init_weights(model: nn.Module, path: str, missing_ok=()) -> None:
    """Load fine-tuning weights (``.safetensors``, checkpoint folder or run folder) into ``model``.

    Every key must fit except model keys under a ``missing_ok`` prefix, which may be absent.
    """
    from vision3d.utils.state import state_dict_differences

    from .checkpoint import load_weights

    p = Path(path)
    if p.is_dir() and (p / "ckpts").is_dir():
        step_dir = latest_checkpoint(p)
        if step_dir is None:
            raise FileNotFoundError(f"{p}: init_weights run folder has no complete checkpoint under ckpts/")
        p = step_dir
    if p.is_dir():
        weights = load_checkpoint(p)[0]
    elif p.suffix == ".safetensors" and p.is_file():
        weights = load_weights(p)
    else:
        raise FileNotFoundError(f"{p}: init_weights must be an existing .safetensors file, checkpoint folder or run "
                                "folder (convert the authors' checkpoint first: vision3d convert --list)")
    own = model.state_dict()
    parts = state_dict_differences(own, weights, skip=tuple(missing_ok))
    extra = [k for k in weights if k not in own]
    parts += [f"{len(extra)} unexpected key(s), e.g. {extra[:3]}"] if extra and missing_ok else []
    if parts:
        raise ValueError(f"{p}: init_weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(weights, strict=False)


Loss = RenderObjective  # the Gaussian-rendering objective under its historical name


def forward_loss(model: nn.Module, loss_fn: Objective, batch, step: int, autocast) -> tuple[Tensor, dict, Tensor | None]:
    """One micro-step's loss: ``(loss, logs, preview image or None)`` from the recipe's objective."""
    r = loss_fn.step(model, batch, step, autocast)
    return r.loss, r.logs, r.preview


def param_groups(model: nn.Module, weight_decay: float, lr_scale: dict[str, float]) -> list[dict]:
    """AdamW groups as timm builds them (no decay on biases, norms and ``no_weight_decay()`` names), split
    further by learning-rate multiplier: ``lr_scale`` maps fnmatch patterns of parameter names to multipliers
    (first match wins), which timm's schedulers apply through each group's ``lr_scale``. A pattern that
    matches no trainable parameter is an error naming it."""
    import fnmatch

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for pat in lr_scale:
        if not any(fnmatch.fnmatchcase(n, pat) for n, _ in named):
            tops = sorted({n.split(".")[0] for n, _ in named})
            raise ValueError(f"config optim.lr_scale: pattern {pat!r} matches no trainable parameter of "
                             f"{type(model).__name__} (top-level modules: {', '.join(tops)})")
    groups: dict[tuple[bool, float], list] = {}
    for n, p in named:
        scale = next((float(v) for pat, v in lr_scale.items() if fnmatch.fnmatchcase(n, pat)), 1.0)
        decay = not (p.ndim <= 1 or n.endswith(".bias") or n in skip)
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
            for (decay, scale), ps in groups.items()]


def freeze_parameters(model: nn.Module, patterns) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose names match any fnmatch pattern; returns their names.

    A pattern that matches no parameter is an error naming it (a typo would silently train everything).
    """
    import fnmatch

    names = [n for n, _ in model.named_parameters()]
    frozen = []
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"config freeze: pattern {pat!r} matches no parameter of {type(model).__name__} "
                             f"(top-level modules: {', '.join(tops)}; e.g. 'aggregator.*')")
        frozen += hit
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    return sorted(set(frozen))


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
    from vision3d.data.transforms import with_scene_transform

    return with_scene_transform(ChunkDataset(data_cfg, sampler), d.scene_transform)


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

    recipe = recipe_for(cfg.model)  # refuses a model without a training recipe before any work
    loss_fn = recipe.build(cfg.loss, torch.device("cpu"))
    info = init_distributed(cfg.device)
    run, resume_from = prepare_run_dir(cfg, info)
    seed_everything(cfg.seed + info.rank)
    device = info.device

    model = build_model(cfg).to(device)
    if cfg.init_weights and resume_from is None:
        load_init_weights(model, cfg.init_weights, cfg.init_missing_ok)
        if info.is_main:
            log.info("initialised %s from %s", cfg.model, cfg.init_weights)
    base = model
    frozen = sorted(set(loss_fn.prepare(base)) | set(freeze_parameters(base, cfg.freeze)))
    if frozen and info.is_main:
        log.info("%d parameter tensors frozen (e.g. %s)", len(frozen), ", ".join(frozen[:3]))
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    o = cfg.optim
    optimizer = create_optimizer_v2(param_groups(base, o.weight_decay, o.lr_scale) if o.lr_scale else base, "adamw",
                                    lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=o.max_steps, lr_min=o.min_lr, warmup_t=o.warmup_steps,
        warmup_lr_init=o.lr * 1e-3 if o.warmup_steps else o.lr, warmup_prefix=True, t_in_epochs=False,
    )
    ema = None
    if o.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(base, decay=o.ema_decay)

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
            if last_batch is None:
                loss_fn.check_batch(batch)
            last_batch = batch
            sync = micro == o.grad_accum - 1 or not info.enabled
            with (nullcontext() if sync else model.no_sync()):
                loss, logs, pred = forward_loss(model, loss_fn, batch, step, autocast)
                (loss / o.grad_accum).backward()
            logs["context_views"] = float(batch.context_images.shape[1])  # varies with data.num_context_max
            for k, v in logs.items():
                logs_acc[k] = logs_acc.get(k, 0.0) + v / o.grad_accum
            seen = batch.target_images if "target_images" in loss_fn.requires else batch.context_images
            views_seen += seen.shape[0] * seen.shape[1] * info.world_size
        if not math.isfinite(logs_acc[recipe.primary]):
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
            if writer is not None and cfg.image_every and step % cfg.image_every == 0 and pred is not None:
                writer.add_images(f"train/{recipe.name}_preview", pred.clamp(0, 1), step)  # [V, 3, H, W']
            if bar is not None:
                bar.update(1)
                post = {recipe.primary: f"{logs_acc[recipe.primary]:.4f}"}
                if "psnr" in logs_acc:
                    post["psnr"] = f"{logs_acc['psnr']:.2f}"
                bar.set_postfix(**post)
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
