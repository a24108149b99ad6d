"""SfM on a photo collection with mixed cameras, sizes and lighting, made from the procedural scene."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """The rendered photo folder (made once for the module) and the true cameras."""
    return _collection(tmp_path_factory.mktemp("collection") / "photos")


def _collection(root):
    from vision3d.gaussians.procedural import collection_cameras, collection_exposures, procedural_scene
    from vision3d.render import rasterize
    from vision3d.utils.images import save_png

    scene = procedural_scene(seed=3, density=3.0)
    cams = collection_cameras(14, scene.target, arc_deg=80, sizes=((320, 240), (240, 320), (288, 216)),
                              fovs_deg=(55.0, 48.0, 60.0))
    gain, off = collection_exposures(14, strength=0.35, seed=0)
    for i, c in enumerate(cams):
        with torch.no_grad():
            im = rasterize(scene.gaussians, c, mode="RGB", backend="torch", background=torch.ones(3)).colors[0]
        save_png(root / f"p{i:02d}.png", (gain[i][:, None, None] * im.clamp(0, 1) + off[i][:, None, None]).clamp(0, 1))
    return root, cams


@pytest.mark.slow
def test_per_image_cameras_register_every_photo_deterministically(collection, tmp_path):
    pytest.importorskip("pycolmap")
    from vision3d.data.folder import list_images, load_images
    from vision3d.poses.base import PoseInput
    from vision3d.poses.colmap import ColmapPoses

    folder, truth = collection
    s = load_images(list_images(folder), size_policy="keep")
    inp = PoseInput(images=s.images, names=s.names, source=folder)
    runs = []
    for r in range(5):
        res = ColmapPoses(camera_mode="per-image", num_threads=1, seed=0, progress=False).estimate(inp, tmp_path / "w")
        runs.append(res)
        assert res.info["registered"] == 14 and res.info["dropped"] == []
        # undistortion resizes each photo a little; portrait photos stay portrait, none is cropped to another's size
        assert [c.width > c.height for c in res.cameras] == [c.width > c.height for c in truth]
    for res in runs[1:]:
        for a, b in zip(res.cameras, runs[0].cameras):
            torch.testing.assert_close(a.cam_to_world, b.cam_to_world, atol=0, rtol=0)
    # each photo gets its own focal length: within 12% of the truth (median), and each camera's (size and zoom)
    # mean within 10%
    rel = torch.tensor([float(a.K[0, 0, 0] / b.K[0, 0, 0]) - 1 for a, b in zip(runs[0].cameras, truth)])
    assert float(rel.abs().median()) < 0.12, rel
    for k in range(3):  # collection_cameras cycles sizes and zooms together: photo i is camera i % 3
        assert abs(float(rel[k::3].mean())) < 0.10, rel


@pytest.mark.slow
def test_partial_registration_is_refused_listing_the_dropped(collection, tmp_path):
    pytest.importorskip("pycolmap")
    import shutil

    from vision3d.data.folder import list_images, load_images
    from vision3d.poses.base import PoseEstimationError, PoseInput
    from vision3d.poses.colmap import ColmapPoses
    from vision3d.utils.images import save_png

    folder = tmp_path / "photos"
    shutil.copytree(collection[0], folder)
    g = torch.Generator().manual_seed(0)
    for i in range(8):  # 8 photos of noise nobody can register: 14 of 22 = 64% < 70%
        save_png(folder / f"z_noise{i}.png", torch.rand(3, 120, 160, generator=g))
    s = load_images(list_images(folder), size_policy="keep")
    inp = PoseInput(images=s.images, names=s.names, source=folder)
    with pytest.raises(PoseEstimationError, match="--allow-partial") as e:
        ColmapPoses(min_registered_fraction=0.7, num_threads=1, progress=False).estimate(inp, tmp_path / "w")
    assert "z_noise0.png" in str(e.value) and "14 of 22" in str(e.value)
    res = ColmapPoses(min_registered_fraction=0.7, allow_partial=True, num_threads=1, progress=False).estimate(
        inp, tmp_path / "w")
    assert res.info["registered"] == 14 and len(res.info["dropped"]) == 8
