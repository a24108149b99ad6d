"""Sparse 3-D convolution on voxel sets, with MinkowskiEngine's semantics.

A :class:`SparseTensor` holds features ``[N, C]`` on integer voxel coordinates ``[N, 4]``
``(batch, x, y, z)``. Coordinates are kept in the units of the finest lattice, so a tensor of
stride ``s`` has coordinates that are multiples of ``s`` (MinkowskiEngine's "tensor stride").
All tensors of one network pass share a :class:`CoordinateCache`: the coordinate set of every
stride and every kernel map, each built once and reused by every layer that needs it.

Semantics (those of MinkowskiEngine 0.5, ``src/kernel_region.hpp``, ``coordinate_map_cpu.hpp``,
``coordinate_map_manager.cpp``; read for facts only):

- a stride-``t`` convolution from stride ``s`` writes to the coordinates ``floor(c / (s t)) * s t``
  of its input (unique per batch element);
- kernel offsets along one axis are ``(i - k // 2) * s`` for odd ``k`` and ``i * s`` for even ``k``
  (``i = 0 .. k-1``, times the dilation), where ``s`` is the *input* stride; output ``o`` reads
  input ``o + offset``;
- a transposed convolution from stride ``s t`` back to stride ``s`` writes to the coordinates that
  stride ``s`` already has in the cache (no new coordinates) and uses the forward map of the same
  kernel swapped: fine ``f`` receives coarse ``c`` through offset ``k`` where ``f = c + offset_k``;
- a kernel of size 1 with stride 1 is a matrix product on the same coordinates.

Weight layouts (ours): a convolution's weight is ``[C_out, C_in, k, k, k]`` and a transposed one's
``[C_in, C_out, k, k, k]``, the spatial axes in ``(x, y, z)`` order, exactly ``torch.nn.Conv3d`` /
``ConvTranspose3d`` on a dense grid indexed ``[x, y, z]`` -- so the dense twin is ``F.conv3d``.
MinkowskiEngine stores ``[k^3, C_in, C_out]`` with the kernel index ``ix + k iy + k^2 iz`` (x
fastest), and ``[C_in, C_out]`` for ``k = 1``; :func:`weight_from_minkowski` converts.

Backends: ``"torch"`` is the reference, a gather-GEMM-scatter in pure PyTorch (one matrix product
per kernel offset over all voxels at once, one scatter); ``"spconv"`` runs the same kernel maps
through spconv's native gather-GEMM-scatter (``pip install "vision3d[sparse]"``; CUDA or CPU);
``"auto"`` picks spconv for CUDA tensors when it is importable, else torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision3d.utils.optional import available, require

_MAX_KEY = 2**62


@dataclass
class KernelMap:
    """Pairs ``(input row, output row)`` of one convolution, grouped by kernel offset.

    ``in_idx``/``out_idx`` are sorted by kernel offset; ``counts[k]`` pairs belong to offset ``k``.
    """

    in_idx: Tensor  # [P] int64 rows of the input
    out_idx: Tensor  # [P] int64 rows of the output
    counts: list[int]  # [K] pairs per kernel offset
    num_in: int
    num_out: int
    _spconv: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def transposed(self) -> "KernelMap":
        """The same pairs read the other way (for the transposed convolution)."""
        return KernelMap(self.out_idx, self.in_idx, self.counts, self.num_out, self.num_in)

    def spconv_pairs(self) -> tuple[Tensor, Tensor]:
        """spconv's format: ``indice_pairs [2, K, max_count]`` int32 (-1 padded), ``indice_pair_num [K]`` int32."""
        if self._spconv is None:
            K, m = len(self.counts), max(self.counts, default=0)
            dev = self.in_idx.device
            pairs = torch.full((2, K, max(m, 1)), -1, dtype=torch.int32, device=dev)
            counts = torch.tensor(self.counts, dtype=torch.int64, device=dev)
            k_of = torch.repeat_interleave(torch.arange(K, device=dev), counts)
            start = torch.cumsum(counts, 0) - counts
            pos = torch.arange(self.in_idx.numel(), device=dev) - start[k_of]
            pairs[0, k_of, pos] = self.in_idx.to(torch.int32)
            pairs[1, k_of, pos] = self.out_idx.to(torch.int32)
            self._spconv = (pairs, counts.to(torch.int32))
        return self._spconv


