"""MoE layer: routers, dispatch/combine, dense <-> MoE conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

from vision3d.layers.moe import (
    MoE,
    RandomUniformPartitionRouter,
    Routing,
    TopKRouter,
    average_experts,
    combine,
    dispatch,
)


def test_random_uniform_partition_is_an_even_random_split():
    router = RandomUniformPartitionRouter(4)
    tokens = torch.randn(103, 8)
    r1, r2 = router(tokens), router(tokens)
    assert r1.expert_index.shape == (103, 1) and torch.all(r1.weights == 1)
    counts = torch.bincount(r1.expert_index[:, 0], minlength=4)
    assert counts.sum() == 103 and counts.max() - counts.min() <= 1
    assert not torch.equal(r1.expert_index, r2.expert_index)  # a fresh permutation each call
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = RandomUniformPartitionRouter(4, g1)(tokens).expert_index
    b = RandomUniformPartitionRouter(4, g2)(tokens).expert_index
    assert torch.equal(a, b)


def test_dispatch_combine_equals_per_token_loop():
    torch.manual_seed(0)
    E, T, C = 3, 10, 4
    experts = [nn.Linear(C, C) for _ in range(E)]
    index = torch.randint(0, E, (T, 2))
    weights = torch.rand(T, 2)
    x = torch.randn(T, C)
    moe = MoE(experts, TopKRouter(C, E, k=2))
    out = moe.forward_experts(x, Routing(index, weights))
    expect = torch.stack(
        [sum(weights[t, s] * experts[int(index[t, s])](x[t]) for s in range(2)) for t in range(T)]
    )
    torch.testing.assert_close(out, expect)
    rows, order, counts = dispatch(x, index, E)
    assert counts == torch.bincount(index.reshape(-1), minlength=E).tolist()
    torch.testing.assert_close(combine(rows, order, torch.ones(T, 2), T), 2 * x)


def test_topk_router_weights_and_balance_loss():
    torch.manual_seed(0)
    router = TopKRouter(6, 4, k=2)
    x = torch.randn(20, 6)
    r = router(x)
    probs = router.gate(x).softmax(-1)
    top, idx = probs.topk(2, -1)
    assert torch.equal(r.expert_index, idx)
    torch.testing.assert_close(r.weights, top / top.sum(-1, keepdim=True))
    frac = torch.stack([(idx == e).float().sum() for e in range(4)]) / (20 * 2)
    torch.testing.assert_close(r.aux_loss, 4 * (frac * probs.mean(0)).sum())
    with pytest.raises(ValueError, match="k must be"):
        TopKRouter(6, 4, k=5)


def test_from_dense_equals_dense_and_gradients_reach_experts():
    torch.manual_seed(0)
    mlp = Mlp(8, 16)
    moe = MoE.from_dense(mlp, 4)
    x = torch.randn(2, 7, 8)
    torch.testing.assert_close(moe(x), mlp(x))
    moe(x).sum().backward()
    assert all(e.fc1.weight.grad is not None and e.fc1.weight.grad.abs().sum() > 0 for e in moe.experts)


def test_to_dense_is_the_parameter_mean():
    torch.manual_seed(0)
    experts = [Mlp(4, 8) for _ in range(3)]
    dense = average_experts(experts)
    for name, p in dense.named_parameters():
        mean = sum(dict(e.named_parameters())[name] for e in experts) / 3
        torch.testing.assert_close(p, mean)
    assert dense is not experts[0]
    moe = MoE(experts, RandomUniformPartitionRouter(3))
    torch.testing.assert_close(moe.to_dense().fc2.bias, dense.fc2.bias)
    with pytest.raises(ValueError, match="3 experts but the router routes to 2"):
        MoE(experts, RandomUniformPartitionRouter(2))
