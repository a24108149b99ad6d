"""Training configuration: dataclasses that tyro turns into the ``vision3d train`` CLI.

Presets live in ``configs/<dataset>/<method>.yaml``; a preset holds any subset of these fields
(nested by section). The resolved config is written to ``<run>/config.yaml`` and a run can be
re-created from it with ``--preset <run>/config.yaml``. YAML is read with ``yaml.safe_load``; no
string is ever evaluated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class DataConfig:
    dataset: Literal["re10k", "dl3dv"] = "re10k"
    """Chunk layout to read (DL3DV chunks share RE10K's layout)."""
    root: str = "datasets/re10k"
    """Folder holding <split>/index.json and the .torch chunks."""
    image_shape: tuple[int, int] = (256, 256)
    """(height, width) after resize + centre crop."""
    num_context: int = 2
    """Context views per example (the smallest count when ``num_context_max`` is set)."""
    num_context_max: int | None = None
    """If set, each training batch draws its context count uniformly from ``num_context`` to this
    (inclusive); all examples of a batch share it, DDP ranks draw independently, and the count is a
    function of (seed, rank, step), so resuming reproduces it (iLRM on DL3DV: 2..6)."""
    shrink_gap: bool = True
    """With a variable count, divide both gap bounds by ``max(num_context_max // count, 1)`` (iLRM)."""
    num_target: int = 4
    """Target views rendered for the loss."""
    min_gap: int = 45
    """Smallest frame gap between the outer context views (after warm-up)."""
    max_gap: int = 135
    """Largest frame gap between the outer context views (after warm-up)."""
    gap_warmup_steps: int = 30_000
    """Steps over which the gap bounds grow to their final values (0: no warm-up)."""
    initial_min_gap: int = 25
    """Gap bounds at step 0 when warming up."""
    initial_max_gap: int = 45
    """Gap bounds at step 0 when warming up."""
    extra_views: Literal["random", "farthest_point", "uniform"] = "random"
    """How context views beyond the outer two are chosen (DL3DV: farthest_point)."""
    targets_with_replacement: bool = True
    """Draw target frames with replacement (RE10K papers) or without (DL3DV papers)."""
    near: float = 1.0
    """Near plane written into the cameras (RE10K: 1)."""
    far: float = 100.0
    """Far plane (RE10K: 100)."""
    batch_size: int = 4
    """Examples per GPU (per process) and per micro-step."""
    num_workers: int = 4
    """DataLoader worker processes per GPU."""
    skip_bad: bool = False
    """Skip unreadable scenes with a logged warning instead of stopping."""
    scene_transform: str = "none"
    """World frame the model trains in (vision3d.data.transforms): 'none' (the dataset's; DepthSplat)
    or 'mean_camera' (iLRM's mean-context-camera frame, centres' largest coordinate 1)."""


@dataclass
class OptimConfig:
    lr: float = 4e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 2500
    """Linear warm-up steps before the cosine decay."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine."""
    max_steps: int = 100_000
    """Optimiser steps in the run."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (0: off)."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Learning-rate multipliers by parameter-name pattern (fnmatch; the first matching pattern wins), e.g.
    ``{'mono.model.*': 0.01}``: DepthSplat's pretrained ViT at 2e-6 beside 2e-4 for the rest, as its authors."""


@dataclass
class LossConfig:
    mse: float = 1.0
    """Weight of the pixel MSE on target views."""
    lpips: float = 0.0
    """Weight of LPIPS (VGG) on target views; needs the LPIPS weights on disk."""
    lpips_after: int = 0
    """Step from which LPIPS is applied."""
    opacity_reg: float = 0.0
    """Weight of the mean opacity (encourages sparse Gaussians)."""
    # --- VGGT / FlashVGGT (the ``vggt`` recipe; defaults: the authors' training configs) ---
    camera: float = 5.0
    """VGGT: weight of the camera loss on the pose encoding (0: the camera head is skipped and frozen)."""
    camera_loss_type: Literal["l1", "l2"] = "l1"
    """VGGT: per-component L1 (the authors' choice) or L2 norm of the pose-encoding error."""
    camera_gamma: float = 0.6
    """VGGT: camera-head iteration i of n is weighted gamma ** (n - 1 - i)."""
    camera_trans: float = 1.0
    """VGGT: weight of the translation part of the camera loss."""
    camera_rot: float = 1.0
    """VGGT: weight of the quaternion part of the camera loss."""
    camera_focal: float = 0.5
    """VGGT: weight of the field-of-view part of the camera loss."""
    depth: float = 1.0
    """VGGT: weight of the confidence-weighted depth loss (needs depth in the data; 0 for RE10K/DL3DV)."""
    depth_gradient: Literal["none", "grad", "grad_conf", "normal", "normal_conf"] = "grad"
    """VGGT: gradient term of the depth loss (multi-scale L1 of the error's spatial gradient)."""
    point: float = 0.0
    """VGGT: weight of the point-map loss (the authors' fine-tuning config has none; their full config 1.0)."""
    point_gradient: Literal["none", "grad", "grad_conf", "normal", "normal_conf"] = "normal"
    """VGGT: gradient term of the point loss (surface-normal agreement)."""
    conf_gamma: float = 1.0
    """VGGT: gamma in gamma * err * c - alpha * log(c)."""
    conf_alpha: float = 0.2
    """VGGT: alpha in gamma * err * c - alpha * log(c)."""
    valid_range: float = 0.98
    """VGGT: per-pixel depth/point errors above this quantile are dropped (<= 0: keep all)."""


@dataclass
class TrainConfig:
    model: str = "ilrm_re10k"
    """Registered reconstructor name (vision3d.recon.list_models())."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor overrides for the model (set them in a preset)."""
    init_weights: str | None = None
    """Start from these weights: a ``.safetensors`` file in our layout (``vision3d convert vggt model.pt
    out.safetensors``), a checkpoint folder or a run folder (fine-tuning); not used when resuming."""
    init_missing_ok: tuple[str, ...] = ()
    """Key prefixes that may be absent from ``init_weights`` and stay at their initialisation (e.g.
    ``point_head.`` for a FlashVGGT checkpoint, which has no point head)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    out: str = "runs/train"
    """Run folder (config.yaml, ckpts/, tb/, renders/, metrics.json)."""
    seed: int = 111123
    """Base seed; each rank adds its rank."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Autocast precision on GPUs (the CPU always runs fp32)."""
    device: str = "auto"
    """auto | cpu | cuda."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    freeze: tuple[str, ...] = ()
    """Parameter-name patterns (fnmatch) kept fixed, e.g. ``aggregator.*`` (VGGT's frozen-aggregator
    fine-tuning, the authors' ``frozen_module_names``); a pattern matching nothing is an error."""
    log_every: int = 50
    """Steps between scalar logs."""
    image_every: int = 1000
    """Steps between rendered-image logs (0: never)."""
    ckpt_every: int = 5000
    """Steps between checkpoints (the last step is always saved)."""
    keep_ckpts: int = 3
    """Checkpoints kept on disk (oldest removed first)."""
    resume: bool = False
    """Continue the run in `out` from its latest checkpoint."""
    overwrite: bool = False
    """Allow starting a new run in a non-empty `out` (its old contents are removed)."""
    progress: bool = True
    """Show a progress bar on rank 0."""


# ------------------------------------------------------------------------------------------------
def to_dict(cfg) -> dict:
    from vision3d.utils.io import to_plain

    return {k: to_dict(v) if dataclasses.is_dataclass(v) else to_plain(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls, data: dict, source: str = "config", prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, refusing keys that do not exist."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: section '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ValueError(
                f"{source}: unknown key '{prefix}{key}'; valid keys here: {', '.join(sorted(names))}"
            )
        f = names[key]
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = from_dict(sub, value, source, f"{prefix}{key}.")
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: preset/config file not found")
    data = yaml.safe_load(path.read_text()) or {}
    return from_dict(TrainConfig, data, source=str(path))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def diff_configs(a: TrainConfig, b: TrainConfig, ignore=("resume", "overwrite", "progress")) -> list[str]:
    """Human-readable differences between two configs (dotted key: old -> new)."""
    out = []

    def walk(x, y, prefix):
        for k in x:
            if prefix == "" and k in ignore:
                continue
            if isinstance(x[k], dict) and isinstance(y.get(k), dict) and k != "model_kwargs":
                walk(x[k], y[k], f"{prefix}{k}.")
            elif x[k] != y.get(k):
                out.append(f"{prefix}{k}: {x[k]!r} -> {y.get(k)!r}")

    walk(to_dict(a), to_dict(b), "")
    return out
