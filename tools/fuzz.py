"""Fuzz vision3d's loaders with mutated files: every case must end in ``InputError`` or a correct load.

Seven targets, each a small valid file written by our own writers and then mutated:

    ply            3DGS PLY (binary and ASCII)            vision3d.gaussians.load_ply
    colmap_text    COLMAP cameras/images/points3D .txt      vision3d.geometry.colmap.read_colmap
    colmap_bin     the same, binary                         read_colmap
    transforms     nerfstudio/NeRF transforms.json          vision3d.geometry.transforms_json.read_transforms_json
    re10k          pixelSplat .torch chunk (+ decoding)     vision3d.data.re10k.read_chunk + decode_image
    checkpoint     .safetensors / .pt and the iLRM converter vision3d.utils.io.read_checkpoint, convert_ilrm_checkpoint
    images         PNG/JPEG files of an image folder        vision3d.data.folder.read_image

Mutations: byte flips, truncation, random insertions, duplicated spans; for text formats, a number
token replaced by a hostile one (``nan``, ``inf``, ``0``, ``-1``, ``1e309``, a 40-digit integer...);
for JSON and chunk records, one value of the parsed tree replaced by a hostile value (``None``,
NaN, a huge int, ``"../../etc/passwd"``, a deeply nested list, an int where a tensor belongs...).

Outcomes per case: ``ok`` (loaded; the result is checked to be finite where it is numeric),
``input_error`` (our error type, message names the file), ``missing_file`` (a
``FileNotFoundError`` for a file the mutated one refers to), and failures: ``wrong_error``
(any other exception), ``slow`` (over ``--max-seconds``), ``memory`` (peak RSS grew more than
``--max-mb``). Usage::

    python tools/fuzz.py --cases 300            # all targets
    python tools/fuzz.py --targets ply re10k --cases 50 --json fuzz.json

``tests/utils/test_fuzz.py`` runs a few cases of each target under hypothesis.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

HOSTILE_NUMBERS = ["nan", "inf", "-inf", "0", "-1", "-0", "1e309", "1e-320", "99999999999999999999999999999999999999", "abc", "", "0x10"]


def _hostile_values():
    deep: list = []
    cur = deep
    for _ in range(3000):
        cur.append([])
        cur = cur[0]
    return [
        None, 0, -1, 0.0, -1e-9, float("nan"), float("inf"), 10**40, True, "x", "", "../../etc/passwd",
        "/etc/passwd", [], {}, [[0.0] * 4] * 4, [[float("nan")] * 4] * 4, [[0.0] * 4] * 3, "é" * 50, deep,
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------- mutators
def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One byte-level mutation: flip, truncate, insert, duplicate or zero a span."""
    b = bytearray(data)
    kind = rng.randrange(5)
    if not b:
        return bytes(rng.randrange(256) for _ in range(8))
    if kind == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
    elif kind == 1:  # truncate
        del b[rng.randrange(len(b)) :]
    elif kind == 2:  # insert random bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == 3:  # duplicate a span
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randint(1, 256))
        b[i:i] = b[i:j]
    else:  # zero a span
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 32)] = b"\0" * len(b[i : i + 32][: rng.randint(1, 32)])
    return bytes(b)


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    """Replace one whitespace-separated token (numbers preferred) with a hostile one, or mutate bytes."""
    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    text = data.decode("latin-1")
    toks = text.split(" ")
    numeric = [i for i, t in enumerate(toks) if t.strip().lstrip("-").replace(".", "", 1).replace("e", "", 1).isdigit()]
    idx = rng.choice(numeric) if numeric and rng.random() < 0.8 else rng.randrange(len(toks))
    tail = "\n" if toks[idx].endswith("\n") else ""
    toks[idx] = rng.choice(HOSTILE_NUMBERS) + tail
    return " ".join(toks).encode("latin-1")


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, prefix + (i,))


