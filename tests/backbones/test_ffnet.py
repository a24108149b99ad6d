"""FFNet: parity with the authors' code (tests/fixtures/ffnet), re-parameterisation, counts, converter."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.utils import reparameterize_model

from tests.backbones.fastpath import (
    assert_cache_holds_ordinary_tensors_and_clears,
    assert_fast_matches_plain,
    assert_nchw_contiguous_outputs,
    randomise_bn,
)
from tests.conftest import LOCAL_FIXTURES
from vision3d.backbones.ffnet import BnConvSkip, FFNet, RepDwConv, checkpoint_filter_fn, checkpoint_layout

# the authors' README table (millions; it counts the deploy structure, rounded to one decimal)
PAPER_PARAMS_M = {"ffnet_1": 13.7, "ffnet_2": 26.9, "ffnet_3": 48.3, "ffnet_4": 79.2}
# counted from the authors' code: training structure / after their replace_batchnorm
AUTHORS_TRAIN = {"ffnet_1": 13_775_656, "ffnet_2": 27_208_408, "ffnet_3": 48_817_896, "ffnet_4": 79_868_968}
AUTHORS_DEPLOY = {"ffnet_1": 13_660_152, "ffnet_2": 26_908_440, "ffnet_3": 48_330_632, "ffnet_4": 79_200_360}
CASES = ["public", "nols", "authors"]


pytestmark = pytest.mark.usefixtures("one_thread")



def _load(case):
    tensors = load_file(str(LOCAL_FIXTURES / "ffnet" / f"{case}.safetensors"))
    meta = json.loads((LOCAL_FIXTURES / "ffnet" / f"{case}.json").read_text())
    state = {k[len("state/") :]: v for k, v in tensors.items() if k.startswith("state/")}
    return tensors, meta, state


def _model_from_authors_kwargs(kw) -> FFNet:
    """Our FFNet built with the authors' constructor arguments (their names -> ours)."""
    return FFNet(
        embed_dims=kw["embed_dim"],
        depths=kw["depth"],
        stem_chs=kw["in_dim"],
        kernel_sizes=kw["kernel_sizes"],
        kernel_sizes1=kw["kernel_sizes1"],
        kernel_sizes2=kw["kernel_sizes2"],
        expansion_ratios=kw["expansion_ratios"],
        use_ses=kw.get("use_ses", [False] * 4),  # the authors' defaults where the fixture omits them
        use_gelus=kw.get("use_gelus", [True] * 4),
        layer_scale_init_value=kw.get("layer_scale_init_value", 1e-6) if kw["use_layer_scale"] else None,
        num_classes=kw["num_classes"],
    ).eval()


@pytest.fixture(scope="module", params=CASES)
def loaded(request):
    tensors, meta, state = _load(request.param)
    model = _model_from_authors_kwargs(meta["upstream"]["constructor_kwargs"])
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return tensors, meta, model


