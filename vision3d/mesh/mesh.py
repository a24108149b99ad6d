"""The triangle-mesh type of vision3d and its file I/O.

:class:`Mesh` holds ``vertices`` ``[V, 3]`` float32, ``faces`` ``[F, 3]`` int64 (counter-clockwise
seen from outside), optional per-vertex ``colors`` ``[V, 3]`` in ``[0, 1]`` and optional per-vertex
``normals`` ``[V, 3]`` (unit length). PLY / OBJ / GLB go through trimesh (extra ``[mesh]``);
cleaning and simplification through open3d (extra ``[mesh]``). Both are imported where used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vision3d.utils.io import atomic_path
from vision3d.utils.optional import require

FORMATS = (".ply", ".obj", ".glb")


@dataclass
class Mesh:
    vertices: Tensor  # [V, 3] float32, world units
    faces: Tensor  # [F, 3] int64 indices into vertices, counter-clockwise from outside
    colors: Tensor | None = None  # [V, 3] float32 in [0, 1]
    normals: Tensor | None = None  # [V, 3] float32 unit vertex normals

    def __post_init__(self) -> None:
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"Mesh.vertices must be [V, 3], got {tuple(self.vertices.shape)}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"Mesh.faces must be [F, 3], got {tuple(self.faces.shape)}")
        if self.faces.dtype != torch.long:
            self.faces = self.faces.long()
        v = self.vertices.shape[0]
        if self.faces.numel() and (int(self.faces.min()) < 0 or int(self.faces.max()) >= v):
            lo, hi = int(self.faces.min()), int(self.faces.max())
            raise ValueError(f"Mesh.faces index outside [0, {v}) (range {lo}..{hi})")
        for name in ("colors", "normals"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (v, 3):
                raise ValueError(f"Mesh.{name} must be [V, 3] = [{v}, 3], got {tuple(t.shape)}")

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def empty(self) -> bool:
        return self.num_faces == 0

    def to(self, device: torch.device | str) -> "Mesh":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Mesh(mv(self.vertices), mv(self.faces), mv(self.colors), mv(self.normals))

    def face_normals(self) -> Tensor:  # [F, 3] unit normals (zero for degenerate faces)
        tri = self.vertices[self.faces]
        n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        return torch.nn.functional.normalize(n, dim=-1)

    def face_areas(self) -> Tensor:  # [F]
        tri = self.vertices[self.faces]
        return 0.5 * torch.linalg.norm(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1)

    def vertex_normals(self) -> Tensor:  # [V, 3] area-weighted mean of adjacent face normals
        tri = self.vertices[self.faces]
        n = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)  # length = 2 * area
        acc = torch.zeros_like(self.vertices).index_add_(0, self.faces.reshape(-1), n.repeat_interleave(3, dim=0))
        return torch.nn.functional.normalize(acc, dim=-1)

    def with_normals(self) -> "Mesh":
        return replace(self, normals=self.vertex_normals())

    def transform(self, matrix: Tensor) -> "Mesh":  # matrix [3, 3] (or [4, 4] affine) applied as M @ v
        """Apply ``M @ v`` (+ translation for a 4x4); normals are rotated by the inverse transpose."""
        m = matrix.to(self.vertices)
        lin, t = (m[:3, :3], m[:3, 3]) if m.shape == (4, 4) else (m, None)
        verts = self.vertices @ lin.T + (t if t is not None else 0)
        normals = None
        if self.normals is not None:
            normals = torch.nn.functional.normalize(self.normals @ torch.linalg.inv(lin), dim=-1)
        return Mesh(verts, self.faces, self.colors, normals)

    def sample_points(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:  # ([n, 3] points, [n, 3] face normals)
        """Area-uniform surface samples and the normal of the face each comes from."""
        if self.empty:
            raise ValueError("Mesh.sample_points: the mesh has no faces")
        areas = self.face_areas()
        face = torch.multinomial(areas / areas.sum(), n, replacement=True, generator=generator)
        u = torch.rand(n, 2, generator=generator, device=self.vertices.device, dtype=self.vertices.dtype)
        flip = u.sum(-1) > 1
        u[flip] = 1 - u[flip]
        tri = self.vertices[self.faces[face]]
        pts = tri[:, 0] + u[:, :1] * (tri[:, 1] - tri[:, 0]) + u[:, 1:] * (tri[:, 2] - tri[:, 0])
        return pts, self.face_normals()[face]

    # ---------------------------------------------------------------- trimesh / open3d bridges
    def to_trimesh(self):
        trimesh = require("trimesh", "mesh export")
        colors = None
        if self.colors is not None:
            c = (self.colors.detach().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            colors = np.concatenate([c, np.full((c.shape[0], 1), 255, np.uint8)], axis=1)
        return trimesh.Trimesh(
            vertices=self.vertices.detach().cpu().numpy().astype(np.float64),
            faces=self.faces.cpu().numpy(),
            vertex_colors=colors,
            vertex_normals=None if self.normals is None else self.normals.detach().cpu().numpy(),
            process=False,
        )

    @staticmethod
    def from_trimesh(tm) -> "Mesh":
        verts = torch.tensor(np.array(tm.vertices), dtype=torch.float32)
        faces = torch.tensor(np.array(tm.faces), dtype=torch.long).reshape(-1, 3)
        colors = None
        visual = getattr(tm, "visual", None)
        if visual is not None and getattr(visual, "kind", None) == "vertex":
            vc = np.asarray(visual.vertex_colors)
            if vc.shape[0] == verts.shape[0]:
                colors = torch.as_tensor(vc[:, :3], dtype=torch.float32) / 255.0
        normals = None
        cache = getattr(getattr(tm, "_cache", None), "cache", {})  # normals read from the file, if any
        if "vertex_normals" in cache:
            normals = torch.tensor(np.array(tm.vertex_normals), dtype=torch.float32)
        return Mesh(verts, faces, colors, normals)

    def to_open3d(self):
        o3d = require("open3d", "mesh cleaning / simplification")
        m = o3d.geometry.TriangleMesh()
        m.vertices = o3d.utility.Vector3dVector(self.vertices.detach().cpu().double().numpy())
        m.triangles = o3d.utility.Vector3iVector(self.faces.cpu().numpy().astype(np.int32))
        if self.colors is not None:
            m.vertex_colors = o3d.utility.Vector3dVector(self.colors.detach().cpu().double().numpy())
        if self.normals is not None:
            m.vertex_normals = o3d.utility.Vector3dVector(self.normals.detach().cpu().double().numpy())
        return m

    @staticmethod
    def from_open3d(m) -> "Mesh":
        verts = torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32)
        faces = torch.as_tensor(np.asarray(m.triangles), dtype=torch.long).reshape(-1, 3)
        colors = torch.as_tensor(np.asarray(m.vertex_colors), dtype=torch.float32) if m.has_vertex_colors() else None
        normals = torch.as_tensor(np.asarray(m.vertex_normals), dtype=torch.float32) if m.has_vertex_normals() else None
        return Mesh(verts, faces, colors, normals)

    # ---------------------------------------------------------------- processing
    def clean(self) -> "Mesh":
        """Merge duplicate vertices, drop degenerate/duplicate faces and unreferenced vertices (open3d)."""
        m = self.to_open3d()
        m = m.remove_duplicated_vertices()
        m = m.remove_degenerate_triangles()
        m = m.remove_duplicated_triangles()
        m = m.remove_unreferenced_vertices()
        return Mesh.from_open3d(m)

    def simplify(self, target_faces: int) -> "Mesh":
        """Quadric-error decimation to about ``target_faces`` faces (open3d)."""
        if target_faces <= 0:
            raise ValueError(f"simplify: target_faces must be positive, got {target_faces}")
        m = self.to_open3d().simplify_quadric_decimation(target_number_of_triangles=int(target_faces))
        return Mesh.from_open3d(m)

    def compact(self) -> "Mesh":
        """Drop vertices no face references (pure PyTorch)."""
        used = torch.zeros(self.num_vertices, dtype=torch.bool, device=self.vertices.device)
        used[self.faces.reshape(-1)] = True
        remap = torch.cumsum(used.long(), 0) - 1
        pick = lambda t: None if t is None else t[used]  # noqa: E731
        return Mesh(self.vertices[used], remap[self.faces], pick(self.colors), pick(self.normals))


def save_mesh(mesh: Mesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` as PLY, OBJ or GLB (by suffix), atomically. Returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported mesh format {suffix!r}; expected one of {', '.join(FORMATS)}")
    tm = mesh.to_trimesh()
    file_type = suffix[1:]
    with atomic_path(path) as tmp:
        if file_type == "obj":
            data = tm.export(file_type="obj", include_normals=mesh.normals is not None, include_color=True)
        else:
            data = tm.export(file_type=file_type)
        tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def load_mesh(path: str | os.PathLike) -> Mesh:
    """Read a PLY / OBJ / GLB file into a :class:`Mesh` (vertex order kept; GLB scenes are merged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: mesh file not found")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unsupported mesh format {suffix!r}; expected one of {', '.join(FORMATS)}")
    trimesh = require("trimesh", "mesh import")
    kwargs = {"process": False}
    if suffix == ".obj":
        kwargs["maintain_order"] = True
    loaded = trimesh.load(str(path), file_type=suffix[1:], **kwargs)
    if isinstance(loaded, trimesh.Scene):
        geoms = list(loaded.geometry.values())
        if not geoms:
            raise ValueError(f"{path}: the file holds no mesh")
        loaded = geoms[0] if len(geoms) == 1 else trimesh.util.concatenate(geoms)
    if not hasattr(loaded, "faces"):
        raise ValueError(f"{path}: expected a triangle mesh, found {type(loaded).__name__}")
    return Mesh.from_trimesh(loaded)