def mutate_tree(tree, rng: random.Random, values=None):
    """Replace one value (at any depth) of a JSON-like tree with a hostile value; returns the new tree."""
    import copy

    tree = copy.deepcopy(tree)
    spots = [p for p in _paths(tree) if p]
    if not spots:
        return rng.choice(values or _hostile_values())
    spot = rng.choice(spots)
    node = tree
    for k in spot[:-1]:
        node = node[k]
    node[spot[-1]] = rng.choice(values or _hostile_values())
    return tree


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.25:
        return mutate_bytes(data, rng)
    tree = mutate_tree(json.loads(data), rng)
    try:
        return json.dumps(tree).encode()
    except (RecursionError, ValueError):
        return data[: len(data) // 2]


# ---------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    name: str
    make: Callable[[Path, random.Random], Path]  # writes a valid seed under the folder; returns the file to mutate
    mutate: Callable[[bytes, random.Random], bytes]
    load: Callable[[Path], object]  # loads (the folder or file) and checks the result


def _gaussians(n: int, degree: int, gen: torch.Generator):
    from vision3d.gaussians import Gaussians

    k = (degree + 1) ** 2
    return Gaussians(
        torch.randn(n, 3, generator=gen),
        torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1),
        torch.rand(n, 3, generator=gen) * 0.1 + 0.01,
        torch.rand(n, generator=gen),
        torch.randn(n, k, 3, generator=gen) * 0.3,
    )


def _make_ply(folder: Path, rng: random.Random) -> Path:
    from vision3d.gaussians import save_ply

    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    p = folder / "scene.ply"
    save_ply(p, _gaussians(rng.randint(1, 6), rng.choice([0, 1]), gen))
    if rng.random() < 0.4:  # an ASCII twin of the same file
        from vision3d.gaussians.ply import read_ply_header

        h = read_ply_header(p)
        data = p.read_bytes()
        names = [n for n, _ in h.elements[0].properties]
        arr = np.frombuffer(data[h.data_offset :], dtype="<f4").reshape(h.elements[0].count, len(names))
        head = data[: h.data_offset].decode("latin-1").replace("binary_little_endian", "ascii")
        body = "".join(" ".join(f"{v:.6g}" for v in row) + "\n" for row in arr)
        p.write_bytes((head + body).encode("latin-1"))
    return p


def _load_ply(p: Path):
    from vision3d.gaussians import load_ply

    g = load_ply(p)
    for t in (g.means, g.scales, g.opacities, g.sh):
        assert torch.isfinite(t).all(), "load_ply returned non-finite values"
    return g


def _colmap_model(rng: random.Random):
    from vision3d.geometry import Cameras
    from vision3d.geometry.colmap import ColmapModel

    v = rng.randint(1, 3)
    K = torch.tensor([[30.0, 0, 16], [0, 32.0, 12], [0, 0, 1]]).expand(v, 3, 3)
    c2w = torch.eye(4).repeat(v, 1, 1)
    c2w[:, 0, 3] = torch.arange(v, dtype=torch.float32) * 0.2
    pts = torch.randn(rng.randint(0, 4), 3)
    return ColmapModel.from_cameras(Cameras(K, c2w, 32, 24), [f"im{i}.png" for i in range(v)], points=pts if len(pts) else None)


def _make_colmap(binary: bool):
    def make(folder: Path, rng: random.Random) -> Path:
        from vision3d.geometry.colmap import write_colmap

        d = folder / "sparse"
        write_colmap(_colmap_model(rng), d, binary=binary)
        ext = ".bin" if binary else ".txt"
        return d / f"{rng.choice(['cameras', 'images', 'points3D'])}{ext}"

    return make


def _load_colmap(p: Path):
    from vision3d.geometry.colmap import read_colmap

    m = read_colmap(p.parent)
    if m.images and all(c.info.num_focal for c in m.cameras.values()):
        for cams, _, _ in m.to_cameras(group_by_size=True).values():
            assert torch.isfinite(cams.K).all() and torch.isfinite(cams.cam_to_world).all(), "non-finite cameras"
    return m


def _make_transforms(folder: Path, rng: random.Random) -> Path:
    from PIL import Image

    frames = []
    for i in range(rng.randint(1, 3)):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(folder / f"f{i}.png")
        m = np.eye(4)
        m[0, 3] = 0.1 * i
        frames.append({"file_path": f"f{i}.png", "transform_matrix": m.tolist()})
    meta: dict = {"frames": frames}
    if rng.random() < 0.5:
        meta.update(fl_x=10.0, fl_y=11.0, cx=4.0, cy=3.0, w=8, h=6)
    else:
        meta["camera_angle_x"] = 0.7
    p = folder / "transforms.json"
    p.write_text(json.dumps(meta))
    return p


