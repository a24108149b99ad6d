"""vision3d: feed-forward 3D vision.

``import vision3d`` registers the backbones with timm; it never imports optional packages or
builds native code.
"""

__version__ = "0.1.0"

from vision3d import backbones  # noqa: F401,E402  (registers timm models)
from vision3d.gaussians import Gaussians  # noqa: E402
from vision3d.geometry import Cameras  # noqa: E402
from vision3d.errors import InputError  # noqa: E402

__all__ = ["Cameras", "Gaussians", "InputError", "__version__"]
