"""A procedural Gaussian scene and look-at camera rigs, for demos and tests that need no data.

The scene is a textured object group on a checkerboard ground plane, built from thousands of
small flattened Gaussians lying on the surfaces (one short axis along the surface normal, the two
long axes along the surface tangents, sized to the sampling spacing so neighbours overlap into a
closed surface, the surfel layout of 2D Gaussian Splatting, Huang et al. 2024, arXiv 2403.17888):

- a torus tilted on its side with hue-gradient colours crossed by light/dark stripes;
- a sphere with a longitude/latitude checker;
- a box whose colour is a vertical gradient;
- a ground plane (``z = 0``, world **z up**) with a two-tone checkerboard.

Everything is deterministic given ``seed`` (the seed moves the palette and jitters the sample
positions within their cells). Cameras follow vision3d's conventions: OpenCV ``cam_to_world``
(x right, y down, z forward) and pixel-unit ``K`` with the principal point at the image centre.
Written for vision3d (Apache-2.0); no code taken from elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vision3d.geometry import Cameras
from vision3d.geometry.rotations import matrix_to_quat

from .gaussians import Gaussians

__all__ = [
    "ProceduralScene",
    "procedural_scene",
    "look_at",
    "intrinsics_from_fov",
    "orbit_cameras",
    "hemisphere_cameras",
    "collection_cameras",
    "collection_exposures",
]


@dataclass
class ProceduralScene:
    gaussians: Gaussians  # N Gaussians, sh degree 0
    target: Tensor  # [3] world point cameras should look at (the object group's centre)
    radius: float  # radius of a sphere around ``target`` holding the object group
    bounds_min: Tensor  # [3] axis-aligned bounds of every Gaussian centre (ground included)
    bounds_max: Tensor  # [3]


# ------------------------------------------------------------------ helpers
def _frame_quats(t1: Tensor, normal: Tensor) -> Tensor:  # [N, 3], [N, 3] -> [N, 4] wxyz
    """Rotation whose columns are (t1, n x t1, n): local x/y along the surface, local z = normal."""
    n = torch.nn.functional.normalize(normal, dim=-1)
    a = torch.nn.functional.normalize(t1 - (t1 * n).sum(-1, keepdim=True) * n, dim=-1)
    b = torch.cross(n, a, dim=-1)
    return matrix_to_quat(torch.stack([a, b, n], -1))


def _hsv_to_rgb(h: Tensor, s: Tensor | float, v: Tensor | float) -> Tensor:  # h in [0, 1) -> [..., 3]
    h = h % 1.0
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    s = torch.as_tensor(s, dtype=h.dtype)[..., None] if isinstance(s, Tensor) else s
    v = torch.as_tensor(v, dtype=h.dtype)[..., None] if isinstance(v, Tensor) else v
    return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _grid(nu: int, nv: int, gen: torch.Generator, jitter: float) -> tuple[Tensor, Tensor]:
    """Cell-centred (u, v) in [0, 1)^2 on an ``nu x nv`` grid, jittered by ``jitter`` cells."""
    iu, iv = torch.meshgrid(torch.arange(nu, dtype=torch.float64), torch.arange(nv, dtype=torch.float64), indexing="ij")
    ju = (torch.rand(nu, nv, generator=gen, dtype=torch.float64) - 0.5) * jitter
    jv = (torch.rand(nu, nv, generator=gen, dtype=torch.float64) - 0.5) * jitter
    return ((iu + 0.5 + ju) / nu).reshape(-1), ((iv + 0.5 + jv) / nv).reshape(-1)


# ------------------------------------------------------------------ surfaces
def _torus(gen, density, palette_shift, centre, tilt):
    R, r = 0.42, 0.15
    nu, nv = max(8, int(round(150 * density))), max(4, int(round(48 * density)))
    u, v = _grid(nu, nv, gen, 0.3)
    a, b = 2 * math.pi * u, 2 * math.pi * v
    ca, sa, cb, sb = a.cos(), a.sin(), b.cos(), b.sin()
    p = torch.stack([(R + r * cb) * ca, (R + r * cb) * sa, r * sb], -1)
    n = torch.stack([cb * ca, cb * sa, sb], -1)
    tu = torch.stack([-sa, ca, torch.zeros_like(sa)], -1)
    rot = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, math.cos(tilt), -math.sin(tilt)], [0.0, math.sin(tilt), math.cos(tilt)]],
        dtype=torch.float64,
    )
    p, n, tu = p @ rot.T + centre, n @ rot.T, tu @ rot.T
    stripes = ((v * 10).floor() % 2)  # 10 bands around the tube
    rgb = _hsv_to_rgb(u + palette_shift, 0.85, 0.95) * (0.45 + 0.55 * stripes)[..., None]
    su = 2 * math.pi * (R + r * cb) / nu
    sv = 2 * math.pi * r / nv
    return p, n, tu, rgb, torch.stack([su, torch.full_like(su, sv)], -1)


def _sphere(gen, density, palette_shift, centre):
    r = 0.26
    nu, nv = max(8, int(round(80 * density))), max(4, int(round(40 * density)))
    u, v = _grid(nu, nv, gen, 0.3)
    lon = 2 * math.pi * u
    lat = math.pi * (v - 0.5) * 0.98
    n = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], -1)
    p = centre + r * n
    tu = torch.stack([-lon.sin(), lon.cos(), torch.zeros_like(lon)], -1)
    check = ((u * 12).floor() + (v * 6).floor()) % 2
    c1 = _hsv_to_rgb(torch.tensor(0.58 + palette_shift, dtype=torch.float64), 0.75, 0.9)
    c2 = torch.tensor([0.97, 0.95, 0.9], dtype=torch.float64)
    rgb = torch.where(check[..., None] > 0, c1, c2)
    su = (2 * math.pi * r * lat.cos() / nu).clamp_min(0.25 * math.pi * r / nv)
    sv = torch.full_like(su, math.pi * r / nv)
    return p, n, tu, rgb, torch.stack([su, sv], -1)


def _box(gen, density, palette_shift, centre, half):
    ps, ns, ts, cols, ss = [], [], [], [], []
    hx, hy, hz = half
    faces = [  # (normal, tangent u, tangent v, half sizes along u, v)
        ((1, 0, 0), (0, 1, 0), (0, 0, 1), hy, hz),
        ((-1, 0, 0), (0, -1, 0), (0, 0, 1), hy, hz),
        ((0, 1, 0), (-1, 0, 0), (0, 0, 1), hx, hz),
        ((0, -1, 0), (1, 0, 0), (0, 0, 1), hx, hz),
        ((0, 0, 1), (1, 0, 0), (0, 1, 0), hx, hy),
    ]
    step = 0.022 / max(density, 1e-3)
    c_lo = _hsv_to_rgb(torch.tensor(0.08 + palette_shift, dtype=torch.float64), 0.9, 0.95)
    c_hi = _hsv_to_rgb(torch.tensor(0.85 + palette_shift, dtype=torch.float64), 0.7, 0.85)
    for nrm, tu, tv, hu, hv in faces:
        nu, nv = max(2, int(round(2 * hu / step))), max(2, int(round(2 * hv / step)))
        u, v = _grid(nu, nv, gen, 0.3)
        nrm_t, tu_t, tv_t = (torch.tensor(x, dtype=torch.float64) for x in (nrm, tu, tv))
        off = torch.tensor([hx * nrm[0], hy * nrm[1], hz * nrm[2]], dtype=torch.float64)
        p = centre + off + (2 * u - 1)[..., None] * hu * tu_t + (2 * v - 1)[..., None] * hv * tv_t
        t = ((p[..., 2] - (centre[2] - hz)) / (2 * hz)).clamp(0, 1)[..., None]
        ps.append(p)
        ns.append(nrm_t.expand_as(p))
        ts.append(tu_t.expand_as(p))
        cols.append((1 - t) * c_lo + t * c_hi)
        ss.append(torch.tensor([2 * hu / nu, 2 * hv / nv], dtype=torch.float64).expand(p.shape[0], 2))
    return torch.cat(ps), torch.cat(ns), torch.cat(ts), torch.cat(cols), torch.cat(ss)


def _ground(gen, density, extent, palette_shift):
    n = max(8, int(round(64 * density)))
    u, v = _grid(n, n, gen, 0.2)
    p = torch.stack([(2 * u - 1) * extent, (2 * v - 1) * extent, torch.zeros_like(u)], -1)
    check = ((u * 8).floor() + (v * 8).floor()) % 2
    c1 = torch.tensor([0.82, 0.80, 0.74], dtype=torch.float64)
    c2 = _hsv_to_rgb(torch.tensor(0.33 + palette_shift, dtype=torch.float64), 0.35, 0.35)
    rgb = torch.where(check[..., None] > 0, c1, c2)
    nrm = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand_as(p)
    tu = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand_as(p)
    s = torch.full((p.shape[0], 2), 2 * extent / n, dtype=torch.float64)
    return p, nrm, tu, rgb, s


def procedural_scene(
    seed: int = 0,
    density: float = 1.0,  # multiplies the samples per unit length on every surface (1.0: ~15k Gaussians)
    ground_extent: float = 1.6,  # the ground plane spans [-e, e]^2 at z = 0
    thickness: float = 0.15,  # normal-axis scale as a fraction of the tangent scales
    overlap: float = 0.7,  # tangent scale (std) as a fraction of the sample spacing
    opacity: float = 0.98,
    dtype: torch.dtype = torch.float32,
) -> ProceduralScene:
    """Build the procedural scene (world z up, ground at ``z = 0``, objects around the origin).

    Deterministic: the same ``seed`` and arguments give bit-identical Gaussians.
    """
    if density <= 0:
        raise ValueError(f"procedural_scene: density must be positive, got {density}")
    gen = torch.Generator().manual_seed(int(seed))
    shift = float(torch.rand((), generator=gen, dtype=torch.float64))
    f64 = torch.float64
    parts = [
        _torus(gen, density, shift, torch.tensor([-0.18, 0.12, 0.62], dtype=f64), tilt=math.radians(70)),
        _sphere(gen, density, shift, torch.tensor([0.45, -0.32, 0.26], dtype=f64)),
        _box(gen, density, shift, torch.tensor([-0.35, -0.45, 0.16], dtype=f64), (0.18, 0.14, 0.16)),
        _ground(gen, density, ground_extent, shift),
    ]
    p, n, tu, rgb, spacing = (torch.cat([part[i] for part in parts]) for i in range(5))
    tangent = spacing * overlap  # [N, 2]
    scales = torch.cat([tangent, tangent.min(-1, keepdim=True).values * thickness], -1)
    quats = _frame_quats(tu, n)
    opac = torch.full((p.shape[0],), float(opacity), dtype=f64)
    g = Gaussians.from_rgb(p.to(dtype), quats.to(dtype), scales.to(dtype), opac.to(dtype), rgb.clamp(0, 1).to(dtype))
    target = torch.tensor([0.0, -0.1, 0.35], dtype=dtype)
    obj = torch.cat([parts[i][0] for i in range(3)]).to(dtype)
    radius = float((obj - target).norm(dim=-1).max())
    return ProceduralScene(g, target, radius, g.means.amin(0), g.means.amax(0))


# ------------------------------------------------------------------ cameras
def look_at(
    eye: Tensor,  # [..., 3] camera centres, world
    target: Tensor,  # [..., 3] points looked at, world
    up: Tensor | tuple[float, float, float] = (0.0, 0.0, 1.0),  # [3] world up (image "up" = -y_cam)
) -> Tensor:  # [..., 4, 4] cam_to_world, OpenCV (x right, y down, z forward)
    """Cam-to-world matrices of cameras at ``eye`` looking at ``target`` with ``up`` pointing up in the image."""
    eye = torch.as_tensor(eye)
    target = torch.as_tensor(target, dtype=eye.dtype, device=eye.device)
    up = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    z = torch.nn.functional.normalize(target - eye, dim=-1)
    x = torch.cross(z, up, dim=-1)
    bad = x.norm(dim=-1, keepdim=True) < 1e-8  # looking straight along up: pick any right vector
    alt = torch.cross(z, torch.roll(up, 1, -1), dim=-1)
    x = torch.nn.functional.normalize(torch.where(bad, alt, x), dim=-1)
    y = torch.cross(z, x, dim=-1)
    c2w = torch.zeros(*eye.shape[:-1], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[..., :3, 0], c2w[..., :3, 1], c2w[..., :3, 2], c2w[..., :3, 3] = x, y, z, eye
    c2w[..., 3, 3] = 1.0
    return c2w


def intrinsics_from_fov(width: int, height: int, fov_deg: float, dtype=torch.float32) -> Tensor:  # [3, 3]
    """Pinhole K in pixels with horizontal field of view ``fov_deg``, square pixels, centred principal point."""
    if not 0 < fov_deg < 180:
        raise ValueError(f"intrinsics_from_fov: fov_deg must be in (0, 180), got {fov_deg}")
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]], dtype=dtype)


def orbit_cameras(
    n: int,
    target: Tensor | tuple[float, float, float],  # [3] world point at the orbit's centre
    radius: float,  # distance from target
    elevation_deg: float = 25.0,  # angle above the horizontal plane through target
    width: int = 128,
    height: int = 128,
    fov_deg: float = 50.0,
    start_deg: float = 0.0,  # azimuth of the first camera, measured from +x towards +y
    up: tuple[float, float, float] = (0.0, 0.0, 1.0),
    near: float | None = None,
    far: float | None = None,
) -> Cameras:  # batch [n]
    """``n`` look-at cameras evenly spaced in azimuth on a circle around ``target`` (world up = ``up``)."""
    if n < 1:
        raise ValueError(f"orbit_cameras: n must be >= 1, got {n}")
    az = torch.deg2rad(torch.arange(n, dtype=torch.float64) * (360.0 / n) + start_deg)
    el = torch.full_like(az, math.radians(elevation_deg))
    return _spherical_rig(az, el, target, radius, width, height, fov_deg, up, near, far)


def hemisphere_cameras(
    n: int,
    target: Tensor | tuple[float, float, float],  # [3]
    radius: float | tuple[float, float],  # distance from target, or (min, max) spread over the views
    elevation_range_deg: tuple[float, float] = (15.0, 60.0),
    width: int = 128,
    height: int = 128,
    fov_deg: float = 50.0,
    offset: float = 0.0,  # in [0, 1): shifts the spiral, e.g. 0.5 gives views interleaved with offset 0
    up: tuple[float, float, float] = (0.0, 0.0, 1.0),
    near: float | None = None,
    far: float | None = None,
) -> Cameras:  # batch [n]
    """``n`` look-at cameras on a Fibonacci spiral over a band of the upper hemisphere around ``target``.

    The views cover the band evenly in area (elevation sampled uniformly in ``sin``), with
    golden-angle steps in azimuth; deterministic.
    """
    if n < 1:
        raise ValueError(f"hemisphere_cameras: n must be >= 1, got {n}")
    lo, hi = (math.radians(x) for x in elevation_range_deg)
    if not -math.pi / 2 <= lo <= hi <= math.pi / 2:
        raise ValueError(f"hemisphere_cameras: bad elevation range {elevation_range_deg}")
    i = torch.arange(n, dtype=torch.float64) + 0.5 + offset
    s = math.sin(lo) + (math.sin(hi) - math.sin(lo)) * (i % n) / n
    el = torch.asin(s)
    az = i * math.pi * (3.0 - math.sqrt(5.0))
    if isinstance(radius, (tuple, list)):
        r = radius[0] + (radius[1] - radius[0]) * ((i * 0.618034) % 1.0)
    else:
        r = torch.full_like(az, float(radius))
    return _spherical_rig(az, el, target, r, width, height, fov_deg, up, near, far)


def _spherical_rig(az, el, target, radius, width, height, fov_deg, up, near, far) -> Cameras:
    target = torch.as_tensor(target, dtype=torch.float64)
    radius = torch.as_tensor(radius, dtype=torch.float64)
    upv = torch.nn.functional.normalize(torch.as_tensor(up, dtype=torch.float64), dim=0)
    # an orthonormal basis (e1, e2) of the plane orthogonal to up, so azimuth works for any up
    helper = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    if abs(float(upv @ helper)) > 0.9:
        helper = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    e1 = torch.nn.functional.normalize(helper - (helper @ upv) * upv, dim=0)
    e2 = torch.cross(upv, e1, dim=0)
    d = (el.cos() * az.cos())[:, None] * e1 + (el.cos() * az.sin())[:, None] * e2 + el.sin()[:, None] * upv
    eye = target + radius[..., None] * d
    c2w = look_at(eye, target.expand_as(eye), upv).float()
    K = intrinsics_from_fov(width, height, fov_deg).expand(az.shape[0], 3, 3)
    return Cameras(K, c2w, width, height, near, far)


# ------------------------------------------------------------------ photo collections
def collection_cameras(
    n: int,
    target: Tensor | tuple[float, float, float],  # [3] world point the photos look at
    radius: tuple[float, float] = (2.2, 2.6),  # (min, max) distance from target, spread over the views
    arc_deg: float = 90.0,  # azimuth span of the walk around the target
    start_deg: float = 0.0,  # azimuth of the first photo, from +x towards +y
    elevation_range_deg: tuple[float, float] = (20.0, 32.0),
    sizes: tuple[tuple[int, int], ...] = ((160, 120), (120, 160), (144, 108)),  # (W, H), cycled
    fovs_deg: tuple[float, ...] = (55.0, 42.0, 62.0),  # horizontal field of view, cycled independently
    up: tuple[float, float, float] = (0.0, 0.0, 1.0),
) -> list[Cameras]:  # n cameras of batch [1], each its own size and K
    """Look-at cameras of a photo collection shot with several cameras on a walk around ``target``:
    photo ``i`` at azimuth ``start_deg + i / (n - 1) * arc_deg``, elevation and distance varying
    smoothly within their ranges, taken at size ``sizes[i % len(sizes)]`` (landscape and portrait) with field of view
    ``fovs_deg[i % len(fovs_deg)]`` (different zooms). Deterministic."""
    if n < 1 or not sizes or not fovs_deg:
        raise ValueError(f"collection_cameras: need n >= 1 and at least one size and fov, got {n}, {sizes}, {fovs_deg}")
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    az = torch.deg2rad(start_deg + arc_deg * t)
    lo, hi = elevation_range_deg
    el = torch.deg2rad(lo + (hi - lo) * torch.sin(math.pi * t))
    r = radius[0] + (radius[1] - radius[0]) * 0.5 * (1 + torch.cos(2 * math.pi * t))
    rig = _spherical_rig(az, el, target, r, 8, 8, 50.0, up, None, None)
    out = []
    for k in range(n):
        w, h = sizes[k % len(sizes)]
        K = intrinsics_from_fov(w, h, fovs_deg[k % len(fovs_deg)])[None]
        out.append(Cameras(K, rig.cam_to_world[k : k + 1], w, h))
    return out


def collection_exposures(
    n: int,
    strength: float = 0.35,  # largest relative change of brightness; 0 gives identical lighting
    tint: float = 0.12,  # largest relative change of one channel against the others (white balance)
    seed: int = 0,
) -> tuple[Tensor, Tensor]:  # gains [n, 3] > 0, offsets [n, 3]
    """Per-photo colour changes of a collection shot at different times and exposures: photo ``i`` is
    ``clamp(gain[i] * render + offset[i], 0, 1)`` per channel (exposure, white balance and a black-level
    lift). Deterministic given ``seed``."""
    if strength < 0 or tint < 0 or strength >= 1:
        raise ValueError(f"collection_exposures: need 0 <= strength < 1 and tint >= 0, got {strength}, {tint}")
    g = torch.Generator().manual_seed(int(seed))
    exposure = 1 + strength * (2 * torch.rand(n, 1, generator=g) - 1)
    wb = 1 + tint * (2 * torch.rand(n, 3, generator=g) - 1)
    offset = 0.05 * strength * (2 * torch.rand(n, 1, generator=g) - 1).expand(n, 3)
    return exposure * wb, offset.clone()
