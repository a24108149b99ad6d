"""The Gaussian scene type, its PLY I/O and edits. Knows only geometry."""

from .gaussians import SH_C0, Gaussians, num_sh_bases, rgb_to_sh, sh_to_rgb
from .ops import concat, crop, crop_mask, dedup_voxel, merge, normalize_scene, prune, prune_mask, scene_bounds, select
from .ply import load_ply, load_splat, read_ply_header, save_ply, save_splat
from .transform import Similarity, rotate_sh, transform_cameras, transform_gaussians

__all__ = [
    "Gaussians",
    "SH_C0",
    "num_sh_bases",
    "rgb_to_sh",
    "sh_to_rgb",
    "save_ply",
    "load_ply",
    "read_ply_header",
    "save_splat",
    "load_splat",
    "Similarity",
    "transform_gaussians",
    "transform_cameras",
    "rotate_sh",
    "prune",
    "prune_mask",
    "select",
    "concat",
    "crop",
    "crop_mask",
    "merge",
    "dedup_voxel",
    "normalize_scene",
    "scene_bounds",
]
