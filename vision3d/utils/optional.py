"""Optional dependencies, imported where used.

Import of ``vision3d`` never requires (or builds) an optional package. Code that needs one calls
:func:`require`, which returns the module or raises :class:`MissingDependencyError` with the exact
``pip install`` line that provides it.

Any failure to import counts as "unavailable", not only ``ImportError``: open3d raises ``OSError``
when a system library it links (``libusb-1.0.so.0``, ``libGL.so.1``) is missing, and a broken
install can raise anything. :func:`why_unavailable` says why in one line and, for a missing shared
library, gives the ``apt-get install`` line instead of a ``pip`` line that would not help.
Tests skip through it (``tests/conftest.py: optional``) so a fresh machine skips with the reason.
"""

from __future__ import annotations

import importlib
import re
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


# shared library (as named in the loader's error) -> Debian/Ubuntu package that provides it
SYSTEM_LIBRARIES: dict[str, str] = {
    "libusb-1.0.so.0": "libusb-1.0-0",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libgomp.so.1": "libgomp1",
    "libX11.so.6": "libx11-6",
    "libXext.so.6": "libxext6",
    "libXrender.so.1": "libxrender1",
    "libSM.so.6": "libsm6",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libudev.so.1": "libudev1",
    "libc++.so.1": "libc++1",
    "libc++abi.so.1": "libc++abi1",
}

_SHARED_LIB = re.compile(r"(lib[\w.+-]+\.so(?:\.\d+)*)\s*:\s*cannot open shared object file")


class MissingDependencyError(ImportError):
    """An optional package is needed for the requested feature and is not installed."""


def install_line(module: str) -> str:
    """The exact command that installs what provides ``module``."""
    dist, extra = KNOWN.get(module, (module.split(".")[0], None))
    if extra is None:
        return f"pip install {dist}"
    return f'pip install "vision3d[{extra}]"   (or: pip install {dist})'


def missing_system_library(error: BaseException) -> str | None:
    """The shared library an import failed to load (``"libusb-1.0.so.0"``), if that is what failed."""
    m = _SHARED_LIB.search(str(error))
    return m.group(1) if m else None


def system_install_line(library: str) -> str:
    """The apt line that provides a shared library (the package name guessed from the soname if unknown)."""
    pkg = SYSTEM_LIBRARIES.get(library)
    if pkg is None:
        pkg = re.sub(r"\.so(\.\d+)*$", "", library).lower()  # best guess; say so
        return f"sudo apt-get install {pkg}   (package name guessed from {library}; search: apt-file search {library})"
    return f"sudo apt-get install {pkg}"


def fix_line(module: str, error: BaseException) -> str:
    """What to run to make ``module`` importable after ``error``: an apt line for a missing system library, else pip."""
    lib = missing_system_library(error)
    return system_install_line(lib) if lib else install_line(module)


def _try_import(module: str) -> tuple[ModuleType | None, BaseException | None]:
    try:
        return importlib.import_module(module), None
    except Exception as e:  # noqa: BLE001 - OSError (system library), RuntimeError (broken build), ...
        return None, e


def why_unavailable(module: str) -> str | None:
    """``None`` when ``module`` imports; else one line: what failed and what to run to fix it."""
    _, e = _try_import(module)
    if e is None:
        return None
    first = (str(e).splitlines() or [""])[0][:200]
    lib = missing_system_library(e)
    if lib:
        return f"{module} is unavailable: system library {lib} is missing ({type(e).__name__}: {first}); fix: {system_install_line(lib)}"
    return f"{module} is unavailable ({type(e).__name__}: {first}); fix: {install_line(module)}"


def require(module: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise an error that says how to install it.

    Args:
        module: import name, e.g. ``"open3d"``.
        purpose: what the caller wanted it for, shown in the message.
    """
    mod, e = _try_import(module)
    if mod is not None:
        return mod
    what = f" for {purpose}" if purpose else ""
    lib = missing_system_library(e)
    how = f"the system library {lib} is missing. Install it with: " if lib else "Install it with: "
    raise MissingDependencyError(
        f"{module} is needed{what} but is not importable ({type(e).__name__}: {e}); {how}{fix_line(module, e)}"
    ) from e


def available(module: str) -> bool:
    """Whether ``module`` imports (any exception, e.g. a missing system library, counts as unavailable)."""
    return _try_import(module)[0] is not None
