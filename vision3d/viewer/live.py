"""The viewer on a scene being fitted: ``vision3d reconstruct --view``.

:class:`LiveViewer` is a ``fit_scene`` callback (``callback(step, gaussians, entry)``, called at every
history entry, i.e. every ``fit.log_every`` steps). On its first call it opens a
:class:`~vision3d.viewer.app.SceneViewer` on the fit's Gaussians with the run folder's cameras
(``cameras/``, written before the fit), adding a "Training" panel: step, loss and PSNR of the last
history entry, a progress bar and a pause button. While paused, the callback holds the fit (as
nerfstudio's viewer does) and the page stays interactive. The scene is replaced every ``every``
calls. Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from vision3d.gaussians import Gaussians

log = logging.getLogger(__name__)

__all__ = ["LiveViewer"]


class LiveViewer:
    """``fit_scene`` callback that serves the scene being fitted; :meth:`close` stops the server."""

    def __init__(
        self,
        run: str | Path | None = None,  # run folder whose cameras/ (and images/) to show, or None
        host: str = "127.0.0.1",
        port: int = 8080,
        total_steps: int | None = None,
        every: int = 1,
        held_out: list[int] | None = None,  # indices into the run's cameras of the held-out views
        announce=print,  # called once with the viewer's URL line
        **viewer_kwargs,
    ):
        from vision3d.utils.optional import require
        from vision3d.viewer.app import check_port

        require("viser", "--view (the live viewer)")  # before the fit starts, not at its first entry
        if every < 1:
            raise ValueError(f"every={every}: expected >= 1 (history entries between scene updates)")
        self.run, self.host, self.total_steps, self.every = run, host, total_steps, int(every)
        self.port = check_port(host, port)  # a busy port fails before the fit starts, not at its first entry
        self.held_out = held_out
        self.announce = announce
        self.viewer_kwargs = viewer_kwargs
        self.viewer = None
        self.calls = 0
        self.updates = 0
        self.last: dict = {}
        self._resume = threading.Event()
        self._resume.set()

    @property
    def paused(self) -> bool:
        return not self._resume.is_set()

    def pause(self, paused: bool = True) -> None:
        if paused:
            self._resume.clear()
        else:
            self._resume.set()
        if self.viewer is not None:
            self._pause_button.label = "Resume training" if paused else "Pause training"
            self._status()

    def _open(self, g: Gaussians) -> None:
        from vision3d.viewer.app import SceneViewer, ViewerScene

        scene = ViewerScene(g.detach(), source=Path(self.run) if self.run is not None else None)
        if self.run is not None and (Path(self.run) / "cameras" / "poses.json").is_file():
            from vision3d.train.reconstruct import load_run

            images, files, cams, _, _, _ = load_run(self.run)
            held = [i for i in (self.held_out or []) if 0 <= i < len(files)]
            scene = ViewerScene(g.detach(), cams, files, held, {i: images[i] for i in held}, source=Path(self.run))
        self.viewer = v = SceneViewer(scene, host=self.host, port=self.port, **self.viewer_kwargs)
        gui = v.server.gui
        with gui.add_folder("Training", order=-1):
            self._text = gui.add_markdown("")
            self._bar = gui.add_progress_bar(0.0)
            self._pause_button = gui.add_button("Pause training")
            self._pause_button.on_click(lambda _: self.pause(not self.paused))
        self.announce(f"vision3d: live viewer at {v.urls[0]} (updates every {self.every} log entries)")

    def _status(self) -> None:
        e = self.last
        total = f" / {self.total_steps}" if self.total_steps else ""
        state = " (paused)" if self.paused else ""
        self._text.content = (f"step {e.get('step', 0)}{total}{state}, loss {e.get('loss', float('nan')):.4f}, "
                              f"PSNR {e.get('psnr', float('nan')):.2f} dB, {e.get('num_gaussians', '?')} Gaussians")
        if self.total_steps:
            self._bar.value = min(100.0, 100.0 * e.get("step", 0) / self.total_steps)

    def __call__(self, step: int, gaussians: Gaussians, entry: dict) -> None:
        self.last = {**entry, "step": step}
        if self.viewer is None:
            self._open(gaussians)
        elif self.calls % self.every == 0 or (self.total_steps and step >= self.total_steps):
            self.viewer.set_gaussians(gaussians.detach())
            self.updates += 1
        self.calls += 1
        self._status()
        while not self._resume.wait(timeout=0.2):  # paused: hold the fit, keep the page live
            if self.viewer is None:
                break

    def close(self) -> None:
        self._resume.set()
        if self.viewer is not None:
            self.viewer.stop()
            self.viewer = None
