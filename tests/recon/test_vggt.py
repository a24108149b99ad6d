"""VGGT: parity with the authors' code (fixture), converter, cameras, input policy, shared layers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vision3d.layers.rope import RoPE2D, patch_positions
from vision3d.recon import create
from vision3d.recon.vggt import VGGT, VGGT_TINY, VGGTConfig, convert_vggt_checkpoint, preprocess_images, vggt_tiny

from tests.conftest import requires_cuda

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "vggt"


@pytest.fixture(scope="module")
def fixture():
    tensors = load_file(str(FIX / "public.safetensors"))
    meta = json.loads((FIX / "public.json").read_text())
    state = {k[len("state/"):]: v for k, v in tensors.items() if k.startswith("state/")}
    return tensors, meta, state


@pytest.fixture(scope="module")
def loaded(fixture):
    _, _, state = fixture
    model = vggt_tiny().eval()
    missing, unexpected = model.load_state_dict(convert_vggt_checkpoint(state), strict=True)
    assert not missing and not unexpected
    return model


def test_fixture_config_matches(fixture):
    _, meta, _ = fixture
    agg = meta["upstream"]["constructor"]["aggregator"]
    assert (agg["embed_dim"], agg["depth"], agg["num_heads"]) == (
        VGGT_TINY["embed_dim"], VGGT_TINY["depth"], VGGT_TINY["num_heads"])
    assert tuple(meta["upstream"]["constructor"]["depth_head"]["intermediate_layer_idx"]) == VGGT_TINY["dpt_layers"]


def test_parity_with_authors_code(fixture, loaded):
    tensors, meta, _ = fixture
    tol = meta["tolerance"]
    images = tensors["in/images"]
    with torch.no_grad():
        tokens = loaded.aggregator(images)
        pred = loaded.predict(images)
    for i, t in enumerate(tokens):
        torch.testing.assert_close(t, tensors[f"out/aggregated_tokens.{i}"], atol=tol["atol"], rtol=tol["rtol"])
    for k in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(pred[k], tensors[f"out/{k}"], atol=tol["atol"], rtol=tol["rtol"], msg=k)
    for i, p in enumerate(pred["pose_enc_list"]):
        torch.testing.assert_close(p, tensors[f"out/pose_enc_list.{i}"], atol=tol["atol"], rtol=tol["rtol"])


def test_reconstructor_output_and_cameras(loaded):
    images = torch.rand(1, 2, 3, 28, 42)
    with torch.no_grad():
        out = loaded(images)
    b, s, _, h, w = images.shape
    assert out.depth.shape == (b, s, 1, h, w) and out.confidence.shape == (b, s, 1, h, w)
    assert out.extras["world_points"].shape == (b, s, h, w, 3)
    assert tuple(out.cameras.batch_shape) == (b, s) and (out.cameras.width, out.cameras.height) == (w, h)
    enc = out.extras["pose_enc"]
    # independent check of the encoding: quaternion xyzw of world-to-camera, fov_h then fov_w
    x, y, z, r = enc[..., 3:7].unbind(-1)
    n = torch.sqrt(x * x + y * y + z * z + r * r)
    x, y, z, r = x / n, y / n, z / n, r / n
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - r * z), 2 * (x * z + r * y),
        2 * (x * y + r * z), 1 - 2 * (x * x + z * z), 2 * (y * z - r * x),
        2 * (x * z - r * y), 2 * (y * z + r * x), 1 - 2 * (x * x + y * y)], -1).view(*enc.shape[:-1], 3, 3)
    w2c = out.cameras.world_to_cam
    torch.testing.assert_close(w2c[..., :3, :3], rot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w2c[..., :3, 3], enc[..., :3], atol=1e-5, rtol=1e-5)
    fy = (h / 2) / torch.tan(enc[..., 7] / 2)
    fx = (w / 2) / torch.tan(enc[..., 8] / 2)
    torch.testing.assert_close(out.cameras.K[..., 0, 0], fx)
    torch.testing.assert_close(out.cameras.K[..., 1, 1], fy)
    torch.testing.assert_close(out.cameras.K[..., 0, 2], torch.full_like(fx, w / 2))


def test_converter_rejects_and_unwraps(fixture):
    _, _, state = fixture
    with pytest.raises(ValueError, match="camera_token"):
        convert_vggt_checkpoint({"foo": torch.zeros(1)})
    wrapped = {"module." + k: v for k, v in state.items()}
    wrapped["track_head.x"] = torch.zeros(1)
    conv = convert_vggt_checkpoint(wrapped)
    assert "track_head.x" not in conv and "aggregator.patch_embed.reg_token" in conv
    cls = conv["aggregator.patch_embed.cls_token"]
    torch.testing.assert_close(cls, state["aggregator.patch_embed.cls_token"] + state["aggregator.patch_embed.pos_embed"][:, :1])
    assert conv["aggregator.patch_embed.pos_embed"].shape[1] == state["aggregator.patch_embed.pos_embed"].shape[1] - 1


def test_one_image_and_bad_sizes(loaded):
    with torch.no_grad():
        out = loaded(torch.rand(1, 1, 3, 28, 42))
    assert out.depth.shape == (1, 1, 1, 28, 42) and torch.isfinite(out.extras["pose_enc"]).all()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        loaded(torch.rand(1, 2, 3, 30, 42))
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, W\]"):
        loaded(torch.rand(2, 3, 28, 28))


def test_too_many_frames_chunks_queries_exactly(fixture, loaded):
    _, _, state = fixture
    images = torch.rand(1, 2, 3, 28, 28)
    model = vggt_tiny(max_frames=1, query_chunk=7).eval()
    model.load_state_dict(convert_vggt_checkpoint(state))
    with torch.no_grad():
        ref = loaded.predict(images)
        with pytest.warns(UserWarning, match="max_frames"):
            pred = model.predict(images)
    for k in ("depth", "pose_enc", "world_points"):
        torch.testing.assert_close(pred[k], ref[k], atol=1e-5, rtol=1e-5)


def test_preprocess_policy():
    tall, wide = torch.rand(3, 80, 40), torch.rand(3, 30, 60)
    crop = preprocess_images([tall, wide], mode="crop", target=56)
    # width -> 56; tall height 112 -> centre-cropped to 56; wide height 28; padded to the max (white)
    assert crop.shape == (2, 3, 56, 56)
    assert torch.all(crop[1, :, :14] == 1.0) and torch.all(crop[1, :, -14:] == 1.0)
    pad = preprocess_images([tall, wide], mode="pad", target=56)
    assert pad.shape == (2, 3, 56, 56)
    assert torch.all(pad[0, :, :, :14] == 1.0)  # tall: width 28, centred
    assert pad.min() >= 0 and pad.max() <= 1
    with pytest.raises(ValueError, match="mode"):
        preprocess_images([tall], mode="stretch")
    with pytest.raises(ValueError, match="image 0"):
        preprocess_images([torch.rand(4, 8, 8)])
    with pytest.raises(ValueError, match="at least one"):
        preprocess_images([])


def test_rope_is_relative():
    rope = RoPE2D(100.0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(pq, pk):
        a = rope(q, torch.tensor([[pq]]))
        b = rope(k, torch.tensor([[pk]]))
        return (a * b).sum(-1)

    torch.testing.assert_close(score((3, 5), (1, 2)), score((7, 9), (5, 6)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score((3, 5), (1, 2)), score((3, 5), (2, 2)))
    pos = patch_positions(2, 2, 3, num_special=5)
    assert pos.shape == (2, 11, 2) and pos[0, :5].abs().sum() == 0 and pos[0, 5].tolist() == [1, 1]
    assert pos[0, -1].tolist() == [2, 3]
    with pytest.raises(ValueError):
        rope(torch.randn(1, 2, 3, 6), torch.zeros(1, 3, 2, dtype=torch.long))


def test_registry_and_config():
    m = create("vggt_tiny")
    assert isinstance(m, VGGT) and m.cfg.embed_dim == 32
    with pytest.raises(ValueError, match="dpt_layers"):
        VGGT(VGGTConfig(**{**VGGT_TINY, "depth": 2}))
    n = sum(p.numel() for p in m.parameters())
    assert n > 0 and math.isfinite(n)


@requires_cuda
def test_cuda_parity_and_bf16(fixture):
    tensors, _, state = fixture
    model = vggt_tiny().eval().cuda()
    model.load_state_dict(convert_vggt_checkpoint(state))
    images = tensors["in/images"].cuda()
    with torch.no_grad():
        pred = model.predict(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model.predict(images)
    torch.testing.assert_close(pred["depth"].cpu(), tensors["out/depth"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(pred["pose_enc"].cpu(), tensors["out/pose_enc"], atol=2e-3, rtol=2e-3)
    assert half["depth"].dtype == torch.float32 and torch.isfinite(half["depth"]).all()


def test_converter_maps_the_official_1b_layout():
    """Every key of the published VGGT-1B state dict (tracking head aside) lands on ``vggt_1b`` with its shape."""
    meta = json.loads((FIX / "official_keys.json").read_text())
    official = {k: torch.empty(s, device="meta") for k, s in meta["state_dict_shapes"].items()}
    conv = convert_vggt_checkpoint(official)
    with torch.device("meta"):
        ours = create("vggt_1b").state_dict()
    assert set(conv) == set(ours), (sorted(set(conv) - set(ours))[:5], sorted(set(ours) - set(conv))[:5])
    bad = [k for k in ours if conv[k].shape != ours[k].shape]
    assert not bad, bad[:5]
    n_track = sum(math.prod(s) for k, s in meta["state_dict_shapes"].items() if k.startswith("track_head."))
    n_mask = math.prod(meta["state_dict_shapes"]["aggregator.patch_embed.mask_token"])
    n_cls_pos = math.prod(meta["state_dict_shapes"]["aggregator.patch_embed.pos_embed"][2:])
    assert sum(v.numel() for v in ours.values()) == meta["num_parameters"] - n_track - n_mask - n_cls_pos
