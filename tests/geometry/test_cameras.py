"""Cameras: projection stays consistent under resize/crop, rays, Plücker, batching."""

from __future__ import annotations

import pytest
import torch

from vision3d.geometry import Cameras, make_rigid, random_rotation


def _cams(*batch: int, w: int = 12, h: int = 8, dtype=torch.float64) -> Cameras:
    n = 1
    for b in batch:
        n *= b
    R = random_rotation(n, dtype=dtype)
    t = torch.randn(n, 3, dtype=dtype)
    c2w = make_rigid(R, t).reshape(*batch, 4, 4)
    K = torch.tensor([[10.0, 0.0, 6.3], [0.0, 11.0, 3.9], [0.0, 0.0, 1.0]], dtype=dtype)
    K = K.expand(*batch, 3, 3).clone()
    K[..., 0, 0] += torch.rand(batch, dtype=dtype)
    return Cameras(K, c2w, w, h)


def _points_in_front(cams: Cameras, n: int = 5) -> torch.Tensor:  # [..., n, 3] world
    uv = torch.rand(*cams.batch_shape, n, 2, dtype=cams.dtype) * torch.tensor([cams.width, cams.height], dtype=cams.dtype)
    z = 1.0 + 3.0 * torch.rand(*cams.batch_shape, n, 1, dtype=cams.dtype)
    uv1 = torch.cat([uv, torch.ones_like(z)], -1)
    p_cam = (torch.linalg.inv(cams.K)[..., None, :, :] @ uv1[..., None])[..., 0] * z
    R, t = cams.cam_to_world[..., :3, :3], cams.cam_to_world[..., :3, 3]
    return (R[..., None, :, :] @ p_cam[..., None])[..., 0] + t[..., None, :]


def test_world_to_cam_is_inverse():
    c = _cams(3, 2)
    eye = torch.eye(4, dtype=c.dtype).expand(3, 2, 4, 4)
    torch.testing.assert_close(c.world_to_cam @ c.cam_to_world, eye)
    torch.testing.assert_close(c.cam_to_world @ c.world_to_cam, eye)
    torch.testing.assert_close(c.centers, c.cam_to_world[..., :3, 3])


def test_resize_and_crop_keep_projection_consistent():
    c = _cams(4)
    p = _points_in_front(c)
    uv, z = c.project(p)
    r = c.resize(30, 20)
    uv_r, z_r = r.project(p)
    torch.testing.assert_close(uv_r, uv * torch.tensor([30 / 12, 20 / 8], dtype=c.dtype))
    torch.testing.assert_close(z_r, z)
    k = c.crop(2, 3, 7, 4)
    assert (k.width, k.height) == (7, 4)
    torch.testing.assert_close(k.project(p)[0], uv - torch.tensor([2.0, 3.0], dtype=c.dtype))
    cc = c.center_crop(8, 6)
    torch.testing.assert_close(cc.project(p)[0], uv - torch.tensor([2.0, 1.0], dtype=c.dtype))
    rc = c.resize_and_center_crop(6, 6)  # scale 0.75 -> 9x6, crop 1 column on the left
    assert (rc.width, rc.height) == (6, 6)
    torch.testing.assert_close(rc.project(p)[0], uv * 0.75 - torch.tensor([1.0, 0.0], dtype=c.dtype))
    with pytest.raises(ValueError, match="outside"):
        c.crop(10, 0, 5, 5)


def test_pixel_centres_at_half_integers_and_normalised_K():
    c = _cams(2)
    g = c.pixel_grid()
    assert g.shape == (8, 12, 2)
    assert g[0, 0].tolist() == [0.5, 0.5] and g[-1, -1].tolist() == [11.5, 7.5]
    Kn = c.K_normalized
    torch.testing.assert_close(Kn[..., 0, 2], c.K[..., 0, 2] / 12)
    torch.testing.assert_close(Kn[..., 1, 1], c.K[..., 1, 1] / 8)
    back = Cameras.from_normalized(Kn, c.cam_to_world, 12, 8)
    torch.testing.assert_close(back.K, c.K)


def test_rays_through_pixel_centres_project_back():
    c = _cams(2, 3)
    o, d = c.rays()
    assert o.shape == d.shape == (2, 3, 8, 12, 3)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(2, 3, 8, 12, dtype=c.dtype))
    pts = (o + 2.5 * d).reshape(2, 3, -1, 3)
    uv, z = c.project(pts)
    torch.testing.assert_close(uv, c.pixel_grid().reshape(-1, 2).expand(2, 3, -1, 2))
    assert bool((z > 0).all())
    _, d1 = c.rays(normalize=False)  # camera-space z = 1
    z_cam = torch.einsum("...ij,...hwj->...hwi", c.world_to_cam[..., :3, :3], d1)[..., 2]
    torch.testing.assert_close(z_cam, torch.ones_like(z_cam))


def test_plucker_shape_and_order():
    c = _cams(2)
    pl = c.plucker()
    assert pl.shape == (2, 6, 8, 12)
    o, d = c.rays()
    m = pl[:, :3].permute(0, 2, 3, 1)
    dd = pl[:, 3:].permute(0, 2, 3, 1)
    torch.testing.assert_close(dd, d)  # direction second
    torch.testing.assert_close(m, torch.cross(o, d, dim=-1))  # moment first
    torch.testing.assert_close((m * dd).sum(-1), torch.zeros(2, 8, 12, dtype=c.dtype))
    # the moment does not depend on where on the ray the origin sits
    torch.testing.assert_close(torch.cross(o + 3.0 * d, d, dim=-1), m)


def test_unproject_project_round_trip():
    c = _cams(3)
    depth = 0.5 + torch.rand(3, 8, 12, dtype=c.dtype)
    pts = c.unproject(depth)
    assert pts.shape == (3, 8, 12, 3)
    uv, z = c.project(pts.reshape(3, -1, 3))
    torch.testing.assert_close(uv, c.pixel_grid().reshape(-1, 2).expand(3, -1, 2))
    torch.testing.assert_close(z, depth.reshape(3, -1))


def test_stack_cat_index_to():
    a, b = _cams(2), _cams(3)
    s = Cameras.stack([a[0], b[1]])
    assert s.batch_shape == (2,)
    torch.testing.assert_close(s.K[1], b.K[1])
    cat = Cameras.cat([a, b])
    assert len(cat) == 5
    torch.testing.assert_close(cat.cam_to_world[2:], b.cam_to_world)
    torch.testing.assert_close(cat[3].K, b.K[1])
    assert cat[1:3].batch_shape == (2,)
    assert cat[torch.tensor([0, 4])].batch_shape == (2,)
    f = cat.to(torch.float32)
    assert f.dtype == torch.float32 and f.K.dtype == f.cam_to_world.dtype == torch.float32
    assert _cams(2, 3).flatten().batch_shape == (6,)
    with pytest.raises(ValueError, match="one size"):
        Cameras.stack([a[0], a[1].resize(6, 4)])
    with pytest.raises(ValueError, match="one size"):
        Cameras.cat([a, b.resize(6, 4)])
    with pytest.raises(ValueError, match="3, 3"):
        Cameras(torch.eye(4), torch.eye(4), 4, 4)


def test_broadcast_and_fov():
    K = torch.tensor([[10.0, 0, 5], [0, 10.0, 5], [0, 0, 1]])
    c = Cameras(K, torch.eye(4).expand(3, 4, 4), 10, 10)
    assert c.K.shape == (3, 3, 3)
    torch.testing.assert_close(c.fov[0], torch.full((2,), 2 * torch.atan(torch.tensor(0.5)).item()))
