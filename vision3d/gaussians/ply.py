"""Gaussian scenes on disk: the INRIA 3DGS PLY layout and the antimatter15 ``.splat`` format.

PLY layout (graphdeco-inria/gaussian-splatting, ``scene/gaussian_model.py``, ``save_ply`` and
``load_ply``; Kerbl et al., "3D Gaussian Splatting for Real-Time Radiance Field Rendering",
SIGGRAPH 2023, arXiv 2308.04079; code under the Inria/MPII non-commercial licence, read for the
layout only): one ``vertex`` element of float32 properties, in this order

    x y z  nx ny nz  f_dc_0..2  f_rest_0..(3*(K-1)-1)  opacity  scale_0..2  rot_0..3

where ``f_rest`` is **channel-major** (the K-1 higher-band coefficients of red, then of green,
then of blue: the authors store ``[N, K-1, 3]`` and write ``transpose(1, 2).flatten(1)``),
``opacity`` is the logit of the opacity, ``scale_*`` the natural log of the standard deviations,
``rot_*`` a quaternion ``wxyz`` and the normals are zero. SuperSplat, viser and the INRIA viewers
read this layout.

``.splat`` (antimatter15/splat, ``convert.py``, MIT licence): 32 bytes per Gaussian, little-endian,
position ``f32x3``, activated scale ``f32x3``, colour RGBA ``u8x4`` (DC colour and opacity times 255,
clipped, truncated), rotation ``u8x4`` (unit quaternion wxyz mapped by ``q * 128 + 128``, clipped,
truncated); Gaussians sorted by decreasing ``scale_0 * scale_1 * scale_2 * opacity``.

Both writers go through :func:`vision3d.utils.io.atomic_path`, so an interrupted write never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vision3d.errors import InputError, check_count, guard
from vision3d.utils.io import atomic_path

from .gaussians import SH_C0, Gaussians, num_sh_bases

__all__ = ["save_ply", "load_ply", "read_ply_header", "PlyHeader", "save_splat", "load_splat", "ply_property_names"]

# PLY scalar type names (both spellings of the spec) -> numpy kind and size
_PLY_TYPES = {
    "char": "i1", "int8": "i1",
    "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4",
    "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4",
    "double": "f8", "float64": "f8",
}  # fmt: skip
_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_VALID_REST = {3 * (num_sh_bases(d) - 1): d for d in range(4)}  # f_rest count -> SH degree
_OPACITY_EPS = 1e-12  # opacities are clamped to [eps, 1 - eps] before the logit so 0 and 1 stay finite
_MIN_SCALE = 1e-30  # scales are clamped from below before the log so 0 stays finite


# ---------------------------------------------------------------------------------------- header
@dataclass
class PlyElement:
    name: str
    count: int
    properties: list[tuple[str, str]]  # (name, numpy kind such as "f4"); list properties have kind "list"


@dataclass
class PlyHeader:
    format: str  # "ascii", "binary_little_endian" or "binary_big_endian"
    elements: list[PlyElement]
    data_offset: int  # byte offset of the first element's data

    def element(self, name: str) -> PlyElement | None:
        return next((e for e in self.elements if e.name == name), None)


_MAX_HEADER = 16 * 2**20  # a longer header (a 15 MB comment...) is refused


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    parts: list[bytes] = []
    size = 0
    with open(path, "rb") as f:
        tail = b""
        while True:
            chunk = f.read(65536)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            # search only the new bytes (and the few before them that could start the marker): linear time
            if b"end_header" in tail + chunk:
                break
            tail = chunk[-len(b"end_header") :]
            if size > _MAX_HEADER:
                raise InputError(path, "header", f"a PLY header under {_MAX_HEADER // 2**20} MiB ending in 'end_header'", f"no 'end_header' in the first {size} bytes")
    head = b"".join(parts)
    if not head.startswith(b"ply"):
        raise ValueError(f"{path}: not a PLY file (it does not start with 'ply')")
    end = head.find(b"end_header")
    if end < 0:
        raise ValueError(f"{path}: truncated or malformed PLY header (no 'end_header' line)")
    nl = head.find(b"\n", end)
    if nl < 0:
        raise ValueError(f"{path}: truncated PLY file (nothing after 'end_header')")
    return head[:end], nl + 1


def read_ply_header(path: str | os.PathLike) -> PlyHeader:
    """Parse the header of a PLY file (any format, any elements)."""
    path = Path(path)
    with guard(path, "a PLY header"):
        return _parse_header(path)


def _parse_header(path: Path) -> PlyHeader:
    text, offset = _read_header_bytes(path)
    fmt = None
    elements: list[PlyElement] = []
    for lineno, raw in enumerate(text.decode("latin-1").splitlines(), 1):
        tok = raw.split()
        if not tok or tok[0] in ("ply", "comment", "obj_info"):
            continue
        if tok[0] == "format":
            if len(tok) < 2 or tok[1] not in _FORMATS:
                raise ValueError(f"{path}: unknown PLY format line {raw.strip()!r} (line {lineno})")
            fmt = tok[1]
        elif tok[0] == "element":
            if len(tok) != 3 or not tok[2].isdigit():
                raise ValueError(f"{path}: malformed element line {raw.strip()!r} (line {lineno})")
            elements.append(PlyElement(tok[1], int(tok[2]), []))
        elif tok[0] == "property":
            if not elements:
                raise ValueError(f"{path}: property before any element (line {lineno})")
            if len(tok) == 5 and tok[1] == "list":
                elements[-1].properties.append((tok[4], "list"))
            elif len(tok) == 3 and tok[1] in _PLY_TYPES:
                elements[-1].properties.append((tok[2], _PLY_TYPES[tok[1]]))
            else:
                raise ValueError(f"{path}: unsupported property line {raw.strip()!r} (line {lineno})")
        else:
            raise ValueError(f"{path}: unexpected PLY header line {raw.strip()!r} (line {lineno})")
    if fmt is None:
        raise ValueError(f"{path}: PLY header has no 'format' line")
    return PlyHeader(fmt, elements, offset)


# ---------------------------------------------------------------------------------------- reading
class _VertexTable:
    """The vertex element's data: one ``[n, P]`` matrix when every property has one type (the
    usual case, read with a single copy), else one array per property."""

    def __init__(self, path: Path, names: list[str], n: int, matrix=None, columns=None):
        self.path, self.names, self.n = path, names, n
        self.matrix, self.columns = matrix, columns
        self.index = {name: j for j, name in enumerate(names)}

    def require(self, name: str) -> None:
        if name not in self.index:
            raise ValueError(
                f"{self.path}: vertex property '{name}' is missing; expected the INRIA 3DGS layout "
                f"(x y z, f_dc_0..2, f_rest_*, opacity, scale_0..2, rot_0..3)"
            )

    def take(self, names: list[str], validate: bool) -> np.ndarray:  # [n, len(names)]
        for name in names:
            self.require(name)
        if not names:
            return np.zeros((self.n, 0), np.float32)
        if self.matrix is not None:
            out = self.matrix[:, [self.index[s] for s in names]]
        else:
            out = np.stack([self.columns[s] for s in names], axis=1)
        if validate:
            finite = np.isfinite(out)
            if not finite.all():
                j = int(np.argmin(finite.all(axis=0)))
                bad = int(np.count_nonzero(~finite[:, j]))
                raise ValueError(f"{self.path}: vertex property '{names[j]}' has {bad} non-finite values (NaN or inf)")
        return out


def _vertex_table(path: Path, header: PlyHeader) -> _VertexTable:
    idx = next((i for i, e in enumerate(header.elements) if e.name == "vertex"), None)
    if idx is None:
        raise ValueError(f"{path}: PLY file has no 'vertex' element; expected the INRIA 3DGS layout")
    vertex = header.elements[idx]
    if any(kind == "list" for _, kind in vertex.properties):
        bad = [n for n, k in vertex.properties if k == "list"]
        raise ValueError(f"{path}: vertex element has list properties {bad}; a 3DGS PLY has scalar properties only")
    n, p = vertex.count, len(vertex.properties)
    names = [name for name, _ in vertex.properties]
    kinds = {kind for _, kind in vertex.properties}
    if header.format == "ascii":
        # each vertex line holds p numbers of at least one character plus separators
        check_count(path, "element vertex count", n, max(1, 2 * p), max(0, path.stat().st_size - header.data_offset))
        with open(path, "rb") as f:
            f.seek(header.data_offset)
            lines = f.read().decode("latin-1").splitlines()
        skip = sum(e.count for e in header.elements[:idx])
        rows = lines[skip : skip + n]
        if len(rows) < n:
            raise ValueError(f"{path}: truncated ASCII PLY: expected {n} vertex lines, found {len(rows)}")
        try:
            flat = np.array(" ".join(rows).split(), dtype=np.float64)
        except ValueError as e:
            raise ValueError(f"{path}: malformed ASCII PLY vertex data ({e})") from e
        if flat.size != n * p:
            raise ValueError(f"{path}: malformed ASCII PLY: expected {p} values on each of {n} vertex lines")
        table = flat.reshape(n, p)
        if len(kinds) == 1:
            return _VertexTable(path, names, n, matrix=table.astype(kinds.pop()))
        cols = {name: table[:, j].astype(kind) for j, (name, kind) in enumerate(vertex.properties)}
        return _VertexTable(path, names, n, columns=cols)
    order = _FORMATS[header.format]
    skip_bytes = 0
    for e in header.elements[:idx]:
        if any(kind == "list" for _, kind in e.properties):
            raise ValueError(
                f"{path}: element '{e.name}' with list properties precedes 'vertex'; cannot locate the vertex data"
            )
        skip_bytes += e.count * sum(np.dtype(kind).itemsize for _, kind in e.properties)
    record = np.dtype([(name, order + kind) for name, kind in vertex.properties])
    available = max(0, path.stat().st_size - header.data_offset - skip_bytes)
    if n * record.itemsize > available:  # checked before reading, so a huge count allocates nothing
        raise InputError(
            path, "element vertex count", f"at most {available // max(1, record.itemsize)} vertices "
            f"({available} data bytes at {record.itemsize} bytes each)", n,
        )
    need = n * record.itemsize
    with open(path, "rb") as f:
        f.seek(header.data_offset + skip_bytes)
        buf = f.read(need)
    if len(buf) < need:
        raise ValueError(f"{path}: truncated PLY file: the {n} vertices need {need} bytes of data, found {len(buf)}")
    if len(kinds) == 1:
        kind = np.dtype(order + kinds.pop())
        matrix = np.frombuffer(buf, dtype=kind, count=n * p).reshape(n, p)
        return _VertexTable(path, names, n, matrix=matrix.astype(kind.newbyteorder("="), copy=False))
    arr = np.frombuffer(buf, dtype=record, count=n)
    cols = {name: arr[name].astype(arr[name].dtype.newbyteorder("="), copy=False) for name in names}
    return _VertexTable(path, names, n, columns=cols)


def load_ply(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    validate: bool = True,
) -> Gaussians:
    """Read a 3DGS PLY (INRIA layout; binary little/big-endian or ASCII) into unbatched Gaussians.

    Extra vertex properties (normals, per-Gaussian features written by other tools) are ignored.
    Scales are activated with ``exp``, opacities with ``sigmoid`` (both in float64), quaternions are
    returned as stored (wxyz, not renormalised). Raises ``ValueError`` naming the file and the
    problem for a missing property, an ``f_rest`` count that is not ``3 * ((d+1)^2 - 1)`` for a
    degree ``d`` in 0..3, a truncated file, or (with ``validate``) a property holding NaN/inf, a
    scale that overflows ``dtype`` or an all-zero quaternion.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such PLY file")
    with guard(path, "a 3DGS PLY file (INRIA layout)"):
        return _load_ply(path, device, dtype, validate)


