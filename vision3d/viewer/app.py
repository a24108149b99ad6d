"""A viser page for a reconstruction: the Gaussians drawn in the browser, our exact renders on demand,
the run's cameras, held-out photos and metrics, filters and export.

viser (nerfstudio-project/viser, Apache-2.0; the ``[viewer]`` extra) serves the page. Two ways of
drawing the scene, switched in the "vision3d" panel:

- ``splats`` (default): the Gaussians are converted once (centres, covariances ``R S S^T R^T``,
  SH-degree-0 colours, opacities; viser 1.x draws no view-dependent colour) and sent to viser's
  in-browser splat renderer (``add_gaussian_splats``), which sorts and draws on the browser's GPU,
  so the view is sharp at the window's resolution and moves smoothly on any server;
- ``rgb`` / ``depth`` / ``alpha``: each camera change is answered by :func:`vision3d.render.rasterize`
  (the PyTorch twin on the CPU, gsplat on a GPU), sent as the page's background image: exactly what
  ``vision3d render`` and the metrics see. A low-resolution frame follows the camera while it
  moves and a full-resolution one (the "render width" slider) replaces it once it rests.

The panel also holds opacity/scale thresholds and a crop box (with the live count of Gaussians
kept; both drawing modes show the filtered scene), export of the filtered scene as PLY or .splat
(the writers of ``vision3d export``), the run's ``metrics.json``, and the camera list: "go to view"
(or a click on a frustum) gives the browser camera that camera's pose and field of view; a held-out
camera shows its photo, our render and their PSNR side by side. The page opens at the first
training camera, with its field of view, and viser's "Reset View" returns there (a bare PLY: outside
the bulk of the scene, looking at its centre). :mod:`vision3d.viewer.live` serves a scene being fitted.

viser's client camera is OpenCV-like (``+z`` forward, ``+y`` down) with a vertical field of view,
so poses go into :class:`~vision3d.geometry.Cameras` unchanged. Serving binds ``127.0.0.1`` unless
told otherwise; a busy port is an error (viser alone would move to the next free one).
Importing this module does not import viser. Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "ViewerScene",
    "load_viewer_scene",
    "camera_from_pose",
    "render_rgb",
    "render_view",
    "splat_arrays",
    "filter_mask",
    "colorize_depth",
    "check_port",
    "reachable_urls",
    "is_loopback",
    "SceneViewer",
]

MODES = ("splats", "rgb", "depth", "alpha")  # drawing modes of the panel


@dataclass
class ViewerScene:
    gaussians: Gaussians  # unbatched
    cameras: Cameras | None = None  # [V] OpenCV, or None for a bare PLY
    names: list[str] | None = None  # [V]
    held_out: list[int] | None = None  # indices into cameras of the held-out views
    photos: dict[int, Tensor] | None = None  # camera index -> [3, H, W] in [0, 1] (held-out photos)
    metrics: dict = field(default_factory=dict)  # the run's metrics.json ({} without one)
    source: Path | None = None  # the run folder or PLY the scene came from
    sizes: list[tuple[int, int]] | None = None  # [V] (width, height) per view when the photos' sizes differ

    def size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of view ``i``."""
        return self.sizes[i] if self.sizes else (self.cameras.width, self.cameras.height)

    def camera(self, i: int) -> Cameras:  # batch [1], at view i's own size
        w, h = self.size(i)
        return Cameras(self.cameras.K[i : i + 1], self.cameras.cam_to_world[i : i + 1], w, h)

    def fov_y(self, i: int) -> float:
        """Vertical field of view of view ``i``, radians."""
        return float(fov_y_of(self.camera(i))[0])


