"""The small DiT: shapes, adaLN-Zero identity start, flow-matching objective, sampler, procedural data."""

from __future__ import annotations

import pytest
import torch

from vision3d.gen.dit import DiT, DiTConfig, flow_matching_inputs, flow_matching_loss, procedural_shapes, sample

pytestmark = pytest.mark.usefixtures("one_thread")


def test_procedural_shapes_are_deterministic_and_distinct_per_class():
    a, la = procedural_shapes(24, num_classes=6, seed=3)
    b, lb = procedural_shapes(24, num_classes=6, seed=3)
    assert a.shape == (24, 3, 16, 16) and torch.equal(a, b) and torch.equal(la, lb)
    assert a.min() >= 0 and a.max() <= 1 and torch.bincount(la).tolist() == [4] * 6
    c, _ = procedural_shapes(24, num_classes=6, seed=4)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="num_classes must be in"):
        procedural_shapes(4, num_classes=9)


def test_dit_starts_as_zero_velocity_and_learns():
    torch.manual_seed(0)
    model = DiT(DiTConfig(dim=32, depth=2, num_heads=2))
    x, y = procedural_shapes(16, seed=0)
    x_t, t, target = flow_matching_inputs(x, torch.Generator().manual_seed(0))
    v = model(x_t, t, y)
    assert v.shape == x.shape and torch.all(v == 0)  # adaLN-Zero + zero final layer
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    first = float(flow_matching_loss(model, x, y, generator=torch.Generator().manual_seed(5)))
    for _ in range(30):
        loss = flow_matching_loss(model, x, y, class_dropout=0.1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(flow_matching_loss(model, x, y, generator=torch.Generator().manual_seed(5))) < 0.8 * first


def test_sampler_shapes_guidance_and_errors():
    torch.manual_seed(0)
    model = DiT(DiTConfig(dim=32, depth=1, num_heads=2, image_size=8, patch_size=2))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    labels = torch.tensor([0, 1, 2])
    noise = torch.randn(3, 3, 8, 8)
    a = sample(model, labels, steps=3, noise=noise)
    b = sample(model, labels, steps=3, noise=noise, guidance=2.0)
    assert a.shape == (3, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, b)
    # one Euler step from t=1 to 0 is x - v(x, 1)
    one = sample(model, labels, steps=1, noise=noise)
    expect = ((noise - model(noise, torch.ones(3), labels) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(one, expect)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(model, labels, steps=0)
    with pytest.raises(ValueError, match="expected 8x8 images"):
        model(torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        DiTConfig(image_size=15, patch_size=2)