def kernel_offsets(kernel_size: int, dilation: int, stride: int, device=None) -> Tensor:  # -> [k^3, 3]
    """Offsets of a cubic kernel in lattice units, in our weight order (x slowest, z fastest)."""
    i = torch.arange(kernel_size, device=device)
    if kernel_size % 2:
        i = i - kernel_size // 2
    i = i * dilation * stride
    gx, gy, gz = torch.meshgrid(i, i, i, indexing="ij")
    return torch.stack([gx, gy, gz], -1).reshape(-1, 3)


def _encode(coords: Tensor, lo: Tensor, extent: Tensor) -> Tensor:  # [..., 4] -> [...] int64
    c = coords - lo
    return ((c[..., 0] * extent[1] + c[..., 1]) * extent[2] + c[..., 2]) * extent[3] + c[..., 3]


def build_kernel_map(
    in_coords: Tensor,  # [N_in, 4] int64 (batch, x, y, z)
    out_coords: Tensor,  # [N_out, 4] int64
    offsets: Tensor,  # [K, 3] int64: output o reads input o + offsets[k]
) -> KernelMap:
    """All ``(input, output, k)`` with ``in_coords[input] == out_coords[output] + (0, offsets[k])``.

    Vectorised over voxels and offsets: the input coordinates are packed into sorted int64 keys
    and every query is answered by one ``searchsorted``.
    """
    K, n_in, n_out = offsets.shape[0], in_coords.shape[0], out_coords.shape[0]
    dev = in_coords.device
    if n_in == 0 or n_out == 0:
        e = torch.zeros(0, dtype=torch.long, device=dev)
        return KernelMap(e, e, [0] * K, n_in, n_out)
    lo = in_coords.min(0).values
    hi = in_coords.max(0).values
    extent = hi - lo + 1
    if math.prod(int(v) for v in extent) >= _MAX_KEY:
        raise ValueError(
            f"build_kernel_map: voxel coordinates span {extent.tolist()} (batch, x, y, z); the packed key "
            "would overflow int64 -- use a larger voxel size"
        )
    keys = _encode(in_coords, lo, extent)
    skeys, order = torch.sort(keys)
    q = out_coords[:, None, :].clone().expand(n_out, K, 4).clone()  # [N_out, K, 4]
    q[..., 1:] += offsets[None]
    inside = ((q >= lo) & (q <= hi)).all(-1)
    qk = _encode(torch.where(inside[..., None], q, lo), lo, extent)
    pos = torch.searchsorted(skeys, qk).clamp_max(n_in - 1)
    found = inside & (skeys[pos] == qk)  # [N_out, K]
    k_idx, o_idx = found.t().nonzero(as_tuple=True)  # sorted by k, then output row
    i_idx = order[pos.t()[k_idx, o_idx]]
    counts = torch.bincount(k_idx, minlength=K).tolist()
    return KernelMap(i_idx, o_idx, counts, n_in, n_out)


class CoordinateCache:
    """The coordinate sets (one per stride) and kernel maps of one sparse network pass."""

    def __init__(self, coords: Tensor, stride: int = 1) -> None:  # coords [N, 4] int64
        self._coords: dict[int, Tensor] = {stride: coords}
        self._maps: dict[tuple, KernelMap] = {}

    def coords(self, stride: int) -> Tensor:  # [N_s, 4]
        if stride not in self._coords:
            raise KeyError(f"no coordinates at stride {stride}; known strides {sorted(self._coords)}")
        return self._coords[stride]

    def strided(self, stride_from: int, stride_to: int) -> Tensor:  # [N_to, 4]
        """Coordinates at ``stride_to``, made from those at ``stride_from`` by flooring (once)."""
        if stride_to not in self._coords:
            c = self.coords(stride_from).clone()
            c[:, 1:] = torch.div(c[:, 1:], stride_to, rounding_mode="floor") * stride_to
            self._coords[stride_to] = torch.unique(c, dim=0)
        return self._coords[stride_to]

    def kernel_map(self, stride_in: int, stride_out: int, kernel_size: int, dilation: int = 1) -> KernelMap:
        key = (stride_in, stride_out, kernel_size, dilation)
        if key not in self._maps:
            cin, cout = self.coords(stride_in), self.coords(stride_out)
            offs = kernel_offsets(kernel_size, dilation, stride_in, device=cin.device)
            self._maps[key] = build_kernel_map(cin, cout, offs)
        return self._maps[key]