def load_viewer_scene(source: str | Path) -> ViewerScene:
    """A run folder of ``vision3d reconstruct`` / ``vision3d demo`` (scene, cameras, held-out photos,
    metrics) or a PLY file."""
    from vision3d.gaussians.ply import load_ply

    src = Path(source)
    ply = src / "scene.ply" if src.is_dir() else src
    if not ply.is_file():
        raise FileNotFoundError(f"{ply}: no scene PLY (expected a run folder with scene.ply, or a .ply file)")
    g = load_ply(ply)
    if g.num == 0:
        raise ValueError(f"{ply}: the PLY holds no Gaussians")
    metrics = {}
    mpath = src / "metrics.json"
    if src.is_dir() and mpath.is_file():
        try:
            metrics = json.loads(mpath.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{mpath}: not readable JSON ({e})") from e
        if not isinstance(metrics, dict):
            raise ValueError(f"{mpath}: expected a JSON object, got {type(metrics).__name__}")
    if not src.is_dir() or not (src / "cameras" / "poses.json").is_file():
        return ViewerScene(g, metrics=metrics, source=src)
    from vision3d.train.reconstruct import load_run

    images, files, cams, _, _, _ = load_run(src)
    sizes = None
    if not isinstance(cams, Cameras):  # per-photo sizes: one batch of poses and K, each view keeps its size
        sizes = [(c.width, c.height) for c in cams]
        cams = Cameras(torch.cat([c.K for c in cams]), torch.cat([c.cam_to_world for c in cams]), *sizes[0])
    names = [v.get("image") for v in (metrics.get("test", {}) or {}).get("views", []) if isinstance(v, dict)]
    held = [files.index(n) for n in names if n in files]
    return ViewerScene(g, cams, files, held, {i: images[i] for i in held}, metrics, src, sizes)


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


def fov_y_of(cameras: Cameras) -> Tensor:  # [V] vertical field of view, radians
    return 2 * torch.atan(0.5 * cameras.height / cameras.K[..., 1, 1].double())


# anchor colours of the depth colour map (near: dark blue, through cyan, green, yellow, to far: dark red)
_DEPTH_ANCHORS = np.array(
    [[48, 18, 59], [50, 100, 230], [30, 190, 220], [60, 240, 120], [190, 240, 50], [250, 180, 40], [230, 80, 20],
     [122, 4, 3]], dtype=np.float64,
)  # fmt: skip


def colorize_depth(
    depth: np.ndarray,  # [H, W] z-depth, world units
    alpha: np.ndarray,  # [H, W] accumulated opacity in [0, 1]
    background=(0.0, 0.0, 0.0),
) -> np.ndarray:  # [H, W, 3] uint8
    """Depth through a blue-to-red colour map, stretched over the 2-98 % depth range of covered pixels,
    blended over ``background`` by ``alpha``."""
    covered = (alpha > 0.5) & np.isfinite(depth)
    if covered.any():
        lo, hi = np.percentile(depth[covered], [2, 98])
    else:
        lo, hi = 0.0, 1.0
    t = np.clip((np.nan_to_num(depth) - lo) / max(hi - lo, 1e-8), 0, 1) * (len(_DEPTH_ANCHORS) - 1)
    i = np.minimum(t.astype(np.int64), len(_DEPTH_ANCHORS) - 2)
    w = (t - i)[..., None]
    rgb = (_DEPTH_ANCHORS[i] * (1 - w) + _DEPTH_ANCHORS[i + 1] * w) / 255.0
    a = np.clip(alpha, 0, 1)[..., None]
    out = rgb * a + np.asarray(background, dtype=np.float64) * (1 - a)
    return (out * 255 + 0.5).astype(np.uint8)


def render_view(
    g: Gaussians,
    camera: Cameras,  # batch [1]
    mode: str = "rgb",  # rgb | depth | alpha
    background=(0.0, 0.0, 0.0),
    backend: str = "auto",
) -> np.ndarray:  # [H, W, 3] uint8
    """One frame of our renderer: colour, colour-mapped depth, or accumulated opacity (grey)."""
    from vision3d.render import rasterize

    if mode not in ("rgb", "depth", "alpha"):
        raise ValueError(f"render_view: mode {mode!r} is not one of rgb, depth, alpha")
    bg = torch.tensor(background, dtype=torch.float32, device=g.device)
    with torch.no_grad():
        out = rasterize(g, camera.to(g.device), background=bg, mode="RGB" if mode == "rgb" else "RGB+ED",
                        backend=backend)
    if mode == "rgb":
        return (out.colors[0].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    alpha = out.alphas[0, 0].clamp(0, 1).cpu().numpy()
    if mode == "alpha":
        return np.repeat((alpha[..., None] * 255 + 0.5).astype(np.uint8), 3, -1)
    return colorize_depth(out.depths[0, 0].cpu().numpy(), alpha, background)


def render_rgb(g: Gaussians, camera: Cameras, background=(0.0, 0.0, 0.0), backend: str = "auto") -> np.ndarray:
    """``[H, W, 3]`` uint8 render of one camera (batch [1])."""
    return render_view(g, camera, "rgb", background, backend)


def splat_arrays(g: Gaussians) -> dict[str, np.ndarray]:
    """The arrays of viser's ``add_gaussian_splats``: ``centers`` [N, 3], ``covariances`` [N, 3, 3] (world),
    ``rgbs`` [N, 3] in [0, 1] (SH degree 0) and ``opacities`` [N, 1]."""
    from vision3d.render.torch_backend import covariances_3d

    with torch.no_grad():
        cov = covariances_3d(g.quats.float(), g.scales.float())
        return {
            "centers": g.means.float().cpu().numpy(),
            "covariances": cov.cpu().numpy(),
            "rgbs": g.rgb.float().cpu().numpy(),
            "opacities": g.opacities.float().clamp(0, 1)[..., None].cpu().numpy(),
        }


def filter_mask(
    g: Gaussians,
    min_opacity: float = 0.0,
    max_scale: float | None = None,  # world units; the largest axis of a kept Gaussian is at most this
    lo=None,  # [3] crop box corner (world), or None for no crop
    hi=None,  # [3]
) -> Tensor:  # [N] bool
    """The Gaussians the viewer's filters keep."""
    from vision3d.gaussians.ops import crop_mask

    keep = g.opacities >= float(min_opacity)
    if max_scale is not None:
        keep &= g.scales.amax(-1) <= float(max_scale)
    if lo is not None and hi is not None:
        keep &= crop_mask(g, lo, hi)
    return keep


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> int:
    """``port`` if it is free on ``host`` (or a free one picked by the system for ``port == 0``);
    a busy port raises ``OSError`` naming it."""
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"--port {port}: expected 0 (pick a free one) to 65535")
    bind_host = "" if host in ("0.0.0.0", "::") else host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((bind_host, int(port)))
        except OSError as e:
            raise OSError(f"port {port} on {host} is busy ({e.strerror}); choose another with --port, or --port 0 "
                          "to pick a free one") from e
        return int(s.getsockname()[1])


def reachable_urls(host: str, port: int) -> list[str]:
    """The URLs a browser can open: ``http://127.0.0.1:port`` for loopback, the machine's addresses for a
    wildcard host (``0.0.0.0``), else the host itself."""
    if is_loopback(host):
        return [f"http://{host}:{port}"]
    if host not in ("0.0.0.0", "::", ""):
        return [f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"]
    addrs = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addrs.append(info[4][0])
    except OSError:
        pass
    try:  # the address of the default route (a UDP connect sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.254.254.254", 1))
            addrs.append(s.getsockname()[0])
    except OSError:
        pass
    seen = [a for i, a in enumerate(addrs) if a not in addrs[:i] and not a.startswith("127.")]
    return [f"http://{a}:{port}" for a in seen] + [f"http://127.0.0.1:{port}"]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:  # uint8 images of one shape
    from vision3d.eval.metrics import psnr

    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255
    return float(psnr(ta, tb)[0])


def _to_uint8(img: Tensor) -> np.ndarray:  # [3, H, W] in [0, 1] -> [H, W, 3]
    return (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)


class _ClientRenderer(threading.Thread):
    """Per-browser render loop of the renderer modes: a preview frame per camera change while it moves, a
    full-resolution frame once the camera has rested ``settle_s``."""

    def __init__(self, viewer: "SceneViewer", client):
        super().__init__(daemon=True, name=f"vision3d-view-{client.client_id}")
        self.viewer, self.client = viewer, client
        self.wake = threading.Event()
        self.stopped = False
        self.generation = 0
        self.last_change = time.monotonic()
        self.shown: tuple | None = None  # (generation, full) of the frame on the page, or ("splats",)

    def poke(self) -> None:
        self.generation += 1
        self.last_change = time.monotonic()
        self.wake.set()

    def run(self) -> None:
        v = self.viewer
        while not self.stopped:
            woke = self.wake.wait(timeout=0.05)
            self.wake.clear()
            if self.stopped:
                return
            try:
                if v.mode == "splats":
                    if self.shown != ("splats",):
                        self.client.scene.set_background_image(None)
                        self.shown = ("splats",)
                    continue
                gen = self.generation
                rested = time.monotonic() - self.last_change >= v.settle_s
                if woke and not rested and self.shown != (gen, False):
                    v.render_client(self.client, full=False)
                    self.shown = (gen, False)
                elif rested and self.shown != (gen, True):
                    v.render_client(self.client, full=True)
                    self.shown = (gen, True)
            except Exception:  # a tab closed mid-render: the client is gone, nothing to report
                if self.stopped or self.client.client_id not in v.server.get_clients():
                    return
                log.exception("vision3d view: render for client %s failed", self.client.client_id)
                time.sleep(0.5)


class SceneViewer:
    """Serve ``scene`` with viser: splats in the browser by default, our renderer as a mode, a vision3d panel."""

    def __init__(
        self,
        scene: ViewerScene,
        host: str = "127.0.0.1",
        port: int = 8080,
        render_width: int = 640,
        backend: str = "auto",
        frustum_scale: float | None = None,
        mode: str = "splats",
        preview_width: int = 160,
        settle_s: float = 0.3,
        start_camera: int | None = None,
    ):
        from vision3d.utils.optional import require

        viser = require("viser", "vision3d view")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        if render_width < 16 or preview_width < 16:
            raise ValueError(f"render_width {render_width} / preview_width {preview_width}: expected >= 16 pixels")
        self.scene = scene
        self.render_width = int(render_width)
        self.preview_width = int(preview_width)
        self.settle_s = float(settle_s)
        self.backend = backend
        self.mode = mode
        self.renders = 0
        self.last_frames: dict[int, np.ndarray] = {}  # client id -> the last frame sent by our renderer
        self._renderers: dict[int, _ClientRenderer] = {}  # connected clients
        self._threads: list[_ClientRenderer] = []  # every render thread started, joined by stop()
        self._gone: set[int] = set()  # ids of disconnected clients
        self._lock = threading.Lock()
        self.host = host
        want = check_port(host, port)
        self.server = viser.ViserServer(host=host, port=want, verbose=False)
        if self.port != want:  # someone took it between the check and the bind: viser moved on silently
            got = self.port
            self.server.stop()
            raise OSError(f"port {want} on {host} became busy while starting (viser moved to {got}); retry, or "
                          "use --port 0")
        try:
            self._setup(scene, frustum_scale, start_camera)
        except BaseException:  # nothing left serving half a page
            self.server.stop()
            raise

    def _setup(self, scene: ViewerScene, frustum_scale: float | None, start_camera: int | None) -> None:
        self.server.gui.configure_theme(control_width="medium")
        g = scene.gaussians
        self._full = g
        self._keep = torch.ones(g.num, dtype=torch.bool, device=g.device)
        self.filtered = g
        self._splats = None
        self._frusta: dict[int, object] = {}
        self.start_index = None
        if scene.cameras is not None:
            train = [i for i in range(len(scene.cameras)) if i not in set(scene.held_out or [])]
            if start_camera is not None and not 0 <= start_camera < len(scene.cameras):
                raise ValueError(f"start_camera {start_camera}: expected 0..{len(scene.cameras) - 1} "
                                 "(the run's cameras)")
            self.start_index = start_camera if start_camera is not None else (train[0] if train else 0)
            self._add_cameras(frustum_scale)
            self._set_initial_camera(self.start_index)
        else:  # a bare PLY: look at the bulk of the scene from outside it
            from vision3d.gaussians.ops import scene_bounds

            lo, hi = (x.double().cpu() for x in scene_bounds(g, quantile=0.95))
            centre, size = (lo + hi) / 2, float((hi - lo).norm().clamp_min(1e-3))
            self.server.initial_camera.look_at = centre.numpy()
            self.server.initial_camera.position = (centre + size * torch.tensor([1.0, 1.0, 1.0]) / 3**0.5).numpy()
        self._build_panel()
        self._update_splats()
        self.server.on_client_connect(self._on_connect)
        self.server.on_client_disconnect(self._on_disconnect)

    # ------------------------------------------------------------------ serving
    @property
    def port(self) -> int:
        return int(self.server.get_port())

    @property
    def urls(self) -> list[str]:
        return reachable_urls(self.host, self.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving; waits for renders in flight (a thread left inside torch at exit aborts the process)."""
        for r in self._threads:
            r.stopped = True
            r.wake.set()
        self.server.stop()
        t0 = time.monotonic()
        for r in self._threads:
            r.join(max(0.0, timeout - (time.monotonic() - t0)))

    # ------------------------------------------------------------------ cameras
    def camera_view(self, i: int) -> dict:
        """Pose of run camera ``i`` for viser: ``wxyz``, ``position``, ``look_at``, ``up`` (world) and ``fov``
        (vertical, radians)."""
        from vision3d.geometry.rotations import matrix_to_quat

        cams = self.scene.cameras
        R = cams.rotation[i].double()
        c = cams.centers[i].double()
        centres = cams.centers.double()
        dist = float((centres - centres.mean(0)).norm(dim=-1).mean()) if len(cams) > 1 else 1.0
        dist = max(dist, 1e-3)
        return {
            "wxyz": matrix_to_quat(R).numpy(),
            "position": c.numpy(),
            "look_at": (c + R[:, 2] * dist).numpy(),
            "up": (-R[:, 1]).numpy(),
            "fov": self.scene.fov_y(i),
        }

    def _set_initial_camera(self, i: int) -> None:
        v = self.camera_view(i)
        ic = self.server.initial_camera
        ic.position = v["position"]
        ic.look_at = v["look_at"]
        ic.up = v["up"]
        ic.fov = v["fov"]

    def _add_cameras(self, frustum_scale: float | None) -> None:
        cams = self.scene.cameras
        centres = cams.centers.double()
        up = -cams.rotation[..., :, 1].double().mean(0)
        if float(up.norm()) > 1e-6:
            self.server.scene.set_up_direction(tuple((up / up.norm()).tolist()))
        if frustum_scale is None:
            d = torch.cdist(centres, centres) + torch.eye(len(cams), dtype=torch.float64) * 1e9
            # small enough that no frustum's photo covers the view from a neighbouring camera
            frustum_scale = 0.15 * float(d.min(-1).values.median()) if len(cams) > 1 else 0.05
        held = set(self.scene.held_out or [])
        photos = self.scene.photos or {}
        for i in range(len(cams)):
            v = self.camera_view(i)
            photo = photos.get(i)
            h = self.server.scene.add_camera_frustum(
                f"/cameras/{'held_out' if i in held else 'train'}/{Path(self._name(i)).stem}",
                fov=self.scene.fov_y(i),
                aspect=self.scene.size(i)[0] / self.scene.size(i)[1],
                scale=frustum_scale,
                color=(255, 140, 0) if i in held else (40, 40, 40),
                image=None if photo is None else _to_uint8(photo),
                wxyz=v["wxyz"],
                position=v["position"],
            )
            h.on_click(lambda event, i=i: self.go_to_view(event.client, i))
            self._frusta[i] = h

    def _name(self, i: int) -> str:
        return self.scene.names[i] if self.scene.names else f"{i:04d}"

    def go_to_view(self, client, i: int) -> None:
        """Give ``client``'s browser camera the pose and field of view of run camera ``i``; a held-out camera
        also shows its photo, our render and their PSNR in the panel."""
        v = self.camera_view(i)
        with client.atomic():
            client.camera.fov = v["fov"]
            client.camera.wxyz = v["wxyz"]
            client.camera.position = v["position"]
        if hasattr(self, "_gui_camera") and self._gui_camera.value != self._camera_label(i):
            self._gui_camera.value = self._camera_label(i)
        self._show_comparison(i)

    def comparison(self, i: int) -> tuple[np.ndarray, float | None, float | None]:
        """``(photo | render side by side [H, 2W + 4, 3] uint8, PSNR of the render now, PSNR in metrics.json)``
        of held-out camera ``i``."""
        photo = _to_uint8(self.scene.photos[i])
        render = render_view(self.filtered, self.scene.camera(i), "rgb", backend=self.backend)
        sep = np.full((photo.shape[0], 4, 3), 255, np.uint8)
        recorded = None
        for view in (self.scene.metrics.get("test", {}) or {}).get("views", []):
            if isinstance(view, dict) and view.get("image") == self._name(i) and "psnr" in view:
                recorded = float(view["psnr"])
        return np.concatenate([photo, sep, render], 1), _psnr(render, photo), recorded

    def _show_comparison(self, i: int) -> None:
        if not hasattr(self, "_gui_compare"):
            return
        if i not in (self.scene.photos or {}):
            self._gui_compare.visible = False
            self._gui_compare_text.content = f"**{self._name(i)}**: training view"
            return
        img, now, recorded = self.comparison(i)
        self._gui_compare.image = img
        self._gui_compare.visible = True
        rec = f", {recorded:.2f} dB in metrics.json" if recorded is not None else ""
        self._gui_compare_text.content = f"**{self._name(i)}** (held out): photo | render, PSNR {now:.2f} dB{rec}"

    def _camera_label(self, i: int) -> str:
        return f"{i}: {self._name(i)}" + (" (held out)" if i in set(self.scene.held_out or []) else "")

    # ------------------------------------------------------------------ panel
    def _build_panel(self) -> None:
        gui = self.server.gui
        g = self._full
        with gui.add_folder("vision3d"):
            self._gui_mode = gui.add_dropdown("Mode", MODES, initial_value=self.mode,
                                              hint="splats: drawn by the browser; rgb/depth/alpha: vision3d's renderer")
            self._gui_width = gui.add_slider("Render width", min=64, max=1920, step=16,
                                             initial_value=min(1920, max(64, self.render_width)),
                                             hint="width of vision3d's renders at rest (rgb/depth/alpha)")
            self._gui_mode.on_update(lambda _: self.set_mode(self._gui_mode.value))
            self._gui_width.on_update(lambda _: self._set_render_width(self._gui_width.value))
        with gui.add_folder("Filter"):
            smax = float(g.scales.amax(-1).max())
            lo, hi = (x.cpu() for x in self._bounds())
            self._gui_opacity = gui.add_slider("Min opacity", min=0.0, max=1.0, step=0.01, initial_value=0.0)
            self._gui_scale = gui.add_slider("Max scale", min=0.0, max=max(smax, 1e-6), step=max(smax, 1e-6) / 200,
                                             initial_value=max(smax, 1e-6))
            self._gui_lo = gui.add_vector3("Crop min", initial_value=tuple(lo.tolist()))
            self._gui_hi = gui.add_vector3("Crop max", initial_value=tuple(hi.tolist()))
            self._gui_count = gui.add_markdown(f"{g.num} of {g.num} Gaussians")
            self._crop_default = (tuple(self._gui_lo.value), tuple(self._gui_hi.value))
            self._quiet = False
            for h in (self._gui_opacity, self._gui_scale, self._gui_lo, self._gui_hi):
                h.on_update(lambda _: self._apply_filter())
        with gui.add_folder("Export", expand_by_default=False):
            default = (self.scene.source if self.scene.source and self.scene.source.is_dir()
                       else (self.scene.source.parent if self.scene.source else Path.cwd()))
            self._gui_format = gui.add_dropdown("Format", ("ply", "splat"), initial_value="ply")
            self._gui_path = gui.add_text("File", initial_value=str(default / "filtered.ply"))
            self._gui_format.on_update(lambda _: setattr(
                self._gui_path, "value", str(Path(self._gui_path.value).with_suffix("." + self._gui_format.value))))
            self._gui_export = gui.add_button("Export filtered scene")
            self._gui_export_text = gui.add_markdown("")
            self._gui_export.on_click(lambda _: self._export_clicked())
        if self.scene.metrics:
            with gui.add_folder("Metrics"):
                gui.add_markdown(self.metrics_markdown())
        if self.scene.cameras is not None:
            with gui.add_folder("Cameras"):
                labels = tuple(self._camera_label(i) for i in range(len(self.scene.cameras)))
                self._gui_camera = gui.add_dropdown("Camera", labels, initial_value=labels[self.start_index])
                shown = gui.add_checkbox("Show cameras", initial_value=True)
                shown.on_update(lambda _: [setattr(h, "visible", shown.value) for h in self._frusta.values()])
                go = gui.add_button("Go to view")
                go.on_click(lambda event: self.go_to_view(event.client, labels.index(self._gui_camera.value)))
                self._gui_compare_text = gui.add_markdown("Click a frustum or press Go to view.")
                self._gui_compare = gui.add_image(np.zeros((8, 8, 3), np.uint8), label="photo | render", visible=False)

    def _bounds(self) -> tuple[Tensor, Tensor]:
        from vision3d.gaussians.ops import scene_bounds

        lo, hi = scene_bounds(self._full)
        pad = 0.01 * (hi - lo).clamp_min(1e-6)
        return lo - pad, hi + pad

    def metrics_markdown(self) -> str:
        m = self.scene.metrics
        rows = []
        test = m.get("test", {}) if isinstance(m.get("test"), dict) else {}
        for key, label, unit in (("psnr", "held-out PSNR", " dB"), ("ssim", "held-out SSIM", ""),
                                 ("lpips", "held-out LPIPS", "")):
            # reconstruct writes the means as psnr/ssim/lpips, demo as psnr_mean/... beside per-view lists
            value = test.get(f"{key}_mean", test.get(key))
            if isinstance(value, (int, float)):
                rows.append(f"| {label} | {value:.4g}{unit} |")
        train = m.get("train", {}) if isinstance(m.get("train"), dict) else {}
        if isinstance(train.get("psnr_mean"), (int, float)):
            rows.append(f"| train PSNR | {train['psnr_mean']:.4g} dB |")
        for key in ("num_gaussians", "steps"):
            if isinstance(m.get(key), (int, float)):
                rows.append(f"| {key.replace('_', ' ')} | {m[key]} |")
        return "| metric | value |\n|---|---|\n" + "\n".join(rows) if rows else "metrics.json holds no summary"

    # ------------------------------------------------------------------ state changes
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        if self._gui_mode.value != mode:
            self._gui_mode.value = mode
        self._update_splats()  # removed in the renderer modes (the page background shows our frame)
        for r in list(self._renderers.values()):
            r.shown = None
            r.poke()

    def _set_render_width(self, w: int) -> None:
        self.render_width = int(w)
        for r in list(self._renderers.values()):
            r.poke()

    def set_filter(self, min_opacity: float = 0.0, max_scale: float | None = None, lo=None, hi=None) -> int:
        """Keep the Gaussians passing the thresholds and inside the crop box; returns how many remain."""
        with self._lock:
            self._keep = filter_mask(self._full, min_opacity, max_scale, lo, hi)
            from vision3d.gaussians.ops import select

            self.filtered = select(self._full, self._keep)
        self._gui_count.content = f"{self.filtered.num} of {self._full.num} Gaussians"
        self._update_splats()
        for r in list(self._renderers.values()):
            r.poke()
        return self.filtered.num

    def set_gaussians(self, g: Gaussians) -> int:
        """Show a new scene (a live fit's latest Gaussians) through the current filters; returns the count kept."""
        with self._lock:
            self._full = g.to(self._full.device)
        # thresholds left at their defaults (the whole scene) follow the new scene's extent
        self._quiet = True
        try:
            if (tuple(self._gui_lo.value), tuple(self._gui_hi.value)) == self._crop_default:
                lo, hi = (tuple(x.cpu().tolist()) for x in self._bounds())
                self._gui_lo.value, self._gui_hi.value = lo, hi
                self._crop_default = (tuple(self._gui_lo.value), tuple(self._gui_hi.value))
            if self._gui_scale.value >= self._gui_scale.max:
                smax = max(float(g.scales.amax(-1).max()), 1e-6)
                self._gui_scale.max, self._gui_scale.step = smax, smax / 200
                self._gui_scale.value = smax
        finally:
            self._quiet = False
        return self.set_filter(self._gui_opacity.value, self._gui_scale.value, self._gui_lo.value, self._gui_hi.value)

    def _apply_filter(self) -> None:
        if self._quiet:
            return
        self.set_filter(self._gui_opacity.value, self._gui_scale.value, self._gui_lo.value, self._gui_hi.value)

    def _update_splats(self) -> None:
        if self._splats is not None:
            self._splats.remove()
            self._splats = None
        if self.filtered.num == 0 or self.mode != "splats":
            return
        self._splats = self.server.scene.add_gaussian_splats("/scene/splats", **splat_arrays(self.filtered))

    def export(self, path: str | Path, format: str | None = None) -> Path:
        """Write the filtered scene with ``vision3d export``'s writers (PLY: INRIA layout; splat: 32-byte records)."""
        from vision3d.gaussians.ply import save_ply, save_splat

        path = Path(path)
        format = format or path.suffix.lstrip(".").lower()
        if format not in ("ply", "splat"):
            raise ValueError(f"{path}: export format {format!r}: expected ply or splat")
        if self.filtered.num == 0:
            raise ValueError(f"{path}: the filters keep no Gaussians; nothing to export")
        g = self.filtered.to("cpu")
        return save_ply(path, g) if format == "ply" else save_splat(path, g)

    def _export_clicked(self) -> None:
        try:
            p = self.export(self._gui_path.value, self._gui_format.value)
            self._gui_export_text.content = f"wrote {self.filtered.num} Gaussians to `{p}`"
        except (OSError, ValueError) as e:
            self._gui_export_text.content = f"export failed: {e}"

    # ------------------------------------------------------------------ clients
    def _on_connect(self, client) -> None:
        if self.scene.cameras is not None:  # the page may have loaded before the initial camera was sent
            v = self.camera_view(self.start_index)
            with client.atomic():
                client.camera.fov = v["fov"]
                client.camera.wxyz = v["wxyz"]
                client.camera.position = v["position"]
        r = _ClientRenderer(self, client)
        self._renderers[client.client_id] = r
        self._threads = [t for t in self._threads if t.is_alive()] + [r]
        client.camera.on_update(lambda _cam: r.poke())
        r.start()
        r.poke()

    def _on_disconnect(self, client) -> None:
        self._gone.add(client.client_id)
        r = self._renderers.pop(client.client_id, None)
        if r is not None:
            r.stopped = True
            r.wake.set()

    def render_client(self, client, full: bool = True) -> np.ndarray:
        """Render ``client``'s camera in the current renderer mode and send it as the page background."""
        cam = client.camera
        aspect = float(cam.aspect) if cam.aspect and cam.aspect > 0 else 4 / 3
        w = self.render_width if full else min(self.preview_width, self.render_width)
        h = max(8, round(w / aspect))
        with self._lock:
            g = self.filtered
        if g.num == 0:
            img = np.zeros((h, w, 3), np.uint8)
        else:
            img = render_view(g, camera_from_pose(cam.wxyz, cam.position, float(cam.fov), w, h), self.mode,
                              backend=self.backend)
        if client.client_id in self._gone:  # the tab closed during the render: nobody to send it to
            return img
        client.scene.set_background_image(img, format="jpeg" if self.mode != "alpha" else "png")
        self.renders += 1
        self.last_frames[client.client_id] = img
        return img
