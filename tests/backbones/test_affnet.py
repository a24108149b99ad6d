"""AFFNet: parity with the authors' code (reference fixture in tests/fixtures), parameter counts, converter, filter maths."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.backbones.fastpath import (
    assert_cache_holds_ordinary_tensors_and_clears,
    assert_fast_matches_plain,
    assert_nchw_contiguous_outputs,
    fold_caches,
    randomise_bn,
)
from tests.conftest import fixture_files
from vision3d.backbones.affnet import AdaptiveFrequencyFilter, checkpoint_filter_fn

# the authors' README table (millions, truncated to one decimal)
PAPER_PARAMS_M = {"affnet_et": 1.4, "affnet_t": 2.6, "affnet": 5.5}
COUNTED = {"affnet_et": 1_436_264, "affnet_t": 2_654_232, "affnet": 5_568_696}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fixture():
    st, js = fixture_files("affnet")
    tensors = load_file(str(st))
    meta = json.loads(js.read_text())
    state = {k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")}
    return tensors, meta, state


def _authors_model(meta):
    n_classes = meta["upstream"]["constructor_kwargs"]["model.classification.n_classes"]
    assert meta["upstream"]["constructor_kwargs"]["model.classification.affnet.mode"] == "xx_small"
    return timm.create_model("affnet_et", num_classes=n_classes).eval()


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == COUNTED[name]
    assert math.floor(n / 1e5) / 10 == PAPER_PARAMS_M[name]


def test_parameter_count_equals_authors_state_dict(fixture):
    _, meta, state = fixture
    authors = sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    model = _authors_model(meta)
    assert sum(p.numel() for p in model.parameters()) == authors


def test_fixture_parity_every_output(fixture):
    tensors, meta, state = fixture
    tol = meta["tolerance"]
    model = _authors_model(meta)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    x = tensors["in/x"]
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        logits = model.forward_head(final)
    for i, s in enumerate(stages):
        torch.testing.assert_close(s, tensors[f"out/stage{i}"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(final, tensors["out/stage5_exp"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(logits, tensors["out/logits"], atol=tol["atol"], rtol=tol["rtol"])


def test_filter_accepts_wrappers_and_prefixes(fixture):
    _, meta, state = fixture
    model = _authors_model(meta)
    plain = checkpoint_filter_fn(state, model)
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}, "epoch": 1}
    assert checkpoint_filter_fn(wrapped, model).keys() == plain.keys()
    ema = {"state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": state}
    got = checkpoint_filter_fn(ema, model)
    torch.testing.assert_close(got["stem.conv.weight"], plain["stem.conv.weight"])  # EMA preferred
    # our own layout passes through unchanged
    assert checkpoint_filter_fn(plain, model).keys() == plain.keys()


def test_checkpoint_of_another_variant_names_variant_key_and_shape(fixture):
    _, _, state = fixture
    other = timm.create_model("affnet_t", num_classes=100)
    with pytest.raises(ValueError, match=r"affnet_t: checkpoint does not fit.*shape mismatch.*\.weight: checkpoint \(\d+.*vs model \(\d+"):
        checkpoint_filter_fn(state, other)


def test_pretrained_authors_checkpoint_via_timm(fixture, tmp_path):
    tensors, meta, state = fixture
    path = tmp_path / "affnet_et_authors.pt"
    torch.save({"model": state}, path)
    model = timm.create_model(
        "affnet_et", pretrained=True, num_classes=100, pretrained_cfg_overlay=dict(file=str(path), num_classes=100)
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["in/x"]), tensors["out/logits"], atol=1e-5, rtol=1e-4)


def _reference_filter(f: AdaptiveFrequencyFilter, x: torch.Tensor) -> torch.Tensor:
    """Independent complex-arithmetic statement of the filter (float64)."""
    x = x.double()
    B, C, H, W = x.shape
    X = torch.fft.rfft2(x, norm="ortho").reshape(B, f.num_groups, f.group_size, H, -1)
    w1 = torch.complex(f.w1[0], f.w1[1]).to(torch.complex128)
    b1 = torch.complex(f.b1[0], f.b1[1]).to(torch.complex128)
    w2 = torch.complex(f.w2[0], f.w2[1]).to(torch.complex128)
    b2 = torch.complex(f.b2[0], f.b2[1]).to(torch.complex128)
    h = torch.einsum("bgihw,gio->bgohw", X, w1) + b1[None, :, :, None, None]
    h = torch.complex(torch.nn.functional.silu(h.real), torch.nn.functional.silu(h.imag))
    m = torch.einsum("bgihw,gio->bgohw", h, w2) + b2[None, :, :, None, None]
    m = torch.complex(torch.nn.functional.softshrink(m.real, 0.01), torch.nn.functional.softshrink(m.imag, 0.01))
    y = torch.fft.irfft2((m * X).reshape(B, C, H, -1), s=(H, W), norm="ortho")
    return y + x


@pytest.mark.parametrize("hw", [(8, 8), (7, 5), (6, 9)])
def test_frequency_filter_matches_complex_reference_on_odd_sizes(hw):
    torch.manual_seed(0)
    f = AdaptiveFrequencyFilter(16)
    with torch.no_grad():
        for p in f.parameters():
            p.mul_(25)
        x = torch.randn(2, 16, *hw)
        torch.testing.assert_close(f(x).double(), _reference_filter(f, x), atol=1e-5, rtol=1e-5)


def test_frequency_filter_keeps_dtype_under_autocast():
    f = AdaptiveFrequencyFilter(16)
    x = torch.randn(1, 16, 6, 6, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_filter_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        AdaptiveFrequencyFilter(20)


def test_reparameterize_folds_batchnorm_exactly():
    """Inference structure: no BatchNorm left, same outputs (random BN statistics), timm's utility agrees."""
    import copy

    from timm.utils import reparameterize_model

    torch.manual_seed(0)
    model = timm.create_model("affnet_et", num_classes=7).eval()
    randomise_bn(model, torch.Generator().manual_seed(1), conv_scale=1)
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        ref = model(x)
        fused = copy.deepcopy(model).reparameterize()
        torch.testing.assert_close(fused(x), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(reparameterize_model(model)(x), ref, atol=1e-5, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    fused.reparameterize()  # idempotent


# --- fast paths (channels-last, GEMM pointwise convs, BatchNorm folded in eval, real-GEMM filter) vs plain calls ---
def _perturbed_model(seed=0, **kw):
    from vision3d.backbones.affnet import AFFNet

    torch.manual_seed(seed)
    model = AFFNet(widths=(8, 16, 16, 24, 32), depths=(1, 2, 1, 2, 1), stem_chs=8, num_classes=7, **kw)
    randomise_bn(model, torch.Generator().manual_seed(seed + 1), conv_scale=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdaptiveFrequencyFilter):  # masks well past the softshrink threshold
                for p in m.parameters():
                    p.mul_(25)
    return model


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fast_path_matches_plain_modules(monkeypatch, mode):
    x = torch.randn(2, 3, 45, 38, generator=torch.Generator().manual_seed(5))
    assert_fast_matches_plain(monkeypatch, _perturbed_model(), x, mode)


def test_fold_cache_follows_parameter_updates():
    """Eval-time folded weights (convs and filter blocks) are reused only while their sources are unchanged."""
    import copy

    model = _perturbed_model().eval()
    other = _perturbed_model(seed=3).eval()
    x = torch.randn(1, 3, 40, 40)

    def fresh(m):
        return copy.deepcopy(m).reparameterize()(x)  # BatchNorms fused, filter caches start empty

    with torch.inference_mode():
        first = model(x)
    assert all(c.value is not None for c in fold_caches(model))
    torch.testing.assert_close(first, fresh(model).detach(), atol=1e-5, rtol=1e-4)
    model.load_state_dict(other.state_dict())  # in-place copies: new versions
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(other), atol=1e-5, rtol=1e-4)
        model.stages[3][1].layers[0].filter.w2.mul_(1.5)  # an optimiser-like in-place update
        model.stages[1][0].conv_dw.bn.running_var.mul_(3.0)
        torch.testing.assert_close(model(x), fresh(model), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(copy.deepcopy(model).double()(x.double()).float(), model(x), atol=1e-5, rtol=1e-4)
    assert_cache_holds_ordinary_tensors_and_clears(model, x)


def test_inference_mode_built_model_works():
    """Parameters made under inference_mode keep no version counter: the caches step aside."""
    with torch.inference_mode():
        model = _perturbed_model().eval()
        x = torch.randn(1, 3, 32, 32)
        a, b = model(x), model(x)
    torch.testing.assert_close(a, b)


def test_outputs_are_nchw_contiguous():
    assert_nchw_contiguous_outputs(_perturbed_model().eval(), torch.randn(1, 3, 64, 64))