@dataclass
class SparseTensor:
    """Features on voxels: ``features [N, C]`` at ``coords [N, 4]`` (batch, x, y, z), multiples of ``stride``."""

    features: Tensor  # [N, C]
    coords: Tensor  # [N, 4] int64
    stride: int = 1
    cache: CoordinateCache | None = None

    def __post_init__(self) -> None:
        if self.coords.ndim != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"SparseTensor: coords must be [N, 4] (batch, x, y, z), got {tuple(self.coords.shape)}")
        if self.features.ndim != 2 or self.features.shape[0] != self.coords.shape[0]:
            raise ValueError(
                f"SparseTensor: features must be [N, C] with N = {self.coords.shape[0]} rows, "
                f"got {tuple(self.features.shape)}"
            )
        if self.coords.dtype != torch.long:
            self.coords = self.coords.long()
        if self.cache is None:
            self.cache = CoordinateCache(self.coords, self.stride)

    def replace(self, features: Tensor) -> "SparseTensor":
        """Same voxels, new features ``[N, C']``."""
        return SparseTensor(features, self.coords, self.stride, self.cache)

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    def __len__(self) -> int:
        return self.features.shape[0]


def sparse_cat(*xs: SparseTensor) -> SparseTensor:
    """Concatenate the channels of tensors on the same voxels (MinkowskiEngine's ``ME.cat``)."""
    first = xs[0]
    for x in xs[1:]:
        if x.cache is not first.cache or x.stride != first.stride:
            raise ValueError("sparse_cat: all tensors must share the coordinate cache and stride")
    return first.replace(torch.cat([x.features for x in xs], 1))


def weight_from_minkowski(kernel: Tensor, kernel_size: int, transposed: bool = False) -> Tensor:
    """MinkowskiEngine kernel ``[k^3, C_in, C_out]`` (or ``[C_in, C_out]`` for k = 1) -> our layout."""
    if kernel.ndim == 2:
        kernel = kernel[None]
    kv, cin, cout = kernel.shape
    if kv != kernel_size**3:
        raise ValueError(f"weight_from_minkowski: kernel has {kv} offsets, expected {kernel_size}^3")
    k = kernel_size
    w = kernel.reshape(k, k, k, cin, cout)  # [iz, iy, ix, C_in, C_out]: x fastest
    w = w.permute(2, 1, 0, 3, 4)  # [ix, iy, iz, C_in, C_out]
    perm = (3, 4, 0, 1, 2) if transposed else (4, 3, 0, 1, 2)
    return w.permute(*perm).contiguous()


def weight_to_minkowski(weight: Tensor, transposed: bool = False) -> Tensor:
    """Our ``[C_out, C_in, k, k, k]`` (``[C_in, C_out, ...]`` if transposed) -> MinkowskiEngine's layout."""
    w = weight if transposed else weight.transpose(0, 1)  # [C_in, C_out, kx, ky, kz]
    cin, cout, k = w.shape[0], w.shape[1], w.shape[2]
    w = w.permute(4, 3, 2, 0, 1).reshape(k**3, cin, cout)  # z slowest, x fastest
    return w[0] if k == 1 else w.contiguous()


def _gemm_torch(x: Tensor, w: Tensor, kmap: KernelMap) -> Tensor:  # x [N_in, C_in], w [K, C_in, C_out]
    if kmap.in_idx.numel() == 0:
        return x.new_zeros(kmap.num_out, w.shape[2]) + 0.0 * w.sum()  # keep the graph for empty maps
    gathered = x.index_select(0, kmap.in_idx)  # [P, C_in]
    parts, start = [], 0
    for k, n in enumerate(kmap.counts):
        if n:
            parts.append(gathered[start : start + n] @ w[k])
            start += n
    products = torch.cat(parts, 0)  # [P, C_out], in the autocast dtype when autocast is on
    return products.new_zeros(kmap.num_out, w.shape[2]).index_add_(0, kmap.out_idx, products)


