"""iLRM's decoupled low-resolution view tokens (encoder="wide", the authors' ``wide`` branch @2da9d82):
shapes, the sub-pixel offset geometry, the checkpoint layout, and that it leaves the released encoder alone.

Numerical parity with the authors' ``IterativeLRM`` was checked once by hand (random weights, CPU,
SDPA in place of xformers): max abs diff 5e-5 on means of magnitude 260, <= 1e-6 elsewhere. No
fixture of the wide model is stored yet.
"""

from __future__ import annotations

import pytest
import torch

from vision3d import recon
from vision3d.geometry import Cameras
from vision3d.geometry.rotations import axis_angle_to_matrix
from vision3d.recon.ilrm import VARIANTS, ILRM, ILRMConfig, config_from_state_dict, convert_ilrm_checkpoint

TINY = dict(patch_size=4, dim=32, head_dim=16, num_layers=4)


def _inputs(B=1, V=2, H=16, W=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(B, V, 3, H, W, generator=g)
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    c2w[..., :3, :3] = axis_angle_to_matrix(torch.randn(B, V, 3, generator=g) * 0.3)
    c2w[..., :3, 3] = torch.randn(B, V, 3, generator=g)
    K = torch.tensor([[20.0, 0, 12.3], [0, 21.0, 7.7], [0, 0, 1]]).expand(B, V, 3, 3)
    return img, Cameras(K, c2w, W, H)


def test_shapes_and_layout():
    torch.manual_seed(0)
    model = recon.create("ilrm_tiny", encoder="wide", viewpoint_factor=2).eval()
    sd = model.state_dict()
    assert sd["ray_embed.weight"].shape == (64, 9 * 16) and sd["support_embed.weight"].shape == (64, 12 * 16)
    assert sd["blocks.0.attn.q.weight"].shape == (128, 64) and sd["blocks.0.attn.proj.weight"].shape == (64, 128)
    assert sd["blocks.1.attn.qkv.weight"].shape == (192, 64) and sd["blocks.1.attn.proj.weight"].shape == (64, 64)
    assert sd["head.1.weight"].shape == (16 * 16, 64)
    assert model.render_kwargs["far_plane"] == 1e6 and ILRM.render_kwargs["far_plane"] == 500.0
    for V in (1, 3):
        img, cams = _inputs(V=V)
        with torch.no_grad():
            out = model(img, cams)
        n = V * 8 * 12  # one Gaussian per pixel of the half-resolution grid
        g = out.gaussians
        assert g.means.shape == (1, n, 3) and g.quats.shape == (1, n, 4) and g.sh.shape == (1, n, 1, 3)
        assert g.scales.shape == (1, n, 3) and g.opacities.shape == (1, n)
        assert out.extras["raw"].shape == (1, V, 96, 16) and out.extras["depth_lowres"].shape == (1, V, 1, 8, 12)
        off = out.extras["offsets"]
        assert off.shape == (1, V, 96, 2) and off.abs().max() < 0.5 and off.std() > 0
        assert torch.isfinite(g.means).all() and out.depth is None
    full = VARIANTS["ilrm_dl3dv_wide"]  # the released wide model (not built here: 24 blocks of width 768)
    assert (full.encoder, full.viewpoint_factor, full.patch_size, full.dim, full.num_layers) == ("wide", 2, 8, 768, 24)
    assert "ilrm_dl3dv_wide" in recon.list_models()


def test_gaussians_sit_on_offset_low_res_rays():
    torch.manual_seed(1)
    model = ILRM(ILRMConfig(**TINY, encoder="wide", viewpoint_factor=2)).eval()
    img, cams = _inputs(B=2, V=2, seed=3)
    with torch.no_grad():
        out = model(img, cams)
    f, h, w = 2, 8, 12
    uv, z = cams.project(out.gaussians.means.unflatten(1, (2, h * w)))  # [B, V, h*w, 2] full-res pixels
    grid = cams.resize(w, h).pixel_grid().reshape(h * w, 2)  # low-res pixel centres
    torch.testing.assert_close(uv, (grid + out.extras["offsets"]) * f, atol=2e-3, rtol=0)
    torch.testing.assert_close(z.reshape(2, 2, 1, h, w), out.extras["depth_lowres"], atol=1e-3, rtol=1e-4)
    with torch.no_grad():  # zero offset logits -> exactly the pixel centres of the half-resolution grid
        oc = model.head[1].weight.view(16 * 16, 32)  # rows (py, px, channel)
        oc.view(16, 16, 32)[:, :2] = 0
        uv0, _ = cams.project(model(img, cams).gaussians.means.unflatten(1, (2, h * w)))
    torch.testing.assert_close(uv0, (grid * f).expand_as(uv0), atol=2e-3, rtol=0)


def test_checkpoint_layout_of_the_wide_branch():
    d, p, layers = 32, 4, 4
    names = {"image_tokenizer.1.weight": (d, 12 * p * p), "image_tokenizer.2.weight": (d,),
             "viewpoint_tokenizer.1.weight": (d, 9 * p * p), "viewpoint_tokenizer.2.weight": (d,),
             "viewpoint_token_decoder.0.weight": (d,), "viewpoint_token_decoder.1.weight": (16 * p * p, d)}
    for i in range(layers):
        b = f"processor.blocks.{i}."
        if i % 2 == 0:
            names.update({b + "read_cross.norm.weight": (d,), b + "read_cross.q.weight": (2 * d, d),
                          b + "read_cross.k.weight": (d, d), b + "read_cross.v.weight": (d, d),
                          b + "read_cross.proj.weight": (d, 2 * d), b + "read_cross.q_norm.weight": (16,),
                          b + "read_cross.k_norm.weight": (16,), b + "read_ff.norm.weight": (d,),
                          b + "read_ff.fc1.weight": (4 * d, d), b + "read_ff.fc2.weight": (d, 4 * d)})
        else:
            names.update({b + "attn.norm.weight": (d,), b + "attn.qkv.weight": (3 * d, d),
                          b + "attn.proj.weight": (d, d), b + "attn.q_norm.weight": (16,),
                          b + "attn.k_norm.weight": (16,), b + "mlp.norm.weight": (d,),
                          b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc2.weight": (d, 4 * d)})
    authors = {"model": {k: torch.randn(s) for k, s in names.items()}}
    state = convert_ilrm_checkpoint(authors)
    cfg = config_from_state_dict(state)
    got = (cfg.encoder, cfg.viewpoint_factor, cfg.patch_size, cfg.dim, cfg.head_dim, cfg.num_layers)
    assert got == ("wide", 2, 4, 32, 16, 4)
    model = ILRM(cfg)
    model.load_state_dict(state, strict=True)
    kv = authors["model"]["processor.blocks.0.read_cross.k.weight"]
    torch.testing.assert_close(model.blocks[0].attn.kv.weight[:d], kv)


def test_errors_and_scale_encoder_untouched():
    with pytest.raises(ValueError, match="needs encoder='wide'"):
        ILRMConfig(viewpoint_factor=2)
    with pytest.raises(ValueError, match="encoder must be"):
        ILRMConfig(encoder="low")
    model = ILRM(ILRMConfig(**TINY, encoder="wide", viewpoint_factor=2))
    img, cams = _inputs(H=12, W=24)
    msg = r"multiple of patch size x viewpoint factor = 8.*crop_to_multiple\(images, cameras, 8\)"
    with pytest.raises(ValueError, match=msg):
        model(img, cams)
    scale = ILRM(ILRMConfig(**TINY))
    assert scale.state_dict()["blocks.0.attn.q.weight"].shape == (32, 32) and scale.head[1].weight.shape[0] == 14 * 16
