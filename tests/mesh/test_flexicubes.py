"""FlexiCubes: generated tables, parity with the authors' extraction, analytic shapes, edge cases."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from tests.conftest import fixture_files, optional, requires_cuda
from vision3d.mesh import Mesh, flexicubes, voxel_grid
from vision3d.mesh.flexicubes import CUBE_EDGES, dmc_tables
from vision3d.mesh.metrics import nearest_neighbors
from vision3d.mesh.sdf import SHAPES

# sha256 of json.dumps([dmc_table, num_vd_table, check_table]) of the authors' tables.py
# (nv-tlabs/FlexiCubes as vendored in lutao2021/DiMeR@b29e953); our tables are generated, not copied.
AUTHORS_TABLES_SHA256 = "164690584d6d4803ec468b17cdb7ccd963cec321c94f830001048515fb7b455e"


def test_generated_tables_equal_authors():
    dmc, num_vd, check = dmc_tables()
    digest = hashlib.sha256(json.dumps([dmc, num_vd, check]).encode()).hexdigest()
    assert digest == AUTHORS_TABLES_SHA256


def test_table_invariants():
    dmc, num_vd, check = dmc_tables()
    assert num_vd[0] == num_vd[255] == 0
    for case in range(256):
        inside = [(case >> c) & 1 for c in range(8)]
        crossed = sorted(e for e, (a, b) in enumerate(CUBE_EDGES) if inside[a] != inside[b])
        groups = [[e for e in g if e >= 0] for g in dmc[case][: num_vd[case]]]
        assert sorted(e for g in groups for e in g) == crossed  # a partition of the crossed edges
        assert all(len(g) >= 3 for g in groups)  # every patch is at least a triangle
    flagged = [c for c in range(256) if check[c][0]]
    assert len(flagged) == 36  # 24 cases C16 + 12 cases C19
    assert all(check[c][4] == 255 - c and num_vd[255 - c] == 2 and num_vd[c] == 1 for c in flagged)


def test_voxel_grid_layout():
    v, c = voxel_grid(3)
    assert v.shape == (64, 3) and c.shape == (27, 8)
    assert torch.equal(v[0], torch.tensor([-0.5, -0.5, -0.5])) and torch.allclose(v[-1], torch.full((3,), 0.5))
    corner = v[c[0]] - v[c[0, 0]]  # corner c at (c & 1, c >> 1 & 1, c >> 2 & 1) / res
    expect = torch.tensor([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.float32) / 3
    torch.testing.assert_close(corner, expect)


def test_parity_with_authors_fixture():
    st, _ = fixture_files("dimer")
    from safetensors.torch import load_file

    f = load_file(str(st))
    verts, cubes = voxel_grid(16)
    torch.testing.assert_close(verts * 2.1, f["in/grid_vertices"], atol=1e-6, rtol=0)
    assert torch.equal(cubes, f["in/grid_cubes"])
    z = torch.zeros(cubes.shape[0], 21)
    out = flexicubes(
        f["in/grid_vertices"], f["out/sdf"][0, :, 0], f["in/grid_cubes"], 16,
        z[:, :12], z[:, 12:20], z[:, 20], weight_scale=0.5,
    )  # fmt: skip
    assert torch.equal(out.faces, f["out/mesh_faces"])
    torch.testing.assert_close(out.vertices, f["out/mesh_vertices"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.reg, f["out/flexicubes_reg"], atol=1e-5, rtol=1e-4)
    # no weights at all gives the same mesh (zeros normalise to uniform weights)
    plain = flexicubes(f["in/grid_vertices"], f["out/sdf"][0, :, 0], f["in/grid_cubes"], 16)
    assert torch.equal(plain.faces, out.faces)
    torch.testing.assert_close(plain.vertices, out.vertices)


def _true_chamfer(shape, mesh: Mesh, n: int = 1500) -> float:
    """Symmetric Chamfer (L2, mean of both directions) between the mesh and the exact surface."""
    g = torch.Generator().manual_seed(0)
    pm, _ = mesh.sample_points(n, generator=g)
    to_true = shape(pm).abs().mean()  # exact distance from mesh samples to the true surface
    ps, _ = shape.sample(n, generator=g)
    pm_dense, _ = mesh.sample_points(4 * n, generator=g)
    to_mesh = nearest_neighbors(ps, torch.cat((pm_dense, mesh.vertices)))[0].mean()
    return float(0.5 * (to_true + to_mesh))


@pytest.mark.parametrize("name", ["sphere", "box", "torus"])
def test_analytic_shapes_watertight_and_close(name):
    trimesh = optional("trimesh")
    shape = SHAPES[name]
    res = 24
    v, c = voxel_grid(res)
    out = flexicubes(v, shape(v), c, res)
    mesh = Mesh(out.vertices, out.faces)
    tm = trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume > 0  # faces wind outward (toward positive SDF)
    cell = 1.0 / res
    # bound: 0.15 cell (measured 0.08-0.11 cell at res 24; box edges and corners are bevelled)
    assert _true_chamfer(shape, mesh) < 0.15 * cell
    # vertex positions: within half a cell of the true surface (sharp box edges are cut)
    assert float(shape(mesh.vertices).abs().max()) < 0.5 * cell


def test_torus_genus_one():
    trimesh = optional("trimesh")
    v, c = voxel_grid(24)
    out = flexicubes(v, SHAPES["torus"](v), c, 24)
    tm = trimesh.Trimesh(out.vertices.numpy(), out.faces.numpy(), process=False)
    assert tm.euler_number == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_empty_sdf_gives_message_not_crash(sign):
    v, c = voxel_grid(4)
    out = flexicubes(v, torch.full((v.shape[0],), sign), c, 4)
    assert out.empty and out.vertices.shape == (0, 3) and out.faces.shape == (0, 3)
    assert ("positive" if sign > 0 else "negative") in out.message


def test_training_split_and_gradients():
    trimesh = optional("trimesh")
    v, c = voxel_grid(12)
    s = SHAPES["sphere"](v).requires_grad_()
    gamma = torch.zeros(c.shape[0], requires_grad=True)
    beta = torch.zeros(c.shape[0], 12, requires_grad=True)
    ev = flexicubes(v, s, c, 12, beta=beta, gamma=gamma)
    tr = flexicubes(v, s, c, 12, beta=beta, gamma=gamma, training=True)
    assert tr.faces.shape[0] == 2 * ev.faces.shape[0]  # 4 triangles per quad instead of 2
    assert tr.vertices.shape[0] == ev.vertices.shape[0] + ev.faces.shape[0] // 2
    assert trimesh.Trimesh(tr.vertices.detach().numpy(), tr.faces.numpy(), process=False).is_watertight
    (tr.vertices.square().sum() + tr.reg.sum()).backward()
    for t in (s, gamma, beta):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_bad_input():
    v, c = voxel_grid(4)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        flexicubes(v[:, :2], v[:, 0], c, 4)
    with pytest.raises(ValueError, match="s must be"):
        flexicubes(v, v[:10, 0], c, 4)
    with pytest.raises(ValueError, match="resolution"):
        flexicubes(v, v[:, 0], c, 5)


@requires_cuda
def test_cuda_matches_cpu():
    v, c = voxel_grid(20)
    s = SHAPES["torus"](v)
    a = flexicubes(v, s, c, 20)
    b = flexicubes(v.cuda(), s.cuda(), c.cuda(), 20)
    assert torch.equal(a.faces, b.faces.cpu())
    torch.testing.assert_close(a.vertices, b.vertices.cpu(), atol=1e-6, rtol=0)
