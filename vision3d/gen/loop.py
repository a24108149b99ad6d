"""The optimisation loop shared by the generation stages (dense training, distillation, fine-tuning).

Same pieces as the reconstructor engine (``vision3d/train/engine.py``): AdamW from timm's factory
(no weight decay on biases and norms), linear warm-up + cosine decay (timm ``CosineLRScheduler``,
stepped per update), global-norm gradient clipping, a tqdm progress bar, a loss history. The step
itself is a callable so every stage states only its losses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

__all__ = ["OptimConfig", "optimise"]


@dataclass
class OptimConfig:
    """Optimiser and schedule of one stage."""

    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 64
    """Images per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    log_every: int = 25
    """Steps between history entries."""


def optimise(
    model: nn.Module,
    step_fn: Callable[[int], tuple[Tensor, dict[str, float]]],
    cfg: OptimConfig,
    *,
    params: Optional[Iterable[nn.Parameter]] = None,
    desc: str = "train",
    progress: bool = True,
) -> list[dict]:
    """Run ``cfg.steps`` updates of ``step_fn(step) -> (loss, logs)``; returns the logged history.

    Args:
        model: the module whose (trainable) parameters are optimised; ``params`` narrows them
            (parameters outside ``params`` get ``requires_grad=False`` for the stage).
        step_fn: computes the loss of one step (the caller draws the batch).
    """
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    if params is not None:
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{desc}: no trainable parameters in {type(model).__name__}")
    optimizer = create_optimizer_v2(model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(cfg.steps, 1), lr_min=cfg.min_lr, warmup_t=warm,
        warmup_lr_init=cfg.lr * 1e-2 if warm else cfg.lr, warmup_prefix=True, t_in_epochs=False,
    )
    scheduler.step_update(0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=desc, dynamic_ncols=True, leave=False)
    history: list[dict] = []
    t0 = time.time()
    model.train()
    for step in range(cfg.steps):
        optimizer.zero_grad(set_to_none=True)
        loss, logs = step_fn(step)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"{desc} step {step}: non-finite loss {logs}; lower the learning rate")
        loss.backward()
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        scheduler.step_update(step + 1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append({"step": step + 1, **logs, "lr": optimizer.param_groups[0]["lr"], "time_s": time.time() - t0})
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
    if bar is not None:
        bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history
