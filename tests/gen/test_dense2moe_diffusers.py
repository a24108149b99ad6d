"""Dense2MoE in place on diffusers transformers (tiny random configs, no downloads)."""

from __future__ import annotations

import copy

import pytest
import torch

from vision3d.gen import dense2moe as d2m
from vision3d.layers.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")


def _tiny_flux(num_layers: int, num_single_layers: int, in_channels: int = 4):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    ).eval()


def _flux_inputs(timesteps: list[float]) -> dict:
    """Keyword inputs of a 4x4-token image and 8 text tokens, one sample per timestep."""
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    B = len(timesteps)
    return dict(
        hidden_states=torch.randn(B, 16, 4, generator=g), encoder_hidden_states=torch.randn(B, 8, 32, generator=g),
        pooled_projections=torch.randn(B, 32, generator=g), timestep=torch.tensor(timesteps),
        img_ids=img_ids, txt_ids=torch.zeros(8, 3), return_dict=False,
    )


def _tiny_pixart(num_layers: int, timesteps: list[int]):
    """A tiny PixArt transformer and its keyword inputs, one sample per timestep."""
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_num_groups=2, caption_channels=12,
        use_additional_conditions=False,
    ).eval()
    g = torch.Generator().manual_seed(0)
    B = len(timesteps)
    kw = dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(B, 5, 12, generator=g),
              timestep=torch.tensor(timesteps), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)
    return model, kw


def _flux():
    return _tiny_flux(2, 1), _flux_inputs([0.3, 0.8])


def _out_loss(model, kw):
    return model(**kw)[0].square().mean()


def test_flux_converts_in_place_exactly_and_round_trips(tmp_path):
    model, kw = _flux()
    with torch.no_grad():
        ref = model(**kw)[0]
    layers = d2m.dense_to_moe(model, d2m.Dense2MoEConfig(num_slices=8, num_shared=1, top_k=2),
                              loss_fn=_out_loss, calibration=[kw])
    assert sorted(layers) == ["single_transformer_blocks.0"] + [f"transformer_blocks.{i}.{n}" for i in range(2) for n in ("ff", "ff_context")]
    assert isinstance(model.single_transformer_blocks[0].proj_out.mlp, MoE)
    assert isinstance(model.transformer_blocks[0].ff, MoE)
    with torch.no_grad():
        prev = d2m.set_all_active(model)
        torch.testing.assert_close(model(**kw)[0], ref, rtol=1e-5, atol=1e-5)
        d2m.set_all_active(model, prev)
        sparse = model(**kw)[0]
    assert (sparse - ref).abs().max() > 1e-6
    d2m.save_converted(model, tmp_path / "flux")
    back = d2m.load_converted(tmp_path / "flux")
    with torch.no_grad():
        torch.testing.assert_close(back(**kw)[0], sparse)
    assert type(back).__name__ == "FluxTransformer2DModel"


def test_pixart_converts_exactly():
    model, kw = _tiny_pixart(2, [10, 500])
    with torch.no_grad():
        ref = model(**kw)[0]
    d2m.dense_to_moe(model, d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=1), loss_fn=_out_loss, calibration=[kw])
    assert sum(isinstance(m, MoE) for m in model.modules()) == 2
    with torch.no_grad():
        d2m.set_all_active(model)
        torch.testing.assert_close(model(**kw)[0], ref, rtol=1e-5, atol=1e-5)


def test_converted_dit_runs_in_its_diffusers_pipeline():
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2,
    ).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(class_labels=[1, 3], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    ref = run()
    d2m.dense_to_moe(transformer, d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=1,
                                                      assignment="contiguous", router_init="random"))
    sparse = run()
    assert sparse.shape == ref.shape == (2, 3, 16, 16)
    d2m.set_all_active(transformer)
    torch.testing.assert_close(run(), ref, rtol=1e-4, atol=1e-4)
    assert d2m.activated_parameters(transformer) > 0


# ------------------------------------------------------------------------------------------------ Mixture of Blocks
def _flux4():
    model, kw = _tiny_flux(4, 4), _flux_inputs([0.1, 0.4, 0.7, 0.95])
    return model, kw, ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


def _pixart4():
    model, kw = _tiny_pixart(4, [10, 300, 600, 950])
    return model, kw, ("hidden_states", "encoder_hidden_states", "timestep")


