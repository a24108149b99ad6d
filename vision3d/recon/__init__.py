"""Reconstructors: images + cameras -> Gaussians or meshes. One file per method."""

from .base import ReconOutput, Reconstructor, create, list_models, register

__all__ = ["ReconOutput", "Reconstructor", "create", "list_models", "register"]
