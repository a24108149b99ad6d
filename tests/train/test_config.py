"""Training config: presets, unknown keys, resume checks, run-folder protection."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from vision3d.cli.train import split_preset
from vision3d.train.config import TrainConfig, diff_configs, dump_config, load_config
from vision3d.train.distributed import DistInfo
from vision3d.train.engine import prepare_run_dir


@pytest.mark.parametrize("preset", sorted(p for p in (REPO / "configs").glob("*/*.yaml") if p.parent.name != "gen"),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    again = tmp_path / "config.yaml"
    again.write_text(dump_config(cfg))
    assert diff_configs(cfg, load_config(again)) == []


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: ilrm_tiny\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown key 'optim.learning_rate'"):
        load_config(p)


def test_preset_then_flags(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("model: ilrm_tiny\noptim:\n  lr: 0.5\n")
    cfg, rest = split_preset(["--preset", str(p), "--seed", "3"])
    assert cfg.model == "ilrm_tiny" and cfg.optim.lr == 0.5 and rest == ["--seed", "3"]


def test_run_folder_protection_and_resume_mismatch(tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(model="ilrm_tiny", out=str(run))
    prepare_run_dir(cfg, DistInfo())
    assert (run / "config.yaml").exists()
    (run / "ckpts" / "x").mkdir()
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_run_dir(cfg, DistInfo())
    other = TrainConfig(model="ilrm_tiny", out=str(run), seed=5, resume=True)
    with pytest.raises(ValueError, match="seed: 111123 -> 5"):
        prepare_run_dir(other, DistInfo())
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        prepare_run_dir(TrainConfig(out=str(tmp_path / "empty"), resume=True), DistInfo())


def test_lpips_loss_refuses_without_weights(monkeypatch):
    import torch

    from vision3d.eval import metrics
    from vision3d.train.config import LossConfig
    from vision3d.train.engine import Loss

    monkeypatch.setattr(metrics, "lpips_available", lambda net="vgg": False)
    with pytest.raises(metrics.LPIPSWeightsMissing, match="--loss.lpips 0"):
        Loss(LossConfig(lpips=0.1), torch.device("cpu"))
    Loss(LossConfig(lpips=0.0), torch.device("cpu"))  # no LPIPS asked: no error


@pytest.mark.parametrize("preset", sorted((REPO / "configs" / "gen").glob("*.yaml")), ids=lambda p: p.name)
def test_generation_presets_load_and_round_trip(preset, tmp_path):
    from vision3d.gen.recipe import dump_gen_config, load_gen_config

    cfg = load_gen_config(preset)
    again = tmp_path / "config.yaml"
    again.write_text(dump_gen_config(cfg))
    assert load_gen_config(again) == cfg
