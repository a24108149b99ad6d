"""iLRM: parity with the authors' code (tests/fixtures/ilrm, made from Gynjn/iLRM @ 2bca1c1), converter, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import LOCAL_FIXTURES
from vision3d import InputError, recon
from vision3d.geometry import Cameras
from vision3d.recon.ilrm import ILRM, ILRMConfig, config_from_state_dict, convert_ilrm_checkpoint, crop_to_multiple

FIX = LOCAL_FIXTURES / "ilrm"


# The two fixtures name their tensors differently ("public" was written by an earlier script, "authors" by the
# authors' own Scaler run): map both onto one set of names.
_NAMES = {
    "public": {"image": "in/image", "intrinsics": "in/intrinsics", "extrinsics": "in/extrinsics", "raw": "out/scaler."},
    "authors": {
        "image": "in/context.image",
        "intrinsics": "in/context.intrinsics",
        "extrinsics": "in/context.extrinsics",
        "raw": "out/",
    },
}


def _load(case):
    t = load_file(str(FIX / f"{case}.safetensors"))
    meta = json.loads((FIX / f"{case}.json").read_text())
    state = {k[len("state/") :]: v for k, v in t.items() if k.startswith("state/")}
    return t, meta, state, _NAMES[case]


@pytest.fixture(scope="module", params=["public", "authors"])
def any_fixture(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def fixture():
    return _load("public")


def _model_and_inputs(fixture):
    t, meta, state, names = fixture
    model = ILRM(ILRMConfig(**meta["upstream"]["constructor_kwargs"])).eval()
    model.load_state_dict(convert_ilrm_checkpoint(state), strict=True)
    img = t[names["image"]]
    cams = Cameras.from_normalized(t[names["intrinsics"]], t[names["extrinsics"]], img.shape[-1], img.shape[-2])
    return model, img, cams


def test_parity_with_authors(any_fixture):
    t, meta, _, names = any_fixture
    tol = meta["tolerance"]
    model, img, cams = _model_and_inputs(any_fixture)
    with torch.no_grad():
        out = model(img, cams)
    g = out.gaussians
    B, V = img.shape[:2]
    # raw (pre-activation) head outputs, per view and pixel
    raw = out.extras["raw"]
    depth_logits, sh_dc, scale, rot, opacity = raw.split((3, 3, 3, 4, 1), -1)
    raw_ours = {"feature": sh_dc, "scale": scale, "rotation": rot, "opacity": opacity}
    raw_ours["xyz_world"] = g.means.reshape(B, V, -1, 3)
    for name, value in raw_ours.items():
        ref = t[names["raw"] + name]
        torch.testing.assert_close(value, ref.reshape(value.shape), atol=tol["atol"], rtol=tol["rtol"], msg=name)
    if "out/gaussians.means" in t:  # activated Gaussians as the authors' decoder renders them
        ours = {"means": g.means, "opacities": g.opacities, "scales": g.scales, "quats": g.quats, "sh_dc": g.sh[..., 0, :]}
        for name, value in ours.items():
            torch.testing.assert_close(value, t[f"out/gaussians.{name}"], atol=tol["atol"], rtol=tol["rtol"], msg=name)


def test_depth_output_unprojects_to_means(fixture):
    model, img, cams = _model_and_inputs(fixture)
    with torch.no_grad():
        out = model(img, cams)
    B, V, _, H, W = img.shape
    pts = cams.unproject(out.depth[:, :, 0])  # [B, V, H, W, 3]
    torch.testing.assert_close(pts.reshape(B, -1, 3), out.gaussians.means, atol=1e-3, rtol=1e-5)


def test_converter_reads_lightning_checkpoint(fixture):
    _, _, state, _ = fixture
    wrapped = {"state_dict": {f"encoder.scaler.{k}": v for k, v in state.items()}, "epoch": 3}
    wrapped["state_dict"]["losses.0.lpips.net.slice1.0.weight"] = torch.zeros(1)
    a = convert_ilrm_checkpoint(wrapped)
    b = convert_ilrm_checkpoint(state)
    assert a.keys() == b.keys()
    cfg = config_from_state_dict(a)
    assert (cfg.patch_size, cfg.dim, cfg.head_dim, cfg.num_layers) == (2, 32, 16, 4)


def test_converter_rejects_foreign_keys(fixture):
    _, _, state, _ = fixture
    bad = dict(state)
    bad["backbone.layer1.weight"] = torch.zeros(1)
    with pytest.raises(InputError, match="backbone.layer1.weight"):
        convert_ilrm_checkpoint(bad)


def test_registry_and_bad_input():
    model = recon.create("ilrm_tiny")
    assert "ilrm_re10k" in recon.list_models()
    img = torch.rand(1, 2, 3, 10, 12)
    K = torch.tensor([[12.0, 0, 6], [0, 12.0, 5], [0, 0, 1]])
    cams = Cameras(K.expand(1, 2, 3, 3), torch.eye(4).expand(1, 2, 4, 4), 12, 10)
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        model(img, cams)
    img2, cams2 = crop_to_multiple(img, cams, 4)
    assert img2.shape[-2:] == (8, 12) and (cams2.height, cams2.width) == (8, 12)
    out = model(img2, cams2)
    assert out.gaussians.means.shape == (1, 2 * 8 * 12, 3)
    with pytest.raises(ValueError, match="does not match images"):
        model(img2[:, :1], cams2)


def test_gradients_and_checkpointing_agree():
    torch.manual_seed(0)
    model = recon.create("ilrm_tiny")
    img = torch.rand(1, 2, 3, 8, 8)
    K = torch.tensor([[10.0, 0, 4], [0, 10.0, 4], [0, 0, 1]])
    c2w = torch.eye(4).repeat(1, 2, 1, 1)
    c2w[0, 1, 0, 3] = 0.3
    cams = Cameras(K.expand(1, 2, 3, 3), c2w, 8, 8)

    def loss():
        g = model(img, cams).gaussians
        return g.means.square().mean() + g.sh.square().mean() + g.opacities.mean()

    loss().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in ref.values())
    model.zero_grad()
    model.set_grad_checkpointing(True)
    loss().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)
