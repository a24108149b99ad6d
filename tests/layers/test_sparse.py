"""Sparse 3-D convolution: dense twins (values and gradients), MinkowskiEngine's offset order and
weight layout, sparse sets with negative coordinates, kernel-map reuse, the spconv backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import requires_cuda
from vision3d.layers.sparse import (
    CoordinateCache,
    SparseConv3d,
    SparseTensor,
    build_kernel_map,
    kernel_offsets,
    sparse_cat,
    weight_from_minkowski,
    weight_to_minkowski,
)
from vision3d.utils.optional import available

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


def _grid(B: int, n: int) -> torch.Tensor:  # [B n^3, 4] every voxel of an n^3 grid, per batch element
    g = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([torch.arange(B).repeat_interleave(g.shape[0])[:, None], g.repeat(B, 1)], 1)


def _to_dense(x: SparseTensor, B: int, shape, shift: int = 0) -> torch.Tensor:  # -> [B, C, *shape]
    out = x.features.new_zeros(B, x.num_channels, *shape)
    c = x.coords
    s = x.stride
    out[c[:, 0], :, (c[:, 1] + shift) // s, (c[:, 2] + shift) // s, (c[:, 3] + shift) // s] = x.features
    return out


def _from_dense(dense: torch.Tensor, coords: torch.Tensor, shift: int = 0) -> torch.Tensor:  # -> [N, C]
    return dense[coords[:, 0], :, coords[:, 1] + shift, coords[:, 2] + shift, coords[:, 3] + shift]


def _dense_reference(conv: SparseConv3d, dense: torch.Tensor) -> torch.Tensor:
    k, s = conv.kernel_size, conv.stride
    if conv.transposed:
        pad = k // 2 if k % 2 else 0
        return F.conv_transpose3d(dense, conv.weight, stride=s, padding=pad, output_padding=s - 1 + 2 * pad - (k - 1))
    if k % 2:
        return F.conv3d(dense, conv.weight, stride=s, padding=k // 2)
    return F.conv3d(F.pad(dense, (0, k - 1) * 3), conv.weight, stride=s)  # even kernels read o .. o + k - 1


@pytest.mark.parametrize("k,s", [(3, 1), (3, 2), (2, 2), (1, 1), (5, 1)])
def test_conv_equals_dense_on_full_grid(k, s):
    B, n, ci, co = 2, 4, 3, 5
    coords = _grid(B, n)
    dense = torch.randn(B, ci, n, n, n, dtype=DT, requires_grad=True)
    conv = SparseConv3d(ci, co, k, s, backend="torch").to(DT)
    y = conv(SparseTensor(_from_dense(dense, coords), coords))
    ref = _dense_reference(conv, dense)
    assert y.stride == s and len(y) == B * ref.shape[2] ** 3
    torch.testing.assert_close(_to_dense(y, B, ref.shape[2:]), ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    gs = torch.autograd.grad((_to_dense(y, B, ref.shape[2:]) * w).sum(), (dense, conv.weight))
    gd = torch.autograd.grad((ref * w).sum(), (dense, conv.weight))
    for a, b in zip(gs, gd):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k", [3, 2])
def test_transposed_equals_dense_on_full_grid(k):
    B, n, ci, co = 2, 4, 4, 3
    coords = _grid(B, n)
    x = SparseTensor(torch.randn(len(coords), 2, dtype=DT), coords)
    down = SparseConv3d(2, ci, k, 2, backend="torch").to(DT)(x)  # puts stride-2 coordinates in the cache
    feats = down.features.detach().requires_grad_(True)
    coarse = SparseTensor(feats, down.coords, 2, down.cache)
    up = SparseConv3d(ci, co, k, 2, transposed=True, backend="torch").to(DT)
    y = up(coarse)
    assert y.stride == 1 and torch.equal(y.coords, coords)  # back onto the cached input voxels, same order
    dense_in = _to_dense(coarse, B, (n // 2,) * 3)
    ref = _dense_reference(up, dense_in)
    torch.testing.assert_close(_to_dense(y, B, (n,) * 3), ref, rtol=1e-10, atol=1e-10)
    w = torch.randn_like(ref)
    g1 = torch.autograd.grad((_to_dense(y, B, (n,) * 3) * w).sum(), (feats, up.weight))
    g2 = torch.autograd.grad((ref * w).sum(), (feats, up.weight), allow_unused=False)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _minkowski_offsets(k: int, ts: int = 1) -> list[tuple[int, int, int]]:
    """Kernel offsets written out in MinkowskiEngine's order: index = ix + k*iy + k^2*iz (x fastest)."""
    r = k // 2 if k % 2 else 0
    return [((i % k - r) * ts, ((i // k) % k - r) * ts, (i // k // k - r) * ts) for i in range(k**3)]


def _shift(dense: torch.Tensor, d) -> torch.Tensor:  # out[x] = dense[x + d], zero outside
    n = dense.shape[2:]
    out = torch.zeros_like(dense)
    src = [slice(max(di, 0), ni + min(di, 0)) for di, ni in zip(d, n)]
    dst = [slice(max(-di, 0), ni + min(-di, 0)) for di, ni in zip(d, n)]
    out[(..., *dst)] = dense[(..., *src)]
    return out


@pytest.mark.parametrize("k", [3, 2])
def test_converter_against_conv_written_in_minkowski_order(k):
    """A dense conv written directly from MinkowskiEngine's kernel layout ``[k^3, C_in, C_out]`` and its
    offset order equals our conv with the converted weight (pins the converter without their library)."""
    B, n, ci, co = 1, 5, 3, 4
    kernel = torch.randn(k**3, ci, co, dtype=DT)
    dense = torch.randn(B, ci, n, n, n, dtype=DT)
    ref = torch.zeros(B, co, n, n, n, dtype=DT)
    for idx, d in enumerate(_minkowski_offsets(k)):  # out[o] += in[o + offset_idx] @ kernel[idx]
        ref += torch.einsum("bixyz,io->boxyz", _shift(dense, d), kernel[idx])
    conv = SparseConv3d(ci, co, k, backend="torch").to(DT)
    with torch.no_grad():
        conv.weight.copy_(weight_from_minkowski(kernel, k))
    coords = _grid(B, n)
    y = conv(SparseTensor(_from_dense(dense, coords), coords))
    torch.testing.assert_close(_to_dense(y, B, (n,) * 3), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weight_to_minkowski(conv.weight), kernel)


def test_transposed_converter_against_minkowski_order():
    """Transposed: fine f receives coarse c through offset k when f = c + offset_k (their swapped kernel map)."""
    B, n, ci, co, k = 1, 6, 3, 2, 3
    coords = _grid(B, n)
    x = SparseTensor(torch.zeros(len(coords), 1, dtype=DT), coords)
    coarse_c = x.cache.strided(1, 2)
    feats = torch.randn(len(coarse_c), ci, dtype=DT)
    kernel = torch.randn(k**3, ci, co, dtype=DT)
    up = SparseConv3d(ci, co, k, 2, transposed=True, backend="torch").to(DT)
    with torch.no_grad():
        up.weight.copy_(weight_from_minkowski(kernel, k, transposed=True))
    y = up(SparseTensor(feats, coarse_c, 2, x.cache))
    ref = torch.zeros(len(coords), co, dtype=DT)
    index = {tuple(c.tolist()): i for i, c in enumerate(coords)}
    for j, c in enumerate(coarse_c.tolist()):
        for idx, d in enumerate(_minkowski_offsets(k)):
            f = (c[0], c[1] + d[0], c[2] + d[1], c[3] + d[2])
            if f in index:
                ref[index[f]] += feats[j] @ kernel[idx]
    torch.testing.assert_close(y.features, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weight_to_minkowski(up.weight, transposed=True), kernel)


def test_kernel_size_one_layout():
    kernel = torch.randn(6, 4)  # MinkowskiEngine's [C_in, C_out] for a 1x1 conv
    w = weight_from_minkowski(kernel, 1)
    assert w.shape == (4, 6, 1, 1, 1)
    torch.testing.assert_close(weight_to_minkowski(w), kernel)


@pytest.mark.parametrize("k,s", [(3, 1), (3, 2), (2, 2)])
def test_sparse_set_with_negative_coordinates_matches_dense(k, s):
    torch.manual_seed(3)
    B, n, shift, ci, co = 2, 10, 6, 3, 4  # coordinates in [-6, 3]; shift is even so stride cells align
    g = _grid(B, n)
    keep = torch.rand(len(g)) < 0.3
    coords = g[keep].clone()
    coords[:, 1:] -= shift
    feats = torch.randn(len(coords), ci, dtype=DT)
    conv = SparseConv3d(ci, co, k, s, backend="torch").to(DT)
    y = conv(SparseTensor(feats, coords))
    # MinkowskiEngine's output voxels: floor(c / s) * s, unique
    want = coords.clone()
    want[:, 1:] = torch.div(want[:, 1:], s, rounding_mode="floor") * s
    assert torch.equal(y.coords, torch.unique(want, dim=0))
    dense = torch.zeros(B, ci, n, n, n, dtype=DT)
    dense[coords[:, 0], :, coords[:, 1] + shift, coords[:, 2] + shift, coords[:, 3] + shift] = feats
    ref = _dense_reference(conv, dense)
    c = y.coords
    got_ref = ref[c[:, 0], :, (c[:, 1] + shift) // s, (c[:, 2] + shift) // s, (c[:, 3] + shift) // s]
    torch.testing.assert_close(y.features, got_ref, rtol=1e-10, atol=1e-10)


def test_kernel_maps_are_built_once_and_shared():
    coords = _grid(1, 4)
    x = SparseTensor(torch.randn(len(coords), 2), coords)
    a, b = SparseConv3d(2, 3, backend="torch"), SparseConv3d(3, 3, backend="torch")
    y = b(a(x))
    assert y.cache is x.cache
    assert x.cache.kernel_map(1, 1, 3) is x.cache.kernel_map(1, 1, 3)
    assert len(x.cache._maps) == 1
    d = SparseConv3d(3, 4, 3, 2, backend="torch")(y)
    up = SparseConv3d(4, 3, 3, 2, transposed=True, backend="torch")(d)
    assert len(x.cache._maps) == 2  # the transposed conv reused the strided conv's map
    assert torch.equal(up.coords, coords)


def test_build_kernel_map_offsets_order():
    offs = kernel_offsets(3, 1, 1)
    assert offs.shape == (27, 3) and offs[0].tolist() == [-1, -1, -1] and offs[1].tolist() == [-1, -1, 0]
    c = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]])
    km = build_kernel_map(c, c, offs)
    assert sum(km.counts) == 4  # each voxel sees itself and its neighbour
    assert km.counts[13] == 2 and km.counts[22] == 1 and km.counts[4] == 1  # centre, +x, -x


def test_empty_set_and_errors():
    x = SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.long))
    y = SparseConv3d(3, 5, backend="torch")(x)
    assert y.features.shape == (0, 5)
    with pytest.raises(ValueError, match="input channels"):
        SparseConv3d(4, 5)(SparseTensor(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"coords must be \[N, 4\]"):
        SparseTensor(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="features must be"):
        SparseTensor(torch.zeros(3, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(KeyError, match="no coordinates at stride"):
        SparseConv3d(3, 2, 3, 2, transposed=True)(SparseTensor(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), 2))
    with pytest.raises(ValueError, match="not a multiple of stride"):
        SparseConv3d(3, 2, 3, 2, transposed=True)(SparseTensor(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), 1))
    with pytest.raises(ValueError, match="kernel_size"):
        SparseConv3d(3, 3, 0)
    with pytest.raises(ValueError, match="share the coordinate cache"):
        c = torch.zeros(1, 4, dtype=torch.long)
        sparse_cat(SparseTensor(torch.zeros(1, 1), c), SparseTensor(torch.zeros(1, 1), c))
    big = torch.tensor([[0, -(2**21), 0, 0], [0, 2**21, 2**21, 2**21]])
    with pytest.raises(ValueError, match="overflow"):
        CoordinateCache(big).kernel_map(1, 1, 3)


def test_autocast_mixed_dtypes():
    """Under bf16 autocast the products come out in bf16; scatter, BN-free chains and fp32 features mix."""
    coords = _grid(1, 4)
    x = SparseTensor(torch.randn(len(coords), 3), coords)
    a, b = SparseConv3d(3, 4, 3, 2, backend="torch"), SparseConv3d(4, 2, 3, 2, transposed=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = b(a(x))
    assert y.features.dtype == torch.bfloat16 and y.features.shape == (len(coords), 2)
    torch.testing.assert_close(y.features.float(), b(a(x)).features, atol=0.1, rtol=0.05)


def _backend_pair(device: str):
    torch.manual_seed(0)
    g = _grid(2, 6)
    coords = g[torch.rand(len(g)) < 0.5].to(device)
    feats = torch.randn(len(coords), 8, device=device, requires_grad=True)
    res = []
    for backend in ("torch", "spconv"):
        torch.manual_seed(1)
        down = SparseConv3d(8, 16, 3, 2, backend=backend).to(device)
        same = SparseConv3d(16, 16, 3, 1, backend=backend).to(device)
        up = SparseConv3d(16, 4, 3, 2, transposed=True, backend=backend).to(device)
        y = up(same(down(SparseTensor(feats, coords))))
        grads = torch.autograd.grad(y.features.square().sum(), (feats, down.weight, same.weight, up.weight))
        res.append((y.features.detach(), grads))
    return res


@pytest.mark.skipif(not available("spconv.pytorch"), reason="spconv not installed")
def test_spconv_backend_matches_torch_cpu():
    (a, ga), (b, gb) = _backend_pair("cpu")
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(not available("spconv.pytorch"), reason="spconv not installed")
def test_spconv_backend_matches_torch_cuda():
    (a, ga), (b, gb) = _backend_pair("cuda")
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-3)
