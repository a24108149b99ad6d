"""Class-conditional generation and the Dense2MoE path: train a dense DiT, convert, distil, sample.

Examples (procedural 16x16 shapes, CPU):
    vision3d gen train --preset configs/gen/dense2moe.yaml --out runs/gen/dense
    vision3d gen convert --teacher runs/gen/dense --out runs/gen/moe            # Taylor init (stage 1)
    vision3d gen distill --teacher runs/gen/dense --student runs/gen/moe --stage kd --out runs/gen/moe_kd
    vision3d gen distill --teacher runs/gen/dense --student runs/gen/moe_kd --stage mob --out runs/gen/moe_mob
    vision3d gen sample --model runs/gen/moe_mob --out grid.png

Every command writes a run folder: ``config.yaml`` (the resolved :class:`GenConfig`; reload with
``--preset <run>/config.yaml``), ``model/`` (``model.safetensors`` + ``config.json``),
``metrics.json`` (loss history, activated parameters, held-out denoising loss; for distill the
held-out velocity gap to the teacher before and after) and
``samples.png`` (one row per class). ``--preset FILE`` loads a YAML preset (default for convert and
distill: the teacher run's config.yaml); flags override it.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vision3d.cli import pop_option
from vision3d.gen.recipe import GenConfig


@dataclass
class TrainArgs:
    """Train a dense DiT with flow matching."""

    out: str = "runs/gen/dense"
    """Run folder."""
    overwrite: bool = False
    """Replace a non-empty run folder."""
    cfg: GenConfig = field(default_factory=GenConfig)


@dataclass
class ConvertArgs:
    """Stage 1: Taylor-metric conversion of the teacher's FFNs into MoE layers."""

    teacher: str = "runs/gen/dense"
    """Run folder of the dense model."""
    out: str = "runs/gen/moe"
    """Run folder."""
    method: Literal["moe", "prune"] = "moe"
    """moe: Dense2MoE conversion; prune: the magnitude-pruning baseline at the same activated parameters."""
    budget: Literal["moe", "mob"] = "moe"
    """With --method prune: match the MoE model (FFN neurons pruned to the active fraction) or the MoE+MoB
    model (per MoB group only the top_k largest-magnitude blocks kept, FFNs pruned to the rest of the budget)."""
    overwrite: bool = False
    """Replace a non-empty run folder."""
    cfg: GenConfig = field(default_factory=GenConfig)


@dataclass
class DistillArgs:
    """Stages 2 (kd: distillation + load balancing) and 3 (mob: Mixture of Blocks + group feature loss)."""

    teacher: str = "runs/gen/dense"
    """Run folder of the dense teacher."""
    student: str = "runs/gen/moe"
    """Run folder of the converted (or pruned) student."""
    stage: Literal["kd", "mob"] = "kd"
    """Which stage."""
    out: str = "runs/gen/moe_kd"
    """Run folder."""
    overwrite: bool = False
    """Replace a non-empty run folder."""
    cfg: GenConfig = field(default_factory=GenConfig)