def _load_ply(path: Path, device, dtype: torch.dtype, validate: bool) -> Gaussians:
    table = _vertex_table(path, read_ply_header(path))
    n = table.n
    n_rest = sum(1 for name in table.names if name.startswith("f_rest_"))
    if n_rest not in _VALID_REST:
        raise ValueError(f"{path}: {n_rest} f_rest_* properties; expected 0, 9, 24 or 45 (SH degree 0..3)")
    k = num_sh_bases(_VALID_REST[n_rest])

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    means = table.take(["x", "y", "z"], validate)
    # f_dc then f_rest (channel-major [n, 3, k-1]) -> [n, k, 3]
    coeffs = table.take([f"f_dc_{i}" for i in range(3)] + [f"f_rest_{i}" for i in range(3 * (k - 1))], validate)
    rest = coeffs[:, 3:].reshape(n, 3, k - 1).transpose(0, 2, 1)
    sh = np.concatenate([coeffs[:, None, :3], rest], axis=1)
    log_scales = table.take([f"scale_{i}" for i in range(3)], validate).astype(np.float64)
    logit_opac = table.take(["opacity"], validate)[:, 0].astype(np.float64)
    quats = table.take([f"rot_{i}" for i in range(4)], validate)
    with np.errstate(over="ignore"):
        scales = tensor(np.exp(log_scales))
        opacities = tensor(1.0 / (1.0 + np.exp(-logit_opac)))
    if validate:
        if not torch.isfinite(scales).all():
            raise ValueError(f"{path}: vertex properties 'scale_*' hold log-scales too large for {dtype} after exp")
        if (np.abs(quats).sum(axis=1) == 0).any():
            raise ValueError(f"{path}: vertex properties 'rot_0..3' hold all-zero quaternions")
    return Gaussians(tensor(means), tensor(quats), scales, opacities, tensor(sh))


