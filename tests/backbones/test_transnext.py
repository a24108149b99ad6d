"""TransNeXt: authors' fixture parity, fast vs reference attention, input sizes, variants, bad input."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import vision3d  # noqa: F401  (registers the models)
from tests.conftest import fixture_files
from vision3d.backbones.transnext import (
    TransNeXt,
    aggregated_attention_fast,
    aggregated_attention_reference,
    checkpoint_filter_fn,
    cpb_coordinates,
    local_window_mask,
)

# the reduced TransNeXt-Micro of the shared fixture (see its json)
SMALL = dict(embed_dims=(24, 48, 96, 192), depths=(1, 1, 2, 1), num_classes=100, img_size=64)

# a still smaller configuration for the gradient tests (head_dim 8)
MINI = dict(embed_dims=(16, 16, 32, 64), num_heads=(2, 2, 4, 8), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
            num_classes=5, img_size=64)

# parameter counts of the authors' modules (1000 classes); README: 12.8M, 28.2M, 49.7M, 89.7M, 13.1M
PARAMS = {
    "transnext_micro": 12_809_304,
    "transnext_tiny": 28_258_960,
    "transnext_small": 49_741_564,
    "transnext_base": 89_721_496,
    "transnext_micro_aaaa": 13_114_008,
}


def _small(**kw) -> TransNeXt:
    return timm.create_model("transnext_micro", **{**SMALL, **kw})


def _mini(**kw) -> TransNeXt:
    return timm.create_model("transnext_micro", **{**MINI, **kw})


@pytest.fixture(scope="module")
def fixture():
    st, js = fixture_files("transnext")
    tensors = load_file(str(st))
    meta = json.loads(js.read_text())
    state = {k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")}
    return state, tensors, meta


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_fixture_parity(fixture, impl):
    state, tensors, meta = fixture
    tol = meta["tolerance"]
    model = _small(attn_impl=impl).eval()
    model.load_state_dict(checkpoint_filter_fn(state, model))
    x = tensors["in/x"]
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(logits, tensors["out/logits"], atol=tol["atol"], rtol=tol["rtol"])
    for i, f in enumerate(feats):
        torch.testing.assert_close(f, tensors[f"out/stage{i}"], atol=tol["atol"], rtol=tol["rtol"])


def test_checkpoint_wrappers_and_pretrained_file(fixture, tmp_path):
    state, tensors, meta = fixture
    # the authors' training script saves {'model': ...}; DDP / torch.compile add prefixes
    wrapped = {"model": {f"module._orig_mod.{k}": v for k, v in state.items()}, "epoch": 3}
    model = _small().eval()
    model.load_state_dict(checkpoint_filter_fn(wrapped, model))
    path = tmp_path / "transnext_micro_small.safetensors"
    save_file(state, str(path))
    loaded = timm.create_model(
        "transnext_micro", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=100), **SMALL
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tensors["in/x"]), model(tensors["in/x"]))
    # our own layout round-trips through the same filter
    again = _small()
    again.load_state_dict(checkpoint_filter_fn(model.state_dict(), again))


def test_pretrained_without_file_is_a_clear_error():
    with pytest.raises(ValueError, match="transnext_micro.*pretrained_cfg_overlay"):
        timm.create_model("transnext_micro", pretrained=True)


def test_checkpoint_from_another_variant_names_keys(fixture):
    state, _, _ = fixture
    other = timm.create_model("transnext_micro", embed_dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), img_size=64)
    with pytest.raises(ValueError, match="stages.0.patch_embed.proj.weight"):
        checkpoint_filter_fn(state, other)


def _attn_inputs(B=2, h=2, d=8, H=5, W=7, P=6, window=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, L = H * W, window * window

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    q = torch.nn.functional.normalize(r(B, h, N, d), dim=-1)
    _, mask = local_window_mask((H, W), window)
    args = dict(
        q_norm=q,
        q_scaled=(q + 0.1 * r(h, 1, d)) * 3.0,
        k_local=torch.nn.functional.normalize(r(B, h, N, d), dim=-1),
        v_local=r(B, h, N, d),
        k_pool=torch.nn.functional.normalize(r(B, h, P, d), dim=-1),
        v_pool=r(B, h, P, d),
        local_bias=r(h, L),
        pool_bias=r(h, N, P),
        tokens=r(h, d, L),
        tokens_bias=r(h, 1, L),
        padding_mask=mask,
    )
    for k, v in args.items():
        if v.dtype.is_floating_point:
            v.requires_grad_(True)
    return args, (H, W), window


@pytest.mark.parametrize("window", [3, 5])
def test_fast_core_matches_reference_values_and_grads(window):
    args, hw, window = _attn_inputs(window=window)
    ref = aggregated_attention_reference(**args, hw=hw, window=window)
    grad_out = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, [v for v in args.values() if v.requires_grad], grad_out)
    fast = aggregated_attention_fast(**args, hw=hw, window=window)
    g_fast = torch.autograd.grad(fast, [v for v in args.values() if v.requires_grad], grad_out)
    torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_fast_model_matches_reference_model_with_grads():
    torch.manual_seed(0)
    ref = timm.create_model("transnext_micro", attn_impl="reference", **MINI)
    fast = timm.create_model("transnext_micro", attn_impl="fast", **MINI)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 40, 56)  # not the table size, not square, not a multiple of 32
    out_ref, out_fast = ref(x), fast(x)
    out_ref.square().sum().backward()
    out_fast.square().sum().backward()
    torch.testing.assert_close(out_fast, out_ref, atol=2e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_cpb_coordinates_by_hand():
    # query grid 4 rows, pooled to 2: key coordinates are the means 0.5 and 2.5
    index, table = cpb_coordinates((4, 1), (2, 1), (5, 5))
    rel = torch.tensor([[0 - 0.5], [0 - 2.5], [1 - 0.5], [1 - 2.5], [2 - 0.5], [2 - 2.5], [3 - 0.5], [3 - 2.5]])
    rel = rel / 4 * 8
    expect = torch.sign(rel) * torch.log2(rel.abs() + 1) / 3
    torch.testing.assert_close(table[index][:, 0:1], expect)
    assert torch.all(table[index][:, 1] == 0)
    valid, mask = local_window_mask((3, 4), 3)
    assert valid[:, 0].tolist() == [4, 6, 6, 4, 6, 9, 9, 6, 4, 6, 6, 4]
    assert mask.shape == (12, 9) and mask[0].tolist() == [True] * 4 + [False, False, True, False, False]


def test_other_input_size_equals_model_built_for_it():
    """'extrapolate': a 64-table model fed 96x96 equals the authors' recipe img_size=96, pretrain_size=64."""
    a = timm.create_model("transnext_micro", **MINI).eval()
    b = timm.create_model("transnext_micro", **{**MINI, "img_size": 80, "pretrain_size": 64}).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=1e-6)
        # at the table size, interpolating the bias is the identity
        c = timm.create_model("transnext_micro", pos_bias="interpolate", **MINI).eval()
        c.load_state_dict(a.state_dict())
        x64 = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(c(x64), a(x64), atol=1e-6, rtol=1e-6)
        # and away from it the two modes differ (bias resized vs regenerated)
        assert (c(x) - a(x)).abs().max() > 1e-6
    assert a.stages[0].geometry((24, 24), torch.device("cpu")).pool_hw == (3, 3)


