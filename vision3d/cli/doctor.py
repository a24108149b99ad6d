"""Check the installation: versions, CUDA, gsplat's kernels, optional extras (with install lines).

Prints four sections and exits 0 whatever it finds (it is a report, not a gate):

- ``versions``: python, torch, torchvision, timm, gsplat, kornia, numpy, opencv;
- ``cuda``: whether CUDA is usable, device name and compute capability;
- ``gsplat kernels``: on a GPU, renders a tiny scene with ``backend="gsplat"`` (which builds the
  CUDA code on first use) and compares it with the pure-PyTorch twin; without CUDA, skipped;
- ``extras``: xformers, mesh (open3d, trimesh), sfm (pycolmap), viewer (viser), gen (diffusers, transformers),
  lpips and whether its backbone weights are on disk; each missing one with its ``pip install`` line,
  or, when the package is installed but a system library it loads is not (open3d without
  ``libusb-1.0.so.0``), the ``apt-get install`` line.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import platform
import sys
import time
from dataclasses import dataclass

from vision3d.utils.optional import KNOWN, fix_line, install_line, missing_system_library

CORE = [  # (label, import name, distributions to ask for a version)
    ("python", None, ()),
    ("torch", "torch", ("torch",)),
    ("torchvision", "torchvision", ("torchvision",)),
    ("timm", "timm", ("timm",)),
    ("gsplat", "gsplat", ("gsplat",)),
    ("kornia", "kornia", ("kornia",)),
    ("numpy", "numpy", ("numpy",)),
    ("opencv", "cv2", ("opencv-python-headless", "opencv-python", "opencv-contrib-python")),
]

EXTRAS = [  # (extra, import names)
    ("xformers", ("xformers",)),
    ("mesh", ("open3d", "trimesh")),
    ("sfm", ("pycolmap",)),
    ("viewer", ("viser",)),
    ("gen", ("diffusers", "transformers")),
    ("lpips", ("lpips",)),
]


@dataclass
class Args:
    json: bool = False
    """Print the report as one JSON object instead of text."""

    skip_gsplat: bool = False
    """Do not try to build/run gsplat's CUDA kernels (the first build can take minutes)."""


def _version(import_name: str | None, dists: tuple[str, ...]) -> str | None:
    if import_name is None:
        return platform.python_version()
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        mod = importlib.import_module(import_name)
    except Exception:  # noqa: BLE001
        return None
    return str(getattr(mod, "__version__", "unknown"))


def check_versions() -> dict[str, str | None]:
    return {label: _version(mod, dists) for label, mod, dists in CORE}


def check_cuda() -> dict:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return {"usable": False, "reason": f"torch does not import: {e}"}
    info: dict = {"torch_cuda_build": torch.version.cuda}
    try:
        ok = torch.cuda.is_available()
    except Exception as e:  # noqa: BLE001
        return {**info, "usable": False, "reason": str(e)}
    if not ok:
        return {**info, "usable": False, "reason": "torch.cuda.is_available() is False"}
    devices = []
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{cap[0]}.{cap[1]}"})
    return {**info, "usable": True, "devices": devices}


def check_gsplat_kernels(cuda_usable: bool, skip: bool = False) -> dict:
    """Render a 64-Gaussian scene on the GPU with gsplat and with the torch twin; report the difference."""
    if skip:
        return {"status": "skipped: --skip-gsplat"}
    if not cuda_usable:
        return {"status": "skipped: no CUDA"}
    try:
        import torch

        from vision3d.gaussians import Gaussians
        from vision3d.geometry import Cameras
        from vision3d.render import rasterize

        dev = torch.device("cuda")
        gen = torch.Generator().manual_seed(0)
        n = 64
        g = Gaussians.from_rgb(
            means=(torch.rand(n, 3, generator=gen) - 0.5) + torch.tensor([0.0, 0.0, 3.0]),
            quats=torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1),
            scales=torch.rand(n, 3, generator=gen) * 0.05 + 0.02,
            opacities=torch.rand(n, generator=gen) * 0.5 + 0.4,
            rgb=torch.rand(n, 3, generator=gen),
        ).to(dev)
        K = torch.tensor([[40.0, 0.0, 16.0], [0.0, 40.0, 16.0], [0.0, 0.0, 1.0]])
        cams = Cameras(K[None], torch.eye(4)[None], 32, 32).to(dev)
        t0 = time.perf_counter()
        out = rasterize(g, cams, mode="RGB+ED", backend="gsplat")
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ref = rasterize(g, cams, mode="RGB+ED", backend="torch")
        diff = float((out.colors - ref.colors).abs().max())
        ok = bool(torch.isfinite(out.colors).all()) and out.alphas.max() > 0
        return {
            "status": "ok" if ok else "failed: empty or non-finite render",
            "first_call_s": round(dt, 3),
            "max_abs_diff_vs_torch": diff,
        }
    except Exception as e:  # noqa: BLE001
        return {"status": f"failed: {type(e).__name__}: {e}"}


