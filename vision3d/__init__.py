"""vision3d: feed-forward 3D vision.

``import vision3d`` registers the backbones with timm; it never imports optional packages or
builds native code. The registration is lazy so that the command line starts without torch: when
timm is already imported it happens at once, otherwise as soon as timm's import finishes (a
``sys.meta_path`` hook), so every ``timm.create_model`` after ``import vision3d`` sees the
backbones. ``vision3d.Cameras`` and ``vision3d.Gaussians`` load their modules on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

from vision3d.errors import InputError  # noqa: E402  (no torch: the CLI reports bad input before torch loads)

__all__ = ["Cameras", "Gaussians", "InputError", "__version__"]

_LAZY = {"Cameras": "vision3d.geometry", "Gaussians": "vision3d.gaussians"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vision3d' has no attribute {name!r}")


class _RegisterWhenTimmLoads(importlib.abc.MetaPathFinder):
    """Imports ``vision3d.backbones`` (which registers the models) right after ``timm`` is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            importlib.import_module("vision3d.backbones")

        spec.loader.exec_module = exec_and_register
        return spec


if "timm" in sys.modules:
    from vision3d import backbones  # noqa: F401,E402  (registers timm models)
elif not any(isinstance(f, _RegisterWhenTimmLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenTimmLoads())
