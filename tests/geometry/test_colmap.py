"""COLMAP sparse models: text <-> binary <-> ours, every camera model, bad files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from tests.conftest import optional
from vision3d.geometry import (
    CAMERA_MODELS,
    CameraDistortion,
    Cameras,
    ColmapCamera,
    ColmapImage,
    ColmapModel,
    ColmapPoint3D,
    make_rigid,
    matrix_to_quat,
    random_rotation,
    read_colmap,
    write_colmap,
)
from vision3d.geometry.colmap import read_cameras_binary, read_images_binary

D = torch.float64


def _model_with_tracks() -> ColmapModel:
    """Two PINHOLE views and an OPENCV one, 4 points with tracks; observations are exact projections."""
    g = torch.Generator().manual_seed(3)
    m = ColmapModel()
    m.cameras[1] = ColmapCamera(1, "PINHOLE", 40, 30, [35.0, 36.0, 20.0, 15.0])
    m.cameras[7] = ColmapCamera(7, "OPENCV", 40, 30, [35.0, 35.0, 19.5, 15.5, 0.01, -0.002, 0.0003, 0.0001])
    pts = torch.randn(4, 3, generator=g, dtype=D) * 0.5
    for k, (iid, cid) in enumerate([(1, 1), (2, 1), (5, 7)]):
        R = random_rotation(generator=g, dtype=D) if k else torch.eye(3, dtype=D)
        q = matrix_to_quat(R)
        t = torch.tensor([0.1 * k, -0.2, 4.0], dtype=D)
        K = m.cameras[cid].K
        pc = pts @ R.T + t
        uv = (pc @ K.T)[:, :2] / pc[:, 2:]
        ids = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
        if k == 1:
            ids[2] = -1  # an observation without a 3D point
        m.images[iid] = ColmapImage(iid, q, t, cid, f"img_{iid:03d}.jpg", uv, ids)
    for j in range(4):  # tracks consistent with the images' point3D_ids, as COLMAP requires
        track = [(iid, k) for iid, im in m.images.items() for k, pid in enumerate(im.point3D_ids.tolist()) if pid == j + 1]
        m.points3D[j + 1] = ColmapPoint3D(j + 1, pts[j], [10 * j, 20, 250], 0.5 + j, *zip(*track))
    return m


def _assert_models_equal(a: ColmapModel, b: ColmapModel):
    assert a.cameras.keys() == b.cameras.keys() and a.images.keys() == b.images.keys()
    assert a.points3D.keys() == b.points3D.keys()
    for k, c in a.cameras.items():
        o = b.cameras[k]
        assert (c.id, c.model, c.width, c.height) == (o.id, o.model, o.width, o.height)
        assert np.array_equal(c.params, o.params) and c.params.dtype == o.params.dtype == np.float64
    for k, im in a.images.items():
        o = b.images[k]
        assert (im.id, im.camera_id, im.name) == (o.id, o.camera_id, o.name)
        for f in ("qvec", "tvec", "xys", "point3D_ids"):
            x, y = getattr(im, f), getattr(o, f)
            assert np.array_equal(x, y) and x.dtype == y.dtype, f
    for k, p in a.points3D.items():
        o = b.points3D[k]
        assert p.error == o.error
        for f in ("xyz", "rgb", "image_ids", "point2D_idxs"):
            x, y = getattr(p, f), getattr(o, f)
            assert np.array_equal(x, y) and x.dtype == y.dtype, f


def test_text_binary_ours_round_trip(tmp_path):
    m = _model_with_tracks()
    write_colmap(m, tmp_path / "bin", binary=True)
    write_colmap(m, tmp_path / "txt", binary=False)
    from_bin = read_colmap(tmp_path / "bin")
    from_txt = read_colmap(tmp_path / "txt")
    assert from_bin.path == tmp_path / "bin"
    _assert_models_equal(m, from_bin)
    _assert_models_equal(m, from_txt)
    # text -> binary gives the same bytes as writing the binary directly
    write_colmap(from_txt, tmp_path / "bin2", binary=True)
    for name in ("cameras.bin", "images.bin", "points3D.bin"):
        assert (tmp_path / "bin" / name).read_bytes() == (tmp_path / "bin2" / name).read_bytes()
    # observations reproject through our Cameras
    cams, names, _ = read_colmap(tmp_path / "bin").to_cameras(image_ids=[1, 2], dtype=D)
    uv, _ = cams.project(m.points_xyz().expand(2, 4, 3))
    torch.testing.assert_close(uv[0], torch.from_numpy(m.images[1].xys))
    torch.testing.assert_close(uv[1], torch.from_numpy(m.images[2].xys))
    assert names == ["img_001.jpg", "img_002.jpg"]


def test_auto_detect_sparse_0_and_binary_first(tmp_path):
    m = _model_with_tracks()
    write_colmap(m, tmp_path / "scene" / "sparse" / "0", binary=False)
    assert read_colmap(tmp_path / "scene").path == tmp_path / "scene" / "sparse" / "0"
    write_colmap(m, tmp_path / "scene" / "sparse" / "0", binary=True)
    (tmp_path / "scene" / "sparse" / "0" / "cameras.txt").write_text("1 NOT_A_MODEL 1 1 1\n")  # ignored: .bin wins
    assert len(read_colmap(tmp_path / "scene").cameras) == 2
    with pytest.raises(ValueError, match="no COLMAP model found"):
        read_colmap(tmp_path / "nowhere")


@pytest.mark.parametrize("info", CAMERA_MODELS, ids=lambda i: i.name)
def test_every_camera_model_round_trips(tmp_path, info):
    params = torch.linspace(0.1, 1.0, info.num_params, dtype=D) * 100
    m = ColmapModel(cameras={3: ColmapCamera(3, info.name, 64, 48, params)})
    for binary in (True, False):
        write_colmap(m, tmp_path / str(binary), binary=binary)
        back = read_colmap(tmp_path / str(binary))
        assert back.cameras[3].model == info.name and back.cameras[3].model_id == info.id
        assert np.array_equal(back.cameras[3].params, params.numpy())
    raw = (tmp_path / "True" / "cameras.bin").read_bytes()
    assert struct.unpack_from("<Qii", raw) == (1, 3, info.id)
    assert len(raw) == 8 + 24 + 8 * info.num_params


def test_to_cameras_and_distortion_reported():
    m = _model_with_tracks()
    cams, names, dist = m.to_cameras(image_ids=[1, 2], dtype=D)
    assert dist is None and cams.batch_shape == (2,) and (cams.width, cams.height) == (40, 30)
    torch.testing.assert_close(cams.K[0], m.cameras[1].K)
    torch.testing.assert_close(cams.world_to_cam[1], m.images[2].world_to_cam)
    cams, names, dist = m.to_cameras(image_ids=[5])
    assert isinstance(dist, CameraDistortion) and dist.model == "OPENCV"
    assert dist.param_names == ("k1", "k2", "p1", "p2")
    torch.testing.assert_close(dist.params, torch.tensor([[0.01, -0.002, 0.0003, 0.0001]]))
    img = torch.rand(1, 3, 30, 40)
    assert dist.undistort_image(img, cams).shape == (1, 3, 30, 40)
    with pytest.raises(ValueError, match=r"different distorted camera models|select images of one model") as e:
        m.cameras[1] = ColmapCamera(1, "SIMPLE_RADIAL", 40, 30, [35.0, 20.0, 15.0, 0.1])
        m.to_cameras()
    assert "OPENCV" in str(e.value) and "SIMPLE_RADIAL" in str(e.value)


def test_to_cameras_mixed_sizes_needs_grouping():
    m = _model_with_tracks()
    m.cameras[7] = ColmapCamera(7, "PINHOLE", 80, 60, [70.0, 70.0, 40.0, 30.0])
    with pytest.raises(ValueError, match=r"different sizes: 40x30 \(2 images\), 80x60 \(1 images\).*group_by_size=True"):
        m.to_cameras()
    groups = m.to_cameras(group_by_size=True)
    assert set(groups) == {(40, 30), (80, 60)}
    assert groups[(80, 60)][1] == ["img_005.jpg"] and groups[(40, 30)][0].batch_shape == (2,)


def test_from_cameras_round_trip(tmp_path):
    n = 3
    c2w = make_rigid(random_rotation(n, dtype=D), torch.randn(n, 3, dtype=D))
    K = torch.tensor([[30.0, 0, 16], [0, 30.0, 12], [0, 0, 1]], dtype=D).repeat(n, 1, 1)
    K[2, 0, 0] = 31.0
    cams = Cameras(K, c2w, 32, 24)
    pts, cols = torch.randn(6, 3, dtype=D), torch.rand(6, 3)
    m = ColmapModel.from_cameras(cams, ["a.png", "b.png", "c.png"], pts, cols)
    assert len(m.cameras) == 2  # the two identical intrinsics share one camera
    write_colmap(m, tmp_path, binary=True)
    back, names, dist = read_colmap(tmp_path).to_cameras(dtype=D)
    assert names == ["a.png", "b.png", "c.png"] and dist is None
    torch.testing.assert_close(back.cam_to_world, c2w)
    torch.testing.assert_close(back.K, K)
    torch.testing.assert_close(read_colmap(tmp_path).points_xyz(), pts)
    assert torch.equal(read_colmap(tmp_path).points_rgb(), (cols * 255).round().to(torch.uint8))
    # distortion travels too
    d = CameraDistortion("OPENCV", torch.tensor([0.1, 0.01, 0.001, 0.002], dtype=D))
    m = ColmapModel.from_cameras(cams, ["a", "b", "c"], distortion=d)
    _, _, dist = m.to_cameras(dtype=D)
    torch.testing.assert_close(dist.params, d.params.expand(3, 4))
    with pytest.raises(ValueError, match="one focal length but fx != fy"):
        ColmapModel.from_cameras(cams, ["a", "b", "c"], distortion=CameraDistortion("SIMPLE_RADIAL", torch.zeros(1)))


# ------------------------------------------------------------------------------------- bad input
def test_unknown_camera_model_text(tmp_path):
    (tmp_path / "cameras.txt").write_text("# header\n1 PINHOLE 10 10 5 5 5 5\n2 BROWN_CONRADY 10 10 5 5 5 5\n")
    (tmp_path / "images.txt").write_text("")
    with pytest.raises(ValueError, match=r"cameras\.txt:3: camera 2 field MODEL: unknown COLMAP camera model 'BROWN_CONRADY'"):
        read_colmap(tmp_path)


def test_wrong_param_count_text(tmp_path):
    (tmp_path / "cameras.txt").write_text("1 OPENCV 10 10 5 5 5 5\n")
    (tmp_path / "images.txt").write_text("")
    with pytest.raises(ValueError, match=r"cameras\.txt:1: camera 1 field PARAMS: OPENCV takes 8"):
        read_colmap(tmp_path)


def test_unknown_camera_model_binary(tmp_path):
    (tmp_path / "cameras.bin").write_bytes(struct.pack("<QiiQQ", 1, 4, 42, 10, 10) + b"\0" * 32)
    with pytest.raises(ValueError, match=r"cameras\.bin: camera #0 \(id 4\) field model_id: unknown COLMAP camera model 42"):
        read_cameras_binary(tmp_path / "cameras.bin")


def test_truncated_binary(tmp_path):
    write_colmap(_model_with_tracks(), tmp_path, binary=True)
    raw = (tmp_path / "images.bin").read_bytes()
    (tmp_path / "images.bin").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match=r"images\.bin: truncated file: .* for image 5 points2D"):
        read_images_binary(tmp_path / "images.bin")
    (tmp_path / "images.bin").write_bytes(raw[:20])
    with pytest.raises(ValueError, match=r"images\.bin: truncated file: .*image #0 \(image_id, qvec, tvec, camera_id\)"):
        read_colmap(tmp_path)
    cam = (tmp_path / "cameras.bin").read_bytes()
    (tmp_path / "cameras.bin").write_bytes(cam[:-8])
    with pytest.raises(ValueError, match=r"cameras\.bin: truncated file: .*camera 7 params \(OPENCV: 8 float64\)"):
        read_cameras_binary(tmp_path / "cameras.bin")


def test_image_refers_to_missing_camera(tmp_path):
    (tmp_path / "cameras.txt").write_text("1 PINHOLE 10 10 5 5 5 5\n")
    (tmp_path / "images.txt").write_text("1 1 0 0 0 0 0 0 9 a.png\n\n")
    with pytest.raises(ValueError, match=r"images\.txt: image 1 \(a\.png\) field camera_id=9"):
        read_colmap(tmp_path)


def test_images_text_blank_points_line_and_no_trailing_newline(tmp_path):
    (tmp_path / "cameras.txt").write_text("1 SIMPLE_PINHOLE 10 8 9 5 4\n")
    (tmp_path / "images.txt").write_text("# c\n1 1 0 0 0 0 0 1 1 a.png\n\n2 1 0 0 0 0 0 2 1 b.png\n1.5 2.5 -1 3 4 7")
    m = read_colmap(tmp_path)
    assert m.images[1].xys.shape == (0, 2) and m.points3D == {} and m.images[1].xys.dtype == np.float64
    assert m.images[2].point3D_ids.tolist() == [-1, 7]
    cams, names, dist = m.to_cameras()
    torch.testing.assert_close(cams.K[0], torch.tensor([[9.0, 0, 5], [0, 9.0, 4], [0, 0, 1]]))
    torch.testing.assert_close(cams.centers, torch.tensor([[0.0, 0, -1], [0, 0, -2]]))


# ------------------------------------------------------------------------------------- against COLMAP itself
def test_camera_model_table_matches_pycolmap():
    pycolmap = optional("pycolmap")
    for m in CAMERA_MODELS:
        mid = pycolmap.CameraModelId.__members__[m.name]
        assert int(mid.value) == m.id, m.name
        cam = pycolmap.Camera.create_from_model_id(1, mid, 100.0, 64, 48)
        assert len(cam.params) == m.num_params, m.name


def test_files_interchange_with_pycolmap(tmp_path):
    pycolmap = optional("pycolmap")
    m = _model_with_tracks()
    for binary in (True, False):
        ours = tmp_path / f"ours_{binary}"
        write_colmap(m, ours, binary=binary)
        rec = pycolmap.Reconstruction()
        (rec.read_binary if binary else rec.read_text)(str(ours))
        for iid, im in m.images.items():
            pim = rec.images[iid]
            w2c = pim.cam_from_world() if callable(pim.cam_from_world) else pim.cam_from_world
            np.testing.assert_allclose(np.asarray(w2c.rotation.matrix()), im.world_to_cam[:3, :3].numpy(), atol=1e-12)
            np.testing.assert_allclose(np.asarray(w2c.translation), im.tvec, atol=1e-12)
            np.testing.assert_array_equal(np.array([p.xy for p in pim.points2D]), im.xys)
            assert np.array_equal(np.asarray(rec.cameras[pim.camera_id].params), m.cameras[im.camera_id].params)
        # and back: COLMAP's writer (with its rigs/frames files) -> our reader
        theirs = tmp_path / f"theirs_{binary}"
        theirs.mkdir()
        (rec.write_binary if binary else rec.write_text)(str(theirs))
        back = read_colmap(theirs)
        for iid, im in m.images.items():
            torch.testing.assert_close(back.images[iid].world_to_cam, im.world_to_cam, atol=1e-12, rtol=0)
            np.testing.assert_array_equal(back.images[iid].point3D_ids, im.point3D_ids)
        for pid, p in m.points3D.items():
            q = back.points3D[pid]
            np.testing.assert_allclose(q.xyz, p.xyz, atol=1e-12)
            assert sorted(zip(q.image_ids.tolist(), q.point2D_idxs.tolist())) == sorted(
                zip(p.image_ids.tolist(), p.point2D_idxs.tolist())
            )


def test_values_that_overflow_float32_are_refused_at_conversion(tmp_path):
    """Finite in the file's float64 but inf as float32 Cameras: refused naming the camera or image."""
    from vision3d.errors import InputError

    (tmp_path / "cameras.txt").write_text(
        "1 PINHOLE 10 10 5 5 5 5\n2 PINHOLE 10 10 5 5 1e83 5\n3 OPENCV 10 10 5 5 5 5 1e300 0 0 0\n"
    )
    (tmp_path / "images.txt").write_text(
        "1 1 0 0 0 0 0 0 2 a.png\n\n2 1 0 0 0 1e60 0 0 1 b.png\n\n3 1 0 0 0 0 0 0 3 c.png\n\n"
    )
    model = read_colmap(tmp_path)  # each value is finite where it is read
    with pytest.raises(InputError, match=r"camera 2 PARAMS: expected values representable in torch\.float32"):
        model.to_cameras(image_ids=[1])
    with pytest.raises(InputError, match=r"image 2 QVEC/TVEC: expected values representable in torch\.float32"):
        model.to_cameras(image_ids=[2])
    with pytest.raises(InputError, match=r"camera 3 PARAMS: expected values representable in torch\.float32"):
        model.to_cameras(image_ids=[3])
    cams, _, _ = model.to_cameras(image_ids=[1], dtype=torch.float64)  # float64 holds them
    assert torch.isfinite(cams.K).all()
