"""VolSplat: parity with the authors' code (tests/fixtures/volsplat, ziplab/VolSplat @ 01ef574):
voxeliser + Gaussian adapter (public), sparse U-Net + head through their MinkowskiEngine (unet*);
batching, bad input, converter."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fixture_files, requires_cuda
from vision3d import recon
from vision3d.geometry import Cameras
from vision3d.geometry.rotations import quat_to_matrix
from vision3d.layers.sparse import SparseTensor
from vision3d.recon.volsplat import (
    AdapterConfig,
    SparseGaussianHead,
    SparseUNet,
    adapt_gaussians,
    convert_sparse_state,
    convert_volsplat_checkpoint,
    voxelize,
)
from vision3d.utils.optional import available

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, VOXEL, NEAR, FAR = 120, 0.05, 0.5, 20.0  # the learning test (synthetic scenes sit 2-5 units away)


def _load(case: str):
    st, js = fixture_files("volsplat", case)
    return load_file(str(st)), json.loads(js.read_text())


@pytest.fixture(scope="module")
def public():
    return _load("public")


def _fixture_inputs(t):
    img, depth = t["in/images"], t["in/depth"]
    B, V, _, H, W = img.shape
    feats = t["in/features"].reshape(B, V, -1, H, W)  # theirs is [(B V), C, H, W]
    cams = Cameras.from_normalized(t["in/intrinsics"], t["in/extrinsics"], W, H)
    return img, feats, depth, cams


def test_voxelizer_parity(public):
    t, meta = public
    tol = meta["tolerance"]
    img, feats, depth, cams = _fixture_inputs(t)
    vox = voxelize(feats, depth, cams, meta["sizes"]["voxel"])
    assert torch.equal(vox.coords, t["out/voxel_coords"])  # their rounding, batch key, sorted order
    assert torch.equal(vox.counts, t["out/voxel_counts"])
    torch.testing.assert_close(vox.features, t["out/voxel_features"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(vox.points, t["out/voxel_points"], atol=tol["atol"], rtol=tol["rtol"])


def test_adapter_parity(public):
    t, meta = public
    tol = dict(atol=meta["tolerance"]["atol"], rtol=meta["tolerance"]["rtol"])
    img, feats, depth, cams = _fixture_inputs(t)
    voxel = meta["sizes"]["voxel"]
    c = meta["upstream"]["constructor_args"]
    cfg = AdapterConfig(c["sh_degree"], c["gaussian_scale_min"], c["gaussian_scale_max"])
    vox = voxelize(feats, depth, cams, voxel)
    raw, valid = vox.to_batched(t["in/head_output"])
    anchors, _ = vox.to_batched(vox.points)
    colors, _ = vox.to_batched(vox.mean(img))
    g = adapt_gaussians(raw, valid, anchors, colors, voxel, cfg)
    assert torch.equal(valid, t["out/valid_mask"])
    torch.testing.assert_close(g.means, t["out/means"], **tol)
    torch.testing.assert_close(g.scales, t["out/scales"], **tol)
    torch.testing.assert_close(g.opacities, t["out/opacities"], **tol)
    xyzw = torch.cat([g.quats[..., 1:], g.quats[..., :1]], -1)
    torch.testing.assert_close(xyzw, t["out/rotations"], **tol)
    torch.testing.assert_close(g.sh.transpose(-1, -2), t["out/harmonics"], **tol)  # theirs [.., 3, d_sh]
    R, S = quat_to_matrix(g.quats), torch.diag_embed(g.scales)
    torch.testing.assert_close(R @ S @ S.mT @ R.mT, t["out/covariances"], **tol)


def test_batched_voxels_are_independent_and_padded(public):
    """Two batch elements: each one's voxels equal its own single run; padding rows get opacity sigmoid(-20)."""
    t, meta = public
    img, feats, depth, cams = _fixture_inputs(t)
    voxel = meta["sizes"]["voxel"]
    depth2 = torch.cat([depth, depth[:, :1].expand_as(depth) * 0.5 + 1.0])  # a second, different scene
    feats2, img2 = torch.cat([feats, feats.flip(0)]), torch.cat([img, img])
    cams2 = Cameras(torch.cat([cams.K, cams.K]), torch.cat([cams.cam_to_world, cams.cam_to_world]), cams.width, cams.height)
    both = voxelize(feats2, depth2, cams2, voxel)
    counts = both.batch_counts()
    for b in range(2):
        one = voxelize(feats2[b : b + 1], depth2[b : b + 1], cams2[b : b + 1], voxel)
        sel = both.coords[:, 0] == b
        assert torch.equal(both.coords[sel][:, 1:], one.coords[:, 1:])
        torch.testing.assert_close(both.features[sel], one.features)
        torch.testing.assert_close(both.points[sel], one.points)
    raw = torch.randn(len(both.coords), 38)
    raw_b, valid = both.to_batched(raw)
    assert valid.sum(1).tolist() == counts.tolist()
    g = adapt_gaussians(raw_b, valid, both.to_batched(both.points)[0], both.to_batched(both.mean(img2))[0], voxel)
    small = int(counts.argmin())
    assert torch.allclose(g.opacities[small, counts[small] :], torch.sigmoid(torch.tensor(-20.0)))


