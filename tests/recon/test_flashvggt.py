"""FlashVGGT: descriptor attention equivalences, chunk-recursive inference, key frames, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vision3d.layers.rope import RoPE2D, patch_positions
from tests.conftest import optional
from vision3d.recon import create
from vision3d.recon.flashvggt import (
    DescriptorAttention,
    FlashVGGT,
    convert_flashvggt_checkpoint,
    flashvggt_tiny,
    kmeans_centres,
    select_keyframes,
)
from vision3d.recon.vggt import Attention, convert_vggt_checkpoint

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "vggt" / "public.safetensors"
FLASH_FIX = FIX.with_name("flashvggt.safetensors")


@pytest.fixture(scope="module")
def fixture():
    t = load_file(str(FIX))
    return t, convert_vggt_checkpoint({k[6:]: v for k, v in t.items() if k.startswith("state/")})


def _model(sd, **kw) -> FlashVGGT:
    m = flashvggt_tiny(**kw).eval()
    m.load_state_dict(sd)
    return m


def test_descriptor_attention_with_all_tokens_is_dense():
    torch.manual_seed(0)
    dim, heads, s, ps, h, w = 32, 2, 3, 5, 2, 3
    rope = RoPE2D(100.0)
    dense = Attention(dim, heads, qk_norm=True, rope=rope)
    desc = DescriptorAttention(dim, heads, qk_norm=True, rope=rope)
    desc.load_state_dict(dense.state_dict())
    desc.downfactor = 1
    t = ps + h * w
    x = torch.randn(2, s * t, dim)
    pos = patch_positions(2 * s, h, w, ps).reshape(2, s * t, 2)
    ref = dense(x, pos)
    out = desc(x, pos, n_frames=s, grid=(h, w), patch_start=ps)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    # with fewer descriptors the result differs (the test can fail)
    desc.downfactor = 2
    assert not torch.allclose(desc(x, pos, n_frames=s, grid=(h, w), patch_start=ps), ref, atol=1e-4)


def test_parity_with_authors_flashvggt():
    """tests/fixtures/vggt/flashvggt.*: the authors' FlashVGGT aggregator (kv_downfactor 2, frame 0 as
    key frame), camera head and depth head on a 4x5 patch grid."""
    meta = json.loads(FLASH_FIX.with_suffix(".json").read_text())
    t = load_file(str(FLASH_FIX))
    cfg = meta["upstream"]["constructor"]["aggregator"]
    m = flashvggt_tiny(kv_downfactor=cfg["kv_downfactor"], keyframe_every=0).eval()
    state = {k[6:]: v for k, v in t.items() if k.startswith("state/")}
    missing, unexpected = m.load_state_dict(convert_flashvggt_checkpoint(state), strict=False)
    assert not unexpected and all(k.startswith("point_head.") for k in missing)
    tol = meta["tolerance"]
    with torch.no_grad():
        tokens = m.aggregator(t["in/images"])
        pred = m.predict(t["in/images"])
    for i, x in enumerate(tokens):
        torch.testing.assert_close(x, t[f"out/aggregated_tokens.{i}"], atol=tol["atol"], rtol=tol["rtol"])
    for k in ("pose_enc", "depth", "depth_conf"):
        torch.testing.assert_close(pred[k], t[f"out/{k}"], atol=tol["atol"], rtol=tol["rtol"], msg=k)
    for i in range(4):
        torch.testing.assert_close(pred["pose_enc_list"][i], t[f"out/pose_enc_list.{i}"], atol=tol["atol"],
                                   rtol=tol["rtol"])


def test_flashvggt_with_all_tokens_matches_vggt_fixture(fixture):
    t, sd = fixture
    m = _model(sd, kv_downfactor=1, use_reference=False)
    with torch.no_grad():
        pred = m.predict(t["in/images"])
    for k in ("pose_enc", "depth", "world_points", "world_points_conf"):
        torch.testing.assert_close(pred[k], t[f"out/{k}"], atol=1e-4, rtol=1e-4, msg=k)


def test_chunk_recursive_one_chunk_equals_one_shot(fixture):
    _, sd = fixture
    m = _model(sd)  # kv_downfactor 2, frame 0 as key frame
    images = torch.rand(1, 3, 3, 28, 28)
    with torch.no_grad():
        one = m.predict(images)
        chunked = m.predict(images, chunk_size=3)
    for k in ("pose_enc", "depth", "depth_conf", "world_points"):
        torch.testing.assert_close(chunked[k], one[k], atol=1e-6, rtol=1e-6, msg=k)


def test_chunk_recursive_two_chunks(fixture):
    _, sd = fixture
    agg = _model(sd).aggregator
    images = torch.rand(1, 4, 3, 28, 28)
    caches = [dict() for _ in range(agg.cfg.depth)]
    with torch.no_grad():
        full = agg(images)
        first = agg(images[:, :2])
        c0 = agg.forward_chunk(images[:, :2], caches, first=True)
        c1 = agg.forward_chunk(images[:, 2:], caches, first=False)
    # the first chunk sees only itself: it equals a one-shot pass on its frames
    for x, y in zip(c0, first):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    # later chunks attend to cached descriptors of the past, not to the whole sequence (causal)
    assert c1[-1].shape == full[-1][:, 2:].shape
    assert not torch.allclose(c1[-1], full[-1][:, 2:], atol=1e-5)
    assert torch.isfinite(c1[-1]).all()


def test_descriptor_cache_size(fixture):
    _, sd = fixture
    m = _model(sd)
    agg = m.aggregator
    caches = [dict() for _ in range(m.cfg.depth)]
    images = torch.rand(1, 4, 3, 28, 42)  # 2x3 patch grid -> 1x1 descriptors at kv_downfactor 2
    with torch.no_grad():
        agg.forward_chunk(images[:, :2], caches, first=True)
        n1 = caches[0]["k"].shape[2]
        agg.forward_chunk(images[:, 2:], caches, first=False)
    per_frame = agg.patch_start + 1
    assert n1 == 2 * 3 + 2 * per_frame  # frame 0 at full resolution + 2 frames of descriptors
    assert caches[-1]["k"].shape[2] == 2 * 3 + 4 * per_frame


def test_keyframes():
    feats = torch.zeros(1, 8, 1, 4)
    feats[0, 4:] += 10.0  # two clusters: frames 0-3 and 4-7
    kf = select_keyframes(feats, every=4)
    assert kf.shape == (1, 3) and kf[0, 0] == 0
    assert set(kf[0, 1:].tolist()) & {0, 1, 2, 3} and set(kf[0, 1:].tolist()) & {4, 5, 6, 7}
    assert select_keyframes(feats, every=0).tolist() == [[0]]
    assert select_keyframes(feats, every=5).tolist() == [[0]]


def _torch_kmeans():
    optional("torch_kmeans")
    import contextlib
    import io

    from torch_kmeans import KMeans

    def centres(x, k):  # the authors' call: KMeans(n_clusters=k, random_state=42)(x).centers
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Full batch converged ..."
            return KMeans(n_clusters=k, random_state=42)(x).centers

    return centres


def test_parity_with_authors_keyframes():
    """tests/fixtures/vggt/flashvggt_keyframes.*: the authors' aggregator with keyframe_every=2 on two
    6-frame sequences, so their torch_kmeans key-frame selection runs (4 key frames per sequence)."""
    fix = FIX.with_name("flashvggt_keyframes.safetensors")
    meta = json.loads(fix.with_suffix(".json").read_text())
    t = load_file(str(fix))
    cfg = meta["upstream"]["constructor"]["aggregator"]
    m = flashvggt_tiny(kv_downfactor=cfg["kv_downfactor"], keyframe_every=cfg["keyframe_every"]).eval()
    state = {k[6:]: v for k, v in t.items() if k.startswith("state/")}
    missing, unexpected = m.load_state_dict(convert_flashvggt_checkpoint(state), strict=False)
    assert not unexpected and all(k.startswith("point_head.") for k in missing)
    tol = meta["tolerance"]
    with torch.no_grad():
        tokens, _ = m.aggregator.embed(t["in/images"])
        assert torch.equal(select_keyframes(tokens, cfg["keyframe_every"]), t["out/keyframes"])
        out = m.aggregator(t["in/images"])
    for i, x in enumerate(out):
        torch.testing.assert_close(x, t[f"out/aggregated_tokens.{i}"], atol=tol["atol"], rtol=tol["rtol"])


def test_no_keyframes_without_downsampling(fixture):
    _, sd = fixture  # kv_downfactor 1: the authors' attention is dense and ignores key frames
    images = torch.rand(1, 4, 3, 28, 28)
    with torch.no_grad():
        a = _model(sd, kv_downfactor=1, keyframe_every=2).aggregator(images)[-1]
        b = _model(sd, kv_downfactor=1, use_reference=False).aggregator(images)[-1]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch_kmeans uses torch.jit.script
@pytest.mark.parametrize("b,n,d,k,dtype", [(1, 6, 8, 3, torch.float32), (2, 30, 64, 6, torch.float32),
                                           (3, 40, 5, 4, torch.float64), (1, 200, 16, 2, torch.float32)])
def test_kmeans_matches_torch_kmeans(b, n, d, k, dtype):
    ref = _torch_kmeans()
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(b, n, d, generator=g, dtype=dtype)
    x[:, n // 2:] += 0.5
    assert torch.equal(kmeans_centres(x, k), ref(x, k))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kmeans_empty_clusters_match_torch_kmeans():
    ref = _torch_kmeans()
    x = torch.zeros(2, 8, 3)
    x[:, 5:] = 1.0  # two distinct points only: with 4 clusters some restarts leave clusters empty
    x[1, 7] = 2.0
    assert torch.equal(kmeans_centres(x, 4), ref(x, 4))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("b,s,every", [(1, 6, 2), (2, 9, 3), (1, 25, 5)])
def test_keyframes_match_authors_selection(b, s, every):
    ref = _torch_kmeans()
    tokens = torch.randn(b, s, 7, 16, generator=torch.Generator().manual_seed(s))
    mean = tokens.mean(2)
    nearest = torch.cdist(mean, ref(mean, s // every)).argmin(1)
    want = torch.cat([torch.zeros(b, 1, dtype=torch.long), nearest], 1)
    assert torch.equal(select_keyframes(tokens, every), want)


def test_keyframes_six_frames_every_two_pinned():
    # the issue's case, pinned without the package: torch_kmeans' seed-123 restarts on the CPU
    tokens = torch.randn(1, 6, 5, 8, generator=torch.Generator().manual_seed(0))
    kf = select_keyframes(tokens, 2)
    assert kf.shape == (1, 4) and kf[0, 0] == 0
    mean = tokens.mean(2)
    c = kmeans_centres(mean, 3)
    # each chosen frame is the one nearest to its centre, and the centres are cluster means
    assert torch.equal(kf[0, 1:], torch.cdist(mean, c).argmin(1)[0])
    labels = torch.cdist(mean, c).argmin(-1)[0]
    for j in range(3):
        if (labels == j).any():
            torch.testing.assert_close(c[0, j], mean[0, labels == j].mean(0))
    with pytest.raises(ValueError, match="keyframe_every=1"):
        select_keyframes(tokens, 1)
    with pytest.raises(ValueError, match="keyframe_every"):
        flashvggt_tiny(keyframe_every=-1)


def test_memory_drop_rate(fixture):
    _, sd = fixture
    images = torch.rand(1, 4, 3, 28, 42)  # 2x3 patch grid -> 1x1 descriptors at kv_downfactor 2
    with pytest.raises(ValueError, match="memory_drop_rate"):
        flashvggt_tiny(memory_drop_rate=0)
    m = _model(sd, memory_drop_rate=2)
    agg = m.aggregator
    per_frame = agg.patch_start + 1
    caches = [dict() for _ in range(m.cfg.depth)]
    other = images.clone()
    other[:, 1] = torch.rand(3, 28, 42)
    keep = [0, 2, 3]

    def chunk(x):
        return agg.forward_chunk(x, [dict() for _ in range(m.cfg.depth)], first=True)[-1]

    with torch.no_grad():
        c0 = agg.forward_chunk(images, caches, first=True)[-1]
        assert caches[0]["k"].shape[2] == 2 * 3 + 2 * per_frame  # reference + frames 0 and 2 of the chunk
        agg.forward_chunk(images[:, 1:], caches, first=False)  # a 3-frame chunk keeps its frames 0 and 2
        assert caches[-1]["k"].shape[2] == 2 * 3 + 4 * per_frame
        # a dropped frame (1) feeds no descriptor: changing it leaves every other frame as it was
        c0b = chunk(other)
        torch.testing.assert_close(c0b[:, keep], c0[:, keep], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(c0b[:, 1], c0[:, 1], atol=1e-4)
        m.cfg.memory_drop_rate = 1  # without dropping, frame 1 reaches the others
        assert not torch.allclose(chunk(other)[:, keep], chunk(images)[:, keep], atol=1e-5)
        # the one-shot path has no memory to drop
        one = m.predict(images)["depth"]
        m.cfg.memory_drop_rate = 2
        torch.testing.assert_close(m.predict(images)["depth"], one)


def test_keyframes_change_one_shot_output(fixture):
    _, sd = fixture
    images = torch.rand(1, 4, 3, 28, 42)
    with torch.no_grad():
        a = _model(sd).aggregator(images)[-1]
        b = _model(sd, keyframe_every=2).aggregator(images)[-1]
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_too_many_frames_falls_back_to_chunks(fixture):
    _, sd = fixture
    m = _model(sd, max_frames=1)
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="chunk-recursively"):
            out = m(images)
        ref = m.predict(images, chunk_size=1)
    torch.testing.assert_close(out.depth, ref["depth"].permute(0, 1, 4, 2, 3))
    assert tuple(out.cameras.batch_shape) == (1, 2)


def test_bad_input(fixture):
    _, sd = fixture
    with pytest.raises(ValueError, match="kv_downfactor"):
        flashvggt_tiny(kv_downfactor=0)
    m = _model(sd, kv_downfactor=4)
    with pytest.raises(ValueError, match="kv_downfactor"):
        m.predict(torch.rand(1, 2, 3, 28, 28))  # 2x2 grid cannot be downsampled by 4
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m.predict(torch.rand(1, 2, 3, 29, 28))
    with pytest.raises(ValueError, match="chunk"):
        m.predict_chunked(torch.rand(1, 2, 3, 56, 56), 0)


def test_converter_and_registry(fixture):
    t, sd = fixture
    state = {k[6:]: v for k, v in t.items() if k.startswith("state/")}
    no_points = {k: v for k, v in state.items() if not k.startswith("point_head.")}
    conv = convert_flashvggt_checkpoint({"model": no_points})
    m = create("flashvggt_tiny")
    missing, unexpected = m.load_state_dict(conv, strict=False)
    assert not unexpected and missing and all(k.startswith("point_head.") for k in missing)
