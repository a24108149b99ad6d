"""`vision3d demo` end to end with a tiny config, its refusal to overwrite, and the console script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vision3d.cli import demo
from vision3d.cli.main import main
from vision3d.gaussians.ply import load_ply
from vision3d.utils.images import load_png
from vision3d.utils.video import read_video_info

TINY = [
    "--steps", "15", "--width", "24", "--height", "18", "--train-views", "6", "--test-views", "2",
    "--scene-density", "0.1", "--num-init", "400", "--video-frames", "3", "--video-width", "32",
    "--fit.batch-views", "3", "--fit.lr-sh0", "0.03", "--fit.no-progress", "--threads", "1",
]  # fmt: skip


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("earlier run")
    assert main(["demo", "--out", str(out), *TINY]) == 2  # refuses a non-empty folder
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]

    threads = torch.get_num_threads()
    assert main(["demo", "--out", str(out), "--overwrite", *TINY]) == 0
    assert torch.get_num_threads() == threads  # --threads is restored after the run
    printed = capsys.readouterr().out
    assert "held-out PSNR" in printed
    assert not (out / demo.INCOMPLETE).exists()  # a finished run has no marker
    for name in ("scene.ply", "metrics.json", "config.yaml", "video.mp4", "renders/test_00.png", "renders/test_01.png"):
        assert (out / name).is_file(), name

    m = json.loads((out / "metrics.json").read_text())
    assert len(m["test"]["psnr"]) == 2 and len(m["test"]["ssim"]) == 2
    assert math.isfinite(m["test"]["psnr_mean"]) and 0 < m["test"]["ssim_mean"] <= 1
    assert f"{m['test']['psnr_mean']:.2f} dB" in printed
    assert m["test"]["psnr_mean"] > m["init"]["test_psnr_mean"]  # the fit improved on its initialisation
    assert m["steps"] == 15 and m["num_gaussians"] == 400 and m["init"]["method"] == "rgbd-unprojection"
    assert m["history"][-1]["step"] == 15 and m["time_s"]["total"] > 0
    assert load_ply(out / "scene.ply").num == 400
    assert load_png(out / "renders" / "test_00.png").shape == (3, 18, 3 * 24 + 4)  # fit | truth | error
    assert read_video_info(out / "video.mp4")["frames"] == 3

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["steps"] == 15 and cfg["fit"]["steps"] == 15 and cfg["fit"]["seed"] == 0
    back = demo.load_config(out / "config.yaml")
    assert back.width == 24 and back.camera_distance == (2.2, 2.8) and back.fit.batch_views == 3
    assert demo.config_to_dict(back) == cfg


def test_demo_config_errors(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("steps: 3\nwarp_speed: 9\n")
    try:
        demo.load_config(bad)
    except ValueError as e:
        assert "warp_speed" in str(e)
    else:
        raise AssertionError("unknown key accepted")
    assert demo.run(demo.Args(out=tmp_path / "x", width=8)) == 2


def test_console_script_help():
    exe = Path(sys.executable).parent / "vision3d"
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "vision3d", "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for command in ("demo", "doctor", "render"):
        assert f"  {command} " in res.stdout


def test_killed_demo_leaves_a_marked_incomplete_folder(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for a kill mid-run

    monkeypatch.setattr(demo, "rgbd_init", killed)
    with pytest.raises(KeyboardInterrupt):
        demo.run(demo.Args(out=out, width=24, height=18, steps=1))
    assert (out / demo.INCOMPLETE).is_file() and "killed or failed" in (out / demo.INCOMPLETE).read_text()
    assert demo.run(demo.Args(out=out, width=24, height=18, steps=1)) == 2
    err = capsys.readouterr().err
    assert "unfinished run" in err and "--overwrite" in err