def _load_transforms(p: Path):
    from vision3d.geometry.transforms_json import read_transforms_json

    t = read_transforms_json(p)
    c = t.cameras
    assert torch.isfinite(c.K).all() and torch.isfinite(c.cam_to_world).all(), "non-finite cameras"
    assert (c.K[..., 0, 0] > 0).all() and (c.K[..., 1, 1] > 0).all(), "non-positive focal length"
    root = p.parent.resolve()
    for f in t.image_paths:
        assert root in Path(f).resolve().parents, f"image path {f} leaves the dataset folder"
    return t


def _chunk_records(rng: random.Random) -> list[dict]:
    from vision3d.data.preprocess import encode_jpeg

    recs = []
    for s in range(rng.randint(1, 2)):
        v = rng.randint(1, 3)
        cams = torch.zeros(v, 18)
        cams[:, :4] = torch.tensor([0.9, 1.2, 0.5, 0.5])
        cams[:, 6:18] = torch.eye(4)[:3].reshape(12)
        imgs = [encode_jpeg(torch.full((3, 8, 8), 100, dtype=torch.uint8)) for _ in range(v)]
        recs.append({"key": f"scene{s}", "url": "", "timestamps": torch.arange(v), "cameras": cams, "images": imgs})
    return recs


def _make_re10k(folder: Path, rng: random.Random) -> Path:
    from vision3d.data.re10k import write_chunk

    return write_chunk(folder / "000000.torch", _chunk_records(rng))


_CHUNK_VALUES = None


def _chunk_values():
    global _CHUNK_VALUES
    if _CHUNK_VALUES is None:
        _CHUNK_VALUES = _hostile_values() + [
            2_000_000_000, torch.zeros(4, 18, dtype=torch.int64), torch.zeros(2, 18, dtype=torch.bool),
            torch.zeros(2, 18, dtype=torch.complex64), torch.full((1, 18), float("nan")), torch.zeros(3, 18),
            torch.zeros(0, dtype=torch.uint8), torch.randint(0, 255, (64,), dtype=torch.uint8), torch.zeros(2, 3),
        ]  # fmt: skip
    return _CHUNK_VALUES


def mutate_chunk(data: bytes, rng: random.Random) -> bytes:
    """Replace one value of the chunk's records (an int where the image bytes belong...), or mutate bytes."""
    import io

    if rng.random() < 0.3:
        return mutate_bytes(data, rng)
    recs = torch.load(io.BytesIO(data), weights_only=True)
    recs = mutate_tree(recs, rng, _chunk_values())
    buf = io.BytesIO()
    try:
        torch.save(recs, buf)
    except (RecursionError, Exception):  # noqa: BLE001 - an unsavable mutation becomes a truncation
        return data[: len(data) // 2]
    return buf.getvalue()


def _load_re10k(p: Path):
    from vision3d.data.preprocess import decode_image
    from vision3d.data.re10k import read_chunk
    from vision3d.geometry.conventions import cameras_from_re10k

    recs = read_chunk(p)
    for ex in recs:
        cams = cameras_from_re10k(ex["cameras"].double(), 8, 8)
        assert torch.isfinite(cams.K).all() and torch.isfinite(cams.cam_to_world).all(), "non-finite cameras"
        for im in ex["images"]:
            decode_image(im, where=f"{p}: scene {ex['key']}")
    return recs


def _make_checkpoint(folder: Path, rng: random.Random) -> Path:
    """The authors' tiny iLRM weights from tests/fixtures/ilrm: as their Lightning .ckpt, or converted to safetensors."""
    from safetensors.torch import load_file, save_file

    from vision3d.recon.ilrm import convert_ilrm_checkpoint

    fix = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ilrm" / "public.safetensors"
    authors = {k[len("state/") :]: v for k, v in load_file(str(fix)).items() if k.startswith("state/")}
    if rng.random() < 0.5:
        p = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in convert_ilrm_checkpoint(authors).items()}, str(p))
    else:
        p = folder / "model.ckpt"
        torch.save({"state_dict": {f"encoder.scaler.{k}": v for k, v in authors.items()}, "epoch": 1}, p)
    return p


def _load_checkpoint(p: Path):
    from vision3d.recon.ilrm import load_ilrm

    return load_ilrm(str(p))


def _make_image(folder: Path, rng: random.Random) -> Path:
    from PIL import Image

    arr = np.random.default_rng(rng.randrange(2**31)).integers(0, 255, (rng.randint(1, 12), rng.randint(1, 12), 3), np.uint8)
    p = folder / rng.choice(["a.png", "a.jpg"])
    Image.fromarray(arr).save(p)
    return p


