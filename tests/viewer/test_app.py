"""The viewer: scene loading, the client camera -> our render, and the viser page served on loopback."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request

import numpy as np
import pytest
import torch

from tests.conftest import optional
from tests.poses.helpers import tiny_run


def test_load_viewer_scene_from_run_and_ply():
    from vision3d.viewer.app import load_viewer_scene

    run = tiny_run()
    s = load_viewer_scene(run)
    assert s.cameras is not None and len(s.cameras) == 8
    assert s.held_out == [0, 4] and sorted(s.photos) == [0, 4] and s.photos[0].shape == (3, 24, 32)
    bare = load_viewer_scene(run / "scene.ply")
    assert bare.cameras is None and bare.gaussians.num == s.gaussians.num
    with pytest.raises(FileNotFoundError, match="scene.ply"):
        load_viewer_scene(run / "cameras")


def test_client_pose_renders_like_the_run_camera():
    from vision3d.geometry.rotations import matrix_to_quat
    from vision3d.render import rasterize
    from vision3d.viewer.app import camera_from_pose, load_viewer_scene, render_rgb

    s = load_viewer_scene(tiny_run())
    cam = s.cameras[2:3]
    fov_y = 2 * float(torch.atan(0.5 * cam.height / cam.K[0, 1, 1]))
    vc = camera_from_pose(matrix_to_quat(cam.rotation[0].double()).numpy(), cam.centers[0].double().numpy(), fov_y,
                          cam.width, cam.height)
    torch.testing.assert_close(vc.cam_to_world, cam.cam_to_world, atol=1e-5, rtol=0)
    torch.testing.assert_close(vc.K, cam.K, atol=1e-4, rtol=0)
    img = render_rgb(s.gaussians, vc, backend="torch")
    with torch.no_grad():
        ref = rasterize(s.gaussians, cam, mode="RGB", backend="torch").colors[0].clamp(0, 1)
    ref = (ref.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    assert img.shape == (24, 32, 3) and np.abs(img.astype(int) - ref.astype(int)).max() <= 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_serves_its_page_on_loopback():
    optional("viser")
    from vision3d.viewer.app import SceneViewer, load_viewer_scene

    viewer = SceneViewer(load_viewer_scene(tiny_run()), host="127.0.0.1", port=_free_port(), render_width=32)
    try:
        body, err = b"", None
        for _ in range(50):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{viewer.port}/", timeout=5) as r:
                    assert r.status == 200
                    body = r.read()
                break
            except OSError as e:  # the server thread may still be starting
                err = e
                time.sleep(0.1)
        assert body, err
        assert b"<html" in body.lower() or b"<!doctype html" in body.lower()
    finally:
        viewer.stop()


def test_view_cli_errors_and_missing_viser(tmp_path, capsys, monkeypatch):
    from vision3d.cli.main import main

    assert main(["view", str(tmp_path / "nothing.ply")]) == 2
    assert "nothing.ply" in capsys.readouterr().err
    import sys

    monkeypatch.setitem(sys.modules, "viser", None)  # makes "import viser" raise ImportError
    assert main(["view", str(tiny_run()), "--seconds", "0"]) == 3
    assert "pip install" in capsys.readouterr().err


def test_splat_arrays_and_filters(tmp_path):
    from vision3d.viewer.app import filter_mask, load_viewer_scene, splat_arrays

    g = load_viewer_scene(tiny_run()).gaussians
    a = splat_arrays(g)
    n = g.num
    assert a["centers"].shape == (n, 3) and a["covariances"].shape == (n, 3, 3) and a["opacities"].shape == (n, 1)
    # the covariance's eigenvalues are the squared scales; colours are the SH-degree-0 colours
    ev = np.sort(np.linalg.eigvalsh(a["covariances"].astype(np.float64)), -1)
    np.testing.assert_allclose(ev, np.sort(g.scales.double().numpy() ** 2, -1), rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(a["rgbs"], g.rgb.numpy(), atol=1e-6)
    keep = filter_mask(g, min_opacity=float(g.opacities.median()))
    assert 0 < int(keep.sum()) < n and bool((g.opacities[keep] >= g.opacities.median()).all())
    smax = float(g.scales.amax(-1).median())
    assert bool((g.scales[filter_mask(g, max_scale=smax)].amax(-1) <= smax).all())
    lo, hi = g.means.min(0).values, g.means.median(0).values
    inside = filter_mask(g, lo=lo, hi=hi)
    assert 0 < int(inside.sum()) < n and bool(((g.means[inside] >= lo) & (g.means[inside] <= hi)).all())


def test_colorize_depth_and_modes():
    from vision3d.viewer.app import colorize_depth, load_viewer_scene, render_view

    depth = np.tile(np.linspace(1, 5, 16), (4, 1))
    img = colorize_depth(depth, np.ones_like(depth))
    assert img.shape == (4, 16, 3) and img.dtype == np.uint8
    assert img[0, 0, 2] > img[0, 0, 0] and img[0, -1, 0] > img[0, -1, 2]  # near blue, far red
    assert (colorize_depth(depth, np.zeros_like(depth)) == 0).all()  # no coverage: background
    s = load_viewer_scene(tiny_run())
    cam = s.cameras[1:2]
    frames = {m: render_view(s.gaussians, cam, m, backend="torch") for m in ("rgb", "depth", "alpha")}
    assert all(f.shape == (24, 32, 3) for f in frames.values())
    assert (frames["alpha"][..., 0] == frames["alpha"][..., 1]).all() and frames["alpha"].max() > 128
    assert np.abs(frames["rgb"].astype(int) - frames["depth"]).mean() > 10
    with pytest.raises(ValueError, match="mode"):
        render_view(s.gaussians, cam, "normals")


def test_port_and_host_handling(capsys):
    from vision3d.cli.main import main
    from vision3d.viewer.app import check_port, reachable_urls

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is busy"):
            check_port("127.0.0.1", port)
        assert main(["view", str(tiny_run()), "--port", str(port), "--seconds", "0"]) == 2
        assert f"port {port}" in capsys.readouterr().err
    assert check_port("127.0.0.1", 0) > 0
    assert reachable_urls("127.0.0.1", 8080) == ["http://127.0.0.1:8080"]
    urls = reachable_urls("0.0.0.0", 8080)
    assert urls[-1] == "http://127.0.0.1:8080" and not any("0.0.0.0" in u for u in urls)
    assert main(["view", str(tiny_run()), "--device", "cuda:7" if not torch.cuda.is_available() else "nope",
                 "--seconds", "0"]) == 2
    assert "--device" in capsys.readouterr().err


def test_viewer_state_start_camera_comparison_export(tmp_path, capsys):
    optional("viser")
    from vision3d.gaussians.ply import load_ply, load_splat
    from vision3d.viewer.app import SceneViewer, fov_y_of, load_viewer_scene

    s = load_viewer_scene(tiny_run())
    v = SceneViewer(s, port=0, backend="torch")
    try:
        assert v.start_index == 1  # the first training camera (0 is held out)
        ic = v.server.initial_camera
        assert ic.fov == pytest.approx(float(fov_y_of(s.cameras)[1]))
        np.testing.assert_allclose(ic.position, s.cameras.centers[1].numpy(), atol=1e-5)
        fwd = (ic.look_at - ic.position) / np.linalg.norm(ic.look_at - ic.position)
        np.testing.assert_allclose(fwd, s.cameras.rotation[1, :, 2].numpy(), atol=1e-5)
        img, now, recorded = v.comparison(4)  # held out: photo | render, PSNR like metrics.json's
        assert img.shape == (24, 68, 3) and recorded is not None and abs(now - recorded) < 0.1
        assert "held-out PSNR" in v.metrics_markdown()
        n = v.set_filter(min_opacity=float(s.gaussians.opacities.median()))
        assert 0 < n < s.gaussians.num and v._gui_count.content.startswith(f"{n} of")
        assert load_ply(v.export(tmp_path / "f.ply")).num == n
        assert load_splat(v.export(tmp_path / "f.splat")).num == n
        with pytest.raises(ValueError, match="ply or splat"):
            v.export(tmp_path / "f.obj")
        v.set_filter(min_opacity=2.0)
        with pytest.raises(ValueError, match="no Gaussians"):
            v.export(tmp_path / "g.ply")
    finally:
        v.stop()


def test_demo_run_folder_has_cameras(tmp_path):
    from vision3d.cli.main import main
    from vision3d.viewer.app import load_viewer_scene

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--width", "24", "--height", "18", "--train-views", "4",
                 "--test-views", "2", "--scene-density", "0.1", "--num-init", "300", "--video-frames", "2",
                 "--video-width", "32", "--fit.no-progress"]) == 0
    s = load_viewer_scene(out)
    assert s.cameras is not None and len(s.cameras) == 6 and s.held_out == [4, 5] and sorted(s.photos) == [4, 5]
    assert s.metrics["test"]["views"][0]["image"] == "test_00.png"


def _wait(cond, timeout=60.0, step=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = cond()
        if value:
            return value
        time.sleep(step)
    return cond()


def _settled(browser, timeout=30.0):
    """A screenshot once two in a row (0.5 s apart) agree: the page has drawn what it was sent."""
    prev = browser.screenshot()
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        cur = browser.screenshot()
        if np.abs(cur.astype(int) - prev).mean() < 0.5:
            return cur
        prev = cur
    return prev


def test_real_browser_draws_switches_and_goes_to_view(tmp_path, recwarn, caplog):
    """Headless Chromium loads the page over DevTools; the splats, a mode switch and go-to-view all show."""
    optional("viser")
    optional("websockets")
    from tests.viewer.browser import Chromium, find_chromium
    from vision3d.viewer.app import SceneViewer, load_viewer_scene

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    s = load_viewer_scene(tiny_run())
    v = SceneViewer(s, port=0, render_width=160, preview_width=64, backend="torch")
    try:
        with Chromium(tmp_path / "profile", (640, 480)) as b:
            b.navigate(f"http://127.0.0.1:{v.port}/")
            assert _wait(lambda: v.server.get_clients()), "the page did not connect"
            client = next(iter(v.server.get_clients().values()))
            splats = _settled(b)
            v.set_filter(min_opacity=2.0)  # nothing left: the blank page
            blank = _settled(b)
            v.set_filter()
            again = _settled(b)
            # the scene area left of the panel: the splats differ from the blank page, and come back the same
            area = np.s_[150:, :290]
            assert np.abs(splats[area].astype(int) - blank[area]).mean() > 8
            assert np.abs(splats[area].astype(int) - again[area]).mean() < 3
            v.set_mode("depth")
            assert _wait(lambda: v.renders >= 2), "no render after switching to depth"
            depth = _settled(b)
            assert np.abs(depth[area].astype(int) - splats[area]).mean() > 8
            frame = v.last_frames[client.client_id]
            assert frame.shape[1] == 160  # at rest: the full render width
            reported = []  # camera states the browser sends back (server-side assignments fire no callback)
            client.camera.on_update(lambda cam: reported.append((np.array(cam.position), float(cam.fov))))
            v.go_to_view(client, 4)
            target = s.cameras.centers[4].numpy()
            fov = float(2 * torch.atan(12 / s.cameras.K[4, 1, 1]))
            assert _wait(lambda: any(np.allclose(p, target, atol=1e-3) and abs(f - fov) < 1e-3 for p, f in reported)), \
                f"the browser camera did not take camera 4's pose and FOV: {reported[-3:]}"
            moved = _settled(b)
            assert np.abs(moved[area].astype(int) - depth[area]).mean() > 3
            assert v._gui_compare.visible  # held out: photo | render beside
            # close the tab while a large render is in flight: no warning, no error, the render thread ends
            v.set_mode("rgb")
            v._gui_width.value = 1280
            n = v.renders
            assert _wait(lambda: v.renders > n, step=0.02)  # the preview went out; the full frame is rendering
            b.close()
        assert _wait(lambda: not any(t.is_alive() for t in v._threads), timeout=120)
    finally:
        v.stop()
    assert not [w for w in recwarn if "closed connection" in str(w.message)]
    assert not [r for r in caplog.records if r.name.startswith("vision3d") and r.levelno >= logging.WARNING]


class _FakeCamera:
    def __init__(self):
        self.wxyz, self.position, self.fov, self.aspect = np.array([1.0, 0, 0, 0]), np.zeros(3), 1.0, 4 / 3
        self.callbacks = []

    def on_update(self, cb):
        self.callbacks.append(cb)


class _FakeClient:
    """The part of viser's ClientHandle the viewer uses, recording the frames it is sent."""

    client_id = 12345

    def __init__(self):
        self.camera, self.frames = _FakeCamera(), []
        self.scene = self

    def set_background_image(self, img, format="jpeg"):
        self.frames.append(None if img is None else img.shape)

    def atomic(self):
        import contextlib

        return contextlib.nullcontext()


