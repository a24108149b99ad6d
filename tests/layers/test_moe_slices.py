"""MoE extensions for Dense2MoE: neuron-slice experts, shared expert, straight-through gates, dense twin."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

from vision3d.layers.moe import MoE, Routing, SlicedFFN, TopKRouter, balance_loss, ffn_weights, split_ffn

pytestmark = pytest.mark.usefixtures("one_thread")


def _split_moe(mlp: Mlp, slices: int, shared: int, k: int) -> MoE:
    w = ffn_weights(mlp, "mlp")
    ids = torch.randperm(w.hidden, generator=torch.Generator().manual_seed(0))
    parts = list(ids.split(w.hidden // slices))
    shared_ids = torch.cat(parts[:shared]) if shared else None
    sh, routed = split_ffn(w, shared_ids, parts[shared:])
    return MoE(routed, TopKRouter(w.in_weight.shape[1], slices - shared, k, straight_through=True), shared=sh)


@pytest.mark.parametrize("shared", [0, 1, 2])
def test_all_slices_active_is_the_dense_ffn(shared):
    torch.manual_seed(0)
    mlp = Mlp(12, 48, act_layer=lambda: nn.GELU(approximate="tanh"))
    moe = _split_moe(mlp, 6, shared, 6 - shared)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(moe(x), mlp(x), rtol=1e-5, atol=1e-6)
    moe.router.k = 1  # fewer experts: a different (approximate) function
    assert (moe(x) - mlp(x)).abs().max() > 1e-4


def test_grouped_dispatch_equals_dense_twin_values_and_gradients():
    torch.manual_seed(0)
    mlp = Mlp(8, 64)
    moe = _split_moe(mlp, 8, 1, 3)
    nn.init.normal_(moe.router.gate.weight)
    x = torch.randn(4, 9, 8, requires_grad=True)
    a = moe(x)
    ga = torch.autograd.grad(a.square().sum(), [x, moe.router.gate.weight, moe.experts[0].fc_in.weight])
    b = moe.forward_dense(x)
    gb = torch.autograd.grad(b.square().sum(), [x, moe.router.gate.weight, moe.experts[0].fc_in.weight])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)
    assert ga[1].abs().sum() > 0  # the straight-through gate learns


def test_straight_through_weights_are_one_with_gate_gradient():
    torch.manual_seed(0)
    r = TopKRouter(6, 5, k=2, straight_through=True)
    x = torch.randn(7, 6)
    out = r(x)
    assert torch.equal(out.weights.detach(), torch.ones(7, 2))
    (out.weights * torch.randn(7, 2)).sum().backward()
    assert r.gate.weight.grad.abs().sum() > 0
    plain = TopKRouter(6, 5, k=2)
    plain.gate.weight.data.copy_(r.gate.weight.data)
    assert torch.equal(plain(x).expert_index, out.expert_index)


def test_balance_loss_is_one_when_balanced_and_larger_when_collapsed():
    E, T = 4, 8
    probs = torch.full((T, E), 1.0 / E)
    index = (torch.arange(T) % E)[:, None]
    torch.testing.assert_close(balance_loss(probs, index), torch.tensor(1.0))
    collapsed = torch.zeros(T, E)
    collapsed[:, 0] = 1
    assert balance_loss(collapsed, torch.zeros(T, 1, dtype=torch.long)) == pytest.approx(E)


def test_shared_expert_is_added_unweighted():
    torch.manual_seed(0)
    experts = [nn.Linear(4, 4) for _ in range(3)]
    shared = nn.Linear(4, 4)
    moe = MoE(experts, TopKRouter(4, 3, k=1), shared=shared)
    x = torch.randn(5, 4)
    routing = moe.router(x)
    expect = moe.forward_experts(x, routing) + shared(x)
    torch.testing.assert_close(moe(x), expect)


def test_slice_errors_name_the_module():
    mlp = Mlp(4, 8)
    w = ffn_weights(mlp, "blocks.3.mlp")
    with pytest.raises(ValueError, match=r"blocks\.3\.mlp: expert neuron sets must partition the 8 hidden neurons"):
        split_ffn(w, None, [torch.arange(4), torch.arange(3, 8)])
    with pytest.raises(TypeError, match=r"head: Linear is not a feed-forward network"):
        ffn_weights(nn.Linear(3, 3), "head")
    with pytest.raises(TypeError, match="normalises its hidden layer"):
        ffn_weights(Mlp(4, 8, norm_layer=nn.LayerNorm), "blocks.0.mlp")


def test_sliced_ffn_round_trip():
    torch.manual_seed(0)
    mlp = Mlp(6, 10)
    w = ffn_weights(mlp)
    full = SlicedFFN.from_weights(w, torch.arange(10), out_bias=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(full(x), mlp(x))
    torch.testing.assert_close(ffn_weights(full).out_weight, mlp.fc2.weight)
