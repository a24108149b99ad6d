"""Run checkpoints: weights as safetensors, everything else as a state file, written atomically.

Layout: ``<run>/ckpts/step_00001000/{model.safetensors, ema.safetensors?, state.pt}``. A step folder
is assembled under a temporary name and renamed into place, so a crash never leaves a half-written
checkpoint; :func:`latest_checkpoint` only sees complete ones. ``state.pt`` holds only tensors and
plain containers and is read back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vision3d.utils.state import state_dict_differences


def _plain(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().cpu().clone().contiguous() for k, v in sd.items()}


def save_weights(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
        save_file(_plain(state_dict), tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    return load_file(str(path))


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    state: dict,
    ema_state: dict[str, torch.Tensor] | None = None,
    config_yaml: str | None = None,
    keep: int = 3,
) -> Path:
    ckpts = Path(run_dir) / "ckpts"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=f".step_{step:08d}."))
    try:
        save_file(_plain(model_state), str(tmp / "model.safetensors"))
        if ema_state is not None:
            save_file(_plain(ema_state), str(tmp / "ema.safetensors"))
        torch.save({**state, "step": step}, tmp / "state.pt")
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in sorted(ckpts.glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    done = [p for p in sorted((Path(run_dir) / "ckpts").glob("step_*")) if (p / "state.pt").exists()]
    return done[-1] if done else None


def load_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[dict, dict, dict | None]:
    """(model weights, state, ema weights or None) of one checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "state.pt").exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a complete checkpoint (no state.pt)")
    model = load_file(str(ckpt_dir / "model.safetensors"))
    state = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
    ema = load_file(str(ckpt_dir / "ema.safetensors")) if (ckpt_dir / "ema.safetensors").exists() else None
    return model, state, ema


def load_model_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names what differs (another model or size)."""
    parts = state_dict_differences(model.state_dict(), weights)
    if parts:
        raise ValueError(f"{source}: checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(weights)
