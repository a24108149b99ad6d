"""INRIA PLY and .splat I/O: round trips, the channel-major f_rest order, independent readers, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import optional
from vision3d.gaussians import Gaussians, load_ply, load_splat, read_ply_header, save_ply, save_splat
from vision3d.gaussians.gaussians import SH_C0, num_sh_bases
import vision3d.gaussians.ply as ply_module
from vision3d.gaussians.ply import ply_property_names


def random_gaussians(n: int = 37, degree: int = 3, seed: int = 0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    k = num_sh_bases(degree)
    return Gaussians(
        means=torch.randn(n, 3, generator=g) * 3,
        quats=torch.randn(n, 4, generator=g),
        scales=torch.rand(n, 3, generator=g) * 0.5 + 1e-3,
        opacities=torch.rand(n, generator=g) * 0.98 + 0.01,
        sh=torch.randn(n, k, 3, generator=g),
    )


def write_with_plyfile(path, columns: dict[str, np.ndarray], text=False, byte_order="<", extra_elements=()):
    plyfile = optional("plyfile")
    n = len(next(iter(columns.values())))
    arr = np.empty(n, dtype=[(k, v.dtype.str.replace("<", "").replace(">", "")) for k, v in columns.items()])
    for k, v in columns.items():
        arr[k] = v
    els = list(extra_elements) + [plyfile.PlyElement.describe(arr, "vertex")]
    plyfile.PlyData(els, text=text, byte_order=byte_order).write(str(path))


def inria_columns(g: Gaussians) -> dict[str, np.ndarray]:
    """The columns the authors' save_ply writes, built independently of our writer."""
    n, k = g.num, g.sh.shape[-2]
    cols = {}
    for i, a in enumerate("xyz"):
        cols[a] = g.means[:, i].numpy().astype("f4")
    for a in ("nx", "ny", "nz"):
        cols[a] = np.zeros(n, "f4")
    for c in range(3):
        cols[f"f_dc_{c}"] = g.sh[:, 0, c].numpy().astype("f4")
    j = 0
    for c in range(3):  # channel-major: all of red, then green, then blue
        for b in range(1, k):
            cols[f"f_rest_{j}"] = g.sh[:, b, c].numpy().astype("f4")
            j += 1
    o = g.opacities.double().numpy()
    cols["opacity"] = np.log(o / (1 - o)).astype("f4")
    for i in range(3):
        cols[f"scale_{i}"] = np.log(g.scales[:, i].double().numpy()).astype("f4")
    for i in range(4):
        cols[f"rot_{i}"] = g.quats[:, i].numpy().astype("f4")
    return cols


def assert_same(a: Gaussians, b: Gaussians) -> None:
    assert torch.equal(a.means, b.means)
    assert torch.equal(a.sh, b.sh)
    assert torch.equal(a.quats, b.quats)
    torch.testing.assert_close(a.scales, b.scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.opacities, b.opacities, rtol=1e-6, atol=0)


@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_round_trip_exact(tmp_path, degree):
    g = random_gaussians(degree=degree)
    path = save_ply(tmp_path / "scene.ply", g)
    back = load_ply(path)
    assert back.sh_degree == degree and back.num == g.num
    assert_same(g, back)
    hdr = read_ply_header(path)
    assert hdr.format == "binary_little_endian"
    assert [n for n, _ in hdr.element("vertex").properties] == ply_property_names(degree)
    # nothing else in the folder: the temporary file was renamed
    assert [p.name for p in tmp_path.iterdir()] == ["scene.ply"]


def test_plyfile_reads_our_file_in_inria_layout(tmp_path):
    plyfile = optional("plyfile")
    g = random_gaussians(n=11, degree=2)
    save_ply(tmp_path / "s.ply", g)
    v = plyfile.PlyData.read(str(tmp_path / "s.ply"))["vertex"]
    expect = inria_columns(g)
    assert [p.name for p in v.properties] == list(expect)
    for name, col in expect.items():
        np.testing.assert_array_equal(np.asarray(v[name]), col, err_msg=name)


