"""vision3d.layers.attention: every backend against the explicit-math twin."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import requires_cuda
from vision3d.layers.attention import attention, attention_math, merge_heads, split_heads
from vision3d.utils.optional import available


def _qkv(b=2, h=3, nq=5, nk=7, d=8, dv=8, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(b, h, nq, d), mk(b, h, nk, d), mk(b, h, nk, dv)


def test_math_matches_definition():
    q, k, v = _qkv(b=1, h=1, nq=3, nk=4, d=2)
    w = torch.softmax(q[0, 0] @ k[0, 0].T / 2**0.5, dim=-1)
    torch.testing.assert_close(attention(q, k, v, backend="math")[0, 0], w @ v[0, 0])


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_sdpa_matches_math(backend):
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, backend=backend), attention_math(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_masks(backend):
    q, k, v = _qkv()
    keep = torch.rand(1, 1, 5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ref = attention_math(q, k, v, additive)
    torch.testing.assert_close(attention(q, k, v, attn_mask=keep, backend=backend), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, attn_mask=additive, backend=backend), ref, atol=1e-5, rtol=1e-5)
    # a masked key does not influence the output
    v2 = v.clone()
    v2[..., 1, :] += 100.0
    mask = torch.ones(1, 1, 5, 7, dtype=torch.bool)
    mask[..., 1] = False
    torch.testing.assert_close(
        attention(q, k, v, attn_mask=mask, backend=backend), attention(q, k, v2, attn_mask=mask, backend=backend)
    )


def test_gradients_agree():
    q, k, v = (t.requires_grad_() for t in _qkv())
    attention(q, k, v, backend="sdpa").square().sum().backward()
    g_sdpa = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    attention(q, k, v, backend="math").square().sum().backward()
    for a, t in zip(g_sdpa, (q, k, v)):
        torch.testing.assert_close(a, t.grad, atol=1e-4, rtol=1e-4)


def test_bad_input():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="flash9")
    with pytest.raises(ValueError, match=r"\[B, heads, N, D\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="differ"):
        attention(q, k[:, :, :3], v)


def test_split_merge_heads_roundtrip():
    x = torch.randn(2, 5, 12)
    assert split_heads(x, 3).shape == (2, 3, 5, 4)
    torch.testing.assert_close(merge_heads(split_heads(x, 3)), x)
    with pytest.raises(ValueError, match="divisible"):
        split_heads(x, 5)


@pytest.mark.skipif(available("xformers"), reason="xformers installed: the missing-extra path cannot run")
def test_xformers_missing_names_pip_line():
    q, k, v = _qkv()
    with pytest.raises(ImportError, match="pip install"):
        attention(q, k, v, backend="xformers")


@requires_cuda
@pytest.mark.skipif(not available("xformers"), reason="needs xformers")
def test_xformers_matches_math_cuda():
    q, k, v = _qkv(device="cuda", dtype=torch.float16, d=64, dv=64)
    torch.testing.assert_close(
        attention(q, k, v, backend="xformers").float(), attention_math(q, k, v).float(), atol=2e-3, rtol=2e-3
    )


@requires_cuda
def test_sdpa_cuda_bf16():
    q, k, v = _qkv(device="cuda", dtype=torch.bfloat16, d=64, dv=64)
    torch.testing.assert_close(attention(q, k, v).float(), attention_math(q, k, v).float(), atol=2e-2, rtol=2e-2)