# ---------------------------------------------------------------------------------------- writing
def ply_property_names(sh_degree: int) -> list[str]:
    """The INRIA vertex property names, in file order, for SH degree ``sh_degree``."""
    k = num_sh_bases(sh_degree)
    return (
        ["x", "y", "z", "nx", "ny", "nz"]
        + [f"f_dc_{i}" for i in range(3)]
        + [f"f_rest_{i}" for i in range(3 * (k - 1))]
        + ["opacity"]
        + [f"scale_{i}" for i in range(3)]
        + [f"rot_{i}" for i in range(4)]
    )


def _check_unbatched(g: Gaussians, what: str) -> None:
    if not isinstance(g, Gaussians):
        raise TypeError(f"{what}: expected Gaussians, got {type(g).__name__}")
    if len(g.batch_shape) != 0:
        raise ValueError(
            f"{what}: expected unbatched Gaussians [N, ...], got batch shape {tuple(g.batch_shape)}; "
            "index the batch or call .flatten_batch() first"
        )


def save_ply(path: str | os.PathLike, gaussians: Gaussians, *, sh_degree: int | None = None) -> Path:
    """Write unbatched Gaussians as a binary little-endian INRIA 3DGS PLY, atomically.

    Args:
        path: output file (its folder is created).
        gaussians: unbatched, ``N`` Gaussians; validated first (no NaN/inf, scales >= 0, opacities
            in [0, 1]) so a bad scene raises ``ValueError`` naming the field instead of being written.
        sh_degree: write only bands ``0..sh_degree`` (zero-padded if above the scene's degree);
            ``None`` keeps every coefficient.

    Means, SH coefficients and quaternions are written as their float32 values (bitwise round trip);
    scales go through ``log`` and opacities through ``logit`` in float64, clamped so that 0 and 1
    stay finite (opacity to ``[1e-12, 1 - 1e-12]``, scales to ``>= 1e-30``).
    """
    path = Path(path)
    _check_unbatched(gaussians, f"save_ply({path})")
    g = gaussians.detach()
    if sh_degree is not None:
        g = g.with_sh_degree(int(sh_degree))
    g.validate(source=f"save_ply({path})")
    n, k = g.num, g.sh.shape[-2]
    names = ply_property_names(g.sh_degree)

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.to(device="cpu", dtype=torch.float32).numpy()

    def f64(t: torch.Tensor) -> np.ndarray:
        return t.to(device="cpu", dtype=torch.float64).numpy()

    opac = np.clip(f64(g.opacities), _OPACITY_EPS, 1.0 - _OPACITY_EPS)
    table = np.empty((n, len(names)), dtype="<f4")
    table[:, 0:3] = f32(g.means)
    table[:, 3:6] = 0.0
    sh = f32(g.sh)  # [n, k, 3]
    table[:, 6:9] = sh[:, 0, :]
    r = 9 + 3 * (k - 1)
    table[:, 9:r] = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, 3 * (k - 1))
    table[:, r] = np.log(opac / (1.0 - opac))
    table[:, r + 1 : r + 4] = np.log(np.maximum(f64(g.scales), _MIN_SCALE))
    table[:, r + 4 : r + 8] = f32(g.quats)
    record = np.dtype([(name, "<f4") for name in names])
    vertices = table.view(record).reshape(n)  # one structured record per Gaussian

    head = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    head += [f"property float {name}" for name in names]
    head += ["end_header"]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(("\n".join(head) + "\n").encode("ascii"))
            f.write(memoryview(vertices).cast("B"))  # the records, without another copy
    return path


