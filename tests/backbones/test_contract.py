"""timm contract for every vision3d-registered backbone (models whose module is under vision3d.backbones).

Like timm's tests/test_models.py: checks on every variant that need no real weights run on the
meta device (construction, parameter count sanity, pretrained cfg, feature_info); checks that need
a forward pass run on the smallest variant of each model family (one family = one module) at a
small input size.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import re
import sys

import pytest
import timm
import torch
from timm.models import group_parameters
from timm.models._registry import model_entrypoint

import vision3d.backbones  # noqa: F401  (registers the models)

MODELS = sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("vision3d.backbones"))
FAMILIES = sorted({model_entrypoint(n).__module__ for n in MODELS})
SIZE = 64
BATCH = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def meta_param_count(name: str) -> int:
    with torch.device("meta"):
        model = timm.create_model(name)
    return sum(p.numel() for p in model.parameters())


def _variants(family: str) -> list[str]:
    return sorted((n for n in MODELS if model_entrypoint(n).__module__ == family), key=meta_param_count)


def _input_size(name: str) -> tuple[int, int, int]:
    cfg = timm.get_pretrained_cfg(name).to_dict()
    if cfg.get("fixed_input_size"):
        return tuple(cfg["input_size"])
    return (3, SIZE, SIZE)


@functools.lru_cache(maxsize=None)
def _smallest(family: str) -> tuple[str, torch.nn.Module]:
    name = _variants(family)[0]
    torch.manual_seed(0)
    return name, timm.create_model(name).eval()


@pytest.fixture(params=FAMILIES, ids=lambda f: f.rsplit(".", 1)[-1])
def small(request):
    """(name, fresh copy of the smallest variant of the family in eval mode, input batch)."""
    name, model = _smallest(request.param)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((BATCH, *_input_size(name)), generator=g)
    return name, copy.deepcopy(model), x


def test_models_are_registered():
    assert {"affnet_et", "affnet_t", "affnet", "ffnet_1", "ffnet_2", "ffnet_3", "ffnet_4"} <= set(MODELS)


# ------------------------------------------------------------------------------------------
# every variant, meta device
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
def test_meta_construction_and_cfg(name):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    for field in ("input_size", "mean", "std", "crop_pct", "interpolation", "classifier", "first_conv", "license"):
        assert cfg.get(field) is not None, f"{name}: pretrained_cfg lacks {field}"
    assert cfg.get("paper_ids") or cfg.get("paper_name"), f"{name}: pretrained_cfg names no paper"
    with torch.device("meta"):
        model = timm.create_model(name)
    assert meta_param_count(name) > 0
    info = model.feature_info
    assert len(info) >= 1
    reductions = [f["reduction"] for f in info]
    assert reductions == sorted(reductions), f"{name}: feature reductions not monotonic {reductions}"
    for f in info:
        model.get_submodule(f["module"])  # names a real module
    as_tuple = lambda v: (v,) if isinstance(v, str) else tuple(v)  # noqa: E731
    for classifier in as_tuple(cfg["classifier"]):
        assert model.get_submodule(classifier).out_features == cfg["num_classes"]
    for first_conv in as_tuple(cfg["first_conv"]):
        assert model.get_submodule(first_conv).in_channels == cfg["input_size"][0]
    assert model.num_features == model.head_hidden_size or model.head_hidden_size > 0


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_without_local_file_is_a_clear_error(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        with torch.device("meta"):
            timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.rsplit(".", 1)[-1])
def test_checkpoint_from_another_variant_is_rejected(family):
    variants = _variants(family)
    if len(variants) < 2:
        pytest.skip(f"{family} registers a single variant")
    with torch.device("meta"):
        small_sd = timm.create_model(variants[0]).state_dict()
        other = timm.create_model(variants[1])
    filter_fn = sys.modules[family].checkpoint_filter_fn
    with pytest.raises(ValueError, match=variants[1]):
        filter_fn({k: torch.zeros(v.shape) for k, v in small_sd.items()}, other)


# ------------------------------------------------------------------------------------------
# smallest variant per family, real forward passes
# ------------------------------------------------------------------------------------------
def test_forward_backward(small):
    name, model, x = small
    model.train()
    out = model(x)
    assert out.shape == (BATCH, model.num_classes)
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing[:5]}"


def test_forward_head_and_features(small):
    name, model, x = small
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model.forward_head(feats), logits)
    assert pooled.shape == (BATCH, model.head_hidden_size)


def test_features_only_matches_feature_info(small):
    name, model, x = small
    info = model.feature_info
    out_indices = tuple(range(len(info)))[-3:]
    fm = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    assert fm.feature_info.channels() == [info[i]["num_chs"] for i in out_indices]
    assert fm.feature_info.reduction() == [info[i]["reduction"] for i in out_indices]
    with torch.no_grad():
        feats = fm(x)
    assert len(feats) == len(out_indices)
    for f, i in zip(feats, out_indices):
        assert f.shape[1] == info[i]["num_chs"]
        if f.ndim == 4 and "reduction" in info[i]:
            assert f.shape[-2:] == (math.ceil(x.shape[-2] / info[i]["reduction"]), math.ceil(x.shape[-1] / info[i]["reduction"]))


def test_forward_intermediates_agrees_with_forward_features(small):
    name, model, x = small
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == len(model.feature_info)
        for f, info in zip(inter, model.feature_info):
            assert f.shape[1] == info["num_chs"]
        only = model.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
        torch.testing.assert_close(only[0], inter[1])
        kept = model.prune_intermediate_layers(indices=[1], prune_head=True)
        assert list(kept) == [1]
        pruned = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        torch.testing.assert_close(pruned[0], inter[1])


def test_reset_classifier(small):
    name, model, x = small
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(x).shape == (BATCH, 3)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (BATCH, model.num_features)


def test_grad_checkpointing_same_output(small):
    name, model, x = small
    model.train()
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()


def test_group_matcher_and_no_weight_decay(small):
    name, model, x = small
    groups = group_parameters(model, model.group_matcher())
    grouped = {p for names in groups.values() for p in names}
    assert grouped == {n for n, _ in model.named_parameters()}
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert {p for names in coarse.values() for p in names} == grouped
    names = {n for n, _ in model.named_parameters()}
    assert set(model.no_weight_decay()) <= names


def test_state_dict_round_trip(small):
    name, model, x = small
    clone = timm.create_model(name).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_pretrained_from_local_file(small, tmp_path, fmt):
    name, model, x = small
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "epoch": 3}, path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # a different head size keeps the backbone and drops the classifier
    five = timm.create_model(name, pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(five.forward_features(x), model.forward_features(x), rtol=0, atol=0)
        assert five(x).shape == (BATCH, 5)
    headless = timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        torch.testing.assert_close(headless.forward_features(x), model.forward_features(x), rtol=0, atol=0)


def test_missing_local_file_is_a_clear_error(small, tmp_path):
    name, _, _ = small
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


def test_wrong_channel_count_is_a_clear_error(small):
    name, model, x = small
    with pytest.raises(ValueError, match=r"expected .*\b3\b.*got"):
        model(torch.randn(BATCH, 4, *x.shape[-2:]))


def test_other_input_size(small):
    """Arbitrary sizes work where the architecture allows; otherwise a ValueError names the size."""
    name, model, x = small
    odd = torch.randn(1, 3, 72, 40)
    with torch.no_grad():
        if timm.get_pretrained_cfg(name).to_dict().get("fixed_input_size"):
            with pytest.raises(ValueError, match=r"72|40"):
                model(odd)
        else:
            assert model(odd).shape == (1, model.num_classes)


def test_family_modules_expose_filter():
    for family in FAMILIES:
        mod = importlib.import_module(family)
        assert callable(getattr(mod, "checkpoint_filter_fn", None)), f"{family} lacks checkpoint_filter_fn"


def test_pretrained_without_file_names_url_and_local_path(tmp_path, monkeypatch):
    """Families with published weights name the URL and the hub-cache path; a file saved there is used."""
    from vision3d.backbones._helpers import local_weights_path

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    for name in ("ffnet_1", "transnext_micro"):
        url = timm.get_pretrained_cfg(name).url
        assert url.startswith("https://")
        with pytest.raises(ValueError, match=rf"download {re.escape(url)} to {re.escape(str(local_weights_path(url)))}"):
            timm.create_model(name, pretrained=True)
    with pytest.raises(ValueError, match="OneDrive"):
        timm.create_model("affnet_et", pretrained=True)
    # a checkpoint saved at the named path loads without any argument
    src = timm.create_model("affnet_et", num_classes=3)  # small; any family's own layout round-trips
    url = "https://example.invalid/weights/affnet_et_test.pth"
    path = local_weights_path(url)
    path.parent.mkdir(parents=True)
    torch.save(src.state_dict(), path)
    model = timm.create_model("affnet_et", pretrained=True, num_classes=3, pretrained_cfg_overlay=dict(url=url))
    torch.testing.assert_close(model.state_dict()["stem.conv.weight"], src.state_dict()["stem.conv.weight"])
