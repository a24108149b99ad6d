"""DepthSplat host: parity with the authors' encoder (tests/fixtures/depthsplat, cvg/depthsplat @ 2dad25a),
the released checkpoint layouts, Gaussian activations, every backbone family, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import LOCAL_FIXTURES, fixture_files
from vision3d import recon
from vision3d.geometry import Cameras
from vision3d.geometry.rotations import quat_to_matrix
from vision3d.recon.depthsplat import (
    SH_C0,
    VARIANTS,
    DepthSplat,
    DepthSplatConfig,
    DepthSplatFeatures,
    config_from_state_dict,
    convert_depthsplat_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_thread")
FIX = LOCAL_FIXTURES / "depthsplat"
CASES = ["small", "base", "re10k_base"]


def _load(case):
    st, js = fixture_files("depthsplat", case)
    t = load_file(str(st))
    meta = json.loads(js.read_text())
    state = {k[len("state/") :]: v.float() for k, v in t.items() if k.startswith("state/")}
    return t, meta, state


def _model(meta, state) -> DepthSplat:
    v = meta["upstream"]["vision3d_config"]
    conv = convert_depthsplat_checkpoint(state)
    cfg = config_from_state_dict(
        conv, backbone=v["backbone"], backbone_kwargs=v["backbone_kwargs"], unet_head_channels=v["unet_head_channels"]
    )
    model = DepthSplat(cfg).eval()
    model.load_state_dict(conv, strict=True)
    return model


def _cameras(t) -> Cameras:
    img = t["in/image"]
    return Cameras.from_normalized(
        t["in/intrinsics"], t["in/extrinsics"], img.shape[-1], img.shape[-2],
        near=float(t["in/near"][0, 0]), far=float(t["in/far"][0, 0]),
    )


@pytest.mark.parametrize("case", CASES)
def test_parity_with_authors(case):
    t, meta, state = _load(case)
    tol = meta["tolerance"]
    model = _model(meta, state)
    img = t["in/image"]
    with torch.no_grad():
        out = model(img, _cameras(t))

    def close(a, b, name):
        torch.testing.assert_close(a, b, atol=tol["atol"], rtol=tol["rtol"], msg=lambda m: f"{case}/{name}: {m}")

    g = out.gaussians
    close(out.depth[:, :, 0], t["out/depths"], "depth")
    close(g.means, t["out/gaussians.means"], "means")
    close(g.opacities, t["out/gaussians.opacities"], "opacities")
    R = quat_to_matrix(g.quats)
    cov = R @ torch.diag_embed(g.scales**2) @ R.transpose(-1, -2)
    torch.testing.assert_close(cov, t["out/gaussians.covariances"], atol=1e-7, rtol=1e-4)
    close(g.sh.transpose(-1, -2), t["out/gaussians.harmonics"], "harmonics (world, authors' rotation)")
    mp = out.extras["view_indices"]
    assert mp.tolist() == [list(range(img.shape[1]))] * img.shape[0]
    prob = torch.nn.functional.interpolate(t["out/match_prob"].max(1, keepdim=True)[0], size=img.shape[-2:], mode="nearest")
    close(out.confidence.flatten(0, 1), prob, "match_prob")
    if "out/raw" in t:
        close(out.extras["raw"].flatten(0, 1), t["out/raw"], "raw head output")
        B, N = g.means.shape[:2]
        close(out.extras["scales_cam"].reshape(B, N, 3), t["out/gaussians.scales"], "camera-frame scales")
        close(out.extras["quats_cam_xyzw"].reshape(B, N, 4), t["out/gaussians.rotations"], "camera-frame quaternions")


def test_encode_exposes_the_head_inputs():
    t, meta, state = _load("small")
    model = _model(meta, state)
    img = t["in/image"]
    with torch.no_grad():
        enc = model.encode(img, _cameras(t))
    B, V, _, H, W = img.shape
    assert isinstance(enc, DepthSplatFeatures)
    assert enc.depth.shape == (B, V, 1, H, W)
    assert enc.gaussian_features.shape == (B, V, 16 + 3 + 16 + 1, H, W)
    assert enc.features.shape == (B, V, 16, H, W) and enc.match_prob.shape == (B, V, 1, H, W)
    D = enc.match_prob_volume.shape[2]
    torch.testing.assert_close(enc.match_prob_volume.sum(2), torch.ones(B, V, H // 4, W // 4))
    assert enc.inverse_depth_candidates.shape == (B, V, D, H // 4, W // 4)
    torch.testing.assert_close(enc.depth[:, :, 0], t["out/depths"], atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("layout,variant", [
    ("small", "depthsplat_small"), ("base", "depthsplat_base"), ("large", "depthsplat_large"),
    ("base_dl3dv", "depthsplat_base_dl3dv"),
])
def test_released_layouts_map_onto_variants(layout, variant):
    """Every key of the authors' released ViT-S/B/L encoders lands on a parameter of the same shape."""
    layouts = json.loads((FIX / "official_keys.json").read_text())["layouts"]
    keys = layouts[layout]["keys"]
    state = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    conv = convert_depthsplat_checkpoint({"state_dict": state, "epoch": 1})
    with torch.device("meta"):
        model = recon.create(variant)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in conv.items()}
    assert sorted(set(ours) ^ set(theirs)) == []
    bad = [k for k in ours if ours[k] != theirs[k]]
    assert bad == []
    cfg = config_from_state_dict(conv)
    ref = VARIANTS[variant]
    for f in ("backbone", "mono_channels", "num_scales", "upsample_factor", "lowest_feature_resolution",
              "dpt_channels", "num_depth_candidates", "num_transformer_layers", "unet_channels", "sh_degree"):
        assert getattr(cfg, f) == getattr(ref, f), f


