"""The viewer: scene loading, the client camera -> our render, and the viser page served on loopback."""

from __future__ import annotations

import socket
import time
import urllib.request

import numpy as np
import pytest
import torch

from tests.poses.helpers import tiny_run
from tests.conftest import optional


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


def test_headless_browser_screenshot(tmp_path):
    """The page loads in headless Chromium, connects, and the server answers its camera with our renders."""
    import shutil
    import subprocess

    optional("viser")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from vision3d.utils.images import load_png
    from vision3d.viewer.app import SceneViewer, load_viewer_scene

    viewer = SceneViewer(load_viewer_scene(tiny_run()), host="127.0.0.1", port=_free_port(), render_width=64)
    shot = tmp_path / "shot.png"
    try:
        r = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
             "--window-size=400,300", "--virtual-time-budget=10000", f"--screenshot={shot}",
             f"http://127.0.0.1:{viewer.port}/"],
            capture_output=True, text=True, timeout=90,
        )
    finally:
        viewer.stop()
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    assert viewer.renders >= 1, "the browser connected but no render was sent"
    img = load_png(shot)
    assert img.shape[-2:] == (300, 400) and float(img.std()) > 0.05
