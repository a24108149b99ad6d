"""The Gaussians container: construction checks, cat/select/with_sh_degree/flatten_batch, validate."""

from __future__ import annotations

import pytest
import torch

from vision3d.gaussians import Gaussians, rgb_to_sh, sh_to_rgb


def make(n=4, k=4, batch=()) -> Gaussians:
    return Gaussians(
        torch.randn(*batch, n, 3),
        torch.randn(*batch, n, 4),
        torch.rand(*batch, n, 3),
        torch.rand(*batch, n),
        torch.randn(*batch, n, k, 3),
    )


def test_shape_checks_name_the_field():
    g = make()
    with pytest.raises(ValueError, match="Gaussians.quats"):
        Gaussians(g.means, g.quats[:, :3], g.scales, g.opacities, g.sh)
    with pytest.raises(ValueError, match="Gaussians.sh: 5 coefficients"):
        Gaussians(g.means, g.quats, g.scales, g.opacities, torch.zeros(4, 5, 3))
    with pytest.raises(ValueError, match="Gaussians.opacities"):
        Gaussians(g.means, g.quats, g.scales, g.opacities[:, None], g.sh)


def test_cat_along_n_pads_sh_and_keeps_batch():
    a, b = make(3, 1, batch=(2,)), make(5, 9, batch=(2,))
    c = Gaussians.cat([a, b])
    assert c.num == 8 and c.sh_degree == 2 and c.batch_shape == (2,)
    assert torch.equal(c.sh[:, :3, :1], a.sh) and torch.equal(c.sh[:, 3:], b.sh)
    assert torch.equal(c.sh[:, :3, 1:], torch.zeros(2, 3, 8, 3))
    assert torch.equal(c.opacities[:, 3:], b.opacities)


def test_select_index_flatten_and_degree():
    g = make(6, 16)
    s = g.select(torch.tensor([True, False, True, False, False, True]))
    assert torch.equal(s.sh, g.sh[[0, 2, 5]])
    assert g.with_sh_degree(1).sh.shape == (6, 4, 3)
    bg = make(3, 4, batch=(2, 5))
    flat = bg.flatten_batch()
    assert flat.num == 30 and torch.equal(flat.sh[7], bg.sh[0, 2, 1])
    assert bg[1].batch_shape == (5,)
    with pytest.raises(IndexError):
        g[0]


def test_validate_names_the_field_and_rgb_round_trip():
    g = make()
    g.quats[1, 2] = float("nan")
    with pytest.raises(ValueError, match="'quats' has 1 non-finite"):
        g.validate()
    g = make()
    g.opacities[0] = 1.5
    with pytest.raises(ValueError, match="'opacities'"):
        g.validate("scene.ply")
    rgb = torch.rand(5, 3)
    torch.testing.assert_close(sh_to_rgb(rgb_to_sh(rgb)), rgb)
    f = Gaussians.from_rgb(
        torch.zeros(5, 3), torch.tensor([[1.0, 0, 0, 0]]).expand(5, 4), torch.ones(5, 3), torch.ones(5), rgb, 2
    )
    torch.testing.assert_close(f.rgb, rgb)
    assert f.sh_degree == 2 and Gaussians.empty(3).num == 0