def _gemm_spconv(x: Tensor, w: Tensor, kmap: KernelMap) -> Tensor:  # same contract as _gemm_torch
    require("spconv.pytorch", "the spconv sparse-convolution backend")
    from spconv.core import ConvAlgo
    from spconv.pytorch.functional import SparseConvFunction

    pairs, num = kmap.spconv_pairs()
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    filters = w.permute(2, 0, 1).to(dtype).contiguous()  # [C_out, K, C_in] (spconv's KRSC)
    return SparseConvFunction.apply(x.to(dtype).contiguous(), filters, pairs, num, kmap.num_out, ConvAlgo.Native)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "spconv" if device.type == "cuda" and available("spconv.pytorch") else "torch"
    if backend not in ("torch", "spconv"):
        raise ValueError(f"sparse backend must be 'auto', 'torch' or 'spconv', got {backend!r}")
    return backend


class SparseConv3d(nn.Module):
    """Sparse 3-D (transposed) convolution with MinkowskiEngine's output coordinates and kernel maps.

    Args:
        in_channels, out_channels: feature widths.
        kernel_size: cube side ``k``.
        stride: ``t``; a convolution goes from stride ``s`` to ``s t``, a transposed one from ``s t`` to ``s``.
        dilation: spacing of the kernel taps (in input-stride units).
        bias: add a learned bias (MinkowskiEngine's default is none).
        transposed: the transposed convolution (upsampling onto coordinates already in the cache).
        backend: ``auto`` | ``torch`` | ``spconv``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = False,
        transposed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if kernel_size < 1 or stride < 1 or dilation < 1:
            raise ValueError(
                f"SparseConv3d: kernel_size={kernel_size}, stride={stride}, dilation={dilation} must all be >= 1"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.transposed, self.backend = transposed, backend
        k = kernel_size
        shape = (in_channels, out_channels, k, k, k) if transposed else (out_channels, in_channels, k, k, k)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # MinkowskiEngine's reset: uniform(+-1/sqrt(fan)), fan over the kernel volume
        fan = (self.out_channels if self.transposed else self.in_channels) * self.kernel_size**3
        nn.init.uniform_(self.weight, -1 / math.sqrt(fan), 1 / math.sqrt(fan))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def kernel_matrix(self) -> Tensor:  # [k^3, C_in, C_out] in our offset order
        w = self.weight.flatten(2)
        return w.permute(2, 0, 1) if self.transposed else w.permute(2, 1, 0)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.in_channels:
            raise ValueError(f"SparseConv3d: expected {self.in_channels} input channels, got {x.num_channels}")
        cache = x.cache
        if self.kernel_size == 1 and self.stride == 1:
            out = x.features @ self.kernel_matrix()[0]
            coords, stride = x.coords, x.stride
        else:
            if self.transposed:
                if x.stride % self.stride:
                    raise ValueError(
                        f"SparseConv3d(transposed): input stride {x.stride} is not a multiple of stride {self.stride}"
                    )
                stride = x.stride // self.stride
                coords = cache.coords(stride)
                kmap = cache.kernel_map(stride, x.stride, self.kernel_size, self.dilation).transposed()
            else:
                stride = x.stride * self.stride
                coords = cache.strided(x.stride, stride)
                kmap = cache.kernel_map(x.stride, stride, self.kernel_size, self.dilation)
            gemm = _gemm_spconv if resolve_backend(self.backend, x.features.device) == "spconv" else _gemm_torch
            out = gemm(x.features, self.kernel_matrix(), kmap)
        if self.bias is not None:
            out = out + self.bias
        return SparseTensor(out, coords, stride, cache)

    def extra_repr(self) -> str:
        t = ", transposed" if self.transposed else ""
        return f"{self.in_channels}, {self.out_channels}, k={self.kernel_size}, stride={self.stride}{t}"


class SparseBatchNorm(nn.BatchNorm1d):
    """Batch norm over all voxels of the batch (MinkowskiEngine's ``MinkowskiBatchNorm``)."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.features))


class SparseLinear(nn.Linear):
    """Per-voxel linear layer (MinkowskiEngine's ``MinkowskiLinear``)."""

    def forward(self, x: SparseTensor) -> SparseTensor:  # type: ignore[override]
        return x.replace(super().forward(x.features))


class SparseConvNormAct(nn.Module):
    """Convolution, batch norm, ReLU (the encoder and decoder unit of sparse U-Nets)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        transposed: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.conv = SparseConv3d(
            in_channels, out_channels, kernel_size, stride, transposed=transposed, backend=backend
        )
        self.norm = SparseBatchNorm(out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = self.norm(self.conv(x))
        return x.replace(F.relu(x.features))
