"""Entry point of the ``vision3d`` console script.

Each command lives in its own module ``vision3d.cli.<name>`` with an ``Args`` dataclass (tyro turns
it into flags) and ``run(args) -> int``. Only the chosen command's module is imported, so a command
whose optional extra is missing does not break the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("vision3d.cli.demo", "procedural scene -> fit Gaussians by test-time optimisation -> run folder"),
    "doctor": ("vision3d.cli.doctor", "versions, CUDA, gsplat kernels, installed extras"),
    "render": ("vision3d.cli.render", "render a scene.ply into COLMAP / transforms.json cameras or an orbit"),
    "reconstruct": ("vision3d.cli.reconstruct", "photos or a video -> 3D Gaussian scene"),
    "reconstruct-mesh": ("vision3d.cli.reconstruct_mesh", "4 normal maps + RGB views -> textured mesh (DiMeR)"),
    "train": ("vision3d.cli.train", "train a reconstructor"),
    "eval": ("vision3d.cli.eval", "evaluate a checkpoint with a published protocol"),
    "view": ("vision3d.cli.view", "viser viewer for a run folder or a PLY"),
    "export": ("vision3d.cli.export", "export a run to ply/splat/colmap/transforms"),
    "convert": ("vision3d.cli.convert", "convert authors' checkpoints to vision3d's layout"),
    "gen": ("vision3d.cli.gen", "class-conditional DiT and Dense2MoE: train | convert | distill | sample"),
}


def plain_help(doc: str | None) -> str | None:
    """A module docstring as terminal text: reST roles, double backticks and ``Examples::`` markers removed."""
    if doc is None:
        return None
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    text = text.replace("``", "")
    text = re.sub(r"::\n", ":\n", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def _usage() -> str:
    lines = ["usage: vision3d <command> [--help] [options]", "", "commands:"]
    for name, (mod, text) in COMMANDS.items():
        if importlib.util.find_spec(mod) is not None:
            lines.append(f"  {name:<12} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from vision3d import __version__

        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS or importlib.util.find_spec(COMMANDS[name][0]) is None:
        print(f"vision3d: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name == "reconstruct" and len(argv) > 1 and not argv[1].startswith("-"):
        from pathlib import Path

        if not Path(argv[1]).exists():  # before torch loads: a typo is reported at once
            print(f"vision3d reconstruct: error: {argv[1]}: no such photo folder or video", file=sys.stderr)
            return 2
    import tyro

    module = importlib.import_module(COMMANDS[name][0])
    if hasattr(module, "main"):  # commands with their own argument handling (presets)
        return int(module.main(argv[1:]) or 0)
    args = tyro.cli(module.Args, args=argv[1:], prog=f"vision3d {name}", description=plain_help(module.__doc__))
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
