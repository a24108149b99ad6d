"""Optional dependencies, imported where used.

Import of ``vision3d`` never requires (or builds) an optional package. Code that needs one calls
:func:`require`, which returns the module or raises :class:`MissingDependencyError` with the exact
``pip install`` line that provides it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# import name -> (distribution on PyPI, vision3d extra that installs it)
KNOWN: dict[str, tuple[str, str | None]] = {
    "open3d": ("open3d", "mesh"),
    "trimesh": ("trimesh", "mesh"),
    "pycolmap": ("pycolmap", "sfm"),
    "viser": ("viser", "viewer"),
    "xformers": ("xformers", "xformers"),
    "diffusers": ("diffusers", "gen"),
    "lpips": ("lpips", "lpips"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "gsplat": ("gsplat", None),
    "skimage": ("scikit-image", "dev"),
    "plyfile": ("plyfile", "dev"),
    "spconv": ("spconv-cu126", "sparse"),
    "spconv.pytorch": ("spconv-cu126", "sparse"),
    "sklearn": ("scikit-learn", "sklearn"),
    "sklearn.cluster": ("scikit-learn", "sklearn"),
}


class MissingDependencyError(ImportError):
    """An optional package is needed for the requested feature and is not installed."""


def install_line(module: str) -> str:
    """The exact command that installs what provides ``module``."""
    dist, extra = KNOWN.get(module, (module.split(".")[0], None))
    if extra is None:
        return f"pip install {dist}"
    return f'pip install "vision3d[{extra}]"   (or: pip install {dist})'


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise an error that says how to install it.

    Args:
        module: import name, e.g. ``"open3d"``.
        purpose: what the caller wanted it for, shown in the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        what = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"{module} is needed{what} but is not importable ({e}). Install it with: {install_line(module)}"
        ) from e


def available(module: str) -> bool:
    """Whether ``module`` imports (without raising)."""
    try:
        importlib.import_module(module)
        return True
    except Exception:  # noqa: BLE001 - a broken optional install counts as unavailable
        return False
