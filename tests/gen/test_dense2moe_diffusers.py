"""Dense2MoE in place on diffusers transformers (tiny random configs, no downloads)."""

from __future__ import annotations

import pytest
import torch

from vision3d.gen import dense2moe as d2m
from vision3d.layers.moe import MoE

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")


def _flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    g = torch.Generator().manual_seed(1)
    img_ids = torch.zeros(16, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    kw = dict(
        hidden_states=torch.randn(2, 16, 4, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
        pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.8]),
        img_ids=img_ids, txt_ids=torch.zeros(8, 3), return_dict=False,
    )
    return model, kw


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
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, norm_num_groups=2, caption_channels=12,
        use_additional_conditions=False,
    ).eval()
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 12, generator=g),
              timestep=torch.tensor([10, 500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
              return_dict=False)
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
