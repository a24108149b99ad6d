"""``vision3d export``: every format round-trips against the run it came from."""

from __future__ import annotations

import pytest
import torch

from tests.poses.helpers import tiny_run
from vision3d.cli.main import main


def test_ply_and_splat_round_trip(tmp_path):
    from vision3d.gaussians.ply import load_ply, load_splat

    run = tiny_run()
    g = load_ply(run / "scene.ply")
    assert main(["export", str(run), "--format", "ply", "--out", str(tmp_path / "s.ply")]) == 0
    g2 = load_ply(tmp_path / "s.ply")
    for k in ("means", "scales", "opacities", "sh"):
        torch.testing.assert_close(getattr(g2, k), getattr(g, k), atol=1e-6, rtol=1e-5)
    assert main(["export", str(run / "scene.ply"), "--format", "splat", "--out", str(tmp_path / "s.splat")]) == 0
    s = load_splat(tmp_path / "s.splat")
    assert (tmp_path / "s.splat").stat().st_size == 32 * g.num
    d, j = torch.cdist(s.means, g.means).min(-1)  # .splat reorders the Gaussians (largest first)
    assert len(set(j.tolist())) == g.num
    torch.testing.assert_close(s.means, g.means[j], atol=1e-6, rtol=0)
    torch.testing.assert_close(s.rgb, g.rgb[j], atol=1 / 255 + 1e-6, rtol=0)


def test_colmap_and_transforms_round_trip(tmp_path):
    from vision3d.geometry.colmap import read_colmap
    from vision3d.geometry.transforms_json import read_transforms_json
    from vision3d.train.reconstruct import load_run

    run = tiny_run()
    _, files, cams, _, _, _ = load_run(run)
    colmap_out = tmp_path / "colmap"
    assert main(["export", str(run), "--format", "colmap", "--out", str(colmap_out), "--max-points", "50"]) == 0
    model = read_colmap(tmp_path / "colmap")
    c, names, _ = model.to_cameras()
    assert names == files and len(model.points3D) == 50
    torch.testing.assert_close(c.cam_to_world, cams.cam_to_world, atol=1e-5, rtol=0)
    out = tmp_path / "tj" / "transforms.json"
    assert main(["export", str(run), "--format", "transforms", "--out", str(out)]) == 0
    tj = read_transforms_json(out, root=run)  # the exported paths point back into the run folder
    torch.testing.assert_close(tj.cameras.cam_to_world, cams.cam_to_world, atol=1e-5, rtol=0)
    torch.testing.assert_close(tj.cameras.K, cams.K, atol=1e-4, rtol=0)
    assert [p.name for p in tj.image_paths] == files and all(p.is_file() for p in tj.image_paths)


@pytest.mark.parametrize("fmt", ["colmap", "transforms"])
def test_cameras_need_a_run_folder(tmp_path, capsys, fmt):
    run = tiny_run()
    assert main(["export", str(run / "scene.ply"), "--format", fmt, "--out", str(tmp_path / "x")]) == 2
    assert "needs a run folder" in capsys.readouterr().err


def test_missing_scene(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--format", "ply", "--out", str(tmp_path / "o.ply")]) == 2
    assert "scene.ply" in capsys.readouterr().err
