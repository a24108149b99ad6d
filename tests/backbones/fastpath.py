"""Checks shared by the convolutional families' fast paths (FFNet, AFFNet): channels-last inside,
pointwise convs as GEMMs, eval-time BatchNorm folding with a cache, against the plain module calls."""

from __future__ import annotations

import copy

import torch


def randomise_bn(model: torch.nn.Module, g: torch.Generator, conv_scale: float) -> None:
    """Non-trivial BatchNorm statistics and larger conv weights, so folding BatchNorm is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            elif isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(conv_scale)


def forward_backward(model: torch.nn.Module, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out**2).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_fast_matches_plain(monkeypatch, model: torch.nn.Module, x: torch.Tensor, mode: str) -> None:
    """The eager fast path (float32) equals the plain module calls (TorchScript's path, in float64 as
    the oracle), values and gradients, with running statistics (``mode="eval"``: folded BatchNorms,
    cached when no gradient reaches them) or batch statistics (``"train"``, where the running
    statistics must be updated alike); the plain path in float32 agrees as well."""
    model.train(mode == "train")
    fast = copy.deepcopy(model)
    out_fast, grads_fast = forward_backward(fast, x)
    with torch.no_grad():
        copy.deepcopy(fast).eval()(x)  # a cached eval forward in between changes nothing
    with monkeypatch.context() as mp:
        mp.setattr(torch.jit, "is_scripting", lambda: True)  # forwards take the plain branches
        ref64 = copy.deepcopy(model).double()
        out_ref, grads_ref = forward_backward(ref64, x.double())
        out_plain, grads_plain = forward_backward(model, x)
    assert out_ref.abs().max() > 1e-2
    assert grads_fast.keys() == grads_ref.keys() and len(grads_ref) == len(list(model.parameters()))
    top = max(g.abs().max().item() for g in grads_ref.values())
    assert top > 0
    for out, grads in ((out_fast, grads_fast), (out_plain, grads_plain)):
        torch.testing.assert_close(out.double(), out_ref, atol=1e-5 * out_ref.abs().max().item(), rtol=1e-4)
        for n, g_ref in grads_ref.items():
            # a bias right before a batch-statistics BatchNorm has an analytically zero gradient: judge it on the model's scale
            scale = max(g_ref.abs().max().item(), 1e-2 * top)
            torch.testing.assert_close(grads[n].double(), g_ref, atol=1e-4 * scale, rtol=1e-3, msg=lambda m: f"{n}: {m}")
    if mode == "train":  # the running statistics were updated alike
        for (n, b), b_ref in zip(fast.named_buffers(), ref64.buffers()):
            torch.testing.assert_close(b.double(), b_ref.double(), atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def fold_caches(model: torch.nn.Module):
    return [m.fold_cache for m in model.modules() if hasattr(m, "fold_cache")]


def assert_cache_holds_ordinary_tensors_and_clears(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Autograd through the input with frozen weights works (the cache holds ordinary, non-inference
    tensors), and ``train()`` drops every cache."""
    model.eval().requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    model(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    model.train()
    assert all(c.value is None for c in fold_caches(model))


def assert_nchw_contiguous_outputs(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Channels-last is internal: features and intermediates come back NCHW-contiguous."""
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        feats = model.forward_features(x)
    assert all(t.is_contiguous() for t in [final, feats, *inter])
