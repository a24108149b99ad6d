"""`vision3d gen` end to end on tiny sizes: train dense -> convert (MoE and pruned) -> distil (kd, mob) -> sample."""

from __future__ import annotations

import json

import pytest

from vision3d.cli.main import main
from vision3d.gen.dit import DiT
from vision3d.gen.recipe import denoising_loss, load_gen_config
from vision3d.utils.images import load_png

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--cfg.dit.image-size", "8", "--cfg.dit.dim", "32", "--cfg.dit.depth", "4", "--cfg.dit.num-heads", "2",
    "--cfg.train.steps", "60", "--cfg.train.batch-size", "16", "--cfg.train.lr", "0.003", "--cfg.train.warmup-steps", "5",
    "--cfg.kd.optim.steps", "15", "--cfg.kd.optim.batch-size", "16",
    "--cfg.mob-stage.optim.steps", "10", "--cfg.mob-stage.optim.batch-size", "16",
    "--cfg.data.calib-batches", "2", "--cfg.sample.num", "8", "--cfg.sample.steps", "4", "--cfg.no-progress",
]


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def test_gen_commands_end_to_end(tmp_path):
    dense, moe, pruned, kd, mob, pruned_mob = (tmp_path / n for n in ("dense", "moe", "pruned", "kd", "mob", "pruned_mob"))
    assert main(["gen", "train", "--out", str(dense), *TINY]) == 0
    for f in ("config.yaml", "metrics.json", "samples.png", "model/model.safetensors", "model/config.json"):
        assert (dense / f).exists(), f
    cfg = load_gen_config(dense / "config.yaml")
    assert cfg.dit.dim == 32 and cfg.train.steps == 60
    m_dense = _metrics(dense)
    untrained = denoising_loss(DiT(cfg.dit), cfg)  # zero velocity: E|eps - x0|^2
    assert m_dense["denoise_loss"] < 0.8 * untrained  # the dense model learns
    assert load_png(dense / "samples.png").shape[0] == 3

    assert main(["gen", "convert", "--teacher", str(dense), "--out", str(moe)]) == 0
    assert main(["gen", "convert", "--teacher", str(dense), "--out", str(pruned), "--method", "prune"]) == 0
    m_moe, m_pr = _metrics(moe), _metrics(pruned)
    assert m_moe["activated_params"] < 0.8 * m_dense["activated_params"]
    assert m_moe["total_params"] > m_dense["total_params"]  # capacity kept (+ routers)
    assert m_pr["total_params"] == pytest.approx(m_moe["activated_params"], rel=0.03)  # same activated budget
    assert m_moe["denoise_loss"] < 1.5 * m_dense["denoise_loss"]  # Taylor init starts near the teacher

    assert main(["gen", "distill", "--teacher", str(dense), "--student", str(moe), "--stage", "kd", "--out", str(kd)]) == 0
    m_kd = _metrics(kd)
    assert m_kd["teacher_gap"] < 0.9 * m_kd["teacher_gap_before"]  # distillation pulls the student to the teacher
    assert main(["gen", "distill", "--teacher", str(dense), "--student", str(kd), "--stage", "mob", "--out", str(mob)]) == 0
    m_mob = _metrics(mob)
    assert m_mob["activated_params"] < _metrics(kd)["activated_params"]
    assert "group_feature" in m_mob["train"][-1]
    assert main(["gen", "convert", "--teacher", str(dense), "--out", str(pruned_mob), "--method", "prune", "--budget", "mob"]) == 0
    m_pm = _metrics(pruned_mob)
    assert m_pm["total_params"] == pytest.approx(m_mob["activated_params"], rel=0.01)  # the MoE+MoB budget

    grid = tmp_path / "grid.png"
    assert main(["gen", "sample", "--model", str(mob), "--out", str(grid), "--per-class", "2", "--steps", "3"]) == 0
    assert load_png(grid).shape[-2:] == (4 * 9 + 1, 2 * 9 + 1)  # 4 classes x 2 samples of 8 px, 1 px padding
    # a run folder is not overwritten by accident; unknown preset keys are errors naming the key
    assert main(["gen", "train", "--out", str(dense), *TINY]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("moe:\n  num_expert: 3\n")
    assert main(["gen", "train", "--preset", str(bad), "--out", str(tmp_path / "x")]) == 2
