"""Export a reconstruction (a run folder of ``vision3d reconstruct`` or a scene PLY) for other viewers and tools.

Formats:

- ``ply``: the INRIA 3DGS layout (SuperSplat, viser, the reference viewers);
- ``splat``: antimatter15's 32-byte records (WebGL splat viewers);
- ``colmap``: a COLMAP text model (``cameras.txt``, ``images.txt``, ``points3D.txt``) of the run's
  cameras, with the Gaussian centres and colours as the points;
- ``transforms``: a nerfstudio ``transforms.json`` of the run's cameras (paths to the run's images).

``colmap`` and ``transforms`` need a run folder (a PLY has no cameras). Every file is written atomically.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro


@dataclass
class Args:
    source: Annotated[Path, tyro.conf.Positional]
    """A run folder of vision3d reconstruct (holding scene.ply and cameras/) or a .ply file."""

    out: Path
    """Output: a file for ply/splat/transforms, a folder for colmap."""

    format: Literal["ply", "splat", "colmap", "transforms"] = "ply"
    """Output format."""

    max_points: int = 100_000
    """colmap: the most Gaussian centres written as points (evenly subsampled)."""


def _scene_path(src: Path) -> Path:
    p = src / "scene.ply" if src.is_dir() else src
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no scene PLY (expected a run folder with scene.ply, or a .ply file)")
    return p


def export(args: Args) -> Path:
    from vision3d.gaussians.ply import load_ply, save_ply, save_splat

    src, out = Path(args.source), Path(args.out)
    if args.format in ("ply", "splat"):
        g = load_ply(_scene_path(src))
        return save_ply(out, g) if args.format == "ply" else save_splat(out, g)
    if not src.is_dir() or not (src / "cameras" / "poses.json").is_file():
        raise ValueError(f"{src}: --format {args.format} needs a run folder of vision3d reconstruct (with cameras/)")
    from vision3d.train.reconstruct import load_run

    _, files, cameras, _, _, _ = load_run(src)
    if args.format == "colmap":
        import torch

        from vision3d.geometry.colmap import write_colmap
        from vision3d.train.reconstruct import colmap_model_of

        g = load_ply(_scene_path(src))
        idx = torch.linspace(0, g.num - 1, min(g.num, args.max_points)).round().long()
        return write_colmap(colmap_model_of(cameras, files, g.means[idx], g.rgb[idx]), out, binary=False)
    from vision3d.geometry.transforms_json import write_transforms_json

    if out.suffix.lower() != ".json":
        out = out / "transforms.json"
    images = [os.path.relpath((src / "images" / f).resolve(), out.parent.resolve()) for f in files]
    write_transforms_json(out, cameras, images)
    return out


def run(args: Args) -> int:
    try:
        path = export(args)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"vision3d export: error: {e}", file=sys.stderr)
        return 2
    print(f"vision3d export: wrote {args.format} -> {path}")
    return 0
