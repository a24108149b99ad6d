"""A viser page for a reconstruction: the Gaussians rendered by our renderer, the cameras, the held-out photos.

viser (nerfstudio-project/viser, Apache-2.0; the ``[viewer]`` extra) serves the page and reports
each browser's camera; every camera change is answered with a render from
:func:`vision3d.render.rasterize` (the PyTorch twin on the CPU, gsplat on a GPU), sent as the
page's background image, so what you see is exactly what ``vision3d render`` and the metrics see.
The run's cameras are drawn as frusta (held-out ones in orange, with their photo). viser's client
camera is OpenCV-like (``+z`` forward, ``+y`` down) with a vertical field of view, so the pose
goes into :class:`~vision3d.geometry.Cameras` unchanged.

Serving binds ``127.0.0.1`` unless told otherwise. Importing this module does not import viser.
Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras

log = logging.getLogger(__name__)

__all__ = ["ViewerScene", "load_viewer_scene", "camera_from_pose", "render_rgb", "SceneViewer"]


@dataclass
class ViewerScene:
    gaussians: Gaussians  # unbatched
    cameras: Cameras | None = None  # [V] OpenCV, or None for a bare PLY
    names: list[str] | None = None  # [V]
    held_out: list[int] | None = None  # indices into cameras of the held-out views
    photos: dict[int, Tensor] | None = None  # camera index -> [3, H, W] in [0, 1] (held-out photos)


def load_viewer_scene(source: str | Path) -> ViewerScene:
    """A run folder of ``vision3d reconstruct`` (scene, cameras, held-out photos) or a PLY file."""
    from vision3d.gaussians.ply import load_ply

    src = Path(source)
    ply = src / "scene.ply" if src.is_dir() else src
    if not ply.is_file():
        raise FileNotFoundError(f"{ply}: no scene PLY (expected a run folder with scene.ply, or a .ply file)")
    g = load_ply(ply)
    if g.num == 0:
        raise ValueError(f"{ply}: the PLY holds no Gaussians")
    if not src.is_dir() or not (src / "cameras" / "poses.json").is_file():
        return ViewerScene(g)
    from vision3d.train.reconstruct import load_run

    images, files, cams, _, _, _ = load_run(src)
    held = []
    mpath = src / "metrics.json"
    if mpath.is_file():
        names = [v["image"] for v in json.loads(mpath.read_text()).get("test", {}).get("views", [])]
        held = [files.index(n) for n in names if n in files]
    return ViewerScene(g, cams, files, held, {i: images[i] for i in held})


def camera_from_pose(
    wxyz: np.ndarray,  # [4] camera-to-world rotation, OpenCV camera axes
    position: np.ndarray,  # [3] camera centre, world
    fov_y: float,  # vertical field of view, radians
    width: int,
    height: int,
) -> Cameras:  # batch [1]
    """Pinhole camera of a viewer pose (square pixels, centred principal point)."""
    from vision3d.geometry.rotations import make_rigid, quat_to_matrix

    R = quat_to_matrix(torch.as_tensor(np.asarray(wxyz, dtype=np.float64)))
    c2w = make_rigid(R, torch.as_tensor(np.asarray(position, dtype=np.float64)))
    f = 0.5 * height / math.tan(0.5 * fov_y)
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return Cameras(K[None].float(), c2w[None].float(), int(width), int(height))


def render_rgb(g: Gaussians, camera: Cameras, background=(0.0, 0.0, 0.0), backend: str = "auto") -> np.ndarray:
    """``[H, W, 3]`` uint8 render of one camera (batch [1])."""
    from vision3d.render import rasterize

    bg = torch.tensor(background, dtype=torch.float32, device=g.device)
    with torch.no_grad():
        out = rasterize(g, camera.to(g.device), background=bg, mode="RGB", backend=backend)
    return (out.colors[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


class SceneViewer:
    """Serve ``scene`` with viser; each client's camera is rendered with our renderer."""

    def __init__(
        self,
        scene: ViewerScene,
        host: str = "127.0.0.1",
        port: int = 8080,
        render_width: int = 320,
        backend: str = "auto",
        frustum_scale: float | None = None,
    ):
        from vision3d.utils.optional import require

        viser = require("viser", "vision3d view")
        self.scene = scene
        self.render_width = int(render_width)
        self.backend = backend
        self.renders = 0
        self._busy: dict[int, bool] = {}
        self._dirty: dict[int, bool] = {}
        self._lock = threading.Lock()
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        if scene.cameras is not None:
            self._add_cameras(frustum_scale)
        self.server.on_client_connect(self._on_connect)

    @property
    def port(self) -> int:
        return int(self.server.get_port())

    def _add_cameras(self, frustum_scale: float | None) -> None:
        from vision3d.geometry.rotations import matrix_to_quat

        cams = self.scene.cameras
        centres = cams.centers.double()
        up = -cams.rotation[..., :, 1].double().mean(0)
        if float(up.norm()) > 1e-6:
            self.server.scene.set_up_direction(tuple((up / up.norm()).tolist()))
        if frustum_scale is None:
            d = torch.cdist(centres, centres) + torch.eye(len(cams), dtype=torch.float64) * 1e9
            frustum_scale = 0.5 * float(d.min(-1).values.median()) if len(cams) > 1 else 0.1
        q = matrix_to_quat(cams.rotation.double())
        fov_y = 2 * torch.atan(0.5 * cams.height / cams.K[:, 1, 1].double())
        held = set(self.scene.held_out or [])
        photos = self.scene.photos or {}
        for i in range(len(cams)):
            name = (self.scene.names or [f"{i:04d}"] * len(cams))[i]
            photo = photos.get(i)
            self.server.scene.add_camera_frustum(
                f"/cameras/{'held_out' if i in held else 'train'}/{Path(name).stem}",
                fov=float(fov_y[i]),
                aspect=cams.width / cams.height,
                scale=frustum_scale,
                color=(255, 140, 0) if i in held else (40, 40, 40),
                image=None if photo is None else (photo.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8),
                wxyz=q[i].numpy(),
                position=centres[i].numpy(),
            )

    def _on_connect(self, client) -> None:
        cams = self.scene.cameras
        if cams is not None:  # start at the first camera
            from vision3d.geometry.rotations import matrix_to_quat

            with client.atomic():
                client.camera.wxyz = matrix_to_quat(cams.rotation[0].double()).numpy()
                client.camera.position = cams.centers[0].double().numpy()
        client.camera.on_update(lambda _cam: self._request(client))
        self._request(client)

    def _request(self, client) -> None:
        cid = client.client_id
        with self._lock:
            if self._busy.get(cid):
                self._dirty[cid] = True
                return
            self._busy[cid] = True
        try:
            while True:
                self._dirty[cid] = False
                self.render_client(client)
                with self._lock:
                    if not self._dirty.get(cid):
                        self._busy[cid] = False
                        return
        except Exception:
            with self._lock:
                self._busy[cid] = False
            raise

    def render_client(self, client) -> np.ndarray:
        cam = client.camera
        aspect = float(cam.aspect) if cam.aspect and cam.aspect > 0 else 4 / 3
        w = self.render_width
        h = max(8, round(w / aspect))
        img = render_rgb(self.scene.gaussians, camera_from_pose(cam.wxyz, cam.position, float(cam.fov), w, h),
                         backend=self.backend)
        client.scene.set_background_image(img, format="jpeg")
        self.renders += 1
        return img

    def stop(self) -> None:
        self.server.stop()
