"""Render a Gaussian scene (INRIA PLY) into COLMAP / transforms.json cameras, or along an orbit.

Examples::

    vision3d render scene.ply --cameras path/to/sparse/0 --out renders/
    vision3d render scene.ply --cameras transforms.json --out renders/ --depth-format npy --scale 0.5
    vision3d render scene.ply --orbit 120 --out orbit/

Outputs in ``--out``:

- ``images/<name>.png``: 8-bit RGB per camera (``<name>`` is the camera's image name without
  extension, or a zero-padded index);
- ``depth/<name>.png`` (16-bit, ``depth = value * depth_scale``, 0 = no depth) with
  ``depth/depth_scale.json``, or ``depth/<name>.npy`` / ``.exr`` (float32, 0 = no depth). Depth is
  the expected z-depth (camera z, world units) where the accumulated opacity is at least 0.5;
- ``orbit.mp4`` with ``--orbit N``: N frames on a circle around the scene (its centre is the
  median of the Gaussian centres; radius, up direction and intrinsics come from the cameras when
  given, else from the scene's extent, ``--up`` and a 50-degree field of view).

Every file is written atomically (temporary name, then rename).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro

from vision3d.geometry import Cameras
from vision3d.utils.io import check_writable_dir, write_text_atomic

COLMAP_FILES = ("cameras.bin", "images.bin", "cameras.txt", "images.txt")


@dataclass
class Args:
    ply: tyro.conf.Positional[Path]
    """Gaussian scene in the INRIA PLY layout (e.g. a run folder's scene.ply)."""

    out: Path = Path("renders")
    """Output folder (created if needed)."""

    cameras: Path | None = None
    """COLMAP model folder (cameras/images .bin or .txt; a folder holding sparse/0 also works) or a
    transforms.json file (or a folder holding one). Optional with --orbit."""

    orbit: int = 0
    """Also render an N-frame orbit video (orbit.mp4) around the scene; 0: no video."""

    depth_format: Literal["png16", "npy", "exr", "none"] = "png16"
    """How to write depth maps: 16-bit PNG + depth_scale.json, float32 NPY, float32 EXR, or not at all."""

    width: int | None = None
    """Output width in pixels (K rescaled; height follows the aspect ratio unless given)."""

    height: int | None = None
    """Output height in pixels (width follows the aspect ratio unless given)."""

    scale: float = 1.0
    """Resolution factor applied to the cameras' own size (ignored when --width/--height are set)."""

    sh_degree: int | None = None
    """SH degree used for colour; None: every band the PLY has."""

    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Background RGB in [0, 1]."""

    orbit_elevation: float = 25.0
    """Orbit camera elevation above the horizontal plane, degrees."""

    orbit_radius: float | None = None
    """Orbit radius (world units); None: the cameras' mean distance to the centre, else 2.2 x the scene's extent."""

    up: tuple[float, float, float] | None = None
    """World up for the orbit; None: from the cameras (mean of their -y axes) when given, else +z."""

    fps: float = 24.0
    """Frame rate of the orbit video."""

    backend: Literal["auto", "gsplat", "torch"] = "auto"
    """Renderer: gsplat's CUDA kernels, the PyTorch twin, or auto (gsplat when CUDA is usable)."""

    device: str = "auto"
    """Torch device; auto: cuda when available, else cpu."""


# ------------------------------------------------------------------ inputs
def load_cameras(path: Path) -> list[tuple[Cameras, list[str]]]:
    """Groups of ``(Cameras [V], one output name per view)`` from a COLMAP folder or a transforms.json.

    Cameras of different image sizes (COLMAP cameras, per-frame transforms.json w/h) give one group per size.
    """
    from vision3d.geometry.colmap import find_colmap_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: cameras path not found (expected a COLMAP folder or a transforms.json)")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(f"{path}: expected a transforms.json file or a COLMAP model folder")
        return _from_transforms(path)
    if (path / "transforms.json").is_file():
        return _from_transforms(path / "transforms.json")
    try:
        folder, _ = find_colmap_model(path)
    except ValueError:
        raise ValueError(
            f"{path}: neither a COLMAP model folder (cameras/images .bin or .txt, here or in sparse/0) "
            "nor a transforms.json (or a folder holding one)"
        ) from None
    return _from_colmap(folder)


def _names(paths, n: int) -> list[str]:
    names = [Path(str(p)).stem for p in paths] if paths is not None and len(paths) == n else []
    if len(set(names)) != n or any(not s for s in names):
        width = max(4, len(str(n - 1)))
        names = [f"{i:0{width}d}" for i in range(n)]
    return names


def _from_transforms(path: Path) -> list[tuple[Cameras, list[str]]]:
    from vision3d.geometry.transforms_json import read_transforms_json

    # only the cameras and the image names are used (no image is read), so file_path may point anywhere,
    # e.g. `vision3d export`'s relative paths back into the run folder
    tj = read_transforms_json(path, root=Path(path).resolve().anchor)
    if tj.distortion is not None and bool((tj.distortion != 0).any()):
        print(f"vision3d render: note: {path} has lens distortion; rendering pinhole views", file=sys.stderr)
    names = _names(tj.image_paths, len(tj.image_paths))
    return [(cams, [names[i] for i in idx]) for cams, idx in tj.by_size().values()]


def _from_colmap(folder: Path) -> list[tuple[Cameras, list[str]]]:
    from vision3d.geometry.colmap import read_colmap

    groups = read_colmap(folder).to_cameras(group_by_size=True)
    if not isinstance(groups, dict):
        groups = {None: groups}
    out = []
    for cams, names, distortion in groups.values():
        if distortion is not None:
            print(f"vision3d render: note: {folder} has lens distortion; rendering pinhole views", file=sys.stderr)
        out.append((cams.flatten(), _names(names, len(cams))))
    return out


def load_scene(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: PLY file not found")
    from vision3d.gaussians.ply import load_ply

    g = load_ply(path)
    if g.num == 0:
        raise ValueError(f"{path}: the PLY holds no Gaussians")
    return g


def _resize(cams: Cameras, width: int | None, height: int | None, scale: float) -> Cameras:
    if width is not None or height is not None:
        aspect = cams.width / cams.height
        w = width if width is not None else max(1, round(height * aspect))
        h = height if height is not None else max(1, round(width / aspect))
        return cams.resize(int(w), int(h))
    if scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    if scale != 1.0:
        return cams.resize(max(1, round(cams.width * scale)), max(1, round(cams.height * scale)))
    return cams


def orbit_rig(
    means: torch.Tensor,  # [N, 3] Gaussian centres, world
    n: int,
    cameras: Cameras | None,  # [V] reference cameras (radius, up, intrinsics) or None
    elevation_deg: float,
    radius: float | None,
    up: tuple[float, float, float] | None,
    width: int | None,
    height: int | None,
    scale: float,
) -> Cameras:
    """``n`` orbit cameras around the median of ``means``."""
    from vision3d.gaussians.procedural import orbit_cameras

    target = means.median(0).values.double()
    if up is not None:
        upv = torch.tensor(up, dtype=torch.float64)
    elif cameras is not None:
        upv = -cameras.rotation[..., :, 1].double().mean(0)
    else:
        upv = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    if float(upv.norm()) < 1e-8:
        raise ValueError("orbit: the up direction is zero; pass --up x y z")
    upv = upv / upv.norm()
    if radius is None:
        if cameras is not None:
            radius = float((cameras.centers.double() - target).norm(dim=-1).mean())
        else:
            d = (means.double() - target).norm(dim=-1)
            radius = 2.2 * float(d.quantile(0.9)) if d.numel() < 16_000_000 else 2.2 * float(d.max())
    if not radius > 0:
        raise ValueError(f"orbit: radius must be positive, got {radius}")
    if cameras is not None:
        ref = _resize(cameras[:1], width, height, scale)
        w, h = ref.width, ref.height
        fov = math.degrees(2 * math.atan(w / (2 * float(ref.K[0, 0, 0]))))
    else:
        w = width or (round(height * 4 / 3) if height else 400)
        h = height or round(w * 3 / 4)
        w, h = max(1, round(w * (scale if width is None and height is None else 1))), max(
            1, round(h * (scale if width is None and height is None else 1))
        )
        fov = 50.0
    return orbit_cameras(n, target, radius, elevation_deg, w, h, fov, up=tuple(upv.tolist()))


# ------------------------------------------------------------------ rendering
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def render_views(g, cams: Cameras, sh_degree, background, backend, desc: str = "render"):
    """Yield ``(index, colors [3, H, W], depth [H, W] or None)`` for each camera of ``cams`` ``[V]``."""
    from tqdm.auto import tqdm

    from vision3d.render import rasterize

    bg = torch.tensor(background, dtype=g.dtype, device=g.device)
    for i in tqdm(range(len(cams)), desc=desc, unit="view", dynamic_ncols=True):
        with torch.no_grad():
            out = rasterize(g, cams[i : i + 1], sh_degree=sh_degree, background=bg, mode="RGB+ED", backend=backend)
        depth = out.depths[0, 0].clone()
        depth[out.alphas[0, 0] < 0.5] = 0.0
        depth = torch.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)
        yield i, out.colors[0].clamp(0, 1), depth


def render(args: Args) -> dict:
    """Do the work of ``vision3d render``; returns a summary dict. Raises on bad input."""
    from vision3d.utils.images import save_depth, save_png
    from vision3d.utils.video import write_video

    if args.cameras is None and args.orbit <= 0:
        raise ValueError("nothing to render: pass --cameras (COLMAP folder or transforms.json) and/or --orbit N")
    if args.orbit < 0:
        raise ValueError(f"--orbit must be >= 0, got {args.orbit}")
    if any(not 0 <= c <= 1 for c in args.background):
        raise ValueError(f"--background must be three values in [0, 1], got {args.background}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"{args.out}: --out exists and is a file; expected an output folder")
    g = load_scene(args.ply)
    groups = load_cameras(args.cameras) if args.cameras is not None else []
    out = check_writable_dir(args.out)
    dev = _device(args.device)
    g = g.to(dev)
    if args.sh_degree is not None and not 0 <= args.sh_degree <= g.sh_degree:
        raise ValueError(f"--sh-degree {args.sh_degree}: the PLY carries degree {g.sh_degree}")
    summary: dict = {"ply": str(args.ply), "num_gaussians": g.num, "out": str(out)}
    if groups:
        groups = [(_resize(c, args.width, args.height, args.scale).to(dev), n) for c, n in groups]
        (out / "images").mkdir(exist_ok=True)
        depth_scale = None
        if args.depth_format != "none":
            (out / "depth").mkdir(exist_ok=True)
            if args.depth_format == "png16":
                # one scale for every view: the farthest Gaussian centre from any camera fills 16 bits
                far = max(float((g.means - c).norm(dim=-1).max()) for cams, _ in groups for c in cams.centers)
                depth_scale = far * 1.05 / 65535.0
        for cams, names in groups:
            for i, rgb, depth in render_views(g, cams, args.sh_degree, args.background, args.backend):
                save_png(out / "images" / f"{names[i]}.png", rgb)
                if args.depth_format != "none":
                    save_depth(out / "depth" / names[i], depth.cpu(), args.depth_format, depth_scale)
        if depth_scale is not None:
            write_text_atomic(
                out / "depth" / "depth_scale.json",
                json.dumps(
                    {"depth_scale": depth_scale, "meaning": "z-depth = uint16 value * depth_scale (world units); 0 = no depth"},
                    indent=2,
                ),
            )
        summary.update(
            views=sum(len(c) for c, _ in groups),
            sizes=[[c.width, c.height] for c, _ in groups],
            depth_format=args.depth_format,
        )
    if args.orbit > 0:
        rig = orbit_rig(
            g.means,
            args.orbit,
            groups[0][0].to("cpu") if groups else None,
            args.orbit_elevation,
            args.orbit_radius,
            args.up,
            args.width,
            args.height,
            args.scale if not groups else 1.0,
        ).to(dev)
        frames = (rgb.cpu() for _, rgb, _ in render_views(g, rig, args.sh_degree, args.background, args.backend, "orbit"))
        write_video(out / "orbit.mp4", frames, fps=args.fps)
        summary.update(orbit=str(out / "orbit.mp4"), orbit_frames=args.orbit)
    return summary


def run(args: Args) -> int:
    try:
        summary = render(args)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"vision3d render: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
