"""DiMeR: converter and numerics against the authors' reference fixture, model, checkpoints, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import fixture_files, optional
from vision3d.recon import create
from vision3d.recon.dimer import (
    CameraModulatedViT,
    CrossAttention,
    DiMeR,
    DiMeRConfig,
    DiMeRNet,
    camera_vector,
    convert_dimer_checkpoint,
    dimer_rig,
    export_rotation,
    infer_config,
    load_dimer_net,
    save_converted,
)

TINY_HEADS = dict(encoder_heads=2, transformer_heads=2, grid_res=16)


@pytest.fixture(scope="module")
def fx():
    st, js = fixture_files("dimer")
    from safetensors.torch import load_file

    return load_file(str(st)), json.loads(js.read_text())


def _authors_state(f) -> dict:
    return {k[len("state/") :]: v for k, v in f.items() if k.startswith("state/")}


@pytest.fixture(scope="module")
def tiny_net(fx):
    f, meta = fx
    # as stored in a Lightning checkpoint: {"state_dict": {"lrm_generator.<key>": ...}}
    sd = convert_dimer_checkpoint({"state_dict": {"lrm_generator." + k: v for k, v in _authors_state(f).items()}})
    net = DiMeRNet(infer_config(sd, **TINY_HEADS)).eval()
    net.load_state_dict(sd, strict=True)
    kw = meta["upstream"]["constructor_kwargs"]
    assert net.cfg.grid_res == kw["grid_res"] and net.cfg.grid_scale == kw["grid_scale"]
    return net


def test_config_inferred_from_fixture(tiny_net, fx):
    vit = fx[1]["upstream"]["encoder_backbone"]["transformers_ViTConfig"]
    kw = fx[1]["upstream"]["constructor_kwargs"]
    c = tiny_net.cfg
    assert (c.encoder_dim, c.encoder_depth, c.encoder_mlp_dim) == (
        vit["hidden_size"], vit["num_hidden_layers"], vit["intermediate_size"],
    )  # fmt: skip
    assert (c.img_size, c.patch_size, c.encoder_eps) == (vit["image_size"], vit["patch_size"], vit["layer_norm_eps"])
    assert (c.transformer_dim, c.transformer_depth, c.triplane_low_res, c.triplane_dim) == (
        kw["transformer_dim"], kw["transformer_layers"], kw["triplane_low_res"], kw["triplane_dim"],
    )  # fmt: skip


def test_rig_matches_authors_cameras(fx):
    f, _ = fx
    cams = dimer_rig(1, 48, 48)
    torch.testing.assert_close(camera_vector(cams), f["in/cameras"], atol=1e-6, rtol=0)
    # OpenCV: every camera looks at the origin (+z axis toward the centre)
    fwd = cams.cam_to_world[0, :, :3, 2]
    torch.testing.assert_close(fwd, -torch.nn.functional.normalize(cams.centers[0], dim=-1), atol=1e-6, rtol=0)


@torch.no_grad()
def test_parity_encoder_planes_sdf_texture(tiny_net, fx):
    f, meta = fx
    tol = dict(atol=meta["tolerance"]["atol"], rtol=meta["tolerance"]["rtol"])
    tokens = tiny_net.encode(f["in/images"], f["in/cameras"])
    torch.testing.assert_close(tokens, f["out/image_feats"], **tol)
    planes = tiny_net.forward_planes(f["in/images"], f["in/cameras"])
    torch.testing.assert_close(planes, f["out/planes"], **tol)
    sdf = tiny_net.query_sdf(f["out/planes"], f["in/grid_vertices"][None])
    torch.testing.assert_close(sdf, f["out/sdf"], **tol)
    chunked = tiny_net.query_sdf(f["out/planes"], f["in/grid_vertices"][None], chunk=333)
    torch.testing.assert_close(chunked, sdf, atol=1e-7, rtol=0)
    export = f["out/mesh_vertices"] @ export_rotation()
    torch.testing.assert_close(export, f["out/mesh_vertices_export"], atol=1e-6, rtol=0)
    tex = tiny_net.query_texture(f["out/planes"], f["out/mesh_vertices_export"][None], chunk=500)
    torch.testing.assert_close(tex.rgb, f["out/vertex_rgb"], **tol)
    torch.testing.assert_close(tex.metallic, f["out/vertex_metallic"], **tol)
    torch.testing.assert_close(tex.roughness, f["out/vertex_roughness"], **tol)


@torch.no_grad()
def test_reconstructor_end_to_end(tiny_net, fx):
    f, _ = fx
    model = DiMeR(geometry=tiny_net, texture=tiny_net).eval()
    cams = dimer_rig(1, 48, 48)
    out = model(f["in/images"], cams, normals=f["in/images"])
    torch.testing.assert_close(out.extras["planes"], f["out/planes"], atol=1e-5, rtol=1e-4)
    mesh = out.mesh
    ref_f = f["out/mesh_faces"].shape[0]
    assert abs(mesh.num_faces - ref_f) <= 0.02 * ref_f  # |sdf| < 1e-4 at some vertices: a few sign flips allowed
    if torch.equal(torch.sign(out.extras["sdf"]), torch.sign(f["out/sdf"][0, :, 0])):
        assert torch.equal(mesh.faces, f["out/mesh_faces"])
        torch.testing.assert_close(mesh.vertices, f["out/mesh_vertices"], atol=1e-5, rtol=0)
        torch.testing.assert_close(mesh.colors, f["out/vertex_rgb"][0].clamp(0, 1), atol=1e-5, rtol=1e-4)
    assert mesh.colors is not None and 0 <= float(mesh.colors.min()) and float(mesh.colors.max()) <= 1
    assert mesh.normals is not None and out.extras["metallic"].shape == (mesh.num_vertices,)


def test_reconstructor_bad_input(tiny_net, fx):
    f, _ = fx
    cams = dimer_rig(1, 48, 48)
    with pytest.raises(ValueError, match="needs normal maps"):
        DiMeR(geometry=tiny_net)(f["in/images"], cams)
    with pytest.raises(ValueError, match="no texture network"):
        DiMeR(geometry=tiny_net)(f["in/images"], cams, normals=f["in/images"])
    with pytest.raises(ValueError, match="cameras batch"):
        DiMeR(geometry=tiny_net)(None, dimer_rig(1, 48, 48, azimuths_deg=(0.0, 90.0, 180.0)), normals=f["in/images"])
    with pytest.raises(ValueError, match="camera vectors"):
        tiny_net.forward_planes(f["in/images"], f["in/cameras"][..., :12])
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_net.forward_planes(f["in/images"][..., :44, :44], f["in/cameras"])


def test_empty_sdf_warns_not_crashes(tiny_net):
    model = DiMeR(geometry=DiMeRNet(tiny_net.cfg)).eval()
    nn.init.constant_(model.geometry.decoder.sdf[-1].bias, 5.0)
    nn.init.zeros_(model.geometry.decoder.sdf[-1].weight)
    planes = torch.zeros(1, 3, tiny_net.cfg.triplane_dim, 8, 8)
    with pytest.warns(UserWarning, match="positive at every grid vertex"):
        res = model.extract_mesh(planes)
    assert res.mesh.empty and "positive" in res.message


def test_grid_too_large_is_refused(tiny_net):
    model = DiMeR(geometry=DiMeRNet(DiMeRConfig(**{**tiny_net.cfg.__dict__, "grid_res": 4096})))
    with pytest.raises(ValueError, match="lower grid_res"):
        model.extract_mesh(torch.zeros(1, 3, tiny_net.cfg.triplane_dim, 8, 8))


def test_cross_attention_matches_torch_mha_with_kdim():
    # the released model has transformer_dim 1024 != encoder_dim 768: q/k/v stored separately
    mha = nn.MultiheadAttention(32, 4, kdim=24, vdim=24, bias=False, batch_first=True).eval()
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    ref = mha(x, ctx, ctx)[0]
    authors = {
        "transformer.layers.0.cross_attn." + k: v for k, v in mha.state_dict().items()
    }  # q_proj_weight, k_proj_weight, v_proj_weight, out_proj.weight
    conv = convert_dimer_checkpoint(authors)
    ca = CrossAttention(32, 24, 4)
    ca.load_state_dict({k.split("cross_attn.")[1]: v for k, v in conv.items()})
    torch.testing.assert_close(ca(x, ctx), ref, atol=1e-5, rtol=1e-5)


def test_converter_rejects_unknown_keys(fx):
    sd = _authors_state(fx[0])
    sd["synthesizer.decoder.net_deformation.0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="net_deformation"):
        convert_dimer_checkpoint(sd)


def test_timm_dino_state_dict_loads_into_real_size_encoder():
    timm = optional("timm")
    with torch.device("meta"):  # shapes only: no memory, no init time
        ref = timm.create_model("vit_base_patch16_224.dino", pretrained=False)
        enc = CameraModulatedViT(DiMeRConfig())
    left = enc.load_timm_state_dict(ref.state_dict(), assign=True)
    assert all(k.startswith("camera_embed.") or ".modulation." in k for k in left)
    assert len([k for k in left if k.endswith("modulation.weight")]) == 12


@torch.no_grad()
def test_encoder_equals_timm_vit_when_unmodulated():
    optional("timm")
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()
    cfg = DiMeRConfig(img_size=32, patch_size=8, encoder_dim=32, encoder_depth=2, encoder_heads=2,
                      encoder_mlp_dim=128, encoder_eps=1e-6)  # fmt: skip
    enc = CameraModulatedViT(cfg).eval()
    enc.load_timm_state_dict(ref.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(enc(x, torch.randn(2, 16)), ref.forward_features((x - mean) / std), atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trips(tmp_path, fx, tiny_net):
    f, _ = fx
    sd = convert_dimer_checkpoint(_authors_state(f))
    path = save_converted(tmp_path / "geo.safetensors", sd, tiny_net.cfg)
    net = load_dimer_net(path)
    assert net.cfg == tiny_net.cfg
    torch.save({"state_dict": {"lrm_generator." + k: v for k, v in _authors_state(f).items()}}, tmp_path / "geo.ckpt")
    net2 = load_dimer_net(tmp_path / "geo.ckpt", **TINY_HEADS)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_dimer_net(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.ckpt"):
        load_dimer_net(tmp_path / "junk.ckpt")


def test_registry_builds_tiny_model():
    model = create("dimer_tiny")
    assert isinstance(model, DiMeR) and model.cfg.grid_res == 16 and model.cfg.encoder_dim == 32


# ----------------------------------------------------------------------------------------- CLI
def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


def _sphere_normal_png(path, size=48):
    yy, xx = np.mgrid[0:size, 0:size]
    u, v = (xx + 0.5) / size * 2 - 1, (yy + 0.5) / size * 2 - 1
    r2 = u**2 + v**2
    n = np.stack([u, -v, np.sqrt(np.clip(1 - r2, 0, 1))], -1)
    img = np.where((r2 < 0.8)[..., None], (n + 1) / 2, 1.0)
    return _write_png(path, (img * 255).round().astype(np.uint8))


@pytest.fixture()
def cli_files(tmp_path, fx, tiny_net):
    f, _ = fx
    ckpt = save_converted(tmp_path / "geo.safetensors", convert_dimer_checkpoint(_authors_state(f)), tiny_net.cfg)
    normals = [_sphere_normal_png(tmp_path / f"n{i}.png") for i in range(4)]
    rng = np.random.default_rng(0)
    photo = lambda: rng.integers(60, 190, (48, 48, 3), dtype=np.uint8)  # noqa: E731 - photo-like mid tones
    rgb = [_write_png(tmp_path / f"c{i}.png", photo()) for i in range(4)]
    return tmp_path, ckpt, normals, rgb


def test_cli_reconstruct_mesh(cli_files, capsys):
    optional("trimesh")
    from vision3d.cli.reconstruct_mesh import Args, run
    from vision3d.mesh import load_mesh

    tmp, ckpt, normals, rgb = cli_files
    out = tmp / "out.ply"
    args = Args(
        normals=normals, geometry_ckpt=ckpt, output=out, images=rgb, texture_ckpt=ckpt, size=48, pad=0, device="cpu"
    )
    assert run(args) == 0, capsys.readouterr().err
    mesh = load_mesh(out)
    assert mesh.num_faces > 0 and mesh.colors is not None


def test_cli_bad_input(cli_files, capsys):
    from vision3d.cli.reconstruct_mesh import Args, run

    tmp, ckpt, normals, rgb = cli_files
    base = dict(geometry_ckpt=ckpt, output=tmp / "o.ply", size=48, pad=0, device="cpu")
    assert run(Args(normals=normals[:3], **base)) == 2
    assert "exactly 4 views" in capsys.readouterr().err
    assert run(Args(normals=normals[:3] + [tmp / "absent.png"], **base)) == 2
    assert "absent.png" in capsys.readouterr().err
    assert run(Args(normals=normals[:3] + [rgb[0]], **base)) == 2  # a photo is not a normal map
    err = capsys.readouterr().err
    assert "c0.png" in err and "normal map" in err
    assert run(Args(normals=normals, images=rgb, **base)) == 2  # colours without a texture network
    assert "--texture-ckpt" in capsys.readouterr().err
    assert run(Args(normals=normals, **{**base, "output": tmp / "o.stl"})) == 2
    assert "o.stl" in capsys.readouterr().err
