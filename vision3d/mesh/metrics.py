"""Mesh-to-mesh metrics: Chamfer distance, F-score, normal consistency.

Definitions (as used by the mesh-LRM line of work that DiMeR (arXiv 2504.17670) reports against:
InstantMesh arXiv 2404.07191, and Occupancy Networks arXiv 1812.03828 for normal consistency).
With ``P`` points sampled on the prediction, ``Q`` on the reference, ``d(p, Q) = min_q ||p - q||_2``:

* Chamfer distance ``CD = 1/2 (mean_p d(p, Q) + mean_q d(q, P))`` (L2 distances, not squared;
  ``squared=True`` gives the squared-distance variant);
* F-score at threshold ``tau``: precision = fraction of ``P`` with ``d(p, Q) < tau``, recall =
  fraction of ``Q`` with ``d(q, P) < tau``, ``F = 2 PR / (P + R)``;
* normal consistency ``NC = 1/2 (mean_p |n_p . n_nn(p)| + mean_q |n_q . n_nn(q)|)`` with the normal
  of the nearest sample on the other surface (absolute value: orientation-free).

Meshes are compared through area-uniform surface samples (:meth:`Mesh.sample_points`). Scale the
meshes to the protocol's normalisation (e.g. the unit cube) before calling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .mesh import Mesh


def nearest_neighbors(a: Tensor, b: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """For each point of ``a`` [N, 3], the distance to and index of its nearest point in ``b`` [M, 3].

    The neighbour is found with a float32 matrix product (``|a|^2 - 2 a.b + |b|^2``), its distance is
    then recomputed exactly in float64, so small distances keep full precision. ``chunk`` rows of
    ``a`` are processed at a time (default: about 32 M distances per chunk).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"nearest_neighbors: expected [N, D] and [M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.shape[0] == 0:
        raise ValueError("nearest_neighbors: the reference point set is empty")
    centre = b.mean(0, keepdim=True)  # centring keeps the expansion well conditioned
    a0, b0 = (a - centre).float(), (b - centre).float()
    b_sq = b0.square().sum(-1)
    chunk = chunk or max(1, (1 << 25) // max(1, b.shape[0]))
    idx = []
    for start in range(0, a0.shape[0], chunk):
        part = a0[start : start + chunk]
        d2 = b_sq.unsqueeze(0) - 2.0 * part @ b0.T  # |a|^2 is constant per row
        idx.append(d2.argmin(dim=1))
    nn_idx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long, device=a.device)
    dist = (a.double() - b.double()[nn_idx]).norm(dim=-1).to(a.dtype)
    return dist, nn_idx


@dataclass
class MeshMetrics:
    chamfer: float
    fscore: float
    precision: float
    recall: float
    normal_consistency: float


def chamfer_distance(p: Tensor, q: Tensor, squared: bool = False) -> Tensor:  # p [N, 3], q [M, 3] -> scalar
    """Symmetric Chamfer distance between point sets (mean of the two directed means)."""
    d_pq, _ = nearest_neighbors(p, q)
    d_qp, _ = nearest_neighbors(q, p)
    if squared:
        d_pq, d_qp = d_pq**2, d_qp**2
    return 0.5 * (d_pq.mean() + d_qp.mean())


def fscore(p: Tensor, q: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:  # p [N, 3], q [M, 3]
    """(F-score, precision, recall) at distance threshold ``tau``."""
    d_pq, _ = nearest_neighbors(p, q)
    d_qp, _ = nearest_neighbors(q, p)
    precision = (d_pq < tau).float().mean()
    recall = (d_qp < tau).float().mean()
    f = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros(()))
    return f, precision, recall


def normal_consistency(
    p: Tensor, np_: Tensor, q: Tensor, nq: Tensor  # points [N, 3] / [M, 3] and unit normals of the same shape
) -> Tensor:
    """Mean absolute cosine between each sample's normal and its nearest neighbour's, both directions."""
    _, i_pq = nearest_neighbors(p, q)
    _, i_qp = nearest_neighbors(q, p)
    a = (np_ * nq[i_pq]).sum(-1).abs().mean()
    b = (nq * np_[i_qp]).sum(-1).abs().mean()
    return 0.5 * (a + b)


def mesh_metrics(
    pred: Mesh, ref: Mesh, *, num_samples: int = 100_000, tau: float = 0.1, seed: int = 0
) -> MeshMetrics:
    """Chamfer, F-score@tau and normal consistency between two meshes from ``num_samples`` samples each."""
    for name, m in (("pred", pred), ("ref", ref)):
        if m.empty:
            raise ValueError(f"mesh_metrics: the {name} mesh has no faces")
    g = torch.Generator(device="cpu").manual_seed(seed)
    p, n_p = pred.to("cpu").sample_points(num_samples, generator=g)
    q, n_q = ref.to("cpu").sample_points(num_samples, generator=g)
    d_pq, i_pq = nearest_neighbors(p, q)
    d_qp, i_qp = nearest_neighbors(q, p)
    precision = float((d_pq < tau).float().mean())
    recall = float((d_qp < tau).float().mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    nc = 0.5 * (float((n_p * n_q[i_pq]).sum(-1).abs().mean()) + float((n_q * n_p[i_qp]).sum(-1).abs().mean()))
    return MeshMetrics(
        chamfer=float(0.5 * (d_pq.mean() + d_qp.mean())),
        fscore=f,
        precision=precision,
        recall=recall,
        normal_consistency=nc,
    )
