"""optim.lr_scale: per-pattern learning-rate multipliers (DepthSplat's ViT at 1/100 of the rest)."""

from __future__ import annotations

import pytest
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from vision3d.train.config import load_config
from vision3d.train.engine import param_groups


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.mono = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.head = nn.Linear(4, 2)


def test_groups_split_by_scale_and_decay_and_the_scheduler_applies_the_scale():
    net = _Net()
    groups = param_groups(net, 0.01, {"mono.*": 0.01})
    by = {(g["weight_decay"], g["lr_scale"]): len(g["params"]) for g in groups}
    # mono: Linear weight (decay) + bias, LayerNorm weight, bias (no decay); head: weight (decay) + bias
    assert by == {(0.01, 0.01): 1, (0.0, 0.01): 3, (0.01, 1.0): 1, (0.0, 1.0): 1}
    opt = create_optimizer_v2(groups, "adamw", lr=2e-4, weight_decay=0.01)
    sched = CosineLRScheduler(opt, t_initial=100, warmup_t=0, t_in_epochs=False)
    sched.step_update(0)
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert lrs == pytest.approx([2e-6, 2e-4])


def test_a_pattern_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="'backbone.\\*' matches no trainable parameter"):
        param_groups(_Net(), 0.01, {"backbone.*": 0.1})


@pytest.mark.parametrize("preset,prefix", [
    ("configs/re10k/depthsplat.yaml", "mono.model."), ("configs/dl3dv/depthsplat.yaml", "mono.model."),
    ("configs/re10k/depthsplat_zpressor.yaml", "mono.model."), ("configs/re10k/volsplat.yaml", "host.mono.model."),
    ("configs/scannet/volsplat.yaml", "host.mono.model.")])
def test_host_presets_scale_the_vit_of_their_model(preset, prefix):
    from pathlib import Path

    from vision3d import recon

    cfg = load_config(Path(__file__).resolve().parents[2] / preset)
    assert cfg.optim.lr_scale == {prefix + "*": 0.01}
    with torch.device("meta"):
        model = recon.create(cfg.model, **cfg.model_kwargs)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr_scale)
    vit = {id(p) for n, p in model.named_parameters() if n.startswith(prefix)}
    assert vit and all((g["lr_scale"] == 0.01) == (id(g["params"][0]) in vit) for g in groups)