def _load_image(p: Path):
    from vision3d.data.folder import read_image

    return read_image(p)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("ply", _make_ply, lambda d, r: (mutate_text if d[:200].find(b"ascii") > 0 else mutate_bytes)(d, r), _load_ply),
        Target("colmap_text", _make_colmap(False), mutate_text, _load_colmap),
        Target("colmap_bin", _make_colmap(True), mutate_bytes, _load_colmap),
        Target("transforms", _make_transforms, mutate_json, _load_transforms),
        Target("re10k", _make_re10k, mutate_chunk, _load_re10k),
        Target("checkpoint", _make_checkpoint, mutate_bytes, _load_checkpoint),
        Target("images", _make_image, mutate_bytes, _load_image),
    )
}


# ---------------------------------------------------------------------------------------- running
def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_case(target: Target, seed: int, folder: Path, max_seconds: float = 5.0) -> tuple[str, str]:
    """Write a seed, mutate it, load it; returns (outcome, detail)."""
    from vision3d.errors import InputError

    rng = random.Random(seed)
    victim = target.make(folder, rng)
    victim.write_bytes(target.mutate(victim.read_bytes(), rng))
    t0 = time.perf_counter()
    try:
        target.load(victim)
        outcome, detail = "ok", ""
    except InputError as e:
        outcome, detail = "input_error", str(e)[:200]
        if not any(str(x) in str(e) for x in (victim, victim.parent, victim.name)):
            outcome, detail = "wrong_error", f"InputError does not name the file: {str(e)[:200]}"
    except FileNotFoundError as e:
        outcome, detail = "missing_file", str(e)[:200]
    except AssertionError as e:
        outcome, detail = "wrong_error", f"silent accept: {e}"
    except BaseException as e:  # noqa: BLE001 - every other exception is a finding
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome, detail = "wrong_error", f"{type(e).__name__}: {str(e)[:200]}"
    dt = time.perf_counter() - t0
    if dt > max_seconds:
        outcome, detail = "slow", f"{dt:.1f} s; {detail}"
    return outcome, detail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="*", default=list(TARGETS), choices=list(TARGETS))
    ap.add_argument("--cases", type=int, default=300, help="mutated files per target")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=5.0, help="per case")
    ap.add_argument("--max-mb", type=float, default=1024.0, help="peak RSS growth allowed over the whole run")
    ap.add_argument("--json", type=Path, default=None, help="write the counts and failures here")
    ap.add_argument("--show", type=int, default=5, help="failures printed per target")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import warnings

    warnings.simplefilter("ignore")
    report: dict = {}
    rss0 = _rss_mb()
    for name in args.targets:
        target = TARGETS[name]
        counts: dict[str, int] = {}
        failures = []
        t0 = time.perf_counter()
        for i in range(args.cases):
            seed = args.seed * 1_000_003 + i
            with tempfile.TemporaryDirectory(prefix="v3dfuzz") as d:
                outcome, detail = run_case(target, seed, Path(d), args.max_seconds)
            counts[outcome] = counts.get(outcome, 0) + 1
            if outcome in ("wrong_error", "slow"):
                failures.append({"seed": seed, "outcome": outcome, "detail": detail})
        report[name] = {"counts": counts, "seconds": round(time.perf_counter() - t0, 1), "failures": failures}
    grew = _rss_mb() - rss0
    cols = ["ok", "input_error", "missing_file", "wrong_error", "slow"]
    print(f"{'target':<12}" + "".join(f"{c:>13}" for c in cols) + f"{'seconds':>9}")
    for name, r in report.items():
        print(f"{name:<12}" + "".join(f"{r['counts'].get(c, 0):>13}" for c in cols) + f"{r['seconds']:>9}")
    print(f"peak RSS growth: {grew:.0f} MB (limit {args.max_mb:.0f})")
    for name, r in report.items():
        for f in r["failures"][: args.show]:
            print(f"  {name} seed {f['seed']}: {f['outcome']}: {f['detail']}")
    bad = sum(len(r["failures"]) for r in report.values()) + (grew > args.max_mb)
    if args.json is not None:
        from vision3d.utils.io import write_text_atomic

        write_text_atomic(args.json, json.dumps({"targets": report, "rss_growth_mb": grew}, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
