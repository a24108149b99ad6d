"""Cameras, conventions and camera-file I/O. Knows nothing above it."""

from .cameras import Cameras

__all__ = ["Cameras"]
