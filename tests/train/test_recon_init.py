"""--init <reconstructor>: initial Gaussians from a feed-forward model (seeded random ilrm_tiny weights).

Untrained weights: no quality is asserted, only counts, shapes, the frame mapping and the errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import LOCAL_FIXTURES
from vision3d import recon
from vision3d.gaussians import Similarity, transform_cameras
from vision3d.geometry import Cameras, look_at, quat_to_matrix, random_rotation
from vision3d.train.checkpoint import save_weights
from vision3d.train.recon_init import (
    INIT_RECONSTRUCTORS,
    init_from_reconstructor,
    mean_camera_similarity,
    select_context_views,
)

V, W, H = 5, 48, 40


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("w") / "ilrm_tiny.safetensors"
    save_weights(path, recon.create("ilrm_tiny").state_dict())
    return path


def _scene(seed: int = 0) -> tuple[torch.Tensor, Cameras]:
    g = torch.Generator().manual_seed(seed)
    ang = torch.linspace(-0.6, 0.7, V, dtype=torch.float64)
    eye = torch.stack([3 * torch.sin(ang), 0.3 * torch.cos(3 * ang), -3 * torch.cos(ang)], -1)  # [V, 3]
    c2w = look_at(eye, torch.zeros(V, 3, dtype=torch.float64), up=(0.0, -1.0, 0.0))
    K = torch.tensor([[40.0, 0, W / 2], [0, 40.0, H / 2], [0, 0, 1]], dtype=torch.float64)
    images = torch.rand(V, 3, H, W, generator=g)
    return images, Cameras(K.expand(V, 3, 3), c2w, W, H)


def test_counts_shapes_and_sh_degree(weights):
    images, cams = _scene()
    g, info = init_from_reconstructor("ilrm_tiny", weights, images, cams.to(torch.float32), max_gaussians=1000,
                                      sh_degree=2, progress=False)
    assert g.batch_shape == () and g.num == 1000 and g.sh.shape == (1000, 9, 3) and g.sh_degree == 2
    assert g.dtype == torch.float32 and bool(torch.isfinite(g.means).all())
    assert torch.count_nonzero(g.sh[:, 1:]) == 0  # iLRM predicts the DC term only; higher bands start at zero
    assert len(info["context_views"]) == INIT_RECONSTRUCTORS["ilrm_tiny"].context_views == 2
    assert info["network_size"] == [64, 64] and info["gaussians_raw"] == 2 * 64 * 64
    assert info["num_gaussians"] == 1000 and info["background"] == [1.0, 1.0, 1.0]
    assert bool((g.opacities >= info["min_opacity"]).all())
    # fewer opaque Gaussians than allowed: all kept; a high threshold drops some; another view count
    g2, info2 = init_from_reconstructor("ilrm_tiny", weights, images, cams, max_gaussians=10**6, sh_degree=0,
                                        context_views=3, min_opacity=0.12, progress=False)
    assert info2["gaussians_raw"] == 3 * 64 * 64 and len(info2["context_views"]) == 3
    assert 0 < g2.num == info2["gaussians_opaque"] < info2["gaussians_raw"] and g2.sh.shape[-2] == 1


def test_seeded_subsampling(weights):
    images, cams = _scene()
    kw = dict(max_gaussians=500, sh_degree=0, progress=False)
    a, _ = init_from_reconstructor("ilrm_tiny", weights, images, cams, generator=torch.Generator().manual_seed(1), **kw)
    b, _ = init_from_reconstructor("ilrm_tiny", weights, images, cams, generator=torch.Generator().manual_seed(1), **kw)
    c, _ = init_from_reconstructor("ilrm_tiny", weights, images, cams, generator=torch.Generator().manual_seed(2), **kw)
    torch.testing.assert_close(a.means, b.means, atol=0, rtol=0)
    assert not torch.equal(a.means, c.means)


def test_output_follows_a_similarity_of_the_input(weights):
    """Cameras given in two world frames (differing by s R x + t) -> Gaussians differing by the same map."""
    images, cams = _scene()
    sim = Similarity(2.5, random_rotation(generator=torch.Generator().manual_seed(4), dtype=torch.float64),
                     torch.tensor([1.0, -4.0, 7.0], dtype=torch.float64))
    kw = dict(max_gaussians=10**6, sh_degree=1, min_opacity=0.0, progress=False)
    a, ia = init_from_reconstructor("ilrm_tiny", weights, images, cams, **kw)
    b, ib = init_from_reconstructor("ilrm_tiny", weights, images, transform_cameras(cams, sim), **kw)
    assert ia["context_views"] == ib["context_views"] and a.num == b.num
    assert math.isclose(ia["model_frame_scale"], 2.5 * ib["model_frame_scale"], rel_tol=1e-9)
    # random weights put the means ~500 model units out (~1000 world units here): float32 keeps ~7 digits
    expect = sim.apply_points(a.means.double())
    err = (b.means.double() - expect).norm(dim=-1)
    assert bool((err <= 1e-4 + 1e-6 * expect.norm(dim=-1)).all()), f"largest error {float(err.max()):.2e}"
    torch.testing.assert_close(b.scales, 2.5 * a.scales, atol=1e-6, rtol=1e-4)
    R = sim.rotation.float()
    torch.testing.assert_close(quat_to_matrix(b.quats), R @ quat_to_matrix(a.quats), atol=1e-4, rtol=0)
    torch.testing.assert_close(b.opacities, a.opacities, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.sh, a.sh, atol=1e-4, rtol=0)  # degree 0 padded: nothing to rotate


def test_mean_camera_frame():
    _, cams = _scene()
    sim = mean_camera_similarity(cams)
    moved = transform_cameras(cams, sim)
    c = moved.centers
    torch.testing.assert_close(c.mean(0), torch.zeros(3, dtype=c.dtype), atol=1e-9, rtol=0)
    assert math.isclose(float(c.abs().max()), 1.0, rel_tol=1e-9)
    fwd = moved.rotation[:, :, 2].mean(0)  # mean optical axis along +z, mean down axis in the y-z plane, +y
    torch.testing.assert_close(fwd / fwd.norm(), torch.tensor([0.0, 0, 1], dtype=c.dtype), atol=1e-9, rtol=0)
    down = moved.rotation[:, :, 1].mean(0)
    assert abs(float(down[0])) < 1e-9 and float(down[1]) > 0
    assert select_context_views(cams, 2) == [0, 4] and select_context_views(cams, 3, "even") == [0, 2, 4]


def test_authors_checkpoint_is_converted_on_the_fly(tmp_path):
    import json

    from safetensors.torch import load_file

    from vision3d.recon.ilrm import convert_ilrm_checkpoint

    t = load_file(str(LOCAL_FIXTURES / "ilrm" / "public.safetensors"))
    kwargs = json.loads((LOCAL_FIXTURES / "ilrm" / "public.json").read_text())["upstream"]["constructor_kwargs"]
    state = {k[len("state/"):]: v for k, v in t.items() if k.startswith("state/")}
    torch.save({"state_dict": {f"encoder.scaler.{k}": v for k, v in state.items()}}, tmp_path / "authors.ckpt")
    save_weights(tmp_path / "ours.safetensors", convert_ilrm_checkpoint(state))
    images, cams = _scene()
    kw = dict(max_gaussians=10**6, sh_degree=0, model_kwargs=kwargs, progress=False)
    a, _ = init_from_reconstructor("ilrm_tiny", tmp_path / "authors.ckpt", images, cams, **kw)
    b, _ = init_from_reconstructor("ilrm_tiny", tmp_path / "ours.safetensors", images, cams, **kw)
    torch.testing.assert_close(a.means, b.means, atol=0, rtol=0)


def test_bad_inputs(weights, tmp_path):
    images, cams = _scene()
    kw = dict(max_gaussians=100, sh_degree=0, progress=False)
    with pytest.raises(ValueError, match=r"--init-weights.*vision3d convert ilrm"):
        init_from_reconstructor("ilrm_tiny", None, images, cams, **kw)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        init_from_reconstructor("ilrm_tiny", tmp_path / "missing.safetensors", images, cams, **kw)
    for name in ("dimer_tiny", "vggt_tiny"):
        with pytest.raises(ValueError, match=r"outputs no 3D Gaussians.*ilrm_re10k"):
            init_from_reconstructor(name, weights, images, cams, **kw)
    with pytest.raises(ValueError, match=r"no such reconstructor.*sfm, random"):
        init_from_reconstructor("nerf_9000", weights, images, cams, **kw)
    with pytest.raises(ValueError, match="does not fit"):
        init_from_reconstructor("ilrm_tiny", weights, images, cams, model_kwargs={"dim": 32}, **kw)
    with pytest.raises(ValueError, match="cameras batch"):
        init_from_reconstructor("ilrm_tiny", weights, images[:3], cams, **kw)
    with pytest.raises(ValueError, match="min_opacity"):
        init_from_reconstructor("ilrm_tiny", weights, images, cams, min_opacity=1.1, **kw)


def test_checkpoint_folder_of_a_training_run(weights, tmp_path):
    from vision3d.train.checkpoint import load_weights, save_checkpoint

    step_dir = save_checkpoint(tmp_path / "run", 7, load_weights(weights), {"note": "test"})
    images, cams = _scene()
    kw = dict(max_gaussians=10**6, sh_degree=0, progress=False)
    a, _ = init_from_reconstructor("ilrm_tiny", step_dir, images, cams, **kw)
    b, _ = init_from_reconstructor("ilrm_tiny", weights, images, cams, **kw)
    torch.testing.assert_close(a.means, b.means, atol=0, rtol=0)