def test_preview_while_moving_full_width_at_rest():
    optional("viser")
    from vision3d.viewer.app import SceneViewer, load_viewer_scene

    s = load_viewer_scene(tiny_run())
    v = SceneViewer(s, port=0, render_width=96, preview_width=32, settle_s=0.4, mode="rgb", backend="torch")
    c = _FakeClient()
    try:
        v._on_connect(c)
        np.testing.assert_allclose(c.camera.position, s.cameras.centers[1].numpy(), atol=1e-6)  # the start view
        for k in range(10):  # the camera moves every 50 ms
            c.camera.position = c.camera.position + 0.01
            c.camera.callbacks[0](c.camera)
            time.sleep(0.05)
        assert _wait(lambda: c.frames and c.frames[-1] == (72, 96, 3), timeout=30)  # at rest: full width
        moving = [f for f in c.frames[:-1] if f is not None]
        assert moving and all(f == (24, 32, 3) for f in moving)
        v.set_mode("splats")
        assert _wait(lambda: c.frames[-1] is None, timeout=10)  # the browser's splats, no background frame
    finally:
        v.stop()


def test_live_viewer_updates_and_pauses_the_fit():
    optional("viser")
    import threading

    from vision3d.gaussians.ops import select
    from vision3d.viewer.app import load_viewer_scene
    from vision3d.viewer.live import LiveViewer

    run = tiny_run()
    g = load_viewer_scene(run).gaussians
    lines = []
    live = LiveViewer(run, port=0, total_steps=30, every=2, held_out=[0, 4], announce=lines.append, backend="torch")
    try:
        live(10, select(g, torch.arange(g.num) < 50), {"loss": 0.5, "psnr": 12.0, "num_gaussians": 50})
        v = live.viewer
        assert v is not None and v.filtered.num == 50 and lines and f":{v.port}" in lines[0]
        assert v.scene.held_out == [0, 4] and sorted(v.scene.photos) == [0, 4]
        assert "step 10 / 30" in live._text.content and "12.00 dB" in live._text.content
        live(20, g, {"loss": 0.4, "psnr": 13.0, "num_gaussians": g.num})  # not an update step (every=2)
        assert v.filtered.num == 50 and "step 20" in live._text.content
        live(30, g, {"loss": 0.3, "psnr": 14.0, "num_gaussians": g.num})
        assert v.filtered.num == g.num and live.updates == 1
        live.pause()
        done = threading.Event()
        t = threading.Thread(target=lambda: (live(31, g, {"loss": 0.3, "psnr": 14.0, "num_gaussians": g.num}),
                                             done.set()), daemon=True)
        t.start()
        assert not done.wait(0.6), "a paused viewer let the fit go on"
        assert "(paused)" in live._text.content and live._pause_button.label == "Resume training"
        live.pause(False)
        assert done.wait(5)
    finally:
        live.close()


