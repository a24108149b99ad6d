"""Serve a reconstruction in the browser with viser (the ``[viewer]`` extra).

Examples::

    vision3d view runs/garden                 # http://127.0.0.1:8080
    vision3d view scene.ply --port 0          # any free port (printed)
    vision3d view runs/garden --mode rgb      # start with vision3d's exact renders instead of browser splats
    vision3d view runs/garden --host 0.0.0.0  # reachable from other machines: only on a trusted network

The page draws the Gaussians in the browser (viser's splats) or with vision3d's renderer (rgb, depth,
alpha), the run's cameras as frusta (held-out ones in orange, with their photos; click one to jump to
its view), and a vision3d panel with filters, a crop box, export and the run's metrics. It opens at
the first training camera. ``vision3d reconstruct --view`` serves a scene while it is fitted. See
:mod:`vision3d.viewer.app`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro


@dataclass
class Args:
    source: Annotated[Path, tyro.conf.Positional]
    """A run folder of vision3d reconstruct or vision3d demo, or a scene .ply."""

    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the page on this machine, 0.0.0.0 serves it to the network."""

    port: int = 8080
    """Port to serve on; a busy port is an error; 0 picks a free one (printed)."""

    mode: Literal["splats", "rgb", "depth", "alpha"] = "splats"
    """Starting mode: splats (drawn by the browser's GPU) or vision3d's renderer (rgb, depth, alpha)."""

    render_width: int = 640
    """Width of vision3d's renders at rest in the rgb/depth/alpha modes (a slider on the page)."""

    preview_width: int = 160
    """Width of vision3d's renders while the camera moves."""

    device: str = "auto"
    """Torch device of vision3d's renderer: auto (cuda when available), cpu, cuda, cuda:1..."""

    seconds: float | None = None
    """Stop after this many seconds (default: serve until Ctrl-C)."""


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name}: not a torch device (expected auto, cpu, cuda or cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return dev


def run(args: Args) -> int:
    from vision3d.utils.optional import MissingDependencyError
    from vision3d.viewer.app import SceneViewer, is_loopback, load_viewer_scene

    try:
        dev = _device(args.device)
        scene = load_viewer_scene(args.source)
        scene.gaussians = scene.gaussians.to(dev)
        viewer = SceneViewer(scene, host=args.host, port=args.port, render_width=args.render_width,
                             preview_width=args.preview_width, mode=args.mode,
                             backend="gsplat" if dev.type == "cuda" else "torch")
    except MissingDependencyError as e:
        print(f"vision3d view: error: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"vision3d view: error: {e}", file=sys.stderr)
        return 2
    urls = viewer.urls
    print(f"vision3d view: {scene.gaussians.num} Gaussians (renderer on {dev}) at {urls[0]} (Ctrl-C to stop)")
    for u in urls[1:]:
        print(f"vision3d view: also at {u}")
    if not is_loopback(args.host):
        print(f"vision3d view: warning: --host {args.host} serves the scene to the network, without authentication",
              file=sys.stderr)
    try:
        t0 = time.monotonic()
        while args.seconds is None or time.monotonic() - t0 < args.seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.stop()
    return 0
