"""Mesh type: validation, normals, sampling, PLY/OBJ/GLB round trips, open3d paths."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import needs, optional
from vision3d.mesh import Mesh, flexicubes, load_mesh, save_mesh, voxel_grid
from vision3d.mesh.sdf import SHAPES
from vision3d.utils.optional import MissingDependencyError


def _sphere_mesh(res: int = 10, colors: bool = True) -> Mesh:
    v, c = voxel_grid(res)
    out = flexicubes(v, SHAPES["sphere"](v), c, res)
    col = (out.vertices + 0.5).clamp(0, 1) if colors else None
    return Mesh(out.vertices, out.faces, col)


def test_validation_errors():
    v = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"vertices must be \[V, 3\]"):
        Mesh(torch.zeros(4, 2), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"faces must be \[F, 3\]"):
        Mesh(v, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        Mesh(v, torch.tensor([[0, 1, 4]]))
    with pytest.raises(ValueError, match="colors"):
        Mesh(v, torch.tensor([[0, 1, 2]]), colors=torch.zeros(3, 3))


def test_normals_point_outward_and_sampling_on_surface():
    m = _sphere_mesh(12).with_normals()
    radial = torch.nn.functional.normalize(m.vertices, dim=-1)
    assert float((m.normals * radial).sum(-1).min()) > 0.9
    pts, nrm = m.sample_points(500, generator=torch.Generator().manual_seed(0))
    assert float(SHAPES["sphere"](pts).abs().max()) < 0.02  # chord sag at res 12
    assert float((nrm * torch.nn.functional.normalize(pts, dim=-1)).sum(-1).min()) > 0.8
    assert abs(float(m.face_areas().sum()) - SHAPES["sphere"].area()) < 0.08 * SHAPES["sphere"].area()


def test_transform_and_compact():
    m = _sphere_mesh(6).with_normals()
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    t = m.transform(rot)
    torch.testing.assert_close(t.vertices, m.vertices @ rot.T)
    torch.testing.assert_close(t.normals, m.normals @ rot.T, atol=1e-6, rtol=0)
    extra = Mesh(torch.cat((m.vertices, torch.ones(2, 3))), m.faces, None)
    assert extra.compact().num_vertices == m.num_vertices


@pytest.mark.parametrize("suffix", [".ply", ".obj", ".glb"])
def test_round_trip(tmp_path, suffix):
    optional("trimesh")
    m = _sphere_mesh(8).with_normals()
    path = save_mesh(m, tmp_path / f"m{suffix}")
    back = load_mesh(path)
    assert back.num_vertices == m.num_vertices and torch.equal(back.faces, m.faces)
    torch.testing.assert_close(back.vertices, m.vertices, atol=1e-6, rtol=0)
    assert back.colors is not None
    torch.testing.assert_close(back.colors, m.colors, atol=1 / 255, rtol=0)  # stored as 8-bit
    if back.normals is not None:
        torch.testing.assert_close(back.normals, m.normals, atol=1e-5, rtol=0)


def test_io_errors(tmp_path):
    m = _sphere_mesh(4, colors=False)
    with pytest.raises(ValueError, match=r"\.stl"):
        save_mesh(m, tmp_path / "m.stl")
    with pytest.raises(FileNotFoundError, match="nope.ply"):
        load_mesh(tmp_path / "nope.ply")
    bad = tmp_path / "bad.xyz"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="bad.xyz"):
        load_mesh(bad)


def test_open3d_missing_names_pip_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "open3d", None)  # import open3d now fails as if it were not installed
    m = _sphere_mesh(4)
    with pytest.raises(MissingDependencyError, match=r'pip install "vision3d\[mesh\]"'):
        m.clean()
    with pytest.raises(MissingDependencyError, match="open3d"):
        m.simplify(100)


@needs("open3d")
def test_open3d_clean_and_simplify(tmp_path):
    import open3d as o3d

    m = _sphere_mesh(12)
    dup = Mesh(torch.cat((m.vertices, m.vertices[:5])), m.faces, torch.cat((m.colors, m.colors[:5])))
    assert dup.clean().num_vertices == m.num_vertices
    small = m.simplify(200)
    assert 0 < small.num_faces <= 220
    path = save_mesh(m, tmp_path / "m.ply")
    o = o3d.io.read_triangle_mesh(str(path))
    assert len(o.triangles) == m.num_faces