def test_reads_plyfile_written_inria_layout(tmp_path):
    """A file written by plyfile in the authors' layout loads into the same Gaussians (order check)."""
    g = random_gaussians(n=9, degree=3, seed=3)
    write_with_plyfile(tmp_path / "a.ply", inria_columns(g))
    assert_same(g, load_ply(tmp_path / "a.ply"))


def test_f_rest_is_channel_major(tmp_path):
    g = random_gaussians(n=1, degree=1)
    g.sh[0, 1:, :] = torch.tensor([[1.0, 4.0, 7.0], [2.0, 5.0, 8.0], [3.0, 6.0, 9.0]])  # [band coeff, rgb]
    save_ply(tmp_path / "c.ply", g)
    hdr = read_ply_header(tmp_path / "c.ply")
    names = [n for n, _ in hdr.element("vertex").properties]
    raw = np.frombuffer((tmp_path / "c.ply").read_bytes()[-4 * len(names) :], dtype="<f4")
    rest = [raw[names.index(f"f_rest_{i}")] for i in range(9)]
    assert rest == [1, 2, 3, 4, 5, 6, 7, 8, 9]  # R's three coefficients first, then G's, then B's


def test_ascii_big_endian_and_extra_properties(tmp_path):
    g = random_gaussians(n=8, degree=1, seed=5)
    cols = inria_columns(g)
    cols["confidence"] = np.arange(8, dtype="f4")  # an extra property to ignore
    cols["label"] = np.arange(8, dtype="u1")
    write_with_plyfile(tmp_path / "be.ply", cols, byte_order=">")
    assert_same(g, load_ply(tmp_path / "be.ply"))
    # plyfile prints floats with repr precision, so ASCII round-trips float32 exactly too
    write_with_plyfile(tmp_path / "asc.ply", cols, text=True)
    assert_same(g, load_ply(tmp_path / "asc.ply"))
    write_with_plyfile(tmp_path / "asc_f4.ply", inria_columns(g), text=True)  # one type: the matrix path
    assert_same(g, load_ply(tmp_path / "asc_f4.ply"))
    write_with_plyfile(tmp_path / "be_f4.ply", inria_columns(g), byte_order=">")
    assert_same(g, load_ply(tmp_path / "be_f4.ply"))


def test_skips_elements_before_vertex(tmp_path):
    plyfile = optional("plyfile")
    g = random_gaussians(n=5, degree=0)
    cam = np.zeros(2, dtype=[("a", "f8"), ("b", "i4")])
    cam["a"] = [1.5, 2.5]
    write_with_plyfile(
        tmp_path / "e.ply", inria_columns(g), extra_elements=[plyfile.PlyElement.describe(cam, "camera")]
    )
    assert_same(g, load_ply(tmp_path / "e.ply"))


def test_opacity_and_scale_edge_values_stay_finite(tmp_path):
    g = random_gaussians(n=4, degree=0)
    g.opacities[:] = torch.tensor([0.0, 1.0, 1e-4, 0.9999])
    g.scales[0] = 0.0
    back = load_ply(save_ply(tmp_path / "edge.ply", g))
    assert torch.isfinite(back.opacities).all() and torch.isfinite(back.scales).all()
    torch.testing.assert_close(back.opacities, g.opacities, atol=1e-11, rtol=1e-6)
    assert back.scales[0].max() < 1e-29


def test_sh_degree_override(tmp_path):
    g = random_gaussians(n=6, degree=3)
    b = load_ply(save_ply(tmp_path / "d1.ply", g, sh_degree=1))
    assert b.sh_degree == 1 and torch.equal(b.sh, g.sh[:, :4])


# ------------------------------------------------------------------ bad input
def test_batched_and_nan_rejected(tmp_path):
    g = random_gaussians(n=4)
    batched = g.map(lambda t: t[None])
    with pytest.raises(ValueError, match="unbatched"):
        save_ply(tmp_path / "b.ply", batched)
    g.means[2, 1] = float("nan")
    with pytest.raises(ValueError, match="'means'"):
        save_ply(tmp_path / "n.ply", g)
    assert not (tmp_path / "n.ply").exists()


