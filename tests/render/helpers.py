"""Scenes and an independent brute-force reference renderer for the render tests.

The reference projects with gsplat's own pure-PyTorch helpers (``gsplat/cuda/_torch_impl.py``) and
composites every pixel against every Gaussian in depth order with a plain loop over Gaussians that
follows gsplat's CUDA forward kernel statement by statement (no tiles, no radii, no chunking).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vision3d.gaussians import Gaussians
from vision3d.gaussians.sh import eval_sh
from vision3d.geometry import Cameras


def look_at(eye: Tensor, target: Tensor, up=(0.0, -1.0, 0.0)) -> Tensor:  # -> [4, 4] OpenCV cam_to_world
    f = torch.nn.functional.normalize(target - eye, dim=-1)
    r = torch.nn.functional.normalize(torch.linalg.cross(f, torch.tensor(up, dtype=eye.dtype)), dim=-1)
    d = torch.linalg.cross(f, r)
    c2w = torch.eye(4, dtype=eye.dtype)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = r, d, f, eye
    return c2w


def random_scene(
    n: int,
    sh_degree: int = 1,
    dtype=torch.float32,
    spread: float = 0.6,
    scale: tuple[float, float] = (0.03, 0.15),
    seed: int = 0,
) -> Gaussians:
    """Gaussians in a ball around ``(0, 0, 3)`` in front of the identity camera."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g, dtype=dtype) * spread + torch.tensor([0.0, 0.0, 3.0], dtype=dtype)
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    lo, hi = scale
    scales = torch.exp(torch.rand(n, 3, generator=g, dtype=dtype) * math.log(hi / lo)) * lo
    opac = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.1
    k = (sh_degree + 1) ** 2
    sh = torch.randn(n, k, 3, generator=g, dtype=dtype) * 0.3
    sh[:, 0] = torch.randn(n, 3, generator=g, dtype=dtype) * 0.8
    return Gaussians(means, quats, scales, opac, sh)


def cameras(v: int = 1, width: int = 24, height: int = 20, dtype=torch.float32, f: float = 22.0) -> Cameras:
    """``v`` cameras on a small arc looking at ``(0, 0, 3)`` (the first is the identity pose)."""
    K = torch.tensor([[f, 0.0, width / 2 + 0.3], [0.0, f * 1.05, height / 2 - 0.2], [0.0, 0.0, 1.0]], dtype=dtype)
    poses = []
    for i in range(v):
        if i == 0:
            poses.append(torch.eye(4, dtype=dtype))
        else:
            ang = 0.25 * i
            eye = torch.tensor([3.0 * math.sin(ang), 0.2 * i, 3.0 - 3.0 * math.cos(ang)], dtype=dtype)
            poses.append(look_at(eye, torch.tensor([0.0, 0.0, 3.0], dtype=dtype)))
    return Cameras(K.expand(v, 3, 3), torch.stack(poses), width, height)


def brute_force(
    g: Gaussians,  # unbatched, N
    cams: Cameras,  # [V]
    *,
    sh_degree: int,
    background: Tensor | None = None,  # [3]
    antialiased: bool = False,
    near: float = 0.01,
    far: float = 1e10,
    eps2d: float = 0.3,
) -> tuple[Tensor, Tensor, Tensor]:
    """Colours ``[V, 3, H, W]``, alphas ``[V, 1, H, W]`` and accumulated depth ``[V, 1, H, W]``."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    W, H = cams.width, cams.height
    covars, _ = _quat_scale_to_covar_preci(g.quats, g.scales, True, False, triu=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        g.means, covars, cams.world_to_cam, cams.K, W, H, eps2d=eps2d, near_plane=near, far_plane=far,
        calc_compensations=antialiased,
    )  # fmt: skip
    ok = (depths > near) & (depths < far)  # the reference keeps z in (near, far)
    opac = g.opacities[None].expand_as(depths)
    if antialiased:
        opac = opac * comp
    dirs = g.means[None] - cams.cam_to_world[:, None, :3, 3]
    rgb = torch.clamp_min(eval_sh(sh_degree, g.sh[None], dirs) + 0.5, 0.0)  # [V, N, 3]
    feats = torch.cat([rgb, depths[..., None]], -1)  # [V, N, 4]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=g.dtype) + 0.5, torch.arange(W, dtype=g.dtype) + 0.5, indexing="ij")
    px, py = xs.reshape(-1), ys.reshape(-1)
    colors, alphas = [], []
    for v in range(cams.batch_shape[0]):
        order = torch.sort(torch.where(ok[v], depths[v], torch.full_like(depths[v], math.inf)), stable=True).indices
        T = torch.ones(H * W, dtype=g.dtype)
        done = torch.zeros(H * W, dtype=torch.bool)
        out = torch.zeros(H * W, 4, dtype=g.dtype)
        for i in order.tolist():
            if not bool(ok[v, i]):
                continue
            dx, dy = means2d[v, i, 0] - px, means2d[v, i, 1] - py
            a_, b_, c_ = conics[v, i]
            sigma = 0.5 * (a_ * dx * dx + c_ * dy * dy) + b_ * dx * dy
            alpha = torch.clamp(opac[v, i] * torch.exp(-sigma), max=0.999)
            skip = (sigma < 0) | (alpha < 1.0 / 255.0)
            next_T = T * (1 - alpha)
            stop = ~skip & ~done & (next_T <= 1e-4)
            done = done | stop
            use = ~skip & ~done
            out = out + torch.where(use[:, None], feats[v, i] * (alpha * T)[:, None], torch.zeros_like(out))
            T = torch.where(use, next_T, T)
        rgbv = out[:, :3]
        if background is not None:
            rgbv = rgbv + T[:, None] * background
        colors.append(torch.cat([rgbv, out[:, 3:]], -1).T.reshape(4, H, W))
        alphas.append((1 - T).reshape(1, H, W))
    c = torch.stack(colors)
    return c[:, :3], torch.stack(alphas), c[:, 3:]
