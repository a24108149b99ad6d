"""Benchmark: FlexiCubes (vision3d.mesh.flexicubes) vs marching cubes (scikit-image) on analytic SDFs.

For each shape (sphere, box, torus in [-0.5, 0.5]^3) and grid resolution, both extractors get the
same SDF samples on the ``(R+1)^3`` grid. Reported: wall time of the extraction alone (median of
``--repeats``), vertex and face counts, watertightness (trimesh, when installed) and the symmetric
Chamfer distance (L2, mean of both directions) to the exact surface: mesh -> surface is the exact
|SDF| at area-uniform mesh samples, surface -> mesh the distance from exact surface samples to
dense mesh samples. Usage::

    python tools/bench/flexicubes.py --res 32 64 128 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vision3d.mesh import Mesh, flexicubes, voxel_grid
from vision3d.mesh.metrics import nearest_neighbors
from vision3d.mesh.sdf import SHAPES
from vision3d.utils.optional import available, require


def chamfer_to_truth(shape, mesh: Mesh, n: int, seed: int = 0) -> tuple[float, float]:
    """(symmetric Chamfer, exact one-sided mean |SDF| of mesh samples)."""
    g = torch.Generator().manual_seed(seed)
    pm, _ = mesh.sample_points(n, generator=g)
    to_true = shape(pm).abs().mean()
    ps, _ = shape.sample(n, generator=g)
    dense, _ = mesh.sample_points(4 * n, generator=g)
    to_mesh = nearest_neighbors(ps, torch.cat((dense, mesh.vertices)))[0].mean()
    return float(0.5 * (to_true + to_mesh)), float(to_true)


def marching_cubes(sdf_grid, res: int) -> Mesh:
    measure = require("skimage.measure", "the marching-cubes baseline")
    verts, faces, _, _ = measure.marching_cubes(sdf_grid, level=0.0, spacing=(1.0 / res,) * 3)
    return Mesh(torch.from_numpy(verts.copy()).float() - 0.5, torch.from_numpy(faces.copy()).long())


def timed(fn, repeats: int, sync):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=10000, help="surface samples per Chamfer term")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    has_tm = available("trimesh")
    print(f"device {dev}, torch threads {torch.get_num_threads()}")
    print("| shape | res | method | time (ms) | vertices | faces | watertight | Chamfer | mesh->surface | / cell |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.shapes:
        shape = SHAPES[name]
        for res in args.res:
            v, c = voxel_grid(res, dev)
            s = shape(v)
            fc, t_fc = timed(lambda: flexicubes(v, s, c, res), args.repeats, sync)
            grid = s.reshape(res + 1, res + 1, res + 1).cpu().numpy()
            mc, t_mc = timed(lambda: marching_cubes(grid, res), args.repeats, sync)
            fc_mesh = Mesh(fc.vertices.cpu(), fc.faces.cpu())
            for label, mesh, t in (("FlexiCubes", fc_mesh, t_fc), ("marching cubes", mc, t_mc)):
                wt = "n/a"
                if has_tm:
                    import trimesh

                    wt = str(trimesh.Trimesh(mesh.vertices.numpy(), mesh.faces.numpy(), process=False).is_watertight)
                cd, exact = chamfer_to_truth(shape, mesh, args.samples)
                print(
                    f"| {name} | {res} | {label} | {t * 1e3:.1f} | {mesh.num_vertices} | {mesh.num_faces} | {wt} "
                    f"| {cd:.2e} | {exact:.2e} | {exact * res:.4f} |"
                )


if __name__ == "__main__":
    main()