def test_fixture_parity_training_structure(loaded):
    tensors, meta, model = loaded
    tol = meta["tolerance"]
    x = tensors["in/x"]
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        logits = model(x)
        if "out/stem" in tensors:
            torch.testing.assert_close(model.stem(x), tensors["out/stem"], atol=tol["atol"], rtol=tol["rtol"])
    for i, s in enumerate(stages):
        torch.testing.assert_close(s, tensors[f"out/stage{i}"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(final, tensors["out/features"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(logits, tensors["out/logits"], atol=tol["atol"], rtol=tol["rtol"])


def test_reparameterize_matches_authors_fused_model(loaded):
    tensors, meta, model = loaded
    tol = meta["tolerance"]
    fused = copy.deepcopy(model).reparameterize()
    x = tensors["in/x"]
    with torch.no_grad():
        if "out/logits_fused" in tensors:
            torch.testing.assert_close(fused(x), tensors["out/logits_fused"], atol=tol["atol"], rtol=tol["rtol"])
            torch.testing.assert_close(fused.forward_features(x), tensors["out/features_fused"], atol=tol["atol"], rtol=tol["rtol"])
        else:  # the authors' fixture: deploy logits of their replace_batchnorm
            torch.testing.assert_close(fused(x), tensors["out/deploy_logits"], atol=tol["atol"], rtol=tol["rtol"])
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    # deploy structure: no BatchNorm left except the final norm, no RepVGG pair left
    bns = [n for n, m in fused.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns == ["norm"]
    assert all(m.reparam_conv is not None for m in fused.modules() if isinstance(m, (RepDwConv, BnConvSkip)))
    # the authors' fused state dict (after replace_batchnorm) has 111 (public) / 71 (nols) / 119 (authors) tensors
    deploy_keys = [k for k in tensors if k.startswith("deploy_state/")]
    expect = len(deploy_keys) if deploy_keys else (111 if meta["upstream"]["constructor_kwargs"]["use_layer_scale"] else 71)
    assert len(fused.state_dict()) == expect


def test_timm_reparameterize_model_is_equivalent(loaded):
    tensors, _, model = loaded
    deploy = reparameterize_model(model)  # deep copy, timm's utility
    assert deploy is not model
    with torch.no_grad():
        torch.testing.assert_close(deploy(tensors["in/x"]), model(tensors["in/x"]), atol=1e-5, rtol=1e-5)
    deploy.reparameterize()  # idempotent


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_paper_and_authors(name):
    with torch.device("meta"):
        model = timm.create_model(name)
        train = sum(p.numel() for p in model.parameters())
        model.reparameterize()
        deploy = sum(p.numel() for p in model.parameters())
    assert train == AUTHORS_TRAIN[name]
    assert deploy == AUTHORS_DEPLOY[name]
    assert round(deploy / 1e6, 1) == PAPER_PARAMS_M[name]


def test_reparameterize_random_official_block_structure():
    """ffnet_2-style blocks (RepVGG channel mixer) with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = FFNet(embed_dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), stem_chs=8, kernel_sizes=(7, 7, 7, 7),
                  layer_scale_init_value=0.5, num_classes=7)
    g = torch.Generator().manual_seed(3)
    randomise_bn(model, g, conv_scale=20)
    model.eval()
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():
        ref = model(x)
        out = model.reparameterize()(x)
    assert ref.abs().max() > 1e-2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_filter_accepts_wrappers_and_rejects_other_variant():
    tensors, meta, state = _load("public")
    model = _model_from_authors_kwargs(meta["upstream"]["constructor_kwargs"])
    plain = checkpoint_filter_fn(state, model)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "state_dict_ema": None, "epoch": 9}
    assert checkpoint_filter_fn(wrapped, model).keys() == plain.keys()
    ema = {"state_dict": {k: torch.zeros_like(v) for k, v in state.items()}, "state_dict_ema": state}
    torch.testing.assert_close(checkpoint_filter_fn(ema, model)["stem.0.conv.weight"], plain["stem.0.conv.weight"])
    with torch.device("meta"):
        other = timm.create_model("ffnet_1", num_classes=10)
    with pytest.raises(ValueError, match=r"ffnet_1: checkpoint does not fit.*stem\.0\.conv\.weight: checkpoint \(16, 3, 3, 3\) vs model \(64, 3, 3, 3\)"):
        checkpoint_filter_fn(state, other)


def test_pretrained_authors_checkpoint_via_timm(tmp_path):
    """An authors'-layout .pth.tar checkpoint loads through timm.create_model(pretrained=True, file=...)."""
    tensors, meta, state = _load("nols")
    kw = meta["upstream"]["constructor_kwargs"]
    path = tmp_path / "ffnet_tiny.pth.tar"
    torch.save({"state_dict": state, "epoch": 300}, path)
    model = timm.create_model(
        "ffnet_1",
        pretrained=True,
        num_classes=kw["num_classes"],
        embed_dims=kw["embed_dim"],
        depths=kw["depth"],
        stem_chs=kw["in_dim"],
        kernel_sizes=kw["kernel_sizes"],
        pretrained_cfg_overlay=dict(file=str(path), num_classes=kw["num_classes"]),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors["in/x"]), tensors["out/logits"], atol=1e-4, rtol=1e-4)


def test_authors_deploy_checkpoint_loads():
    """The authors' re-parameterised state dict (export_model.replace_batchnorm) loads and gives their deploy logits."""
    tensors, meta, _ = _load("authors")
    deploy = {k[len("deploy_state/") :]: v for k, v in tensors.items() if k.startswith("deploy_state/")}
    model = _model_from_authors_kwargs(meta["upstream"]["constructor_kwargs"])
    assert checkpoint_layout(deploy) == "authors-deploy"
    sd = checkpoint_filter_fn({"state_dict": deploy}, model)  # turns the model into its deploy structure
    model.load_state_dict(sd, strict=True)
    tol = meta["tolerance"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tensors["in/x"]), tensors["out/deploy_logits"], atol=tol["atol"], rtol=tol["rtol"])
    # through timm: pretrained=True with a local deploy file
    assert checkpoint_layout(model.state_dict()) == "vision3d-deploy"


def test_wrong_checkpoint_error_names_layout():
    tensors, meta, state = _load("authors")
    with torch.device("meta"):
        other = timm.create_model("ffnet_1", num_classes=100)
    with pytest.raises(ValueError, match=r"looks like the authors' training layout.*training structure"):
        checkpoint_filter_fn(state, other)
    deploy = {k[len("deploy_state/") :]: v for k, v in tensors.items() if k.startswith("deploy_state/")}
    with torch.device("meta"):
        other = timm.create_model("ffnet_1", num_classes=100)
    with pytest.raises(ValueError, match=r"looks like the authors' re-parameterised layout.*re-parameterised structure"):
        checkpoint_filter_fn(deploy, other)
    with pytest.raises(ValueError, match=r"no FFNet layout"):
        checkpoint_filter_fn({"foo.weight": torch.zeros(1)}, other)


# --- fast paths (channels-last, GEMM pointwise convs, BatchNorm folded in eval) vs plain module calls ---
def _perturbed_model(kernel_sizes, layer_scale, seed=0) -> FFNet:
    torch.manual_seed(seed)
    model = FFNet(embed_dims=(8, 16, 32, 64), depths=(1, 1, 2, 1), stem_chs=8, kernel_sizes=kernel_sizes,
                  use_ses=(True, False, False, False), layer_scale_init_value=layer_scale, num_classes=7)
    g = torch.Generator().manual_seed(seed + 1)
    randomise_bn(model, g, conv_scale=5)
    return model


@pytest.mark.parametrize("kernel_sizes,layer_scale", [((3, 3, 3, 3), None), ((7, 7, 7, 7), 0.5)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_fast_path_matches_plain_modules(monkeypatch, kernel_sizes, layer_scale, mode):
    x = torch.randn(2, 3, 45, 38, generator=torch.Generator().manual_seed(5))
    assert_fast_matches_plain(monkeypatch, _perturbed_model(kernel_sizes, layer_scale), x, mode)


def test_fold_cache_follows_parameter_updates():
    """Eval-time folded weights are reused only while every source tensor is unchanged."""
    model = _perturbed_model((7, 7, 7, 7), 0.5).eval()
    other = _perturbed_model((7, 7, 7, 7), 0.5, seed=3).eval()
    x = torch.randn(1, 3, 40, 40)

    def fresh(m):
        return copy.deepcopy(m).reparameterize()(x)  # no cache involved

    with torch.inference_mode():
        first = model(x)
    assert any(m.fold_cache.value is not None for m in model.modules() if hasattr(m, "fold_cache"))
    torch.testing.assert_close(first, fresh(model).detach(), atol=1e-5, rtol=1e-4)
    model.load_state_dict(other.state_dict())  # in-place copies: new versions
    with torch.no_grad():
        torch.testing.assert_close(model(x), fresh(other).detach(), atol=1e-5, rtol=1e-4)
        model.stages[2].blocks[0].token_mixer.conv1.large.bn.running_var.mul_(3.0)  # like an EMA update
        model.stem[0].conv.weight.add_(0.1)
        torch.testing.assert_close(model(x), fresh(model), atol=1e-5, rtol=1e-4)
        model64 = copy.deepcopy(model).double()
        torch.testing.assert_close(model64(x.double()).float(), model(x), atol=1e-5, rtol=1e-4)
    assert_cache_holds_ordinary_tensors_and_clears(model, x)


def test_outputs_are_nchw_contiguous():
    assert_nchw_contiguous_outputs(_perturbed_model((3, 3, 3, 3), None).eval(), torch.randn(1, 3, 64, 64))
