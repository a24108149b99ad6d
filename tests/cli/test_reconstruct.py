"""End-to-end tests of ``vision3d reconstruct`` on a tiny procedural scene with known cameras (CPU)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tests.poses.helpers import make_photo_folder, photo_cameras, run_args, tiny_run
from tests.conftest import optional
from vision3d.cli.main import main


def test_outputs_present_and_parseable():
    from vision3d.gaussians.ply import load_ply
    from vision3d.geometry.colmap import read_colmap
    from vision3d.geometry.transforms_json import read_transforms_json
    from vision3d.utils.images import load_png
    from vision3d.utils.video import read_video_info

    run = tiny_run()
    m = json.loads((run / "metrics.json").read_text())
    g = load_ply(run / "scene.ply")
    assert g.num == m["num_gaussians"] == m["init"]["num_gaussians"] == 300  # 6 steps end before the first refinement
    assert m["init"]["method"] == "sfm" and m["images"]["registered"] == 8 and m["test"]["count"] == 2
    assert math.isfinite(m["test"]["psnr"]) and m["test"]["psnr"] > 10.0
    assert 0.0 < m["test"]["ssim"] <= 1.0
    assert [v["image"] for v in m["test"]["views"]] == ["img_00.png", "img_04.png"]
    assert m["steps"] == 6 and [h["step"] for h in m["history"]] == list(range(1, 7))
    # cameras/: COLMAP text model and transforms.json agree with each other and with the true cameras
    truth = photo_cameras(8, 32, 24)
    model = read_colmap(run / "cameras")
    cams, names, dist = model.to_cameras()
    assert dist is None and names == [f"img_{i:02d}.png" for i in range(8)] and len(model.points3D) == 300
    torch.testing.assert_close(cams.cam_to_world, truth.cam_to_world, atol=1e-4, rtol=0)
    torch.testing.assert_close(cams.K, truth.K, atol=1e-4, rtol=0)
    tj = read_transforms_json(run / "cameras" / "transforms.json", root=run)  # its images sit in run/images
    torch.testing.assert_close(tj.cameras.cam_to_world, truth.cam_to_world, atol=1e-4, rtol=0)
    assert all(p.is_file() for p in tj.image_paths)
    # held-out renders: render | photo, side by side
    for name in ("img_00", "img_04"):
        im = load_png(run / "renders" / f"{name}.png")
        assert im.shape == (3, 24, 2 * 32 + 2)
    info = read_video_info(run / "video.mp4")
    assert info["frames"] == 4 and (info["width"], info["height"]) == (32, 24)
    state = torch.load(run / "ckpt" / "state.pt", weights_only=True)
    assert state["fit"]["step"] == 6 and state["fit"]["steps"] == 6
    assert not list(run.rglob("*.tmp*")), "atomic writes left temporary files"


def test_fit_improves_on_the_initialisation():
    from vision3d.eval.metrics import psnr
    from vision3d.gaussians.ply import load_ply
    from vision3d.train.reconstruct import load_run
    from vision3d.render import rasterize
    from vision3d.train.scene_fit import gaussians_from_points

    run = tiny_run()
    images, _, cams, pts, cols, _ = load_run(run)
    init = gaussians_from_points(pts, cols, opacity=0.1)
    fitted = load_ply(run / "scene.ply")
    with torch.no_grad():
        p0 = psnr(rasterize(init, cams, mode="RGB", backend="torch").colors.clamp(0, 1), images).mean()
        p1 = psnr(rasterize(fitted, cams, mode="RGB", backend="torch").colors.clamp(0, 1), images).mean()
    assert p1 > p0 + 0.5


def test_interrupt_then_resume(tmp_path, monkeypatch):
    import vision3d.train.scene_fit as sf

    folder, _ = make_photo_folder(tmp_path, n=6, width=24, height=16, num_points=150)
    out = tmp_path / "run"
    real = sf.fit_scene

    def interrupted(init, images, cameras, config=None, callback=None, **kw):
        def cb(step, g, entry):
            if step >= 3:
                raise KeyboardInterrupt

        return real(init, images, cameras, config, callback=cb, **kw)

    monkeypatch.setattr(sf, "fit_scene", interrupted)
    assert main(run_args(folder, out, 6, "--holdout-every", "3", "--no-video", "--ckpt-every", "100")) == 130
    state = torch.load(out / "ckpt" / "state.pt", weights_only=True)
    assert state["fit"]["step"] == 3 and (out / "ckpt" / "scene.ply").is_file()
    assert not (out / "scene.ply").exists() and not (out / "metrics.json").exists()
    monkeypatch.setattr(sf, "fit_scene", real)
    # without --resume the folder is refused
    assert main(run_args(folder, out, 6, "--holdout-every", "3", "--no-video")) == 2
    assert main(run_args(folder, out, 6, "--holdout-every", "3", "--no-video", "--resume")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_step"] == 3 and m["steps"] == 6
    assert [h["step"] for h in m["history"]] == list(range(1, 7))


def test_transforms_json_random_init_no_holdout(tmp_path):
    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="transforms")
    out = tmp_path / "run"
    args = run_args(folder, out, 2, "--init", "random", "--random-init-count", "200", "--no-video")
    args[args.index("--holdout-every") + 1] = "0"
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["init"] == {"method": "random", "num_gaussians": 200} and m["test"]["count"] == 0
    assert not (out / "video.mp4").exists() and (out / "scene.ply").is_file()


# ------------------------------------------------------------------ bad input
def _fails(args, capsys, *needles, code=2):
    assert main(args) == code
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_too_few_images(tmp_path, capsys):
    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="transforms")
    for p in sorted(folder.glob("img_0[23].png")):
        p.unlink()
    _fails(run_args(folder, tmp_path / "run", 2), capsys, str(folder), "at least 3")


def test_unreadable_image(tmp_path, capsys):
    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="transforms")
    (folder / "img_01.png").write_bytes(b"not a png")
    _fails(run_args(folder, tmp_path / "run", 2), capsys, "img_01.png", "cannot be read", "--skip-unreadable")


def test_wildly_different_sizes(tmp_path, capsys):
    from vision3d.utils.images import save_png

    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="none")
    save_png(folder / "img_02.png", torch.rand(3, 40, 10))
    _fails(run_args(folder, tmp_path / "run", 2, "--poses", "colmap", "--size-policy", "error"), capsys, "img_02.png",
           "aspect", "--size-policy keep")


def test_video_opencv_cannot_open(tmp_path, capsys):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 64)
    _fails(run_args(bad, tmp_path / "run", 2, "--poses", "colmap"), capsys, "clip.mp4", "OpenCV")


def test_known_poses_without_cameras(tmp_path, capsys):
    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="none")
    _fails(run_args(folder, tmp_path / "run", 2), capsys, "--cameras", "--poses colmap")


def test_missing_input_and_non_empty_out(tmp_path, capsys):
    _fails(run_args(tmp_path / "nope", tmp_path / "run", 2), capsys, "nope")
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("x")
    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="transforms")
    _fails(run_args(folder, out, 2), capsys, "--resume", "--overwrite")


def test_mesh_without_open3d_names_the_pip_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "open3d", None)  # import open3d now fails as if it were not installed
    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="transforms")
    _fails(run_args(folder, tmp_path / "run", 2, "--mesh"), capsys, "pip install", "open3d", code=3)
    assert not (tmp_path / "run").exists()


def test_sfm_failure_is_explained(tmp_path, capsys):
    optional("pycolmap")
    from vision3d.utils.images import save_png

    folder = tmp_path / "noise"
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_png(folder / f"n{i}.png", torch.rand(3, 64, 80, generator=g))
    out = tmp_path / "run"
    err = _fails(run_args(folder, out, 2, "--poses", "colmap"), capsys, "registered", "overlap", "--poses vggt")
    assert "of 3 images" in err
    assert (out / "sfm" / "colmap.log").is_file() and "E2" not in err  # COLMAP's log is in the file, not the terminal
    # the same command again restarts the unfinished pose stage (no "folder not empty" loop), with or without --resume
    for extra in ((), ("--resume",)):
        err = _fails(run_args(folder, out, 2, "--poses", "colmap", *extra), capsys, "registered")
        assert "not empty" not in err and "nothing to resume" not in err


@pytest.mark.slow
def test_sfm_poses_match_the_truth_up_to_similarity(tmp_path, monkeypatch):
    optional("pycolmap")
    import vision3d.poses.colmap as colmap_poses

    # an initial pair needing a 179-degree triangulation angle cannot exist: mapping must start again relaxed
    monkeypatch.setattr(colmap_poses, "_INIT_LADDER", ((179.0, 100), (None, None)))
    from vision3d.data.synthetic import synthetic_cameras
    from vision3d.gaussians.procedural import procedural_scene
    from vision3d.train.reconstruct import load_run
    from tests.poses.helpers import make_video_like_folder

    folder = make_video_like_folder(tmp_path)  # 14 frames, 160x120, a 90-degree arc
    out = tmp_path / "run"
    args = run_args(folder, out, 2, "--poses", "colmap", "--sfm-threads", "1", "--no-video",
                    "--fit.background", "1", "1", "1")  # one thread: COLMAP is deterministic
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["poses"]["estimator"] == "colmap" and m["poses"]["registered"] >= 3 and m["init"]["method"] == "sfm"
    assert m["poses"]["initialisation"] == {"min_tri_angle": 16.0, "min_num_inliers": 100}  # COLMAP's defaults
    _, files, cams, pts, _, _ = load_run(out)
    truth = synthetic_cameras(14, procedural_scene(seed=3, density=1.5).target, 2.4, 160, 120, seed=1, arc_deg=90)
    idx = [int(f[1:3]) for f in files]
    a, b = cams.centers.double(), truth.centers.double()[idx]
    a0, b0 = a - a.mean(0), b - b.mean(0)
    U, S, Vt = torch.linalg.svd(b0.T @ a0)
    D = torch.eye(3, dtype=torch.float64)
    D[2, 2] = torch.sign(torch.det(U @ Vt))
    R = U @ D @ Vt
    s = (S * D.diagonal()).sum() / a0.pow(2).sum()
    err = (s * a0 @ R.T - b0).norm(dim=-1)
    assert float(err.max()) < 0.1 * float(b0.norm(dim=-1).mean() + 0.5)


def test_video_input_frames(tmp_path):
    from vision3d.train.reconstruct import ReconstructConfig, load_input
    from vision3d.utils.video import write_video

    frames = [torch.full((3, 24, 32), i / 20) for i in range(20)]
    video = write_video(tmp_path / "clip.mp4", frames, fps=10)
    inp = load_input(ReconstructConfig(video, tmp_path / "run", video_frames=5, sharpness_window=2), 16, False)
    assert inp.is_video and inp.cameras is None and len(inp.names) == 5 and inp.names[0] == "frame_000000"
    assert inp.images.shape == (5, 3, 12, 16)  # longest side capped at 16
    with pytest.raises(ValueError, match="video has none"):
        load_input(ReconstructConfig(video, tmp_path / "run"), None, True)


# ------------------------------------------------------------------ --init <reconstructor>, --pose-ba, --mesh
def test_init_from_a_reconstructor(tmp_path, capsys):
    from vision3d import recon
    from vision3d.train.checkpoint import save_weights

    folder, _ = make_photo_folder(tmp_path, n=6, width=32, height=24, num_points=150)
    torch.manual_seed(0)
    weights = tmp_path / "ilrm_tiny.safetensors"
    save_weights(weights, recon.create("ilrm_tiny").state_dict())
    # fails before the pose stage without weights, naming the flag and the converter
    _fails(run_args(folder, tmp_path / "r0", 2, "--init", "ilrm_tiny"), capsys, "--init-weights", "vision3d convert")
    _fails(run_args(folder, tmp_path / "r1", 2, "--init", "no_such_model", "--init-weights", str(weights)), capsys,
           "no_such_model", "ilrm_re10k")
    assert not (tmp_path / "r0" / "images").exists()
    # a file that is not the model's weights fails before the pose stage and leaves no run folder
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    _fails(run_args(folder, tmp_path / "r2", 2, "--init", "ilrm_tiny", "--init-weights", str(bad)), capsys, "bad.safetensors")
    assert not (tmp_path / "r2").exists()
    out = tmp_path / "run"
    args = run_args(folder, out, 3, "--init", "ilrm_tiny", "--init-weights", str(weights), "--no-video",
                    "--max-init-gaussians", "500")
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    init = m["init"]
    assert init["method"] == "ilrm_tiny" and 0 < init["num_gaussians"] <= 500
    assert init["reconstructor"]["method"] == "ilrm_tiny" and len(init["reconstructor"]["context_views"]) >= 2
    assert "init" in m["time_s"] and math.isfinite(m["test"]["psnr"])
    # the checkpoint keeps the reconstructor's info for a resume
    state = torch.load(out / "ckpt" / "state.pt", weights_only=True)
    assert state["init"]["reconstructor"]["method"] == "ilrm_tiny"


def test_pose_ba_needs_a_feedforward_estimator(tmp_path, capsys):
    folder, _ = make_photo_folder(tmp_path, n=4, width=24, height=16, cameras="transforms")
    _fails(run_args(folder, tmp_path / "run", 2, "--pose-ba"), capsys, "--pose-ba", "vggt|flashvggt", "known")


def test_mesh_is_written(tmp_path):
    optional("open3d")
    from vision3d.mesh.mesh import load_mesh

    folder, _ = make_photo_folder(tmp_path, n=6, width=32, height=24, num_points=300)
    out = tmp_path / "run"
    assert main(run_args(folder, out, 3, "--mesh", "--no-video")) == 0
    m = json.loads((out / "metrics.json").read_text())
    mesh = load_mesh(out / "mesh.ply")
    assert m["mesh"]["vertices"] == mesh.num_vertices > 0 and m["mesh"]["triangles"] == mesh.num_faces > 0
    assert m["mesh"]["views"] == 6 and "mesh" in m["time_s"]


def test_invalid_input_creates_nothing_and_unreadable_listed(tmp_path, capsys):
    folder, _ = make_photo_folder(tmp_path, n=5, width=24, height=16, cameras="transforms")
    (folder / "img_01.png").write_bytes(b"not a png")
    (folder / "img_03.png").write_bytes(b"nor this")
    out = tmp_path / "run"
    _fails(run_args(folder, out, 2), capsys, "img_01.png", "img_03.png", "--skip-unreadable")
    assert not out.exists()
    assert main(run_args(folder, out, 2, "--skip-unreadable", "--no-video", "--holdout-every", "0")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"]["registered"] == 3 and m["time_s"]["total_all_runs"] >= m["time_s"]["total"]


def test_missing_path_is_reported_before_torch_loads(tmp_path):
    import subprocess

    code = ("import sys; from vision3d.cli import main as m; rc = m.main(['reconstruct', sys.argv[1]]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr and r.stdout.strip() == "False"


def test_import_vision3d_still_registers_the_backbones_with_timm():
    import subprocess

    for code in ("import vision3d, timm; assert 'affnet' in timm.list_models('affnet*')",
                 "import timm, vision3d; assert 'affnet' in timm.list_models('affnet*')",
                 "from vision3d import Cameras, Gaussians; import vision3d; assert vision3d.Cameras is Cameras"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_mixed_size_photos_keep_their_sizes(tmp_path):
    from vision3d.gaussians.procedural import collection_cameras, procedural_scene
    from vision3d.geometry.colmap import write_colmap
    from vision3d.render import rasterize
    from vision3d.train.reconstruct import colmap_model_of, load_run
    from vision3d.utils.images import save_png

    scene = procedural_scene(seed=3, density=0.35)
    cams = collection_cameras(6, scene.target, arc_deg=120, sizes=((32, 24), (24, 32)))
    folder = tmp_path / "photos"
    names = [f"p{i}.png" for i in range(6)]
    for n, c in zip(names, cams):
        with torch.no_grad():
            save_png(folder / n, rasterize(scene.gaussians, c, mode="RGB", backend="torch").colors[0].clamp(0, 1))
    write_colmap(colmap_model_of(cams, names, scene.gaussians.means[:200], scene.gaussians.rgb[:200]),
                 folder / "sparse" / "0", binary=False)
    out = tmp_path / "run"
    assert main(run_args(folder, out, 3, "--holdout-every", "3", "--no-video", "--fit.appearance")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert sorted(map(tuple, m["images"]["sizes"])) == [(24, 32), (32, 24)]
    assert "psnr_right_half_fitted" in m["test"]["appearance"]
    images, _, got, _, _, _ = load_run(out)
    assert isinstance(images, list) and [(c.width, c.height) for c in got] == [(c.width, c.height) for c in cams]
    for a, b in zip(got, cams):
        torch.testing.assert_close(a.K, b.K, atol=1e-3, rtol=0)
    # export and view read such a run: each photo keeps its size
    from vision3d.cli.export import Args as ExportArgs, export
    from vision3d.geometry.colmap import read_colmap
    from vision3d.viewer.app import load_viewer_scene

    export(ExportArgs(out, tmp_path / "sparse_out", format="colmap"))
    cm = read_colmap(tmp_path / "sparse_out")
    assert sorted((c.width, c.height) for c in cm.cameras.values()) == sorted((c.width, c.height) for c in cams)
    export(ExportArgs(out, tmp_path / "tj", format="transforms"))
    tj = json.loads((tmp_path / "tj" / "transforms.json").read_text())
    assert [(f["w"], f["h"]) for f in tj["frames"]] == [(c.width, c.height) for c in cams]
    from vision3d.geometry.transforms_json import read_transforms_json

    back = read_transforms_json(tmp_path / "tj" / "transforms.json", root=out)  # per-frame w/h read back
    assert back.sizes == [(c.width, c.height) for c in cams]
    for i, c in enumerate(cams):
        torch.testing.assert_close(back.camera(i).K, c.K.reshape(1, 3, 3), atol=1e-3, rtol=0)
    vs = load_viewer_scene(out)
    assert [vs.size(i) for i in range(len(cams))] == [(c.width, c.height) for c in cams]
    for i, c in enumerate(cams):
        cam = vs.camera(i)
        assert (cam.width, cam.height) == (c.width, c.height)
        torch.testing.assert_close(cam.K[0], c.K.reshape(3, 3), atol=1e-3, rtol=0)
    from vision3d.utils.optional import why_unavailable

    if why_unavailable("viser") is None:  # the viewer draws the frusta and held-out comparisons at each size
        from vision3d.viewer.app import SceneViewer

        viewer = SceneViewer(vs, host="127.0.0.1", port=0, render_width=32)
        try:
            for i in vs.held_out:
                img, now, _ = viewer.comparison(i)
                assert img.shape[:2] == (vs.size(i)[1], 2 * vs.size(i)[0] + 4) and now is not None
        finally:
            viewer.stop()


def test_interrupted_pose_stage_restarts_with_the_printed_command(tmp_path, capsys, monkeypatch):
    import vision3d.train.reconstruct as rec

    folder, _ = make_photo_folder(tmp_path, n=5, width=24, height=16, cameras="transforms")
    out = tmp_path / "run"
    real = rec.write_posed

    def interrupted(out_dir, result, progress):
        from vision3d.utils.images import save_png

        save_png(out_dir / "images" / "half_written.png", result.images[0])
        raise KeyboardInterrupt

    monkeypatch.setattr(rec, "write_posed", interrupted)
    args = run_args(folder, out, 2, "--no-video", "--fit.pose-opt")
    monkeypatch.setattr(sys, "argv", ["vision3d", *args])
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and str(out) in err
    monkeypatch.setattr(rec, "write_posed", real)
    assert main([*args, "--resume"]) == 0  # the printed command: the pose stage starts again
    m = json.loads((out / "metrics.json").read_text())
    assert not (out / "images" / "half_written.png").exists() and m["images"]["registered"] == 5
    assert m["pose_opt"]["mean_rotation_change_deg"] >= 0
