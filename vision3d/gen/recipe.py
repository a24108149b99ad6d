"""The Dense2MoE recipe on our DiT as configs and one function per stage.

Stages (arXiv:2510.09094, see ``vision3d/gen/dense2moe.py``):

0. :func:`train_dense` — the dense teacher, flow matching on procedural shapes;
1. :func:`convert` — Taylor-metric expert initialisation on calibration batches (no training);
2. :func:`distill` with ``stage="kd"`` — output distillation from the teacher + load balancing
   (+ optional ground-truth denoising loss);
3. :func:`distill` with ``stage="mob"`` — Mixture of Blocks added, group feature loss + output
   distillation + load balancing.

:func:`prune` builds the paper's baseline: the teacher with magnitude-pruned FFNs at the same
activated parameters as the MoE (``budget="moe"``), or with magnitude-pruned blocks and FFNs at those
of the MoE+MoB model (``budget="mob"``), distilled with the same budget. :func:`evaluate` measures the
denoising loss on fixed held-out draws and the sample quality (:mod:`vision3d.gen.quality`).

:class:`GenConfig` holds every section; presets live in ``configs/gen/*.yaml`` and are read with
:func:`load_gen_config` (unknown keys are errors naming the key).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import dense2moe as d2m
from .dit import DiT, DiTConfig, flow_matching_inputs, flow_matching_loss, procedural_shapes, sample
from .loop import OptimConfig, optimise

__all__ = [
    "DataConfig", "StageConfig", "SampleConfig", "GenConfig", "load_gen_config", "dump_gen_config",
    "train_dense", "convert", "distill", "prune", "mob_activated_parameters", "evaluate", "teacher_gap",
]


@dataclass
class DataConfig:
    """Procedural shapes drawn fresh for every step (deterministic in seed and step)."""

    num_classes: int = 4
    """Shape classes (first ``num_classes`` of ``SHAPE_CLASSES``); must equal ``dit.num_classes``."""
    seed: int = 0
    """Base seed of the training draws (held-out draws use other seeds)."""
    calib_batches: int = 4
    """Calibration batches for the Taylor metric."""


@dataclass
class StageConfig:
    """One distillation stage."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=300, lr=5e-4, warmup_steps=20))
    """Optimiser and schedule."""
    output_kd: float = 1.0
    """Weight of the output (velocity) distillation MSE against the teacher."""
    denoise: float = 0.0
    """Weight of the ground-truth flow-matching loss."""
    balance: float = 0.01
    """Weight of the load-balancing loss (MoE and MoB routers)."""
    group_feature: float = 1.0
    """Weight of the group feature loss (only with MoB groups)."""
    train: Literal["all", "routers"] = "all"
    """Parameters trained in the stage."""


@dataclass
class SampleConfig:
    steps: int = 20
    """Euler steps of the ODE sampler."""
    guidance: float = 1.5
    """Classifier-free guidance scale (1: none)."""
    num: int = 256
    """Samples drawn for the quality proxy (classes cycle)."""
    seed: int = 7
    """Seed of the starting noise."""


@dataclass
class GenConfig:
    """Everything a ``vision3d gen`` run needs."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=lambda: OptimConfig(steps=800, lr=1e-3, warmup_steps=50))
    """Dense training."""
    moe: d2m.Dense2MoEConfig = field(default_factory=d2m.Dense2MoEConfig)
    mob: d2m.MoBConfig = field(default_factory=d2m.MoBConfig)
    kd: StageConfig = field(default_factory=StageConfig)
    """Stage 2: MoE knowledge distillation with load balancing."""
    mob_stage: StageConfig = field(default_factory=StageConfig)
    """Stage 3: MoB with the group feature loss."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    seed: int = 0
    """Seed of model initialisation."""
    device: str = "cpu"
    """cpu | cuda."""
    progress: bool = True
    """Show progress bars."""


