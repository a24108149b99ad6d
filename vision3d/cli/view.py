"""Serve a reconstruction in the browser with viser (the ``[viewer]`` extra).

Examples::

    vision3d view runs/garden                 # http://127.0.0.1:8080
    vision3d view scene.ply --port 8090
    vision3d view runs/garden --host 0.0.0.0  # reachable from other machines: only on a trusted network

The page shows the Gaussians rendered with vision3d's renderer from your camera, the run's cameras
as frusta (held-out ones in orange, with their photos). See :mod:`vision3d.viewer.app`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro


@dataclass
class Args:
    source: Annotated[Path, tyro.conf.Positional]
    """A run folder of vision3d reconstruct or a scene .ply."""

    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 keeps the page on this machine."""

    port: int = 8080
    """Port to serve on (viser moves to the next free one if it is taken)."""

    render_width: int = 320
    """Width of the renders sent to the browser (the CPU renderer is the bottleneck)."""

    device: str = "auto"
    """Torch device of the renderer: auto (cuda when available), cpu, cuda."""

    seconds: float | None = None
    """Stop after this many seconds (default: serve until Ctrl-C)."""


def run(args: Args) -> int:
    import torch

    from vision3d.utils.optional import MissingDependencyError
    from vision3d.viewer.app import SceneViewer, load_viewer_scene

    try:
        scene = load_viewer_scene(args.source)
        dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                           ("cpu" if args.device == "auto" else args.device))
        scene.gaussians = scene.gaussians.to(dev)
        viewer = SceneViewer(scene, host=args.host, port=args.port, render_width=args.render_width)
    except MissingDependencyError as e:
        print(f"vision3d view: error: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"vision3d view: error: {e}", file=sys.stderr)
        return 2
    print(f"vision3d view: {scene.gaussians.num} Gaussians at http://{args.host}:{viewer.port} (Ctrl-C to stop)")
    try:
        t0 = time.monotonic()
        while args.seconds is None or time.monotonic() - t0 < args.seconds:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.stop()
    return 0
