"""Convert an authors' checkpoint to vision3d's layout (safetensors + config json).

Examples:
    vision3d convert ilrm re10k_2view.ckpt models/ilrm/re10k_2view.safetensors
    vision3d convert --list
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import tyro

from vision3d.errors import InputError, guard
from vision3d.utils.io import read_checkpoint

# name -> (module, converter function, one line on what it reads)
CONVERTERS: dict[str, tuple[str, str, str]] = {
    "ilrm": ("vision3d.recon.ilrm", "convert_ilrm_checkpoint", "Gynjn/iLRM Lightning .ckpt (encoder.scaler.*)"),
    "vggt": ("vision3d.recon.vggt", "convert_vggt_checkpoint", "facebookresearch/vggt model.pt (aggregator/camera/depth/point heads)"),
    "flashvggt": ("vision3d.recon.flashvggt", "convert_flashvggt_checkpoint", "ZipW/FlashVGGT flashvggt.pt (VGGT layout)"),
    "depthsplat": ("vision3d.recon.depthsplat", "convert_depthsplat_checkpoint", "cvg/depthsplat Lightning .ckpt (encoder.depth_predictor.*, encoder.gaussian_head.*; ZPressor hosts: depth_predictor.zipmatch.*)"),
    "volsplat": ("vision3d.recon.volsplat", "convert_volsplat_checkpoint", "ziplab/VolSplat Lightning .ckpt (encoder.*, MinkowskiEngine sparse U-Net)"),
    "dimer": ("vision3d.recon.dimer", "convert_dimer_checkpoint", "lutao2021/DiMeR geometry or texture .ckpt (lrm_generator.*)"),
}


def register_converter(name: str, module: str, function: str, what: str) -> None:
    CONVERTERS[name] = (module, function, what)


def get_converter(name: str) -> Callable[[dict], dict]:
    if name not in CONVERTERS:
        raise KeyError(f"no converter named '{name}'; available: {', '.join(sorted(CONVERTERS))}")
    mod, fn, _ = CONVERTERS[name]
    return getattr(importlib.import_module(mod), fn)


@dataclass
class Args:
    method: tyro.conf.Positional[str] = ""
    """Converter name (see --list)."""
    source: tyro.conf.Positional[str] = ""
    """The authors' checkpoint file."""
    dest: tyro.conf.Positional[str] = ""
    """Output .safetensors path (a .json with the key count is written beside it)."""
    list: bool = False
    """List the converters and exit."""


def run(args: Args) -> int:
    if args.list or not args.method:
        for name, (_, _, what) in sorted(CONVERTERS.items()):
            print(f"{name:<20} {what}")
        return 0
    if not args.source or not args.dest:
        print("vision3d convert: give METHOD SOURCE DEST (see --help)")
        return 2
    try:
        return _convert(args)
    except (InputError, FileNotFoundError, KeyError) as e:  # bad input: a message, not a traceback
        text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"vision3d convert: {text}", file=sys.stderr)
        return 2


def _convert(args: Args) -> int:
    from vision3d.train.checkpoint import save_weights

    converter = get_converter(args.method)
    source = Path(args.source)
    raw = read_checkpoint(source)
    try:
        with guard(source, f"a {args.method} checkpoint: {CONVERTERS[args.method][2]}"):
            state = converter(raw)
    except InputError as e:
        if e.path != str(source):  # converters that do not know the file: name it
            raise InputError(source, e.field, e.expected, e.got) from e
        raise
    dest = Path(args.dest)
    module = importlib.import_module(CONVERTERS[args.method][0])
    n = sum(v.numel() for v in state.values())
    if hasattr(module, "infer_config") and hasattr(module, "save_converted"):
        # models whose loader reads a config json beside the weights
        module.save_converted(dest, state, module.infer_config(state))
    else:
        from vision3d.utils.io import write_text_atomic

        save_weights(dest, state, metadata={"converted_from": str(args.source), "method": args.method})
        info = {"method": args.method, "source": str(args.source), "tensors": len(state), "parameters": n}
        write_text_atomic(dest.with_suffix(".json"), json.dumps(info, indent=1))
    print(f"wrote {dest}: {len(state)} tensors, {n / 1e6:.2f} M parameters")
    return 0
