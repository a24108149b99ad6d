"""Photos or a video -> a 3D Gaussian scene, with its cameras, held-out metrics, renders and a video.

Examples::

    vision3d reconstruct photos/ --out runs/garden                       # SfM with pycolmap ([sfm] extra)
    vision3d reconstruct photos/ --out runs/garden --poses known --cameras photos/transforms.json
    vision3d reconstruct clip.mp4 --out runs/clip --video-frames 60 --steps 3000 --device cuda
    vision3d reconstruct photos/ --out runs/garden --resume              # after Ctrl-C
    vision3d reconstruct photos/ --out runs/garden --mesh                # + mesh.ply (TSDF, [mesh] extra)
    vision3d reconstruct photos/ --out runs/garden --poses vggt --pose-weights vggt.pt --pose-ba
    vision3d reconstruct photos/ --out runs/garden --init ilrm_re10k --init-weights re10k.ckpt

The run folder holds ``scene.ply``, ``images/`` and ``cameras/`` (COLMAP text model and
``transforms.json``), ``renders/`` (held-out render | photo), ``metrics.json``, ``video.mp4``,
``ckpt/`` and, with ``--mesh``, ``mesh.ply``. The pipeline is :mod:`vision3d.train.reconstruct`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro

from vision3d.train.reconstruct import ReconstructConfig, reconstruct


@dataclass
class Args(ReconstructConfig):
    input: Annotated[Path, tyro.conf.Positional]
    """A folder of photos or a video file."""


def run(args: Args) -> int:
    from vision3d.utils.optional import MissingDependencyError

    try:
        m = reconstruct(args)
    except KeyboardInterrupt:
        print(f"\nvision3d reconstruct: interrupted; continue with the same command and --resume ({args.out})",
              file=sys.stderr)
        return 130
    except MissingDependencyError as e:
        print(f"vision3d reconstruct: error: {e}", file=sys.stderr)
        return 3
    except (FileExistsError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        print(f"vision3d reconstruct: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a vanished folder: atomic writes left no half-written file
        print(f"vision3d reconstruct: error: {e} (free space or fix {args.out}, then rerun with --resume)",
              file=sys.stderr)
        return 2
    t = m["test"]
    held = (f"held-out PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.4f} over {t['count']} views"
            if t.get("count") else "no held-out views")
    print(
        f"vision3d reconstruct: {m['images']['registered']}/{m['images']['input']} images posed "
        f"({m['poses'].get('estimator', '?')}), {m['num_gaussians']} Gaussians, {held}, "
        f"{m['time_s']['total']:.1f} s -> {Path(args.out)}"
    )
    return 0