def test_nan_in_file_names_property(tmp_path):
    g = random_gaussians(n=4, degree=0)
    cols = inria_columns(g)
    cols["scale_1"][2] = np.nan
    write_with_plyfile(tmp_path / "nan.ply", cols)
    with pytest.raises(ValueError, match=r"nan\.ply.*'scale_1'"):
        load_ply(tmp_path / "nan.ply")


def test_missing_property(tmp_path):
    g = random_gaussians(n=4, degree=0)
    cols = inria_columns(g)
    del cols["rot_3"]
    write_with_plyfile(tmp_path / "m.ply", cols)
    with pytest.raises(ValueError, match=r"m\.ply.*'rot_3' is missing"):
        load_ply(tmp_path / "m.ply")


def test_point_cloud_without_inria_properties(tmp_path):
    cols = {a: np.zeros(3, "f4") for a in "xyz"}
    cols.update({c: np.zeros(3, "u1") for c in ("red", "green", "blue")})
    write_with_plyfile(tmp_path / "pc.ply", cols)
    with pytest.raises(ValueError, match=r"pc\.ply.*'f_dc_0' is missing"):
        load_ply(tmp_path / "pc.ply")


def test_wrong_f_rest_count(tmp_path):
    g = random_gaussians(n=3, degree=1)
    cols = inria_columns(g)
    del cols["f_rest_8"]
    write_with_plyfile(tmp_path / "r.ply", cols)
    with pytest.raises(ValueError, match=r"r\.ply: 8 f_rest_\* properties; expected 0, 9, 24 or 45"):
        load_ply(tmp_path / "r.ply")


def test_truncated_and_not_ply(tmp_path):
    g = random_gaussians(n=10, degree=1)
    data = save_ply(tmp_path / "t.ply", g).read_bytes()
    (tmp_path / "cut.ply").write_bytes(data[:-7])
    with pytest.raises(ValueError, match=r"cut\.ply: element vertex count: expected at most 9 vertices"):
        load_ply(tmp_path / "cut.ply")
    (tmp_path / "hdr.ply").write_bytes(data[:200])
    with pytest.raises(ValueError, match=r"hdr\.ply: truncated or malformed PLY header"):
        load_ply(tmp_path / "hdr.ply")
    (tmp_path / "x.ply").write_bytes(b"solid cube\n")
    with pytest.raises(ValueError, match="not a PLY file"):
        load_ply(tmp_path / "x.ply")
    with pytest.raises(FileNotFoundError):
        load_ply(tmp_path / "absent.ply")