def _randomise_routers(routers, model=None, kw=None, scale=1.0):
    """Random router weights; with ``model, kw``: biases that centre each router's logit gap on the batch, so
    the samples of ``kw`` split between the group's blocks (routing differs per sample)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for r in routers:
            r.router.weight.copy_(torch.randn(r.router.weight.shape, generator=g) * scale)
            r.router.bias.zero_()
        if model is None:
            return
        seen = {}
        hs = [r.router.register_forward_pre_hook(lambda m, a: seen.setdefault(m, a[0])) for r in routers]
        model(**kw)
        for h in hs:
            h.remove()
        for r in routers:
            logits = r.router(seen[r.router])
            r.router.bias.copy_(-logits.median(0).values - 1e-3 * (logits[:, 0] - logits[:, 1]).abs().mean())


def _without_skipped(dense, routers, b):
    """The dense model with the blocks sample ``b`` skips removed from its block lists."""
    ref = copy.deepcopy(dense)
    drop: dict[str, set] = {}
    for r in routers:
        sel = r.last[0][b]
        for name, s in zip(r.block_names, sel.tolist()):
            if not s:
                ln, _, i = name.rpartition(".")
                drop.setdefault(ln, set()).add(int(i))
    for ln, ids in drop.items():
        blocks = getattr(ref, ln)
        setattr(ref, ln, torch.nn.ModuleList([blk for i, blk in enumerate(blocks) if i not in ids]))
    return ref


@pytest.mark.parametrize("build", [_flux4, _pixart4], ids=["flux", "pixart"])
def test_mob_on_diffusers_is_exact_per_sample(build):
    dense, kw, per_sample = build()
    model = copy.deepcopy(dense)
    d2m.dense_to_moe(model, d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=1,
                                                assignment="contiguous", router_init="random"))
    moe_ref = copy.deepcopy(model)  # MoE, every block
    routers = d2m.add_mob(model, d2m.MoBConfig(group_size=2, top_k=1, keep_ends=1))
    lists = d2m._BLOCK_LISTS[type(dense).__name__]
    assert len(routers) == len(lists)  # 4 blocks, keep 1 at each end: one group of 2 per block list
    assert all(len(getattr(model, ln)) == len(getattr(dense, ln)) for ln in lists)
    with torch.no_grad():
        prev, prev_ref = d2m.set_all_active(model), d2m.set_all_active(moe_ref)
        torch.testing.assert_close(model(**kw)[0], moe_ref(**kw)[0], rtol=1e-5, atol=1e-5)  # every block = no MoB
        d2m.set_all_active(model, prev)
        d2m.set_all_active(moe_ref, prev_ref)  # back to top-1 experts, as in the MoB model
        _randomise_routers(routers, model, kw)
        out = model(**kw)[0]
    sel = torch.stack([r.last[0] for r in routers], 1)  # [B, groups, 2]
    assert torch.equal(sel.sum(-1), torch.ones_like(sel.sum(-1)))
    assert len({tuple(s.flatten().tolist()) for s in sel}) > 1, "routing should differ between samples"
    for b in range(out.shape[0]):
        ref = _without_skipped(moe_ref, routers, b)
        one = {k: (v[b : b + 1] if k in per_sample else v) for k, v in kw.items()}
        with torch.no_grad():
            torch.testing.assert_close(out[b : b + 1], ref(**one)[0], rtol=1e-5, atol=1e-5)


def test_mob_skipped_block_returns_its_inputs_in_diffusers_order():
    model, kw, _ = _flux4()
    routers = d2m.add_mob(model, d2m.MoBConfig(group_size=2, top_k=1, keep_ends=1))
    blk = model.transformer_blocks[1]
    assert isinstance(blk, d2m.MoBBlock)
    g = torch.Generator().manual_seed(0)
    h, e, temb = torch.randn(3, 16, 32, generator=g), torch.randn(3, 8, 32, generator=g), torch.randn(3, 32, generator=g)
    rope = model.pos_embed(torch.cat([kw["txt_ids"], kw["img_ids"]]))
    with torch.no_grad():
        routers[0].router.bias.copy_(torch.tensor([-5.0, 5.0]))  # every sample picks the group's second block
        enc, hid = blk(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
        assert enc is e and hid is h  # skipped: the inputs, as (encoder_hidden_states, hidden_states)
        enc2, hid2 = model.transformer_blocks[2](h, e, temb, rope)  # positional, as under gradient checkpointing
        ref_e, ref_h = model.transformer_blocks[2].block(hidden_states=h, encoder_hidden_states=e, temb=temb,
                                                         image_rotary_emb=rope)
    torch.testing.assert_close((enc2, hid2), (ref_e, ref_h), rtol=1e-6, atol=1e-6)
    assert d2m.activated_parameters(blk) == pytest.approx(sum(p.numel() for p in blk.block.parameters()) / 2)


def test_mob_group_feature_loss_and_round_trip_on_flux(tmp_path):
    teacher, kw, _ = _flux4()
    student = copy.deepcopy(teacher)
    d2m.dense_to_moe(student, d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=1), loss_fn=_out_loss,
                     calibration=[kw])
    routers = d2m.add_mob(student, d2m.MoBConfig(group_size=2, top_k=1, keep_ends=1))
    _randomise_routers(routers, student, kw)
    d2m.clear_aux_losses(student)
    with d2m.group_features(student, teacher) as feats:
        with torch.no_grad():
            teacher(**kw)
        out = student(**kw)[0]
    assert [f.shape for f in feats.student] == [f.shape for f in feats.teacher] == [torch.Size([4, 24, 32])] * 2
    gf = d2m.group_feature_loss(feats.student, feats.teacher)
    lb = d2m.load_balance_loss(student)
    (gf + lb + out.square().mean()).backward()
    assert gf > 0 and torch.isfinite(gf) and lb > 0
    assert all(r.router.weight.grad is not None and r.router.weight.grad.abs().sum() > 0 for r in routers)
    d2m.save_converted(student, tmp_path / "flux_mob")
    back = d2m.load_converted(tmp_path / "flux_mob")
    with torch.no_grad():
        torch.testing.assert_close(back(**kw)[0], student(**kw)[0])
    assert len(back.mob_routers) == 2 and isinstance(back.single_transformer_blocks[1], d2m.MoBBlock)
    dense_act = d2m.activated_parameters(teacher)
    assert d2m.activated_parameters(back) < d2m.activated_parameters(student.__class__.from_config(teacher.config)) == dense_act


def test_mob_dit_runs_in_its_diffusers_pipeline(tmp_path):
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2,
    ).eval()
    for blk in transformer.transformer_blocks:  # non-zero adaLN gates, so skipping a block changes the output
        torch.nn.init.normal_(blk.norm1.linear.weight, std=0.2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()
    pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(class_labels=[1, 3, 5], num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    ref = run()
    routers = d2m.add_mob(transformer, d2m.MoBConfig(group_size=2, top_k=1, keep_ends=0))  # wraps block 0 too
    assert len(routers) == 2 and isinstance(transformer.transformer_blocks[0], d2m.MoBBlock)
    _randomise_routers(routers, scale=0.5)  # the pipeline's calls vary: no centring
    sparse = run()
    assert sparse.shape == ref.shape == (3, 3, 16, 16) and (sparse - ref).abs().max() > 1e-4
    prev = d2m.set_all_active(transformer)
    torch.testing.assert_close(run(), ref, rtol=1e-4, atol=1e-4)
    d2m.set_all_active(transformer, prev)
    d2m.save_converted(transformer, tmp_path / "dit")
    pipe.transformer = d2m.load_converted(tmp_path / "dit")
    torch.testing.assert_close(run(), sparse)


def test_moe_and_mob_flux_runs_in_its_diffusers_pipeline(tmp_path):
    """FluxPipeline with the converted transformer (MoE, then MoB): prompt embeddings are given, so no text
    encoder or tokenizer (and no download) is needed; the pipeline imports transformers for its type names."""
    pytest.importorskip("transformers")
    transformer = _tiny_flux(4, 4, in_channels=16)  # the pipeline packs 2x2 patches of 4 latent channels
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16, shift_factor=0.1,
    ).eval()
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(1)
    prompt, pooled = torch.randn(3, 8, 32, generator=g), torch.randn(3, 32, generator=g)

    def run():
        return pipe(prompt_embeds=prompt, pooled_prompt_embeds=pooled, height=16, width=16, num_inference_steps=2,
                    guidance_scale=1.0, output_type="pt", generator=torch.Generator().manual_seed(0)).images

    ref = run()
    d2m.dense_to_moe(transformer, d2m.Dense2MoEConfig(num_slices=4, num_shared=1, top_k=1,
                                                      assignment="contiguous", router_init="random"))
    routers = d2m.add_mob(transformer, d2m.MoBConfig(group_size=2, top_k=1, keep_ends=1))
    assert len(routers) == 2 and isinstance(transformer.single_transformer_blocks[1], d2m.MoBBlock)
    _randomise_routers(routers, scale=0.5)
    sparse = run()
    assert sparse.shape == ref.shape == (3, 3, 16, 16) and (sparse - ref).abs().max() > 1e-5
    prev = d2m.set_all_active(transformer)
    torch.testing.assert_close(run(), ref, rtol=1e-4, atol=1e-4)  # every expert and block: the dense pipeline
    d2m.set_all_active(transformer, prev)
    assert d2m.activated_parameters(transformer) < sum(p.numel() for p in transformer.parameters())
    d2m.save_converted(transformer, tmp_path / "flux")
    pipe.transformer = d2m.load_converted(tmp_path / "flux")
    torch.testing.assert_close(run(), sparse)
