"""Photos or a video -> a 3D Gaussian scene, with its cameras, held-out metrics, renders and a video.

Examples::

    vision3d reconstruct photos/ --out runs/garden                       # SfM with pycolmap ([sfm] extra)
    vision3d reconstruct photos/ --out runs/garden --poses known --cameras photos/transforms.json
    vision3d reconstruct clip.mp4 --out runs/clip --video-frames 60 --steps 3000 --device cuda
    vision3d reconstruct photos/ --out runs/garden --resume              # after Ctrl-C
    vision3d reconstruct photos/ --out runs/garden --mesh                # + mesh.ply (TSDF, [mesh] extra)
    vision3d reconstruct photos/ --out runs/garden --poses vggt --pose-weights vggt.pt --pose-ba
    vision3d reconstruct photos/ --out runs/garden --init ilrm_re10k --init-weights re10k.ckpt
    vision3d reconstruct landmark/ --out runs/landmark --fit.appearance --fit.pose-opt   # internet photos

The run folder holds ``scene.ply``, ``images/`` and ``cameras/`` (COLMAP text model and
``transforms.json``), ``renders/`` (held-out render | photo), ``metrics.json``, ``video.mp4``,
``ckpt/``, ``run.json`` (settings and time across resumes), with ``--mesh`` ``mesh.ply``, and ``sfm/``:
COLMAP's work folder (the images it saw, database.db, sparse/ models, undistorted/ and colmap.log,
COLMAP's own log; often most of the folder's size; --no-keep-sfm removes it). Photos keep their own
sizes and intrinsics. SfM is deterministic with the default --sfm-threads 1 (seeded by --seed); with
more threads the registration may differ between runs. An interrupted or failed pose stage restarts
when the same command is run again; after Ctrl-C during the fit, the printed command continues it.
The pipeline is :mod:`vision3d.train.reconstruct`.
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


def _resume_command() -> str:
    """The command line that continues this run: the same arguments plus --resume (an unfinished pose stage
    restarts by itself, a fit continues from its checkpoint)."""
    import shlex

    argv = [a for a in sys.argv[1:] if a != "--resume"]
    head = "vision3d" if not argv or argv[0] == "reconstruct" else "vision3d reconstruct"
    return " ".join([head, *map(shlex.quote, argv), "--resume"])


def run(args: Args) -> int:
    from vision3d.utils.optional import MissingDependencyError

    try:
        m = reconstruct(args)
    except KeyboardInterrupt:
        print(f"\nvision3d reconstruct: interrupted; continue with: {_resume_command()}", file=sys.stderr)
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
    dropped = m["images"].get("dropped") or []
    if dropped:
        print(f"vision3d reconstruct: warning: {len(dropped)} photo(s) not registered and left out: "
              f"{', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}", file=sys.stderr)
    a = t.get("appearance")
    if a:
        held += (f"; right halves with each photo's appearance fitted on its left half: "
                 f"PSNR {a['psnr_right_half_fitted']:.2f} dB (mean appearance {a['psnr_right_half_mean_embedding']:.2f})")
    print(
        f"vision3d reconstruct: {m['images']['registered']}/{m['images']['input']} images posed "
        f"({m['poses'].get('estimator', '?')}), {m['num_gaussians']} Gaussians, {held}, "
        f"{m['time_s'].get('total_all_runs', m['time_s']['total']):.1f} s -> {Path(args.out)}"
    )
    return 0
