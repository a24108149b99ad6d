"""`vision3d render`: COLMAP and transforms.json cameras, depth formats, resizing, orbit video, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vision3d.cli import render
from vision3d.cli.main import main
from vision3d.gaussians.ply import save_ply
from vision3d.gaussians.procedural import hemisphere_cameras, procedural_scene
from vision3d.geometry.colmap import ColmapModel, write_colmap
from vision3d.geometry.transforms_json import write_transforms_json
from vision3d.render import rasterize
from vision3d.utils.images import load_depth_exr, load_depth_png16, load_png
from vision3d.utils.video import read_video_info

W, H = 24, 18
NAMES = ["frame_b.jpg", "frame_a.jpg", "frame_c.jpg"]


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("render_inputs")
    scene = procedural_scene(seed=2, density=0.08)
    ply = save_ply(root / "scene.ply", scene.gaussians)
    cams = hemisphere_cameras(3, scene.target, 2.3, width=W, height=H, fov_deg=60)
    colmap_dir = root / "colmap" / "sparse" / "0"
    write_colmap(ColmapModel.from_cameras(cams, NAMES), colmap_dir)
    tj = root / "nerfstudio" / "transforms.json"
    tj.parent.mkdir()
    write_transforms_json(tj, cams, [f"images/{n}" for n in NAMES])
    return {"root": root, "ply": ply, "cams": cams, "colmap": root / "colmap", "transforms": tj, "scene": scene}


def _reference(scene_files, i):
    from vision3d.gaussians.ply import load_ply

    g = load_ply(scene_files["ply"])
    with torch.no_grad():
        return rasterize(g, scene_files["cams"][i : i + 1], mode="RGB+ED", backend="torch")


@pytest.mark.parametrize("source", ["colmap", "transforms"])
def test_render_into_cameras_matches_the_renderer(scene_files, tmp_path, source):
    out = tmp_path / "out"
    rc = main(["render", str(scene_files["ply"]), "--cameras", str(scene_files[source]), "--out", str(out), "--backend", "torch"])
    assert rc == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["frame_a.png", "frame_b.png", "frame_c.png"]
    scale = json.loads((out / "depth" / "depth_scale.json").read_text())["depth_scale"]
    ref = _reference(scene_files, 0)  # camera 0 is frame_b
    img = load_png(out / "images" / "frame_b.png")
    assert img.shape == (3, H, W)
    assert (img - ref.colors[0].clamp(0, 1)).abs().max() <= 1 / 255 + 1e-5
    depth = load_depth_png16(out / "depth" / "frame_b.png", scale)
    solid = ref.alphas[0, 0] >= 0.5
    assert solid.any() and (depth[~solid] == 0).all()
    assert (depth[solid] - ref.depths[0, 0][solid]).abs().max() <= scale
    assert not [p for p in out.rglob(".*")]  # no temporary files left behind


@pytest.mark.parametrize("fmt", ["npy", "exr", "none"])
def test_depth_formats_and_resizing(scene_files, tmp_path, fmt):
    out = tmp_path / fmt
    args = render.Args(
        ply=scene_files["ply"], cameras=scene_files["transforms"], out=out, depth_format=fmt, scale=0.5, backend="torch"
    )
    assert render.run(args) == 0
    assert load_png(out / "images" / "frame_a.png").shape == (3, H // 2, W // 2)
    if fmt == "none":
        assert not (out / "depth").exists()
        return
    f = out / "depth" / f"frame_a.{fmt}"
    d = torch.from_numpy(np.load(f)) if fmt == "npy" else load_depth_exr(f)
    assert d.shape == (H // 2, W // 2) and d.dtype == torch.float32 and (d > 0).any()


def test_width_keeps_the_aspect_ratio(scene_files, tmp_path):
    args = render.Args(ply=scene_files["ply"], cameras=scene_files["colmap"], out=tmp_path, width=16, depth_format="none")
    assert render.run(args) == 0
    assert load_png(tmp_path / "images" / "frame_c.png").shape == (3, 12, 16)


def test_orbit_video(scene_files, tmp_path, capsys):
    args = render.Args(ply=scene_files["ply"], out=tmp_path, orbit=5, width=32, height=24, backend="torch", fps=5)
    assert render.run(args) == 0
    info = read_video_info(tmp_path / "orbit.mp4")
    assert info["frames"] == 5 and (info["width"], info["height"]) == (32, 24)
    summary = json.loads(capsys.readouterr().out)
    assert summary["orbit_frames"] == 5 and summary["num_gaussians"] == scene_files["scene"].gaussians.num


def test_orbit_rig_looks_at_the_scene_centre(scene_files):
    g = scene_files["scene"].gaussians
    rig = render.orbit_rig(g.means, 4, scene_files["cams"], 20.0, None, None, None, None, 1.0)
    target = g.means.median(0).values
    uv, _ = rig.project(target.expand(4, 1, 3))
    assert torch.allclose(uv[:, 0], torch.tensor([W / 2, H / 2]).expand(4, 2), atol=1e-3)
    dist = (scene_files["cams"].centers - target).norm(dim=-1).mean()
    assert torch.allclose((rig.centers - target).norm(dim=-1), dist.expand(4), atol=1e-4)


def test_bad_inputs_give_clear_errors(scene_files, tmp_path, capsys):
    ply = str(scene_files["ply"])
    assert main(["render", str(tmp_path / "missing.ply"), "--orbit", "2", "--out", str(tmp_path / "o")]) == 2
    assert "missing.ply: PLY file not found" in capsys.readouterr().err
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("hello")
    assert main(["render", ply, "--cameras", str(neither), "--out", str(tmp_path / "o")]) == 2
    assert "neither a COLMAP model folder" in capsys.readouterr().err
    assert main(["render", ply, "--cameras", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "cameras path not found" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["render", ply, "--orbit", "2", "--out", str(blocker / "sub")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    assert main(["render", ply, "--orbit", "2", "--out", str(blocker)]) == 2
    assert "is a file; expected an output folder" in capsys.readouterr().err
    assert main(["render", ply, "--out", str(tmp_path / "o")]) == 2
    assert "nothing to render" in capsys.readouterr().err
    assert main(["render", ply, "--orbit", "2", "--sh-degree", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--sh-degree" in capsys.readouterr().err