# ---------------------------------------------------------------------------------------- .splat
_SPLAT_RECORD = np.dtype([("position", "<f4", 3), ("scale", "<f4", 3), ("rgba", "u1", 4), ("rot", "u1", 4)])


def save_splat(path: str | os.PathLike, gaussians: Gaussians) -> Path:
    """Write unbatched Gaussians in the antimatter15 ``.splat`` format (32 bytes each), atomically.

    Only the DC colour is kept (view-dependent bands are dropped), opacity and colour are quantised
    to 8 bits and the unit quaternion to 8 bits per component, as that viewer expects. Gaussians
    are sorted by decreasing ``scale_0 * scale_1 * scale_2 * opacity`` (the viewer's order).
    """
    path = Path(path)
    _check_unbatched(gaussians, f"save_splat({path})")
    g = gaussians.detach()
    g.validate(source=f"save_splat({path})")
    scales = g.scales.to("cpu", torch.float64).numpy()
    opac = g.opacities.to("cpu", torch.float64).numpy()
    order = np.argsort(-(scales.prod(axis=1) * opac), kind="stable")
    rgb = 0.5 + SH_C0 * g.sh[:, 0, :].to("cpu", torch.float64).numpy()
    rgba = np.concatenate([rgb, opac[:, None]], axis=1)
    q = g.quats.to("cpu", torch.float64).numpy()
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = np.empty(g.num, dtype=_SPLAT_RECORD)
    out["position"] = g.means.to("cpu", torch.float32).numpy()[order]
    out["scale"] = scales.astype(np.float32)[order]
    out["rgba"] = np.clip(rgba * 255.0, 0, 255).astype(np.uint8)[order]
    out["rot"] = np.clip(q * 128.0 + 128.0, 0, 255).astype(np.uint8)[order]
    with atomic_path(path) as tmp:
        tmp.write_bytes(out.tobytes())
    return path