def test_reconstruct_view_serves_the_fit(tmp_path, capsys):
    optional("viser")
    from tests.poses.helpers import make_photo_folder, run_args
    from vision3d.cli.main import main

    folder, _ = make_photo_folder(tmp_path, n=5, width=24, height=20, num_points=200)
    assert main(run_args(folder, tmp_path / "run", 3, "--view", "--view-port", "0")) == 0
    assert "live viewer at http://127.0.0.1:" in capsys.readouterr().out


def test_view_cli_prints_reachable_urls_and_network_warning(capsys):
    optional("viser")
    from vision3d.cli.main import main

    assert main(["view", str(tiny_run()), "--port", "0", "--seconds", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "renderer on cpu" in out.out and "http://127.0.0.1:" in out.out and "warning" not in out.err
    assert main(["view", str(tiny_run()), "--host", "0.0.0.0", "--port", "0", "--seconds", "0"]) == 0
    out = capsys.readouterr()
    assert "http://0.0.0.0" not in out.out and "http://127.0.0.1:" in out.out
    assert "serves the scene to the network" in out.err


def test_bare_ply_starts_outside_the_scene_looking_at_it():
    optional("viser")
    from vision3d.viewer.app import SceneViewer, load_viewer_scene

    s = load_viewer_scene(tiny_run() / "scene.ply")
    v = SceneViewer(s, port=0)
    try:
        lo, hi = s.gaussians.means.min(0).values.numpy(), s.gaussians.means.max(0).values.numpy()
        ic = v.server.initial_camera
        assert v.start_index is None and ((ic.look_at >= lo) & (ic.look_at <= hi)).all()
        assert np.linalg.norm(ic.position - ic.look_at) > 0.5 * np.linalg.norm(hi - lo) * 0.5
    finally:
        v.stop()


def test_bad_start_camera_and_mode_are_errors_and_free_the_port():
    optional("viser")
    from vision3d.viewer.app import SceneViewer, check_port, load_viewer_scene

    s = load_viewer_scene(tiny_run())
    port = check_port("127.0.0.1", 0)
    with pytest.raises(ValueError, match="start_camera 99: expected 0..7"):
        SceneViewer(s, port=port, start_camera=99)
    assert check_port("127.0.0.1", port) == port  # the failed viewer left nothing serving
    with pytest.raises(ValueError, match="mode 'normals'"):
        SceneViewer(s, port=0, mode="normals")
