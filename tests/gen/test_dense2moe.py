"""Dense2MoE: exact conversion, Taylor metric, MoB, losses, pruning baseline, save/load, bad input, diffusers."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from vision3d.gen import dense2moe as d2m
from vision3d.gen.dit import DiT, DiTConfig, flow_matching_loss, procedural_shapes
from vision3d.layers.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")


def _dit(depth=4, dim=32, seed=0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DiTConfig(dim=dim, depth=depth, num_heads=2, image_size=8))
    for blk in model.blocks:  # non-zero adaLN gates, so every block changes the output
        nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.1)
        nn.init.normal_(blk.adaLN_modulation[-1].bias, std=0.1)
    nn.init.normal_(model.final.linear.weight, std=0.1)
    return model.eval()


def _inputs(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.rand(n, generator=g), torch.arange(n) % 4


def _calib():
    x, y = procedural_shapes(16, size=8, seed=2)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    loss = lambda m, b: flow_matching_loss(m, b[0], b[1], generator=torch.Generator().manual_seed(0))  # noqa: E731
    return loss, batches


@pytest.mark.parametrize("assignment", ["taylor_cluster", "taylor_stride", "contiguous"])
def test_all_experts_active_is_the_dense_model(assignment):
    dense = _dit()
    moe = copy.deepcopy(dense)
    loss, batches = _calib()
    layers = d2m.dense_to_moe(moe, d2m.Dense2MoEConfig(assignment=assignment), loss_fn=loss, calibration=batches)
    assert sorted(layers) == [f"blocks.{i}.mlp" for i in range(4)]
    x, t, y = _inputs()
    ref = dense(x, t, y)
    prev = d2m.set_all_active(moe)
    torch.testing.assert_close(moe(x, t, y), ref, rtol=1e-5, atol=1e-5)
    d2m.set_all_active(moe, prev)
    sparse = moe(x, t, y)
    assert (sparse - ref).abs().max() > 1e-5  # top-2 of 7 is an approximation, not the dense model
    # activated FFN parameters: (1 shared + 2 routed) / 8 slices
    ffn_dense = sum(p.numel() for p in dense.blocks[0].mlp.parameters())
    mlp = moe.blocks[0].mlp
    act = d2m.activated_parameters(mlp) - sum(p.numel() for p in mlp.router.parameters())
    assert act == pytest.approx(ffn_dense * 3 / 8, rel=0.02)


def test_mob_all_blocks_active_is_dense_and_grouped_equals_twin():
    dense = _dit(depth=6)
    model = copy.deepcopy(dense)
    groups = d2m.add_mob(model, d2m.MoBConfig(group_size=2, top_k=1, keep_ends=1))
    assert [g.block_indices for g in groups] == [(1, 2), (3, 4)] and len(model.blocks) == 4
    x, t, y = _inputs(6)
    prev = d2m.set_all_active(model)
    torch.testing.assert_close(model(x, t, y), dense(x, t, y), rtol=1e-5, atol=1e-5)
    d2m.set_all_active(model, prev)
    for g in groups:
        nn.init.normal_(g.router.weight)
    c = model.condition(t, y)
    h = model.embed(x)
    for g in groups:
        a, b = g(h, c), g.forward_dense(h, c)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        _, sel, _ = g.route(c)
        assert torch.equal(sel.sum(1), torch.ones(6, dtype=torch.long))
        h = a
    total_blocks = sum(p.numel() for p in dense.blocks.parameters())
    one_block = sum(p.numel() for p in dense.blocks[0].parameters())
    saved = d2m.activated_parameters(dense) - d2m.activated_parameters(model)
    router = sum(p.numel() for g in groups for p in g.router.parameters())
    assert saved == pytest.approx(2 * one_block - router) and total_blocks == 6 * one_block
    # gradients reach the MoB routers through the straight-through weights
    model(x, t, y).square().mean().backward()
    assert all(g.router.weight.grad.abs().sum() > 0 for g in groups)


def test_taylor_importance_is_first_order_loss_change():
    model = _dit(depth=1)
    loss, batches = _calib()
    ffns = d2m.find_ffns(model)
    stats = d2m.calibrate(model, loss, batches, ffns)["blocks.0.mlp"]
    # brute force: |sum_tokens h_j dL/dh_j| by hand, per batch
    mlp = model.blocks[0].mlp
    expect = torch.zeros(mlp.fc1.out_features)
    for b in batches:
        store = {}
        hook = mlp.fc2.register_forward_pre_hook(lambda _m, a: store.setdefault("h", a[0]))
        val = loss(model, b)
        hook.remove()
        (g,) = torch.autograd.grad(val, store["h"])
        expect += (store["h"] * g).reshape(-1, expect.numel()).sum(0).abs()
    torch.testing.assert_close(stats.importance, expect.detach(), rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())  # calibration leaves .grad alone
    # the shared expert holds the most important neurons
    cfg = d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=1)
    shared, groups = d2m.assign_neurons(expect.numel(), cfg, stats, "blocks.0.mlp")
    top = torch.argsort(stats.importance, descending=True)[: shared.numel()]
    assert set(shared.tolist()) == set(top.tolist())
    assert all(g.numel() == shared.numel() for g in groups)


def test_taylor_router_prefers_the_experts_that_matter():
    model = _dit(depth=1)
    loss, batches = _calib()
    ffns = d2m.find_ffns(model)
    stats = d2m.calibrate(model, loss, batches, ffns)["blocks.0.mlp"]
    cfg = d2m.Dense2MoEConfig(num_slices=8, num_shared=1, top_k=2)
    moe = d2m.convert_ffn(ffns["blocks.0.mlp"], cfg, stats, "blocks.0.mlp")
    shared, groups = d2m.assign_neurons(stats.importance.numel(), cfg, stats, "blocks.0.mlp")
    scores = torch.stack([stats.scores[:, g].sum(1) for g in groups], 1)  # [T, 7]
    chosen = moe.router(stats.inputs).expert_index
    picked = scores.gather(1, chosen).sum(1)
    # the fitted router's picks carry more Taylor score than a random pair of experts would on average
    assert picked.mean() > 1.2 * (scores.mean(1) * 2).mean()


def test_losses_and_pruning_baseline():
    teacher = _dit(depth=6)
    student = copy.deepcopy(teacher)
    d2m.dense_to_moe(student, d2m.Dense2MoEConfig(assignment="contiguous", router_init="random"))
    d2m.add_mob(student, d2m.MoBConfig())
    x, t, y = _inputs()
    d2m.clear_aux_losses(student)
    with d2m.group_features(student, teacher) as feats:
        student(x, t, y)
        teacher(x, t, y)
    assert len(feats.student) == len(feats.teacher) == 2
    gf = d2m.group_feature_loss(feats.student, feats.teacher)
    manual = sum((s - t).square().mean() for s, t in zip(feats.student, feats.teacher)) / 2
    torch.testing.assert_close(gf, manual)
    lb = d2m.load_balance_loss(student)
    assert lb >= 1.0 - 1e-6  # Switch loss is >= 1 ... up to the top-k fraction
    pruned = copy.deepcopy(teacher)
    d2m.prune_ffns_magnitude(pruned, 0.375)
    assert pruned.blocks[0].mlp.num_neurons == round(0.375 * 128)
    w = teacher.blocks[0].mlp
    score = w.fc1.weight.norm(dim=1) * w.fc2.weight.norm(dim=0)
    kept = set(torch.argsort(score, descending=True)[:48].tolist())
    rows = {tuple(r.tolist()) for r in pruned.blocks[0].mlp.fc_in.weight}
    assert rows == {tuple(w.fc1.weight[j].tolist()) for j in kept}


def test_save_load_round_trip(tmp_path):
    model = _dit(depth=4)
    loss, batches = _calib()
    d2m.dense_to_moe(model, d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=2), loss_fn=loss, calibration=batches)
    d2m.add_mob(model, d2m.MoBConfig(group_size=2, top_k=1, keep_ends=1))
    d2m.save_converted(model, tmp_path / "m")
    back = d2m.load_converted(tmp_path / "m")
    x, t, y = _inputs()
    torch.testing.assert_close(back(x, t, y), model(x, t, y))
    assert back.dense2moe_config == model.dense2moe_config
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        d2m.load_converted(tmp_path / "nothing")


def test_bad_input_names_module_and_numbers():
    model = _dit(depth=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp: hidden width 128 is not divisible into num_slices=5"):
        d2m.dense_to_moe(model, d2m.Dense2MoEConfig(num_slices=5, assignment="contiguous", router_init="random"))
    assert not any(isinstance(m, MoE) for m in model.modules())  # nothing half-converted
    with pytest.raises(ValueError, match=r"top_k=8 must be in \[1, 7\]"):
        d2m.dense_to_moe(model, d2m.Dense2MoEConfig(top_k=8, assignment="contiguous", router_init="random"))
    with pytest.raises(ValueError, match="need calibration"):
        d2m.dense_to_moe(model, d2m.Dense2MoEConfig())
    with pytest.raises(ValueError, match="Sequential: found no FFN to convert"):
        d2m.dense_to_moe(nn.Sequential(nn.Linear(4, 4)), d2m.Dense2MoEConfig(assignment="contiguous"))
    with pytest.raises(TypeError, match=r"blocks\.0\.attn: SelfAttention is not a feed-forward network"):
        d2m.find_ffns(model, ["blocks.0.attn"])
    with pytest.raises(ValueError, match="no module named 'blocks.9.mlp'"):
        d2m.find_ffns(model, ["blocks.9.mlp"])
    with pytest.raises(ValueError, match=r"2 blocks minus 2\*keep_ends=2 leaves 0"):
        d2m.add_mob(model, d2m.MoBConfig())
    with pytest.raises(ValueError, match=r"top_k=3 must be in \[1, 2\]"):
        d2m.MoBGroup([nn.Identity(), nn.Identity()], 4, 3, [0, 1])


def test_balanced_kmeans_recovers_separated_groups_with_equal_sizes():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    feats = torch.cat([centers[i] + 0.1 * torch.randn(10, 16, generator=g) for i in range(4)])
    groups = d2m._balanced_kmeans(feats[torch.randperm(40, generator=g)], 4, 10, 10, g)
    assert [grp.numel() for grp in groups] == [10] * 4
    assert torch.equal(torch.cat(groups).sort().values, torch.arange(40))
    unbalanced = torch.cat([centers[0] + 0.1 * torch.randn(30, 16, generator=g), centers[1] + 0.1 * torch.randn(10, 16, generator=g)])
    assert [grp.numel() for grp in d2m._balanced_kmeans(unbalanced, 4, 10, 5, g)] == [10] * 4


def test_pruning_at_the_mob_budget_matches_it_and_round_trips(tmp_path):
    from vision3d.gen.recipe import GenConfig, mob_activated_parameters, prune

    cfg = GenConfig()
    cfg.dit = DiTConfig(dim=32, depth=6, num_heads=2, image_size=8)
    teacher = _dit(depth=6)
    with torch.no_grad():  # make block 2 clearly larger than block 1 and block 3 smaller than block 4
        for p in teacher.blocks[2].parameters():
            p.mul_(2.0)
        for p in teacher.blocks[3].parameters():
            p.mul_(0.5)
    target = mob_activated_parameters(teacher, cfg)
    pruned = prune(teacher, cfg, "mob")
    assert pruned.pruned_blocks == [0, 2, 4, 5]  # groups (1, 2) and (3, 4): the larger-magnitude block of each
    act = d2m.activated_parameters(pruned)
    assert act == sum(p.numel() for p in pruned.parameters())  # static: every parameter runs
    assert act == pytest.approx(target, rel=0.005)
    assert act < 0.6 * d2m.activated_parameters(teacher)
    x, t, y = _inputs()
    d2m.save_converted(pruned, tmp_path / "p")
    back = d2m.load_converted(tmp_path / "p")
    torch.testing.assert_close(back(x, t, y), pruned(x, t, y))
    shallow = copy.deepcopy(teacher)
    d2m.prune_blocks_magnitude(shallow, d2m.MoBConfig())
    with pytest.raises(ValueError, match="outside"):  # below what the attention and embeddings alone take
        d2m.ffn_fraction_for_budget(shallow, 0.2 * act)


def test_calibration_is_bounded_and_does_not_depend_on_the_passes():
    model = _dit(depth=3)
    loss, batches = _calib()  # 2 batches x 8 images x 16 tokens = 256 tokens per FFN
    ffns = d2m.find_ffns(model)
    both = d2m.calibrate(model, loss, batches, ffns, max_tokens=100)
    alone = d2m.calibrate(model, loss, batches, {"blocks.1.mlp": ffns["blocks.1.mlp"]}, max_tokens=100)["blocks.1.mlp"]
    s = both["blocks.1.mlp"]
    assert s.inputs.shape == (100, 32) and s.scores.shape == s.activations.shape == (100, 128)
    assert torch.equal(s.inputs, alone.inputs) and torch.equal(s.importance, alone.importance)  # same tokens kept
    # the kept rows are real calibration tokens: each input row occurs among the FFN's inputs
    seen = []
    hook = ffns["blocks.1.mlp"].register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, 32)))
    for b in batches:
        loss(model, b)
    hook.remove()
    every = torch.cat(seen)
    assert bool((torch.cdist(s.inputs, every, compute_mode="donot_use_mm_for_euclid_dist").min(1).values < 1e-5).all())
    # conversion in one pass per FFN (a tiny memory budget) equals conversion in a single pass
    one, many = copy.deepcopy(model), copy.deepcopy(model)
    cfg = d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=1, calib_tokens=100)
    d2m.dense_to_moe(one, dataclasses.replace(cfg, calib_budget_mb=0), loss_fn=loss, calibration=batches)
    d2m.dense_to_moe(many, dataclasses.replace(cfg, calib_budget_mb=1e-6), loss_fn=loss, calibration=iter(batches))
    x, t, y = _inputs()
    torch.testing.assert_close(many(x, t, y), one(x, t, y), rtol=1e-5, atol=1e-5)
    assert all(m.router.k == 1 for m in many.modules() if isinstance(m, MoE))  # top-k restored after the passes