def test_interrupted_write_leaves_old_file(tmp_path, monkeypatch):
    g = random_gaussians(n=5, degree=0)
    path = save_ply(tmp_path / "keep.ply", g)
    before = path.read_bytes()

    class Interrupted:  # a file that takes some bytes, then the process is interrupted
        def __init__(self, p, mode):
            self.f = open(p, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:10])
            raise KeyboardInterrupt

    monkeypatch.setattr(ply_module, "open", Interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        save_ply(path, random_gaussians(n=50, degree=3))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.ply"]


# ------------------------------------------------------------------ .splat
def test_splat_layout_order_and_round_trip(tmp_path):
    g = random_gaussians(n=20, degree=2, seed=7)
    g.sh[:, 0] = (torch.rand(20, 3) - 0.5) / SH_C0  # colours inside [0, 1]
    path = save_splat(tmp_path / "s.splat", g)
    raw = path.read_bytes()
    assert len(raw) == 32 * 20
    rec = np.frombuffer(raw, dtype=[("p", "<f4", 3), ("s", "<f4", 3), ("c", "u1", 4), ("r", "u1", 4)])
    # sorted by decreasing volume * opacity; positions and scales are the exact float32 values
    imp = (g.scales.double().prod(1) * g.opacities.double()).numpy()
    order = np.argsort(-imp, kind="stable")
    assert np.all(np.diff(imp[order]) <= 0)
    np.testing.assert_array_equal(rec["p"], g.means[order].numpy())
    np.testing.assert_array_equal(rec["s"], g.scales[order].numpy())
    q = torch.nn.functional.normalize(g.quats[order].double(), dim=-1).numpy()
    np.testing.assert_array_equal(rec["r"], np.clip(q * 128 + 128, 0, 255).astype(np.uint8))
    rgba = np.concatenate([0.5 + SH_C0 * g.sh[order, 0].double().numpy(), g.opacities[order, None].double().numpy()], 1)
    np.testing.assert_array_equal(rec["c"], np.clip(rgba * 255, 0, 255).astype(np.uint8))
    back = load_splat(path)
    assert back.num == 20 and back.sh_degree == 0
    torch.testing.assert_close(back.rgb, g.rgb[order], atol=1 / 255 + 1e-6, rtol=0)
    torch.testing.assert_close(back.opacities, g.opacities[order], atol=1 / 255 + 1e-6, rtol=0)
    qa = torch.nn.functional.normalize(back.quats, dim=-1)
    qb = torch.nn.functional.normalize(g.quats[order], dim=-1)
    assert ((qa * qb).sum(-1).abs() > 0.99).all()


def test_splat_truncated(tmp_path):
    (tmp_path / "bad.splat").write_bytes(b"\0" * 33)
    with pytest.raises(ValueError, match=r"bad\.splat.*multiple of 32"):
        load_splat(tmp_path / "bad.splat")


def test_empty_scene_round_trips(tmp_path):
    g = Gaussians.empty(2)
    back = load_ply(save_ply(tmp_path / "e.ply", g))
    assert back.num == 0 and back.sh_degree == 2
    assert load_splat(save_splat(tmp_path / "e.splat", g)).num == 0


def test_truncated_ascii(tmp_path):
    g = random_gaussians(n=4, degree=0)
    write_with_plyfile(tmp_path / "a.ply", inria_columns(g), text=True)
    text = (tmp_path / "a.ply").read_text()
    (tmp_path / "cut.ply").write_text(text[: text.rstrip().rfind("\n")])  # drop the last vertex line
    with pytest.raises(ValueError, match=r"cut\.ply: truncated ASCII PLY: expected 4 vertex lines, found 3"):
        load_ply(tmp_path / "cut.ply")


def test_hostile_headers_end_in_input_error(tmp_path):
    from vision3d.errors import InputError

    head = "ply\nformat binary_little_endian 1.0\nelement vertex {n}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    p = tmp_path / "huge.ply"
    p.write_bytes(head.format(n=10**15).encode() + b"\0" * 24)  # would be 12 PB of vertex data
    with pytest.raises(InputError, match=r"huge\.ply: element vertex count: expected at most 2 vertices"):
        load_ply(p)
    p.write_bytes(head.format(n=10**15).replace("binary_little_endian", "ascii").encode() + b"1 2 3\n")
    with pytest.raises(InputError, match=r"huge\.ply: element vertex count"):
        load_ply(p)
    p.write_bytes(b"ply\nformat ascii 1.0\ncomment " + b"x" * (17 * 2**20))  # no end_header within 16 MiB
    with pytest.raises(InputError, match=r"huge\.ply: header: expected a PLY header under 16 MiB"):
        read_ply_header(p)
    p.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float \xff\xfe\nend_header\n1\n")
    with pytest.raises(InputError, match=r"huge\.ply"):
        load_ply(p)


def test_long_comment_header_is_read_in_one_pass(tmp_path):
    g = Gaussians(torch.zeros(2, 3), torch.tensor([[1.0, 0, 0, 0]] * 2), torch.ones(2, 3) * 0.1, torch.full((2,), 0.5), torch.zeros(2, 1, 3))
    p = save_ply(tmp_path / "c.ply", g)
    data = p.read_bytes()
    p.write_bytes(data.replace(b"format binary_little_endian 1.0\n", b"format binary_little_endian 1.0\ncomment " + b"y" * (15 * 2**20) + b"\n", 1))
    torch.testing.assert_close(load_ply(p).means, g.means)
