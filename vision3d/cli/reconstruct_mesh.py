"""4 normal maps (+ 4 RGB views) -> textured mesh with DiMeR (arXiv 2504.17670).

The views must come from DiMeR's fixed rig: cameras at azimuth 0, 90, 180 and 270 degrees
(counter-clockwise seen from above, azimuth 0 on the world +x axis), elevation 5 degrees,
distance 3.5, vertical field of view 30 degrees, looking at the origin, world z up. Pass the files
in that order. Images are square (resized to ``--size``, 512 by default); an alpha channel, when
present, is the foreground mask and the background becomes white, as in the authors' pipeline.
The authors then add a 50-pixel white border (at 512) and resize back, shrinking the object;
``--pad`` does the same (0 to skip it if your views are already framed that way).

Normal maps: DiMeR's geometry network reads world-space unit normals ``n`` of the visible surface,
stored as colours ``(n + 1) / 2`` (x, y, z -> R, G, B), with a white background. Ways to get them:

* render them from a mesh (any rasteriser: interpolate vertex normals, rotate them into the world
  frame of the rig, encode ``(n + 1) / 2``);
* predict camera-space normals with a monocular normal estimator (e.g. Lotus, StableNormal,
  Marigold-normals) or a multi-view diffusion model that outputs normals (the authors use their
  Kiss3DGen / Zero123++ fine-tunes), then rotate each view's normals into the rig's world frame with
  that view's camera-to-world rotation (mind the estimator's axis convention: OpenGL vs OpenCV, and
  the authors' extra x flip for Lotus outputs, ``utils/tool.py: trans_local_2_global``).

Weights: convert the authors' ``DiMeR_geometry.ckpt`` and ``DiMeR_texture.ckpt`` (Hugging Face
``LutaoJiang/DiMeR``; no licence given, not shipped) with
:func:`vision3d.recon.dimer.convert_dimer_checkpoint` / :func:`save_converted`, or pass the ``.ckpt``
files directly (converted on load). Output: PLY, OBJ or GLB with vertex colours, in the rig's world
frame (z up).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

NUM_VIEWS = 4


@dataclass
class Args:
    normals: list[Path]
    """4 normal-map images (PNG/JPG), rig order: azimuth 0, 90, 180, 270 degrees"""
    geometry_ckpt: Path
    """geometry network: converted .safetensors (+ .json) or the authors' DiMeR_geometry.ckpt"""
    output: Path = Path("mesh.glb")
    """output mesh: .ply, .obj or .glb"""
    images: list[Path] | None = None
    """4 RGB views in the same order (needed for colours)"""
    texture_ckpt: Path | None = None
    """texture network: converted .safetensors (+ .json) or the authors' DiMeR_texture.ckpt"""
    size: int = 512
    """input resolution the networks see (multiple of 16)"""
    pad: int = 50
    """white border added before resizing back to --size, in pixels at 512 (authors: 50)"""
    grid_res: int | None = None
    """FlexiCubes grid resolution (default: the checkpoint's, 192)"""
    device: str = "auto"
    """cuda, cpu or auto"""
    simplify: int | None = None
    """decimate to about this many faces (needs open3d)"""


def load_view(path: Path, size: int, pad: int) -> torch.Tensor:  # -> [3, size, size] in [0, 1]
    """Read an image, composite its alpha over white, pad with white (``pad`` at 512) and resize."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            im.load()
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    h, w = rgba.shape[:2]
    if h != w:
        raise ValueError(f"{path}: DiMeR views must be square, got {w}x{h}")
    t = torch.from_numpy(rgba).permute(2, 0, 1)
    rgb = t[:3] * t[3:] + (1 - t[3:])
    if pad > 0:
        p = int(round(pad * w / 512))
        rgb = F.pad(rgb, (p, p, p, p), value=1.0)
    rgb = F.interpolate(rgb[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return rgb.clamp(0, 1)


def _load_views(paths: list[Path] | None, what: str, size: int, pad: int) -> torch.Tensor:  # [1, 4, 3, S, S]
    if not paths:
        raise ValueError(f"--{what}: give {NUM_VIEWS} files (azimuth 0, 90, 180, 270)")
    if len(paths) != NUM_VIEWS:
        got = [str(p) for p in paths]
        raise ValueError(f"--{what}: DiMeR needs exactly {NUM_VIEWS} views, got {len(paths)}: {got}")
    return torch.stack([load_view(Path(p), size, pad) for p in paths])[None]


def _check_normal_map(view: torch.Tensor, path: Path) -> None:
    """Reject images that cannot be encoded normals (grey/colour photos) with a message naming the file."""
    n = view * 2 - 1
    norm = n.norm(dim=0)
    fg = (view < 0.99).any(dim=0)  # non-white pixels
    if fg.sum() < 16:
        raise ValueError(f"{path}: the normal map is empty (all background)")
    frac = ((norm[fg] - 1).abs() < 0.15).float().mean().item()
    if frac < 0.6:
        raise ValueError(
            f"{path}: does not look like a normal map ({frac:.0%} of foreground pixels decode to unit vectors); "
            "expected world normals encoded (n + 1) / 2 on white"
        )


def run(args: Args) -> int:
    from vision3d.mesh.mesh import save_mesh
    from vision3d.recon.dimer import DiMeR, dimer_rig, load_dimer_net
    from vision3d.utils.optional import MissingDependencyError, require

    try:
        require("trimesh", "mesh export")
        if args.simplify:
            require("open3d", "--simplify")
        if args.size % 16:
            raise ValueError(f"--size must be a multiple of 16, got {args.size}")
        if Path(args.output).suffix.lower() not in (".ply", ".obj", ".glb"):
            raise ValueError(f"{args.output}: output must end in .ply, .obj or .glb")
        if (args.images is None) != (args.texture_ckpt is None):
            raise ValueError("--images and --texture-ckpt go together (colours need both); give both or neither")
        normals = _load_views(args.normals, "normals", args.size, args.pad)
        for i, p in enumerate(args.normals):
            _check_normal_map(normals[0, i], Path(p))
        images = _load_views(args.images, "images", args.size, args.pad) if args.images is not None else None
        device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                              ("cpu" if args.device == "auto" else args.device))  # fmt: skip
        over = {"grid_res": args.grid_res} if args.grid_res else {}
        geometry = load_dimer_net(args.geometry_ckpt, **over).eval()
        texture = load_dimer_net(args.texture_ckpt, **over).eval() if args.texture_ckpt is not None else None
    except (ValueError, FileNotFoundError, MissingDependencyError) as e:
        print(f"vision3d reconstruct-mesh: {e}", file=sys.stderr)
        return 2
    model = DiMeR(geometry=geometry, texture=texture).to(device).eval()
    cams = dimer_rig(1, args.size, args.size).to(device)
    with torch.no_grad():
        out = model(None if images is None else images.to(device), cams, normals=normals.to(device))
    mesh = out.mesh
    if mesh.empty:
        sdf = out.extras["sdf"]
        print(
            f"vision3d reconstruct-mesh: no surface found (SDF range {float(sdf.min()):.3g}..{float(sdf.max()):.3g}); "
            "check that the inputs are world-space normal maps from the DiMeR rig",
            file=sys.stderr,
        )
        return 1
    if args.simplify:
        mesh = mesh.simplify(args.simplify)
    path = save_mesh(mesh.to("cpu"), args.output)
    print(f"wrote {path}: {mesh.num_vertices} vertices, {mesh.num_faces} faces")
    return 0
