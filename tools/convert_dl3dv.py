"""Convert the raw DL3DV-10K release to the chunked ``.torch`` layout the feed-forward papers train on.

Example::

    python tools/convert_dl3dv.py /data/DL3DV-10K /data/dl3dv --split train --downscale 8 \
        --key-prefix dl3dv_ --exclude-json benchmark_keys.json
    python tools/convert_dl3dv.py /data/DL3DV-Benchmark /data/dl3dv --split test --downscale 8

Resumable (re-run the same command: finished scenes are skipped, chunks are written atomically),
with a progress bar. See :func:`vision3d.data.dl3dv.convert_dl3dv` for the format and the source
(DepthSplat's ``src/scripts/convert_dl3dv_*.py``, github.com/cvg/depthsplat, MIT).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("raw_root", type=Path, help="folder holding DL3DV scene folders (with transforms.json)")
    p.add_argument("out_root", type=Path, help="output dataset root; chunks go to <out_root>/<split>/")
    p.add_argument("--split", default="train")
    p.add_argument("--downscale", type=int, default=8, choices=[1, 2, 4, 8], help="read images_<N> (1: images)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None, help="resize + centre crop to H W")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality")
    p.add_argument("--key-prefix", default="", help="prefix for scene keys (DepthSplat's train split uses 'dl3dv_')")
    p.add_argument("--scenes-json", type=Path, default=None, help="JSON list (or object) of scene keys to convert")
    p.add_argument("--exclude-json", type=Path, default=None, help="JSON list (or object) of scene keys to leave out")
    p.add_argument("--chunk-mb", type=float, default=100.0, help="target chunk size in MB")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    from vision3d.data.dl3dv import convert_dl3dv

    def keys(path: Path | None):
        if path is None:
            return None
        data = json.loads(path.read_text())
        return list(data.keys() if isinstance(data, dict) else data)

    index = convert_dl3dv(
        args.raw_root,
        args.out_root,
        args.split,
        downscale=args.downscale,
        image_shape=tuple(args.size) if args.size else None,
        quality=args.quality,
        key_prefix=args.key_prefix,
        scenes=keys(args.scenes_json),
        exclude=keys(args.exclude_json) or (),
        target_bytes_per_chunk=int(args.chunk_mb * 1e6),
        progress=not args.no_progress,
    )
    print(f"{len(index)} scenes indexed in {args.out_root / args.split / 'index.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