def test_depth_gradient_reaches_means(public):
    t, meta = public
    img, feats, depth, cams = _fixture_inputs(t)
    depth = depth.clone().requires_grad_(True)
    vox = voxelize(feats, depth, cams, meta["sizes"]["voxel"])
    vox.points.sum().backward()
    assert depth.grad is not None and depth.grad.abs().sum() > 0


def test_bad_input(public):
    t, meta = public
    img, feats, depth, cams = _fixture_inputs(t)
    for v in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="voxel_size must be > 0"):
            voxelize(feats, depth, cams, v)
    d = depth.clone()
    d[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        voxelize(feats, d, cams, 0.5)
    with pytest.raises(ValueError, match="does not match features"):
        voxelize(feats, depth[..., :4], cams, 0.5)
    # all depths invalid: a defined, empty result
    empty = voxelize(feats, torch.zeros_like(depth), cams, 0.5)
    assert empty.coords.shape == (0, 4) and empty.features.shape == (0, feats.shape[2])
    # some invalid: those pixels are not lifted
    d = depth.clone()
    d[:, 0] = -1.0
    part = voxelize(feats, d, cams, 0.5)
    assert int(part.counts.sum()) == depth[:, 1].numel()
    with pytest.raises(ValueError, match="expected 38"):
        adapt_gaussians(torch.zeros(1, 2, 30), torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), 0.1)


# ------------------------------------------------------------------------------------------------ sparse U-Net
def _unet_from_fixture(case: str):
    t, meta = _load(case)
    up = meta["upstream"]
    a = up["constructor_args"]["SparseUNetWithAttention"]
    unet = SparseUNet(
        a["in_channels"], a["out_channels"], a["num_blocks"], up["encoder_base_width"], a["use_attention"], backend="torch"
    )
    head = SparseGaussianHead(a["out_channels"], 38, backend="torch")
    state = convert_sparse_state({k[len("state/") :]: v for k, v in t.items() if k.startswith("state/")})
    own = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {f"head.{k}": v for k, v in head.state_dict().items()}
    assert set(state) == set(own), set(state) ^ set(own)
    unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
    head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})
    return t, meta, unet, head


@pytest.mark.parametrize("case", ["unet", "unet_deep"])
def test_sparse_unet_parity_with_minkowski(case):
    t, meta, unet, head = _unet_from_fixture(case)
    train = meta["call"]["mode"].startswith("train")
    unet.train(train), head.train(train)
    tol = dict(atol=meta["tolerance"]["atol"], rtol=meta["tolerance"]["rtol"])
    with torch.set_grad_enabled(train):
        x = SparseTensor(t["in/features"], t["in/coords"])
        y = unet(x)
        assert torch.equal(y.coords, x.coords)
        torch.testing.assert_close(y.features, t["out/unet"], **tol)
        h = head(x.replace(y.features + x.features))
        torch.testing.assert_close(h.features, t["out/head"], **tol)
    if train:
        names = [k for k in t if k.startswith("out/running_mean.")]
        assert names
        mods = dict(unet.named_modules())
        for k in names:
            ours = re.sub(r"^decoder_blocks\.(\d+)\.0\.", r"ups.\1.", k[len("out/running_mean.") :])
            ours = ours.replace("final_upsample.", "final.")
            torch.testing.assert_close(mods[ours].running_mean, t[k], **tol)


def test_converter_rejects_unknown_keys():
    with pytest.raises(KeyError, match="unexpected key 'spare_unet.mystery.kernel'"):
        convert_sparse_state({"spare_unet.mystery.kernel": torch.zeros(27, 2, 2)})