def test_fixed_pool_size():
    m = _mini(fixed_pool_size=1).eval()
    assert m.stages[0].geometry((20, 20), torch.device("cpu")).pool_hw == (1, 1)
    assert m.stages[3].geometry((3, 3), torch.device("cpu")).pool_hw == (3, 3)  # full attention: no pooling
    with torch.no_grad():
        assert m(torch.randn(1, 3, 80, 80)).shape == (1, 5)
    with pytest.raises(ValueError, match="stage 2.*fixed_pool_size 4 must be below the grid"):
        _mini(fixed_pool_size=4)(torch.randn(1, 3, 64, 64))


def test_bad_input():
    m = _mini().eval()
    with pytest.raises(ValueError, match=r"transnext_micro: expected an image batch \[B, 3, H, W\], got shape \[1, 4, 64, 64\]"):
        m(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="transnext_micro: input \\(16, 16\\).*stage 0.*pooling ratio 8"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="attn_impl"):
        _mini(attn_impl="cuda")


def test_timm_api_features_and_heads():
    m = _mini().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, m.forward_features(x))
        torch.testing.assert_close(m.forward_head(final, pre_logits=True), final.mean((2, 3)))
    assert [f.shape[1] for f in inter] == [16, 16, 32, 64]
    assert [f.shape[-1] for f in inter] == [16, 8, 4, 2]
    feat = timm.create_model("transnext_micro", features_only=True, out_indices=(1, 3), **MINI).eval()
    with torch.no_grad():
        outs = feat(x)
    assert feat.feature_info.channels() == [16, 64] and feat.feature_info.reduction() == [8, 32]
    assert [o.shape[1] for o in outs] == [16, 64]
    m.reset_classifier(7)
    assert m(x).shape == (1, 7)
    assert "stages.0.blocks.0.attn.temperature" in m.no_weight_decay()
    assert m.prune_intermediate_layers([1]) == [1] and len(m.stages) == 2


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    a = timm.create_model("transnext_micro", **MINI)
    b = timm.create_model("transnext_micro", **MINI)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(1, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    with torch.device("meta"):
        m = timm.create_model(name)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]


def test_384_finetuned_cfg():
    with torch.device("meta"):
        m = timm.create_model("transnext_base.in1k_384")
    assert m.pretrained_cfg["input_size"] == (3, 384, 384)
    assert m.stages[0].table_grid == 96 and m.stages[0].pretrain_grid == 56  # pretrain size 224
    with torch.device("meta"):
        m = timm.create_model("transnext_micro_aaaa")
    assert m.img_size == 256 and m.stages[3].pretrain_grid == 8 and m.sr_ratios == (16, 8, 4, 2)


_TRITON_CHECK = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
import torch
torch.set_num_threads(1)
from tests.backbones.test_transnext import _attn_inputs
from vision3d.backbones.transnext import aggregated_attention_reference, aggregated_attention_triton
args, hw, window = _attn_inputs(B=1, h=2, d=5, H=4, W=5, P=3)
args = {k: (v.float().detach().requires_grad_(True) if v.dtype.is_floating_point else v) for k, v in args.items()}
ref = aggregated_attention_reference(**args, hw=hw, window=window)
tri = aggregated_attention_triton(**args, hw=hw, window=window)
torch.testing.assert_close(tri, ref, atol=2e-5, rtol=1e-5)
params = [v for v in args.values() if v.requires_grad]
g = torch.randn_like(ref)
for a, b in zip(torch.autograd.grad(tri, params, g), torch.autograd.grad(ref, params, g)):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
print("TRITON_OK", (tri - ref).abs().max().item())
"""


def test_triton_kernel_matches_reference_in_interpreter():
    """The fused Triton kernel, run by Triton's CPU interpreter (a fresh process: the flag must precede import)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo)}
    res = subprocess.run([sys.executable, "-c", _TRITON_CHECK], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "TRITON_OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
