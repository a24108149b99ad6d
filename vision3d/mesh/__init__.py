"""Triangle meshes: the Mesh type, extraction (FlexiCubes), I/O and metrics."""

from .flexicubes import FlexiCubesResult, dmc_tables, flexicubes, voxel_grid
from .mesh import Mesh, load_mesh, save_mesh
from .metrics import MeshMetrics, chamfer_distance, fscore, mesh_metrics, normal_consistency

__all__ = [
    "FlexiCubesResult",
    "Mesh",
    "MeshMetrics",
    "chamfer_distance",
    "dmc_tables",
    "flexicubes",
    "fscore",
    "load_mesh",
    "mesh_metrics",
    "normal_consistency",
    "save_mesh",
    "voxel_grid",
]
