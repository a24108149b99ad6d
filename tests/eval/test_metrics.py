"""PSNR/SSIM on known cases and against scikit-image; LPIPS weight discovery and plumbing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import optional
from vision3d.eval import (
    LPIPSWeightsMissing,
    Metrics,
    lpips,
    lpips_available,
    lpips_missing_message,
    lpips_weight_paths,
    psnr,
    ssim,
)


def smooth_images(*shape, seed=0) -> torch.Tensor:  # [..., 3, H, W] in [0, 1] with structure
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g)
    x = torch.nn.functional.avg_pool2d(x.reshape(-1, *shape[-3:]), 3, 1, 1).reshape(shape)
    return x.clamp(0, 1)


def test_psnr_known_values():
    a = smooth_images(2, 3, 3, 16, 20) * 0.8
    assert torch.isinf(psnr(a, a)).all()
    out = psnr(a + 0.1, a)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, torch.full((2, 3), 20.0), atol=1e-4, rtol=0)  # MSE 0.01 -> 20 dB
    b = a.clone()
    b[0, 0, 0, 0, 0] += 0.5  # one pixel of one channel: MSE = 0.25 / (3*16*20)
    assert psnr(b, a)[0, 0].item() == pytest.approx(10 * math.log10(3 * 16 * 20 / 0.25), abs=1e-3)
    assert psnr(a * 255, (a + 0.1) * 255, max_val=255.0)[0, 0].item() == pytest.approx(20.0, abs=1e-3)


def test_ssim_identical_and_symmetry():
    a = smooth_images(2, 3, 24, 24)
    b = smooth_images(2, 3, 24, 24, seed=1)
    torch.testing.assert_close(ssim(a, a), torch.ones(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(ssim(a, b), ssim(b, a))
    assert (ssim(a, b) < 0.9).all()
    assert ssim(a, b, padding="same").shape == (2,)


@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_ssim_matches_scikit_image(noise):
    """Same Gaussian window (sigma 1.5, 11 taps: scipy truncates at int(3.5 sigma + 0.5) = 5), same
    constants, same 5-pixel border excluded. Tolerance: 1e-12 in float64 (measured ~1e-16) and 5e-6
    in float32 (measured <= 7e-7, float32 rounding of the local moments)."""
    metrics = optional("skimage.metrics")
    a = smooth_images(3, 32, 40, seed=2)
    g = torch.Generator().manual_seed(3)
    b = (a + noise * torch.randn(a.shape, generator=g)).clamp(0, 1)
    ref = metrics.structural_similarity(
        b.double().numpy(),
        a.double().numpy(),
        channel_axis=0,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert abs(ssim(b[None].double(), a[None].double())[0].item() - ref) < 1e-12
    assert abs(ssim(b[None], a[None])[0].item() - ref) < 5e-6


def test_bad_inputs():
    a = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, torch.rand(1, 3, 16, 17))
    with pytest.raises(ValueError, match="channels-first"):
        ssim(torch.rand(16, 16), torch.rand(16, 16))
    with pytest.raises(ValueError, match="smaller than the 11-pixel window"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="'vgg' or 'alex'"):
        lpips(a, a, net="squeeze")


# ------------------------------------------------------------------ LPIPS
@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def test_lpips_missing_weights_error_says_what_to_place_where(empty_torch_home):
    assert not lpips_available("vgg")
    a = torch.rand(1, 3, 32, 32)
    with pytest.raises(LPIPSWeightsMissing) as e:
        lpips(a, a, net="vgg")
    msg = str(e.value)
    want = empty_torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert str(want) in msg and "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert lpips_weight_paths("alex")["backbone"] == want.parent / "alexnet-owt-7be5be79.pth"
    assert not list(empty_torch_home.rglob("*.pth"))  # nothing was downloaded or created


def test_lpips_available_checks_files_only(empty_torch_home):
    optional("lpips")
    path = lpips_weight_paths("alex")["backbone"]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"placeholder")
    assert lpips_available("alex") and not lpips_available("vgg")


def test_metrics_skip_lpips_when_absent_and_fail_when_required(empty_torch_home):
    a = smooth_images(2, 2, 3, 16, 16)
    b = (a + 0.05).clamp(0, 1)
    m = Metrics()  # LPIPS "auto": weights absent -> PSNR and SSIM only, no error
    out = m(b, a)
    assert set(out) == {"psnr", "ssim"}
    assert out["psnr"] == pytest.approx(float(psnr(b, a).mean()), rel=1e-6)
    m(a, b)
    total = m.compute()
    assert total["ssim"] == pytest.approx(float(ssim(b, a).mean()), rel=1e-6)
    m.reset()
    assert m.compute() == {}
    with pytest.raises(LPIPSWeightsMissing, match="vgg16-397923af.pth"):
        Metrics(require_lpips=True)
    assert Metrics(lpips_net=None).names == ["psnr", "ssim"]


def test_lpips_plumbing_with_random_backbone():
    """The real LPIPS v0.1 heads on an ImageNet-free AlexNet: checks shapes, zero self-distance and
    gradients (the values are not the published metric; that needs the ImageNet weights)."""
    optional("lpips")
    a = smooth_images(2, 1, 3, 32, 32)
    b = smooth_images(2, 1, 3, 32, 32, seed=4).requires_grad_(True)
    same = lpips(a, a, net="alex", pretrained_backbone=False)
    assert same.shape == (2, 1) and same.abs().max() < 1e-6
    d = lpips(b, a, net="alex", pretrained_backbone=False)
    assert (d > 0).all()
    d.sum().backward()
    assert b.grad is not None and torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_metrics_values_are_plain_floats():
    a = smooth_images(1, 3, 16, 16)
    out = Metrics(lpips_net=None)(a, a * 0.9)
    assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())


def test_missing_message_names_the_lpips_package_when_absent(empty_torch_home, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lpips" else real(name, *a))
    assert not lpips_available("alex")
    msg = lpips_missing_message("alex")
    assert "pip install" in msg and "lpips" in msg and "alexnet-owt-7be5be79.pth" in msg