def _update(default, data: dict, source: str, prefix: str = ""):
    """A copy of dataclass instance ``default`` with ``data``'s keys set (nested sections recursively)."""
    import dataclasses

    if not isinstance(data, dict):
        raise ValueError(f"{source}: section '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(default)}
    changes = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(f"{source}: unknown key '{prefix}{key}'; valid keys here: {', '.join(sorted(names))}")
        current = getattr(default, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _update(current, value, source, f"{prefix}{key}.")
        else:
            changes[key] = tuple(value) if isinstance(value, list) else value
    try:
        return dataclasses.replace(default, **changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: section '{prefix or '<root>'}': {e}") from e


def load_gen_config(path: str | Path) -> GenConfig:
    """Read a preset or a run's ``config.yaml`` (any subset of :class:`GenConfig`'s fields, nested by section)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: preset/config file not found")
    return _update(GenConfig(), yaml.safe_load(path.read_text()) or {}, str(path))


def dump_gen_config(cfg: GenConfig) -> str:
    import yaml

    from vision3d.train.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _batch(cfg: GenConfig, step: int, batch_size: int, stream: int) -> tuple[Tensor, Tensor]:
    x, y = procedural_shapes(batch_size, size=cfg.dit.image_size, num_classes=cfg.data.num_classes,
                             seed=cfg.data.seed * 1_000_003 + stream * 100_003 + step)
    dev = torch.device(cfg.device)
    return x.to(dev), y.to(dev)


def _check(cfg: GenConfig) -> None:
    if cfg.data.num_classes != cfg.dit.num_classes:
        raise ValueError(f"config: data.num_classes={cfg.data.num_classes} differs from dit.num_classes={cfg.dit.num_classes}")


# ------------------------------------------------------------------------------------------------ stages
def train_dense(cfg: GenConfig) -> tuple[DiT, list[dict]]:
    """Stage 0: train a dense DiT from scratch with the flow-matching loss."""
    _check(cfg)
    torch.manual_seed(cfg.seed)
    model = DiT(cfg.dit).to(cfg.device)
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def step_fn(step):
        x, y = _batch(cfg, step, cfg.train.batch_size, stream=0)
        loss = flow_matching_loss(model, x, y, class_dropout=cfg.dit.class_dropout, generator=g)
        return loss, {"denoise": float(loss.detach())}

    history = optimise(model, step_fn, cfg.train, desc="dense", progress=cfg.progress)
    return model, history


def calibration_batches(cfg: GenConfig) -> list[tuple[Tensor, Tensor]]:
    return [_batch(cfg, i, cfg.train.batch_size, stream=1) for i in range(cfg.data.calib_batches)]


def calibration_loss(model: nn.Module, batch) -> Tensor:
    """The Taylor metric's loss: the flow-matching loss at a fixed draw of ``t`` and noise per batch."""
    x, y = batch
    g = torch.Generator().manual_seed(int(y.sum()) + x.shape[0])
    return flow_matching_loss(model, x, y, generator=g)


def convert(teacher: DiT, cfg: GenConfig) -> DiT:
    """Stage 1: a copy of the teacher with Taylor-initialised MoE FFNs."""
    student = copy.deepcopy(teacher).eval()
    d2m.dense_to_moe(student, cfg.moe, loss_fn=calibration_loss, calibration=calibration_batches(cfg), seed=cfg.seed)
    return student


def mob_activated_parameters(teacher: DiT, cfg: GenConfig) -> float:
    """Activated parameters of the teacher converted to MoE and grouped into MoB by ``cfg`` (the structure only)."""
    ref = copy.deepcopy(teacher)
    shape_only = dataclasses.replace(cfg.moe, assignment="contiguous", router_init="zeros")
    d2m.dense_to_moe(ref, shape_only)
    d2m.add_mob(ref, cfg.mob)
    return d2m.activated_parameters(ref)


def prune(teacher: DiT, cfg: GenConfig, budget: Literal["moe", "mob"] = "moe") -> DiT:
    """The baseline: a copy of the teacher magnitude-pruned to the MoE's activated parameters.

    ``budget="moe"``: the FFNs keep ``cfg.moe.active_fraction`` of their neurons (the MoE-only budget).
    ``budget="mob"``: the MoE+MoB budget: of each MoB group only the ``cfg.mob.top_k`` blocks of largest
    weight magnitude are kept (:func:`~vision3d.gen.dense2moe.prune_blocks_magnitude`), then the FFNs keep
    the fraction of neurons that brings the activated parameters to those of the MoE+MoB model.
    """
    student = copy.deepcopy(teacher).eval()
    if budget == "moe":
        fraction = cfg.moe.active_fraction
    elif budget == "mob":
        target = mob_activated_parameters(teacher, cfg)
        d2m.prune_blocks_magnitude(student, cfg.mob)
        fraction = d2m.ffn_fraction_for_budget(student, target)
    else:
        raise ValueError(f"prune: budget must be 'moe' or 'mob', got {budget!r}")
    d2m.prune_ffns_magnitude(student, fraction)
    student.pruned_fraction = fraction
    return student


def distill(
    student: DiT, teacher: DiT, cfg: GenConfig, stage: Literal["kd", "mob"] = "kd"
) -> tuple[DiT, list[dict]]:
    """Stages 2 (``"kd"``) and 3 (``"mob"``, adds MoB groups first if the student has none), in place."""
    _check(cfg)
    sc = cfg.kd if stage == "kd" else cfg.mob_stage
    if stage == "mob" and not any(isinstance(b, d2m.MoBGroup) for b in student.blocks):
        d2m.add_mob(student, cfg.mob)
    teacher = teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    use_groups = stage == "mob" and sc.group_feature > 0
    g = torch.Generator().manual_seed(cfg.seed + 2 + (stage == "mob"))

    def step_fn(step):
        x, y = _batch(cfg, step, sc.optim.batch_size, stream=2 if stage == "kd" else 3)
        x_t, t, target = flow_matching_inputs(x, g)
        drop = torch.rand(y.shape, generator=g).to(y.device) < cfg.dit.class_dropout
        y = torch.where(drop, torch.full_like(y, cfg.dit.num_classes), y)
        logs = {}
        d2m.clear_aux_losses(student)
        if use_groups:
            with d2m.group_features(student, teacher) as feats:
                with torch.no_grad():
                    v_t = teacher(x_t, t, y)
                v_s = student(x_t, t, y)
            gf = d2m.group_feature_loss(feats.student, feats.teacher)
        else:
            with torch.no_grad():
                v_t = teacher(x_t, t, y)
            v_s = student(x_t, t, y)
            gf = None
        kd = (v_s - v_t).square().mean()
        loss = sc.output_kd * kd
        logs["kd"] = float(kd.detach())
        if sc.denoise > 0:
            dn = (v_s - target).square().mean()
            loss = loss + sc.denoise * dn
            logs["denoise"] = float(dn.detach())
        if gf is not None:
            loss = loss + sc.group_feature * gf
            logs["group_feature"] = float(gf.detach())
        if sc.balance > 0:
            lb = d2m.load_balance_loss(student).to(loss.device)
            loss = loss + sc.balance * lb
            logs["balance"] = float(lb.detach())
        return loss, logs

    params = None
    if sc.train == "routers":
        params = [p for m in student.modules() if isinstance(m, (d2m.MoE, d2m.MoBGroup)) for p in m.router.parameters()]
    history = optimise(student, step_fn, sc.optim, params=params, desc=f"distill:{stage}", progress=cfg.progress)
    for p in teacher.parameters():
        p.requires_grad_(True)
    return student, history


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def denoising_loss(model: nn.Module, cfg: GenConfig, num: int = 512, seed: int = 99) -> float:
    """Flow-matching loss on fixed held-out images, times and noise (no class dropout)."""
    model.eval()
    x, y = procedural_shapes(num, size=cfg.dit.image_size, num_classes=cfg.data.num_classes, seed=10_000 + seed)
    g = torch.Generator().manual_seed(seed)
    dev = torch.device(cfg.device)
    x_t, t, target = flow_matching_inputs(x, g)
    total = 0.0
    for i in range(0, num, 128):
        v = model(x_t[i : i + 128].to(dev), t[i : i + 128].to(dev), y[i : i + 128].to(dev))
        total += float((v - target[i : i + 128].to(dev)).square().sum())
    return total / target.numel()


@torch.no_grad()
def teacher_gap(student: nn.Module, teacher: nn.Module, cfg: GenConfig, num: int = 256, seed: int = 98) -> float:
    """Mean squared difference of the student's and the teacher's velocities on fixed held-out inputs."""
    student.eval(), teacher.eval()
    x, y = procedural_shapes(num, size=cfg.dit.image_size, num_classes=cfg.data.num_classes, seed=20_000 + seed)
    x_t, t, _ = flow_matching_inputs(x, torch.Generator().manual_seed(seed))
    dev = torch.device(cfg.device)
    x_t, t, y = x_t.to(dev), t.to(dev), y.to(dev)
    return float((student(x_t, t, y) - teacher(x_t, t, y)).square().mean())


@torch.no_grad()
def draw_samples(model: nn.Module, cfg: GenConfig) -> tuple[Tensor, Tensor]:  # -> images [N, 3, H, W] in [0, 1], labels [N]
    model.eval()
    s = cfg.sample
    labels = torch.arange(s.num) % cfg.dit.num_classes
    g = torch.Generator().manual_seed(s.seed)
    noise = torch.randn(s.num, cfg.dit.in_channels, cfg.dit.image_size, cfg.dit.image_size, generator=g)
    dev = torch.device(cfg.device)
    outs = [
        sample(model, labels[i : i + 128].to(dev), steps=s.steps, guidance=s.guidance, noise=noise[i : i + 128].to(dev)).cpu()
        for i in range(0, s.num, 128)
    ]
    return torch.cat(outs), labels


def evaluate(model: nn.Module, cfg: GenConfig, classifier=None) -> dict:
    """Activated/total parameters, held-out denoising loss and (with a classifier) sample accuracy and feature FD."""
    from .quality import sample_quality

    out = {
        "activated_params": d2m.activated_parameters(model),
        "total_params": sum(p.numel() for p in model.parameters()),
        "denoise_loss": denoising_loss(model, cfg),
    }
    if classifier is not None:
        imgs, labels = draw_samples(model, cfg)
        q = sample_quality(classifier, imgs, labels, size=cfg.dit.image_size)
        out["sample_accuracy"], out["sample_fd"] = q.accuracy, q.fd
    return out


def sample_grid(images: Tensor, nrow: int) -> Tensor:  # [N, 3, H, W] -> [3, H', W'] in [0, 1]
    from torchvision.utils import make_grid

    return make_grid(images, nrow=nrow, padding=1, pad_value=1.0)
