"""Mesh metrics on analytic shapes with known answers."""

from __future__ import annotations

import pytest
import torch

from vision3d.mesh import Mesh, chamfer_distance, flexicubes, fscore, mesh_metrics, normal_consistency, voxel_grid
from vision3d.mesh.metrics import nearest_neighbors
from vision3d.mesh.sdf import Sphere


def _points_on_sphere(r: float, n: int, seed: int):
    return Sphere(radius=r).sample(n, generator=torch.Generator().manual_seed(seed))


def test_nearest_neighbors_exact():
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0, 1e-4], [5.0, 5.0, 5.0], [1.0, 1.0, 0.9]])
    d, i = nearest_neighbors(a, b)
    assert i.tolist() == [0, 2]
    torch.testing.assert_close(d, torch.tensor([1e-4, 0.1]), atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        nearest_neighbors(a, b[:0])


def test_chamfer_concentric_spheres():
    p, _ = _points_on_sphere(0.30, 1500, 0)
    q, _ = _points_on_sphere(0.35, 1500, 1)
    assert float(chamfer_distance(p, p)) == 0.0
    cd = float(chamfer_distance(p, q))
    assert 0.05 <= cd < 0.05 + 0.01  # radial gap plus sampling spacing
    assert abs(float(chamfer_distance(p, q, squared=True)) - 0.05**2) < 1e-3


def test_fscore_thresholds():
    p, _ = _points_on_sphere(0.30, 2000, 0)
    q, _ = _points_on_sphere(0.35, 2000, 1)
    f_hi, prec, rec = fscore(p, q, tau=0.1)
    assert float(f_hi) == float(prec) == float(rec) == 1.0
    f_lo, _, _ = fscore(p, q, tau=0.04)  # every point is at least 0.05 from the other sphere
    assert float(f_lo) == 0.0


def test_normal_consistency():
    p, n = _points_on_sphere(0.3, 1000, 0)
    q, m = _points_on_sphere(0.3, 1000, 1)
    assert float(normal_consistency(p, n, q, m)) > 0.98
    assert float(normal_consistency(p, n, q, -m)) > 0.98  # orientation-free
    tangent = torch.nn.functional.normalize(torch.cross(m, torch.randn_like(m), dim=-1), dim=-1)
    assert float(normal_consistency(p, n, q, tangent)) < 0.1


def test_mesh_metrics_flexicubes_sphere_vs_finer():
    def sphere_mesh(res):
        v, c = voxel_grid(res)
        out = flexicubes(v, Sphere(0.3)(v), c, res)
        return Mesh(out.vertices, out.faces)

    coarse, fine = sphere_mesh(12), sphere_mesh(28)
    same = mesh_metrics(fine, fine, num_samples=1200, tau=0.05)  # sample spacing is ~0.03
    diff = mesh_metrics(coarse, fine, num_samples=1200, tau=0.05)
    assert same.normal_consistency > 0.97 and same.fscore > 0.99
    assert diff.chamfer > same.chamfer and diff.normal_consistency > 0.95
    with pytest.raises(ValueError, match="pred mesh has no faces"):
        mesh_metrics(Mesh(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long)), fine)
