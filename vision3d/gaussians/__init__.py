"""The Gaussian scene type, its PLY I/O and edits. Knows only geometry."""

from .gaussians import SH_C0, Gaussians, num_sh_bases, rgb_to_sh, sh_to_rgb

__all__ = ["Gaussians", "SH_C0", "num_sh_bases", "rgb_to_sh", "sh_to_rgb"]
