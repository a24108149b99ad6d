"""EWA: the averaging formula, MoE <-> FFN conversion, collapse to a standard timm ViT, variants."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Mlp

import vision3d  # noqa: F401  (registers the models)
from vision3d.backbones.ewa import (
    EWAHook,
    EWAMoE,
    collapse_state_dict,
    checkpoint_filter_fn,
    ewa_average_,
    ewa_to_vit,
    vit_to_ewa,
)

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def _diverse_moe(E=4, seed=0) -> EWAMoE:
    torch.manual_seed(seed)
    return EWAMoE([Mlp(6, 12) for _ in range(E)])


@pytest.mark.parametrize("E,beta", [(2, 0.3), (4, 0.5), (3, 1.0)])
def test_averaging_step_exact_formula(E, beta):
    moe = _diverse_moe(E)
    before = [{n: p.detach().clone() for n, p in e.named_parameters()} for e in moe.experts]
    ewa_average_(moe, beta)
    for i, e in enumerate(moe.experts):
        for n, p in e.named_parameters():
            others = sum(before[j][n] for j in range(E) if j != i)
            expect = (1 - beta) * before[i][n] + beta / (E - 1) * others
            torch.testing.assert_close(p, expect, atol=1e-6, rtol=1e-6)
    # the experts' mean is invariant, deviations shrink by 1 - beta * E / (E - 1)
    for n in before[0]:
        mean0 = sum(b[n] for b in before) / E
        mean1 = sum(dict(e.named_parameters())[n] for e in moe.experts) / E
        torch.testing.assert_close(mean1, mean0, atol=1e-6, rtol=1e-6)
        dev0 = before[0][n] - mean0
        dev1 = dict(moe.experts[0].named_parameters())[n] - mean1
        torch.testing.assert_close(dev1, (1 - beta * E / (E - 1)) * dev0, atol=1e-6, rtol=1e-5)


def test_averaging_edge_cases_and_errors():
    moe = _diverse_moe(3)
    ref = copy.deepcopy(moe)
    ewa_average_(moe, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(moe.parameters(), ref.parameters()))
    single = EWAMoE([Mlp(4, 8)])
    w = single.experts[0].fc1.weight.clone()
    ewa_average_(single, 0.7)
    assert torch.equal(single.experts[0].fc1.weight, w)
    with pytest.raises(ValueError, match="share_rate must be in \\[0, 1\\]"):
        ewa_average_(moe, 1.5)
    with pytest.raises(ValueError, match="no EWAMoE layer"):
        EWAHook(torch.nn.Linear(2, 2), 0.3)


def test_hook_runs_after_optimizer_step():
    model = timm.create_model("ewa_vit_tiny_patch16_224", **TINY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = EWAHook(model, share_rate=0.4)
    handle = hook.attach(opt)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    moe = model.blocks[1].mlp
    after_sgd = [e.fc1.weight.detach() - 0.1 * e.fc1.weight.grad for e in moe.experts]
    assert not torch.allclose(after_sgd[0], after_sgd[1])  # different tokens -> different expert grads
    opt.step()
    for i, e in enumerate(moe.experts):
        others = sum(after_sgd[j] for j in range(4) if j != i)
        torch.testing.assert_close(e.fc1.weight, 0.6 * after_sgd[i] + 0.4 / 3 * others, atol=1e-6, rtol=1e-5)
    handle.remove()


def test_dense_to_moe_keeps_outputs():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **TINY)
    ewa = vit_to_ewa(copy.deepcopy(vit), moe_blocks=[0, 2], num_experts=3)
    assert isinstance(ewa.blocks[0].mlp, EWAMoE) and not isinstance(ewa.blocks[1].mlp, EWAMoE)
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):  # random routing over identical experts is still the dense FFN
        vit.train(mode), ewa.train(mode)
        torch.testing.assert_close(ewa(x), vit(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="moe block 7 out of range"):
        vit_to_ewa(copy.deepcopy(vit), moe_blocks=[7])
    with pytest.raises(ValueError, match="has no .blocks"):
        vit_to_ewa(torch.nn.Linear(2, 2))


def test_each_token_visits_one_expert_in_training():
    moe = _diverse_moe(4)
    seen = []
    for e in moe.experts:
        e.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    x = torch.randn(2, 9, 6)
    moe.train()(x)
    assert sum(seen) == 18 and max(seen) - min(seen) <= 1


def test_after_training_collapse_equals_timm_vit():
    torch.manual_seed(0)
    model = timm.create_model("ewa_vit_tiny_patch16_224", **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hook = EWAHook(model, share_rate=0.3)
    for _ in range(3):
        x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        hook.step()
    moe = model.blocks[1].mlp
    assert not torch.allclose(moe.experts[0].fc1.weight, moe.experts[1].fc1.weight)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out_eval = model(x)
        # a stock timm ViT holding the experts' mean
        vit = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
        vit.load_state_dict(collapse_state_dict(model.state_dict()))
        torch.testing.assert_close(vit(x), out_eval, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.to_vit().eval()(x), out_eval, atol=1e-5, rtol=1e-5)
        dense = ewa_to_vit(copy.deepcopy(model)).eval()
        assert not any(isinstance(m, EWAMoE) for m in dense.modules())
        torch.testing.assert_close(dense(x), out_eval, atol=1e-5, rtol=1e-5)
        assert set(dense.state_dict()) == set(vit.state_dict())
        model.train()
        assert (model(x) - out_eval).abs().max() > 1e-4  # training mode really routes to distinct experts


def test_checkpoint_filter_dense_and_ewa(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **TINY)
    path = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(path))
    model = timm.create_model(
        "ewa_vit_tiny_patch16_224", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **TINY,
    )
    for e in model.blocks[3].mlp.experts:
        torch.testing.assert_close(e.fc2.weight, vit.blocks[3].mlp.fc2.weight)
    again = timm.create_model("ewa_vit_tiny_patch16_224", **TINY)
    again.load_state_dict(checkpoint_filter_fn({"model": model.state_dict()}, again))
    other = timm.create_model("ewa_vit_tiny_patch16_224", **{**TINY, "embed_dim": 64})
    with pytest.raises(ValueError, match="ewa_vit_tiny_patch16_224: checkpoint does not fit.*cls_token"):
        checkpoint_filter_fn(vit.state_dict(), other)
    with pytest.raises(ValueError, match="ewa_vit_tiny_patch16_224.*pretrained_cfg_overlay"):
        timm.create_model("ewa_vit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize(
    "size,dense,ffn", [("tiny", 5_717_416, 295_872), ("small", 22_050_664, 1_181_568), ("base", 86_567_656, 4_722_432)]
)
def test_variant_parameter_counts(size, dense, ffn):
    with torch.device("meta"):
        m = timm.create_model(f"ewa_vit_{size}_patch16_224")
        v = timm.create_model(f"vit_{size}_patch16_224")
    assert m.moe_blocks == (1, 3, 5, 7, 9, 11) and m.num_experts == 4
    assert sum(p.numel() for p in v.parameters()) == dense
    assert sum(p.numel() for p in v.blocks[0].mlp.parameters()) == ffn
    assert sum(p.numel() for p in m.parameters()) == dense + 6 * 3 * ffn


def _manual_average_reference(model, share_rate):
    for m in model.modules():
        if isinstance(m, EWAMoE):
            ewa_average_(m, share_rate)


@pytest.mark.parametrize("accum", [1, 2])
def test_plain_loop_averages_exactly_once_per_optimizer_step(accum):
    """A loop that knows nothing of EWA: the automatic hook equals averaging by hand after each step."""
    torch.manual_seed(0)
    auto = timm.create_model("ewa_vit_tiny_patch16_224", share_rate=0.4, **TINY)
    manual = copy.deepcopy(auto)
    from vision3d.backbones.ewa import enable_auto_averaging

    enable_auto_averaging(manual, None)  # the reference averages by hand
    opt_a = torch.optim.SGD(auto.parameters(), lr=0.1, momentum=0.9)
    opt_m = torch.optim.SGD(manual.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        for model, opt in ((auto, opt_a), (manual, opt_m)):
            g = torch.Generator().manual_seed(step)
            for moe in (m for m in model.modules() if isinstance(m, EWAMoE)):
                moe.router.generator = torch.Generator().manual_seed(step)
            for _ in range(accum):
                x = torch.randn(4, 3, 32, 32, generator=g)
                model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if model is manual:
                _manual_average_reference(manual, 0.4)
    for (n, a), (_, b) in zip(auto.named_parameters(), manual.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=n)
    # the experts differ from plain SGD without averaging (the hook really ran)
    moe = auto.blocks[1].mlp
    spread = (moe.experts[0].fc1.weight - moe.experts[1].fc1.weight).abs().max()
    assert spread > 0


def test_optimizer_without_the_experts_does_not_average():
    torch.manual_seed(0)
    model = timm.create_model("ewa_vit_tiny_patch16_224", share_rate=1.0, **TINY)
    moe = model.blocks[1].mlp
    with torch.no_grad():
        moe.experts[0].fc1.weight.add_(1.0)
    before = moe.experts[0].fc1.weight.clone()
    head_opt = torch.optim.SGD(model.head.parameters(), lr=0.1)
    model(torch.randn(2, 3, 32, 32)).mean().backward()
    head_opt.step()
    assert torch.equal(moe.experts[0].fc1.weight, before)


def test_eval_mean_is_cached_and_never_stale():
    torch.manual_seed(0)
    moe = _diverse_moe(4).eval()
    x = torch.randn(5, 6)
    dense = moe.to_dense()
    torch.testing.assert_close(moe(x), dense(x))
    key = moe._mean_key
    moe(x)
    assert moe._mean_key is key  # not re-averaged
    with torch.no_grad():
        moe.experts[2].fc2.bias.add_(1.0)  # in-place change: the mean follows
    torch.testing.assert_close(moe(x), moe.to_dense()(x))
    other = _diverse_moe(4, seed=3)
    moe.load_state_dict(other.state_dict())
    assert "mean_expert.fc1.weight" not in moe.state_dict()
    torch.testing.assert_close(moe(x), other.to_dense()(x))
    assert not any("mean_expert" in n for n, _ in moe.named_parameters())