def _lpips_weights() -> dict:
    """Whether the files LPIPS reads (linear heads in the wheel, torchvision backbone in the hub cache) exist."""
    from vision3d.eval.metrics import lpips_weight_paths

    nets = {}
    for net in ("vgg", "alex"):
        paths = lpips_weight_paths(net)
        missing = [str(p) for p in paths.values() if not p.is_file()]
        nets[net] = {"present": "linear" in paths and not missing, "missing": missing}
    present = [n for n, v in nets.items() if v["present"]]
    if present:
        detail = "present for net=" + ", ".join(present)
    else:
        detail = "missing " + ", ".join(p for v in nets.values() for p in v["missing"])
    return {"present": bool(present), "detail": detail, "nets": nets}


def check_extras() -> list[dict]:
    rows = []
    for extra, mods in EXTRAS:
        for m in mods:
            try:
                mod = importlib.import_module(m)
                ver = _version(m, (KNOWN.get(m, (m, None))[0],)) or str(getattr(mod, "__version__", "?"))
                row = {"extra": extra, "module": m, "installed": True, "version": ver}
            except Exception as e:  # noqa: BLE001
                row = {
                    "extra": extra,
                    "module": m,
                    "installed": False,
                    "error": f"{type(e).__name__}: {e}".splitlines()[0][:160],
                    # a missing shared library (open3d without libusb) is fixed by apt, not pip
                    "system_library": missing_system_library(e),
                    "install": fix_line(m, e),
                }
            if m == "lpips":
                row["weights"] = _lpips_weights() if row["installed"] else {"present": False, "detail": "lpips not installed"}
            rows.append(row)
    return rows


def collect(args: Args) -> dict:
    versions = check_versions()
    cuda = check_cuda()
    return {
        "versions": versions,
        "cuda": cuda,
        "gsplat_kernels": check_gsplat_kernels(cuda.get("usable", False), skip=args.skip_gsplat),
        "extras": check_extras(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def format_report(rep: dict) -> str:
    lines = ["vision3d doctor", "", "== versions"]
    for k, v in rep["versions"].items():
        lines.append(f"  {k:<12} {v if v is not None else 'NOT INSTALLED  -> ' + install_line('cv2' if k == 'opencv' else k)}")
    lines += ["", "== cuda"]
    cuda = rep["cuda"]
    lines.append(f"  torch built with CUDA: {cuda.get('torch_cuda_build')}")
    if cuda.get("usable"):
        for d in cuda["devices"]:
            lines.append(f"  usable: yes  cuda:{d['index']} {d['name']} (capability {d['capability']})")
    else:
        lines.append(f"  usable: no ({cuda.get('reason')})")
    lines += ["", "== gsplat kernels"]
    gk = rep["gsplat_kernels"]
    lines.append(f"  {gk['status']}")
    if "max_abs_diff_vs_torch" in gk:
        lines.append(f"  first call {gk['first_call_s']} s; max |gsplat - torch| = {gk['max_abs_diff_vs_torch']:.2e}")
    lines += ["", "== extras"]
    for row in rep["extras"]:
        name = f"[{row['extra']}] {row['module']}"
        if row["installed"]:
            text = f"  {name:<22} installed {row['version']}"
            if "weights" in row:
                w = row["weights"]
                text += f"; weights {'present' if w['present'] else 'ABSENT'} ({w['detail']})"
        else:
            lib = row.get("system_library")
            state = f"installed, but system library {lib} is missing" if lib else "missing"
            text = f"  {name:<22} {state} -> {row['install']}"
        lines.append(text)
    lines += ["", f"platform: {rep['platform']}", f"python: {rep['executable']}"]
    return "\n".join(lines)


def run(args: Args) -> int:
    rep = collect(args)
    print(json.dumps(rep, indent=2) if args.json else format_report(rep))
    return 0
