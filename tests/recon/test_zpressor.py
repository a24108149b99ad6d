"""ZPressor: parity with the authors' module (tests/fixtures/zpressor, ziplab/ZPressor @ eb7fe82), the
batched path against a per-anchor loop twin, anchor selection edge cases, converter, errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import LOCAL_FIXTURES, optional, requires_cuda
from vision3d.recon.zpressor import (
    ZPressor,
    ZPressorConfig,
    assign_to_anchors,
    cluster_by_tokens,
    config_from_state,
    convert_zpressor_state,
    select_anchors,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FIX = LOCAL_FIXTURES / "zpressor"
CASES = sorted(p.stem for p in FIX.glob("*.json"))


def _load(case: str):
    t = load_file(str(FIX / f"{case}.safetensors"))
    meta = json.loads((FIX / f"{case}.json").read_text())
    state = {k[len("state/") :]: v for k, v in t.items() if k.startswith("state/")}
    return t, meta, state


def _num_anchors(meta: dict, t: dict) -> int:
    return int(meta["sizes"].get("K_anchors", t["out/center_views"].shape[1]))


@pytest.mark.parametrize("case", CASES)
def test_parity_with_authors(case):
    t, meta, state = _load(case)
    tol = meta["tolerance"]
    kw = meta["upstream"]["constructor_kwargs"]
    model = ZPressor(**kw).eval()
    model.load_state_dict(convert_zpressor_state(state), strict=True)
    K = _num_anchors(meta, t)
    tokens = "in/cls_token" in t
    if tokens:  # the token-clustering path (scikit-learn k-means)
        optional("sklearn")
        args, kwargs = (t["in/x"], None, K), {"cluster_tokens": t["in/cls_token"]}
    else:
        args, kwargs = (t["in/x"], t["in/extrinsics"], K), {}
    with torch.no_grad():
        feats, anchors = model(*args, **kwargs)
    assert torch.equal(anchors, t["out/center_views"])
    if tokens:
        assert torch.equal(cluster_by_tokens(t["in/cls_token"], K)[1], t["out/clusters"])
    else:
        assert torch.equal(assign_to_anchors(t["in/extrinsics"][..., :3, 3], anchors), t["out/clusters"])
    torch.testing.assert_close(feats, t["out/features"], atol=tol["atol"], rtol=tol["rtol"])

    if "out/features_flash_bf16" in t:  # the authors' default bf16 path, its own loose tolerance
        bf = ZPressor(**kw, precision="bf16").eval()
        bf.load_state_dict(model.state_dict())
        with torch.no_grad():
            feats_bf, _ = bf(*args, **kwargs)
        pt = tol["per_output"]["out/features_flash_bf16"]
        torch.testing.assert_close(feats_bf, t["out/features_flash_bf16"], atol=pt["atol"], rtol=pt["rtol"])
        assert (feats_bf - feats).abs().max() > 0  # the bf16 path really is a different computation


# ---------------------------------------------------------------------------------------------
# a slow twin: the algorithm written per batch element and per anchor, with explicit attention


def _attn(q, k, v, heads):  # [N, C], [M, C], [M, C]
    n, c = q.shape
    d = c // heads
    q, k, v = (t.reshape(t.shape[0], heads, d).transpose(0, 1) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, -1)
    return (w @ v).transpose(0, 1).reshape(n, c)


def _mlp(m, y):
    return y + m.fc2(F.gelu(m.fc1(m.norm(y))))


def _loop_twin(model: ZPressor, x, c2w, K):
    p = c2w[..., :3, 3]
    B, V, C, H, W = x.shape
    anchors = select_anchors(p, K)
    clusters = assign_to_anchors(p, anchors)
    tok = x.flatten(3).transpose(2, 3)
    out = []
    for b in range(B):
        zs = [tok[b, anchors[b, j]] for j in range(K)]
        for blk in model.levels[0]:
            for j in range(K):
                members = [v for v in range(V) if clusters[b, v] == j and v != anchors[b, j]]
                if not members:
                    continue
                s = torch.cat([tok[b, v] for v in members], 0)
                cr = blk.cross
                kv = cr.kv(cr.norm_kv(s))
                a = _attn(cr.q(cr.norm_q(zs[j])), kv[:, :C], kv[:, C:], model.num_heads)
                zs[j] = zs[j] + cr.proj(a)
                if cr.mlp is not None:
                    zs[j] = _mlp(cr.mlp, zs[j])
            if blk.self_attn is not None:
                sa = blk.self_attn
                for j in range(K):
                    q, k, v = sa.qkv(sa.norm(zs[j])).chunk(3, -1)
                    a = _attn(q, k, v, model.num_heads)
                    zs[j] = _mlp(sa.mlp, zs[j] + (sa.proj(a) if sa.proj is not None else a))
        out.append(torch.stack([z.transpose(0, 1).reshape(C, H, W) for z in zs]))
    return torch.stack(out), anchors


def _scene(B, V, C, H, W, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, C, H, W, generator=g)
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    c2w[..., :3, 3] = 2 * torch.randn(B, V, 3, generator=g)
    return x, c2w


def _perturb_norms(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p += 0.1 * torch.randn(p.shape, generator=g)


@pytest.mark.parametrize(
    "heads,layers,no_self,B,V,K",
    [(1, 2, False, 2, 7, 3), (2, 2, False, 1, 9, 4), (4, 1, True, 2, 6, 2), (1, 2, True, 1, 4, 6)],
)
def test_batched_matches_loop_twin(heads, layers, no_self, B, V, K):
    model = ZPressor(16, heads, layers, no_self).eval()
    _perturb_norms(model)
    x, c2w = _scene(B, V, 16, 3, 4, seed=heads + V)
    c2w[0, -1, :3, 3] = 50.0  # an isolated outlier: an anchor without supports
    with torch.no_grad():
        got, a = model(x, c2w, K)
        want, a_ref = _loop_twin(model, x, c2w, K)
    assert torch.equal(a, a_ref)
    assert got.shape == (B, K, 16, 3, 4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_math_backend_and_multi_level():
    x, c2w = _scene(2, 6, 16, 2, 3)
    model = ZPressor(16, 2, 2).eval()
    twin = ZPressor(16, 2, 2, backend="math").eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x, c2w, 3)[0], twin(x, c2w, 3)[0], atol=1e-5, rtol=1e-4)
    # two feature levels share the anchors; each level has its own blocks
    ml = ZPressor((16, 8), 2, 2).eval()
    x2 = torch.randn(2, 6, 8, 4, 4)
    with torch.no_grad():
        (f0, f1), a = ml([x, x2], c2w, 3)
    assert f0.shape == (2, 3, 16, 2, 3) and f1.shape == (2, 3, 8, 4, 4)
    assert torch.equal(a, select_anchors(c2w[..., :3, 3], 3))


def test_gradients_flow():
    x, c2w = _scene(1, 5, 16, 2, 2)
    x.requires_grad_(True)
    model = ZPressor(16, 1, 2)
    feats, _ = model(x, c2w, 2)
    feats.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# anchor selection


def _line(*xs):  # [1, V, 3] centres on the x axis
    pos = torch.zeros(1, len(xs), 3)
    pos[0, :, 0] = torch.tensor(xs)
    return pos


def test_select_anchors_farthest_point_order_and_ties():
    # mean 2.4: 6 is farthest from it; then 0; then 3 (9 from both); then 1 and 2 tie at 1 -> lower index
    pos = _line(0.0, 1, 2, 3, 6)
    a = select_anchors(pos, 4)
    assert a.tolist() == [[4, 0, 3, 1]] and a.dtype == torch.long
    # symmetric square: every corner is equally far from the mean -> view 0 first; the opposite corner next
    sq = torch.tensor([[[1.0, 1, 0], [-1, 1, 0], [-1, -1, 0], [1, -1, 0]]])
    assert select_anchors(sq, 2).tolist() == [[0, 2]]
    assert select_anchors(sq, 3).tolist() == [[0, 2, 1]]
    # batched: each row on its own
    both = torch.cat([pos[:, :4], _line(5.0, 0, 1, 2)])
    assert select_anchors(both, 2).tolist() == [[0, 3], [0, 1]]


def test_duplicate_positions_and_more_anchors_than_views():
    # views 1 and 3 stand on views 0 and 2: only 2 distinct positions
    pos = _line(0.0, 0, 5, 5)
    assert select_anchors(pos, 2).tolist() == [[0, 2]]
    clusters = assign_to_anchors(pos, torch.tensor([[0, 2]]))
    assert clusters.tolist() == [[0, 0, 1, 1]]  # duplicates support the anchor they stand on
    # positions run out: every further pick is view 0 again (the authors' behaviour), and the repeated
    # anchor, never the nearest-first one, gets no supports, so it is the anchor's own tokens refined
    a = select_anchors(pos, 4)
    assert a.tolist() == [[0, 2, 0, 0]]
    assert assign_to_anchors(pos, a).tolist() == [[0, 0, 1, 1]]
    x, c2w = _scene(1, 4, 16, 2, 2)
    c2w[..., :3, 3] = pos
    model = ZPressor(16, 1, 1).eval()
    with torch.no_grad():
        feats, anchors = model(x, c2w, 4)
        twin, _ = _loop_twin(model, x, c2w, 4)
    assert feats.shape == (1, 4, 16, 2, 2) and anchors.tolist() == [[0, 2, 0, 0]]
    torch.testing.assert_close(feats, twin, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(feats[0, 0], feats[0, 2])  # anchor 0 with its support vs without
    # more anchors than views
    one = _line(1.0, 2.0)
    assert select_anchors(one, 3).tolist() == [[0, 1, 0]]


def test_bad_input_errors():
    x, c2w = _scene(1, 4, 16, 2, 2)
    model = ZPressor(16, 1, 1)
    with pytest.raises(ValueError, match="k must be a positive int"):
        select_anchors(c2w[..., :3, 3], 0)
    with pytest.raises(ValueError, match=r"\[B, V, 3\]"):
        select_anchors(torch.zeros(4, 3), 2)
    bad = c2w.clone()
    bad[0, 1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(x, bad, 2)
    with pytest.raises(ValueError, match="C=16"):
        model(torch.randn(1, 4, 8, 2, 2), c2w, 2)
    with pytest.raises(ValueError, match="V=4"):
        model(torch.randn(1, 3, 16, 2, 2), c2w, 2)
    with pytest.raises(ValueError, match=r"\[B, V, 4, 4\]"):
        model(x, c2w[..., :3, :], 2)
    with pytest.raises(ValueError, match="anchor_idx must lie"):
        assign_to_anchors(c2w[..., :3, 3], torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="not divisible by num_heads=3"):
        ZPressor(16, 3)
    with pytest.raises(ValueError, match="precision"):
        ZPressor(16, precision="fp16")
    with pytest.raises(ValueError, match="num_anchors"):
        ZPressorConfig(num_anchors=0)
    with pytest.raises(ValueError, match="2 feature level"):
        ZPressor((16, 8))(x, c2w, 2)
    with pytest.raises(ValueError, match="or give cluster_tokens"):
        model(x, None, 2)
    with pytest.raises(ValueError, match="need V >= num_anchors"):
        cluster_by_tokens(torch.randn(1, 2, 5), 3)
    with pytest.raises(ValueError, match=r"\[B, V, F\]"):
        model(x, None, 2, cluster_tokens=torch.randn(4, 5))


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_converter_host_prefixes_and_config():
    t, meta, state = _load("public")
    ours = convert_zpressor_state(state)
    for prefix in ("encoder.depth_predictor.zipmatch.", "encoder.backbone.zipmatch.", "encoder.zipmatch."):
        host = {prefix + k: v for k, v in state.items()}
        host["encoder.backbone.conv.weight"] = torch.zeros(1)  # another part of the host: left alone
        lightning = {"state_dict": host, "epoch": 3}
        got = convert_zpressor_state(lightning)
        assert got.keys() == ours.keys()
        assert all(torch.equal(got[k], ours[k]) for k in ours)
    cfg = config_from_state(ours)
    assert (cfg.embed_dim, cfg.num_layers, cfg.no_self_attn, cfg.num_heads) == (16, 2, False, 1)
    model = ZPressor.from_config(cfg)
    model.load_state_dict(ours, strict=True)
    with pytest.raises(ValueError, match="output projection"):
        config_from_state(ours, num_heads=2)
    with pytest.raises(KeyError, match="unexpected key 'cross_attn_layers.0.0.bogus.weight'"):
        convert_zpressor_state({**state, "cross_attn_layers.0.0.bogus.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no key starts with 'encoder.nothing.'"):
        convert_zpressor_state(state, prefix="encoder.nothing.")
    # no_self_attn and several heads: the cross-attention MLP and the self-attention projection map too
    for kw in ({"no_self_attn": True}, {"num_heads": 2}, {"embed_dim": (16, 8), "num_heads": 2}):
        m = ZPressor(**{"embed_dim": 16, "num_layers": 2, **kw})
        authors = {_to_authors(k): v for k, v in m.state_dict().items()}
        conv = convert_zpressor_state(authors)
        assert conv.keys() == m.state_dict().keys()
        c = config_from_state(conv, num_heads=m.num_heads)
        assert (c.embed_dim, c.no_self_attn) == (kw.get("embed_dim", 16), kw.get("no_self_attn", False))


def _to_authors(key: str) -> str:  # our key -> the authors' (inverse of the converter, written out)
    lv, blk, part, rest = key.split(".", 4)[1:]
    names = {
        "cross": {"norm_q": "norm1", "norm_kv": "norm2", "q": "projq", "kv": "proj_kv", "proj": "proj", "mlp": "mlp"},
        "self_attn": {"norm": "norm", "qkv": "to_qkv", "proj": "to_out.0", "mlp": "mlp"},
    }[part]
    head, _, tail = rest.partition(".")
    top = "cross_attn_layers" if part == "cross" else "self_attn_layers"
    return f"{top}.{lv}.{blk}.{names[head]}.{tail}"


@requires_cuda
def test_cuda_bf16_path_close_to_fp32():
    x, c2w = _scene(2, 12, 32, 8, 8)
    model = ZPressor(32, 1, 2).eval().cuda()
    bf = ZPressor(32, 1, 2, precision="bf16").eval().cuda()
    bf.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref, a = model(x.cuda(), c2w.cuda(), 4)
        got, a_bf = bf(x.cuda(), c2w.cuda(), 4)
        cpu, a_cpu = model.cpu()(x, c2w, 4)
    assert torch.equal(a.cpu(), a_cpu) and torch.equal(a, a_bf)
    torch.testing.assert_close(ref.cpu(), cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)


def test_inside_the_depthsplat_host():
    from tests.recon.test_depthsplat import _cams
    from vision3d import recon

    host = recon.create("depthsplat_tiny", zpressor=ZPressorConfig(num_anchors=2, embed_dim=32, num_layers=1)).eval()
    # the authors' DepthSplat checkpoint keeps ZPressor under encoder.depth_predictor.zipmatch.
    authors = {"encoder.depth_predictor.zipmatch." + _to_authors(k): v.clone() for k, v in host.zpressor.state_dict().items()}
    authors["encoder.depth_predictor.backbone.conv1.weight"] = torch.zeros(1)  # the rest of the host: not ours
    host.zpressor.load_state_dict(convert_zpressor_state({"state_dict": authors}), strict=True)
    H = W = host.size_multiple
    cams = _cams(1, 4, H, W)
    with torch.no_grad():
        out = host(torch.rand(1, 4, 3, H, W), cams)
    anchors = select_anchors(cams.cam_to_world[..., :3, 3], 2)
    assert torch.equal(out.extras["view_indices"], anchors)
    assert out.gaussians.means.shape == (1, 2 * H * W, 3)