def test_converter_drops_non_model_keys_and_rejects_foreign_ones():
    _, _, state = _load("small")
    wrapped = {"state_dict": {f"encoder.{k}": v for k, v in state.items()}}
    wrapped["state_dict"]["losses.1.lpips.net.0.weight"] = torch.zeros(1)
    wrapped["state_dict"]["encoder.depth_predictor.pretrained.mask_token"] = torch.zeros(1, 32)
    a, b = convert_depthsplat_checkpoint(wrapped), convert_depthsplat_checkpoint(state)
    assert a.keys() == b.keys()
    with pytest.raises(KeyError, match="encoder_extra.weight"):
        convert_depthsplat_checkpoint({**state, "encoder_extra.weight": torch.zeros(1)})


def test_registered_and_listed_by_convert():
    from vision3d.cli.convert import CONVERTERS, get_converter

    assert {"depthsplat_small", "depthsplat_base", "depthsplat_large", "depthsplat_tiny"} <= set(recon.list_models())
    assert get_converter("depthsplat") is convert_depthsplat_checkpoint
    assert "depthsplat" in CONVERTERS


# ----------------------------------------------------------------------------------------- activations
def _cams(B, V, H, W, baseline=0.2):
    K = torch.tensor([[1.0 * W, 0, W / 2], [0, 1.0 * W, H / 2], [0, 0, 1]])
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    for v in range(V):
        a = 0.05 * v
        c2w[:, v, :3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        c2w[:, v, 0, 3] = baseline * v
    return Cameras(K.expand(B, V, 3, 3), c2w, W, H, near=0.5, far=20.0)


def test_gaussian_activations_are_the_authors():
    model = recon.create("depthsplat_tiny")
    B, V, H, W = 1, 2, 4, 6
    cams = _cams(B, V, H, W)
    images = torch.rand(B, V, 3, H, W)
    depth = 1.0 + torch.rand(B, V, 1, H, W)
    enc = DepthSplatFeatures(
        depth=depth, features=None, gaussian_features=None, match_prob=None, match_prob_volume=None,
        inverse_depth_candidates=None, view_indices=torch.arange(V)[None], images=images, cameras=cams,
    )
    raw = torch.zeros(B, V, 37, H, W)
    raw[:, :, 0] = 2.0  # opacity logit
    raw[:, :, 3:6] = torch.tensor([4.0, 3.0, 100.0]).view(1, 1, 3, 1, 1)  # scale pre-activations
    raw[:, :, 9] = 5.0  # quaternion w (xyzw layout): identity in the camera frame
    raw[:, :, 10 + 1] = 1.0  # red SH, first degree-1 coefficient
    g, ex = model.to_gaussians(enc, raw)
    torch.testing.assert_close(g.opacities, torch.full((B, V * H * W), torch.sigmoid(torch.tensor(2.0)).item()))
    expect = torch.tensor([math.log(2.0), math.log1p(math.exp(-1.0)), 3.0])  # softplus(s - 4), clamped to 3
    torch.testing.assert_close(g.scales, expect.expand(B, V * H * W, 3))
    # identity camera-frame rotation -> world rotation of the camera
    R = quat_to_matrix(g.quats).view(B, V, H * W, 3, 3)
    torch.testing.assert_close(R, cams.rotation[:, :, None].expand_as(R), atol=1e-6, rtol=1e-6)
    # DC from the image: rgb = 0.5 + C0 * dc
    dc = g.sh[..., 0, :].view(B, V, H, W, 3)
    torch.testing.assert_close(0.5 + SH_C0 * dc, images.permute(0, 1, 3, 4, 2), atol=1e-6, rtol=1e-6)
    # degree-1 coefficient scaled by the authors' mask 0.1 * 0.25 (camera frame)
    torch.testing.assert_close(ex["sh_cam"][..., 0, 1], torch.full((B, V, H, W), 0.025))
    # zero offset: the mean sits on the pixel-centre ray at the predicted z-depth
    pts = cams.unproject(depth[:, :, 0])  # [B, V, H, W, 3]
    torch.testing.assert_close(g.means, pts.reshape(B, -1, 3), atol=1e-5, rtol=1e-5)
    # an offset of sigmoid(x) - 0.5 pixels moves the ray
    raw[:, :, 1] = 20.0  # x offset -> +0.5 px
    g2, _ = model.to_gaussians(enc, raw)
    m = g2.means.view(B, V, H, W, 3)[0, 0]  # view 0 of scene 0
    c2w = cams.cam_to_world[0, 0]
    cam = (m - c2w[:3, 3]) @ c2w[:3, :3]
    u = cams.K[0, 0, 0, 0] * cam[..., 0] / cam[..., 2] + cams.K[0, 0, 0, 2]
    torch.testing.assert_close(u, torch.arange(W).float().expand(H, W) + 1.0, atol=1e-4, rtol=0)


def test_exact_sh_rotation_option_differs_only_in_higher_bands():
    model_a = recon.create("depthsplat_tiny")
    model_e = recon.create("depthsplat_tiny", sh_rotation="exact")
    B, V, H, W = 1, 2, 2, 2
    cams = _cams(B, V, H, W)
    enc = DepthSplatFeatures(
        depth=torch.ones(B, V, 1, H, W), features=None, gaussian_features=None, match_prob=None,
        match_prob_volume=None, inverse_depth_candidates=None, view_indices=torch.arange(V)[None],
        images=torch.rand(B, V, 3, H, W), cameras=cams,
    )
    raw = torch.randn(B, V, 37, H, W)
    ga, _ = model_a.to_gaussians(enc, raw)
    ge, _ = model_e.to_gaussians(enc, raw)
    torch.testing.assert_close(ga.sh[..., 0, :], ge.sh[..., 0, :])
    assert not torch.allclose(ga.sh[..., 1:, :], ge.sh[..., 1:, :])
    with pytest.raises(ValueError, match="sh_rotation"):
        DepthSplatConfig(sh_rotation="e3nn")


# ----------------------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("backbone", ["affnet_t", "ffnet_1", "transnext_micro", "ewa_vit_tiny_patch16_224"])
def test_host_runs_with_every_backbone_family(backbone):
    torch.manual_seed(0)
    model = recon.create("depthsplat_tiny", backbone=backbone, backbone_kwargs={}).eval()
    assert model.mono.name == backbone
    B, V, H, W = 1, 2, 64, 64
    with torch.no_grad():
        out = model(torch.rand(B, V, 3, H, W), _cams(B, V, H, W))
    assert out.gaussians.means.shape == (B, V * H * W, 3)
    assert out.depth.shape == (B, V, 1, H, W)
    assert torch.isfinite(out.depth).all() and (out.depth >= 0.5 - 1e-4).all() and (out.depth <= 20.0 + 1e-3).all()
    # the learned projection adapts the backbone's widths to the host's 32
    assert all(p.out_channels == 32 for p in model.mono.proj if isinstance(p, torch.nn.Conv2d))


def test_bad_backbone_names_raise_naming_the_value():
    with pytest.raises(ValueError, match="'no_such_net'"):
        recon.create("depthsplat_tiny", backbone="no_such_net")
    import timm
    from timm.models import register_model

    name = "v3d_test_no_features"
    if not timm.is_model(name):
        @register_model
        def v3d_test_no_features(pretrained=False, **kwargs):  # a registered model without feature extraction
            return torch.nn.Conv2d(3, 8, 3)

    with pytest.raises(ValueError, match=f"'{name}'.*features_only"):
        recon.create("depthsplat_tiny", backbone=name, backbone_kwargs={})


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    model = recon.create("depthsplat_tiny").eval()
    with pytest.raises(ValueError, match="at least 2 context views"):
        model(torch.rand(1, 1, 3, 64, 64), _cams(1, 1, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        model(torch.rand(1, 2, 3, 60, 64), _cams(1, 2, 60, 64))
    bad = _cams(1, 2, 64, 64)
    bad.near, bad.far = 5.0, 1.0
    with pytest.raises(ValueError, match="near < far"):
        model(torch.rand(1, 2, 3, 64, 64), bad)
    with pytest.raises(ValueError, match="upsample_factor"):
        DepthSplatConfig(upsample_factor=2, num_scales=1)


def test_views_without_overlap_give_a_zero_cost_volume_and_finite_gaussians():
    """Two cameras looking in opposite directions: every reprojection leaves the other image, the cost
    volume is exactly zero (no evidence), and the output is still finite and inside [near, far]."""
    torch.manual_seed(0)
    model = recon.create("depthsplat_tiny").eval()
    B, V, H, W = 1, 2, 32, 32
    cams = _cams(B, V, H, W, baseline=0.0)
    cams.cam_to_world[0, 1, :3, :3] = torch.diag(torch.tensor([-1.0, 1.0, -1.0]))  # turned around
    seen = {}
    model.regressor[0][0].register_forward_hook(lambda m, i, o: seen.update(cost=i[0][:, :16]))
    with torch.no_grad():
        out = model(torch.rand(B, V, 3, H, W), cams)
    assert seen["cost"].abs().max() == 0
    assert torch.isfinite(out.gaussians.means).all()
    assert (out.depth >= 0.5 - 1e-4).all() and (out.depth <= 20.0 + 1e-3).all()


def test_more_than_three_views_match_nearest_views():
    torch.manual_seed(0)
    model = recon.create("depthsplat_tiny", local_mv_match=1).eval()
    B, V, H, W = 1, 5, 32, 32
    cams = _cams(B, V, H, W)
    cams.cam_to_world[0, :, 0, 3] = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0])
    with torch.no_grad():
        out = model(torch.rand(B, V, 3, H, W), cams)
    assert out.gaussians.means.shape == (B, V * H * W, 3)
    src = model._sources(cams.cam_to_world, B, V)
    assert src.shape == (B, V, 1) and src[0, :, 0].tolist() == [1, 0, 1, 2, 3]


def test_gradients_reach_every_trainable_block():
    torch.manual_seed(0)
    model = recon.create("depthsplat_tiny")
    B, V, H, W = 1, 2, 32, 32
    out = model(torch.rand(B, V, 3, H, W), _cams(B, V, H, W))
    g = out.gaussians
    (g.means.square().mean() + g.sh.square().mean() + g.opacities.mean() + g.scales.mean()).backward()
    for prefix in ("cnn.", "transformer.", "mono.", "regressor.", "depth_head.", "upsampler.", "feature_upsampler.", "gaussian_head."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and any(gr is not None and gr.abs().sum() > 0 for gr in grads), prefix


# ----------------------------------------------------------------------------------------- ZPressor
def test_host_with_zpressor_keeps_anchor_views_only_and_loads_the_authors_layout():
    from tests.recon.test_zpressor import _to_authors
    from vision3d.recon.zpressor import ZPressorConfig, select_anchors

    torch.manual_seed(0)
    z = ZPressorConfig(num_anchors=3, embed_dim=32, num_layers=1)
    host = recon.create("depthsplat_tiny", zpressor=z).eval()
    # a whole authors' host checkpoint: ZPressor under encoder.depth_predictor.zipmatch.
    theirs = {}
    for k, v in host.state_dict().items():
        if k.startswith("zpressor."):
            theirs["encoder.depth_predictor.zipmatch." + _to_authors(k[len("zpressor."):])] = v + 0.01
    ours_back = convert_depthsplat_checkpoint({"state_dict": theirs})
    assert set(ours_back) == {k for k in host.state_dict() if k.startswith("zpressor.")}
    host.load_state_dict(ours_back, strict=False)
    B, V, H, W = 1, 7, 32, 32
    cams = _cams(B, V, H, W)
    images = torch.rand(B, V, 3, H, W)
    with torch.no_grad():
        out = host(images, cams)
    anchors = select_anchors(cams.cam_to_world[..., :3, 3], 3)
    assert torch.equal(out.extras["view_indices"], anchors)
    assert out.gaussians.means.shape == (B, 3 * H * W, 3) and out.depth.shape == (B, 3, 1, H, W)
    # Gaussians from the anchor views only: the DC colours are the anchor images'
    dc = 0.5 + SH_C0 * out.gaussians.sh[..., 0, :]
    want = images[0, anchors[0]].permute(0, 2, 3, 1).reshape(1, -1, 3)
    torch.testing.assert_close(dc, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embed_dim"):
        recon.create("depthsplat_tiny", zpressor=ZPressorConfig(num_anchors=2, embed_dim=16))


def test_train_cli_backbone_flag():
    from vision3d.cli.train import split_backbone

    name, rest = split_backbone(["--model", "depthsplat_tiny", "--backbone", "ffnet_1", "--out", "x"])
    assert name == "ffnet_1" and rest == ["--model", "depthsplat_tiny", "--out", "x"]
    assert split_backbone(["--backbone=affnet_t"]) == ("affnet_t", [])
    assert split_backbone(["--out", "x"]) == (None, ["--out", "x"])