def load_splat(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Gaussians:
    """Read an antimatter15 ``.splat`` file into unbatched SH-degree-0 Gaussians (8-bit precision)."""
    path = Path(path)
    with guard(path, "an antimatter15 .splat file"):
        return _load_splat(path, device, dtype)


def _load_splat(path: Path, device, dtype: torch.dtype) -> Gaussians:
    data = path.read_bytes()
    if len(data) % _SPLAT_RECORD.itemsize:
        raise ValueError(
            f"{path}: a .splat file holds 32-byte records; {len(data)} bytes is not a multiple of 32 (truncated?)"
        )
    rec = np.frombuffer(data, dtype=_SPLAT_RECORD)
    rgba = rec["rgba"].astype(np.float64) / 255.0
    q = (rec["rot"].astype(np.float64) - 128.0) / 128.0
    bad = np.linalg.norm(q, axis=1) == 0
    q[bad] = (1.0, 0.0, 0.0, 0.0)

    def tensor(a: np.ndarray) -> torch.Tensor:  # copies: the records view a read-only buffer
        return torch.from_numpy(np.array(a, order="C", copy=True)).to(device=device, dtype=dtype)

    sh = ((rgba[:, :3] - 0.5) / SH_C0)[:, None, :]
    return Gaussians(tensor(rec["position"]), tensor(q), tensor(rec["scale"]), tensor(rgba[:, 3]), tensor(sh)).validate(
        source=str(path)
    )