@dataclass
class SampleArgs:
    """Draw a grid of samples from a run's model."""

    model: str = "runs/gen/dense"
    """Run folder (or its model/ folder)."""
    out: str = "samples.png"
    """PNG to write."""
    per_class: int = 8
    """Samples per class (one row each)."""
    steps: int = 20
    """Euler steps."""
    guidance: float = 1.5
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of the starting noise."""
    device: str = "cpu"
    """cpu | cuda."""


SUBCOMMANDS = {"train": TrainArgs, "convert": ConvertArgs, "distill": DistillArgs, "sample": SampleArgs}


# ------------------------------------------------------------------------------------------------ run folders
def _prepare(out: str, overwrite: bool) -> Path:
    from vision3d.utils.io import check_writable_dir

    run = Path(out)
    if run.exists() and run.is_dir() and any(run.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{run}: run folder exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(run)
    return check_writable_dir(run)


def _model_dir(path: str) -> Path:
    p = Path(path)
    if (p / "model" / "config.json").exists():
        return p / "model"
    if (p / "config.json").exists():
        return p
    raise FileNotFoundError(f"{p}: not a vision3d gen run folder (expected model/config.json inside)")


def _finish(run: Path, cfg: GenConfig, model, metrics: dict) -> None:
    from vision3d.gen import dense2moe as d2m
    from vision3d.gen.recipe import dump_gen_config, evaluate
    from vision3d.utils.io import write_text_atomic

    write_text_atomic(run / "config.yaml", dump_gen_config(cfg))
    d2m.save_converted(model, run / "model")
    metrics = {**metrics, **evaluate(model, cfg)}
    write_text_atomic(run / "metrics.json", json.dumps(metrics, indent=1))
    _write_grid(model, run / "samples.png", cfg.dit.num_classes, 8, cfg.sample.steps, cfg.sample.guidance, 0, cfg.device)
    print(
        f"done: activated {metrics['activated_params'] / 1e3:.1f}k of {metrics['total_params'] / 1e3:.1f}k parameters, "
        f"held-out denoising loss {metrics['denoise_loss']:.4f} -> {run}"
    )


def _write_grid(model, path: Path, num_classes: int, per_class: int, steps: int, guidance: float, seed: int, device: str):
    import torch

    from vision3d.gen.dit import sample
    from vision3d.gen.recipe import sample_grid
    from vision3d.utils.images import save_png

    labels = torch.arange(num_classes).repeat_interleave(per_class).to(device)
    g = torch.Generator().manual_seed(seed)
    imgs = sample(model.to(device).eval(), labels, steps=steps, guidance=guidance, generator=g)
    save_png(path, sample_grid(imgs.cpu(), nrow=per_class))


# ------------------------------------------------------------------------------------------------ commands
def run_train(a: TrainArgs) -> int:
    from vision3d.gen.recipe import train_dense

    run = _prepare(a.out, a.overwrite)
    model, history = train_dense(a.cfg)
    _finish(run, a.cfg, model, {"stage": "dense", "train": history})
    return 0


def run_convert(a: ConvertArgs) -> int:
    from vision3d.gen import dense2moe as d2m
    from vision3d.gen.recipe import convert, prune

    teacher = d2m.load_converted(_model_dir(a.teacher), a.cfg.device)
    run = _prepare(a.out, a.overwrite)
    student = convert(teacher, a.cfg) if a.method == "moe" else prune(teacher, a.cfg, a.budget)
    info = {"stage": "convert" if a.method == "moe" else "prune", "teacher": str(a.teacher)}
    if a.method == "prune":
        info["budget"] = a.budget
    _finish(run, a.cfg, student, info)
    return 0


def run_distill(a: DistillArgs) -> int:
    from vision3d.gen import dense2moe as d2m
    from vision3d.gen.recipe import distill, teacher_gap

    teacher = d2m.load_converted(_model_dir(a.teacher), a.cfg.device)
    student = d2m.load_converted(_model_dir(a.student), a.cfg.device)
    run = _prepare(a.out, a.overwrite)
    before = teacher_gap(student, teacher, a.cfg)
    student, history = distill(student, teacher, a.cfg, a.stage)
    metrics = {"stage": a.stage, "teacher": str(a.teacher), "student": str(a.student), "train": history,
               "teacher_gap_before": before, "teacher_gap": teacher_gap(student, teacher, a.cfg)}
    _finish(run, a.cfg, student, metrics)
    return 0


def run_sample(a: SampleArgs) -> int:
    from vision3d.gen import dense2moe as d2m

    model = d2m.load_converted(_model_dir(a.model), a.device)
    _write_grid(model, Path(a.out), model.cfg.num_classes, a.per_class, a.steps, a.guidance, a.seed, a.device)
    print(f"wrote {a.out}")
    return 0


RUNNERS = {"train": run_train, "convert": run_convert, "distill": run_distill, "sample": run_sample}


def _flag(argv: list[str], name: str, default: str) -> str:
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return default


def main(argv: list[str] | None = None) -> int:
    import tyro

    from vision3d.gen.recipe import load_gen_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: vision3d gen {{{'|'.join(SUBCOMMANDS)}}} [--help] [options]\n\n{__doc__}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    sub, rest = argv[0], argv[1:]
    cls = SUBCOMMANDS[sub]
    try:
        preset, rest = pop_option(rest, "--preset")
        default = cls()
        if sub != "sample":
            if preset is None and sub in ("convert", "distill"):
                teacher_cfg = Path(_flag(rest, "teacher", default.teacher)) / "config.yaml"
                preset = str(teacher_cfg) if teacher_cfg.exists() else None
            if preset is not None:
                default.cfg = load_gen_config(preset)
    except (FileNotFoundError, ValueError) as e:
        print(f"vision3d gen {sub}: {e}", file=sys.stderr)
        return 2
    args = tyro.cli(cls, args=rest, default=default, prog=f"vision3d gen {sub}", description=cls.__doc__)
    try:
        return int(RUNNERS[sub](args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as e:
        print(f"vision3d gen {sub}: {e}", file=sys.stderr)
        return 2