# ------------------------------------------------------------------------------------------------ the model
def _views(B=1, V=2, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor([[1.2 * S, 0, S / 2], [0, 1.2 * S, S / 2], [0, 0, 1]])
    c2w = torch.eye(4).repeat(B, V, 1, 1)
    c2w[..., 0, 3] = torch.linspace(-0.2, 0.2, V)
    return torch.rand(B, V, 3, S, S, generator=g), Cameras(K.expand(B, V, 3, 3), c2w, S, S, near=0.5, far=10.0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return recon.create("volsplat_tiny", voxel_size=0.05, sparse_backend="torch")


def test_model_outputs_one_gaussian_per_voxel(tiny):
    images, cams = _views(B=2)
    tiny.train()
    out = tiny(images, cams)
    n = out.extras["num_gaussians"]
    g = out.gaussians
    assert g.means.shape == (2, int(n.max()), 3) and g.sh.shape[-2:] == (9, 3)
    assert out.extras["valid"].sum(1).tolist() == n.tolist()
    assert out.depth.shape == (2, 2, 1, 16, 16)
    assert len(out.aux_gaussians) == 1 and out.aux_gaussians[0][0] == 0.9  # intermediate depth, training only
    loss = g.means.sum() + g.opacities.sum() + out.aux_gaussians[0][1].scales.sum()
    loss.backward()
    assert tiny.unet.encoders[0].conv.weight.grad is not None and tiny.host.cnn.conv1.weight.grad is not None
    tiny.zero_grad()
    tiny.eval()
    with torch.no_grad():
        out = tiny(images, cams)
    assert out.aux_gaussians == []
    # the Gaussians' DC colour is the voxel's mean image colour
    valid = out.extras["valid"]
    rgb = out.gaussians.rgb[valid]
    assert rgb.min() >= 0 and rgb.max() <= 1


@pytest.mark.parametrize("kw", [
    dict(unet_attention=True, unet_blocks=1),
    dict(unet_blocks=3, host=dict(sh_degree=0)),
    dict(host=dict(num_scales=1, upsample_factor=4, lowest_feature_resolution=4, sh_degree=1)),
])
def test_configurations_the_authors_accept(kw):
    """Attention bottleneck, U-Net depth, SH degree, one-scale host (then no intermediate depth)."""
    torch.manual_seed(0)
    m = recon.create("volsplat_tiny", voxel_size=0.05, sparse_backend="torch", **kw).train()
    images, cams = _views(B=2)
    out = m(images, cams)
    d = m.cfg.host.sh_degree
    assert out.gaussians.sh.shape[-2] == (d + 1) ** 2
    assert len(out.aux_gaussians) == (1 if m.cfg.host.num_scales > 1 else 0)
    assert torch.isfinite(out.gaussians.means).all()


def test_no_valid_depth_is_a_clear_error(tiny):
    images, cams = _views()
    tiny.eval()
    with torch.no_grad():
        enc = tiny.host.encode(images, cams)
        with pytest.raises(ValueError, match="no voxel to predict from"):
            tiny.predict(enc, torch.zeros_like(enc.depth))
        d = enc.depth.clone()
        d[0, 0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN/inf"):
            tiny.predict(enc, d)
    with pytest.raises(ValueError, match="voxel_size must be > 0"):
        recon.create("volsplat_tiny", voxel_size=0.0)


def _to_authors_layout(state: dict) -> dict:
    """Our VolSplat state dict written back in the authors' key layout (for the converter's round trip)."""
    from vision3d.layers.sparse import weight_to_minkowski
    from vision3d.recon.depthsplat import _PREFIXES

    out = {}
    back = [
        (r"^unet\.encoders\.(\d+)\.conv\.weight$", r"spare_unet.encoders.\1.conv.kernel"),
        (r"^unet\.encoders\.(\d+)\.norm\.", r"spare_unet.encoders.\1.norm.bn."),
        (r"^unet\.bottleneck\.(\d+)\.conv\.weight$", r"spare_unet.bottleneck.\1.conv.kernel"),
        (r"^unet\.bottleneck\.(\d+)\.norm\.", r"spare_unet.bottleneck.\1.norm.bn."),
        (r"^unet\.ups\.(\d+)\.conv\.weight$", r"spare_unet.decoder_blocks.\1.0.upconv.kernel"),
        (r"^unet\.ups\.(\d+)\.norm\.", r"spare_unet.decoder_blocks.\1.0.norm.bn."),
        (r"^unet\.fuses\.(\d+)\.weight$", r"spare_unet.decoder_blocks.\1.1.kernel"),
        (r"^unet\.final\.conv\.weight$", r"spare_unet.final_upsample.upconv.kernel"),
        (r"^unet\.final\.norm\.", r"spare_unet.final_upsample.norm.bn."),
        (r"^head\.conv([12])\.weight$", r"gaussian_head.conv\1.kernel"),
    ]
    for k, v in state.items():
        if k.startswith("host."):
            k2 = k[5:]
            for old, new in _PREFIXES:
                if k2.startswith(new):
                    out["encoder." + old + k2[len(new) :]] = v
                    break
            continue
        for pat, rep in back:
            new, n = re.subn(pat, rep, k)
            if n:
                break
        if new.endswith(".kernel"):
            v = weight_to_minkowski(v, transposed=".upconv." in new)
        out["encoder." + new] = v
    return {"state_dict": out}


def test_checkpoint_converter_round_trip(tiny):
    ours = tiny.state_dict()
    converted = convert_volsplat_checkpoint(_to_authors_layout(ours))
    assert set(converted) == set(ours)
    for k, v in ours.items():
        assert torch.equal(converted[k], v), k
    with pytest.raises(KeyError, match="unexpected key"):
        convert_volsplat_checkpoint({"encoder.mystery.weight": torch.zeros(1)})


def test_vision3d_convert_volsplat(tiny, tmp_path):
    from safetensors.torch import load_file as load_st

    from vision3d.cli import convert

    src = tmp_path / "volsplat.ckpt"
    torch.save(_to_authors_layout(tiny.state_dict()), src)
    assert convert.run(convert.Args("volsplat", str(src), str(tmp_path / "v.safetensors"))) == 0
    m = recon.create("volsplat_tiny", voxel_size=0.05)
    m.load_state_dict(load_st(str(tmp_path / "v.safetensors")), strict=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(not available("spconv.pytorch"), reason="spconv not installed")
def test_spconv_model_matches_torch_backend_cuda():
    torch.manual_seed(0)
    m = recon.create("volsplat_tiny", voxel_size=0.05, sparse_backend="torch").cuda().eval()
    images, cams = _views(B=2)
    images, cams = images.cuda(), cams.to("cuda")
    with torch.no_grad():
        a = m(images, cams).gaussians
        for mod in m.modules():
            if hasattr(mod, "backend"):
                mod.backend = "spconv"
        b = m(images, cams).gaussians
    torch.testing.assert_close(b.means, a.means, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b.opacities, a.opacities, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------------ it learns
@pytest.mark.slow
def test_tiny_volsplat_learns_beyond_mean_colour(tmp_path):
    """`vision3d train` on synthetic RE10K-format chunks: held-out PSNR beats the mean-colour baseline
    (every target pixel = the mean colour of the context views) by a margin."""
    from vision3d.data import ChunkDataset, ChunkDatasetConfig, EvaluationViewSampler
    from vision3d.data.synthetic import synthetic_scenes, write_synthetic_dataset
    from vision3d.cli import eval as eval_cli
    from vision3d.train.config import DataConfig, OptimConfig, TrainConfig
    from vision3d.train.engine import train

    size, views, steps, margin = 32, 12, STEPS, 3.0  # measured: 20.7 dB vs 12.4 dB
    root = tmp_path / "syn"
    kw = dict(num_views=views, width=size, height=size, density=0.1)
    write_synthetic_dataset(root, "train", num_scenes=6, seed=1, **kw)
    write_synthetic_dataset(root, "test", num_scenes=2, seed=2, **kw)
    index = {k: {"context": [2, 8], "target": [4, 5, 6]} for k, _ in synthetic_scenes(2, 2)}
    (root / "index.json").write_text(json.dumps(index))
    test = ChunkDataset(  # the held-out views, for the baseline
        ChunkDatasetConfig(roots=[root], split="test", image_shape=(size, size), near=NEAR, far=FAR),
        EvaluationViewSampler(root / "index.json"),
    )
    from tests.train.util import trivial_baselines

    baselines = trivial_baselines(test)
    baseline = baselines["mean_colour"]
    cfg = TrainConfig(
        model="volsplat_tiny", model_kwargs=dict(voxel_size=VOXEL, sparse_backend="torch"),
        out=str(tmp_path / "run"), device="cpu", progress=False, seed=0,
        data=DataConfig(root=str(root), image_shape=(size, size), num_context=2, num_target=2, min_gap=4, max_gap=8,
                        gap_warmup_steps=0, batch_size=1, num_workers=0, near=NEAR, far=FAR),
        optim=OptimConfig(lr=2e-3, warmup_steps=10, max_steps=steps, weight_decay=0.0),
        log_every=10, ckpt_every=10_000, image_every=0,
    )
    train(cfg)
    # `vision3d eval` on the run folder: config, model and weights come back from disk
    assert eval_cli.run(eval_cli.Args(
        str(tmp_path / "run"), index=str(root / "index.json"), root=str(root), out=str(tmp_path / "eval"),
        device="cpu", save_renders=False, lpips="off",
    )) == 0
    p1 = json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean_over_images"]["psnr"]
    print(f"held-out PSNR {p1:.2f} dB after {steps} steps; baselines " + ", ".join(f"{k} {v:.2f}" for k, v in baselines.items()))
    assert p1 > baseline + margin, f"held-out PSNR {p1:.2f} dB is not {margin} dB above the mean-colour {baseline:.2f} dB"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"][-1]["step"] == steps and "aux0_psnr" in metrics["train"][-1]
