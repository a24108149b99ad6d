"""`vision3d doctor`: sections, install lines for missing extras, JSON output, exit code 0."""

from __future__ import annotations

import json

import torch

from vision3d.cli import doctor
from vision3d.cli.main import main


def test_doctor_prints_every_section(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for section in ("== versions", "== cuda", "== gsplat kernels", "== extras"):
        assert section in out
    for name in ("python", "torch", "torchvision", "timm", "gsplat", "kornia", "numpy", "opencv"):
        assert f"  {name} " in out
    for extra in ("[xformers]", "[mesh] open3d", "[mesh] trimesh", "[sfm]", "[viewer]", "[gen]", "[lpips]"):
        assert extra in out
    if not torch.cuda.is_available():
        assert "skipped: no CUDA" in out
        assert "usable: no" in out


def test_doctor_missing_extras_name_their_pip_line(capsys):
    rep = doctor.collect(doctor.Args())
    for row in rep["extras"]:
        if not row["installed"] and not row["system_library"]:
            assert row["install"].startswith("pip install ")
            assert f"vision3d[{row['extra']}]" in row["install"]
    text = doctor.format_report(rep)
    missing = [r for r in rep["extras"] if not r["installed"] and not r["system_library"]]
    assert text.count("missing -> pip install") == len(missing)
    lp = [r for r in rep["extras"] if r["module"] == "lpips"][0]
    assert "weights" in lp


def test_doctor_json_parses(capsys):
    assert doctor.run(doctor.Args(json=True)) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["versions"]["torch"] == torch.__version__.split("+")[0]
    assert rep["cuda"]["usable"] == torch.cuda.is_available()
    assert set(rep) >= {"versions", "cuda", "gsplat_kernels", "extras"}


def test_doctor_gsplat_check_without_cuda_is_skipped():
    assert doctor.check_gsplat_kernels(False)["status"] == "skipped: no CUDA"
    assert doctor.check_gsplat_kernels(True, skip=True)["status"].startswith("skipped")


def test_doctor_names_the_apt_line_for_a_missing_system_library(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "open3d":
            raise OSError("libusb-1.0.so.0: cannot open shared object file: No such file or directory")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    rows = {r["module"]: r for r in doctor.check_extras()}
    o3d = rows["open3d"]
    assert not o3d["installed"] and o3d["system_library"] == "libusb-1.0.so.0"
    assert o3d["install"] == "sudo apt-get install libusb-1.0-0"
    text = doctor.format_report({**doctor.collect(doctor.Args(skip_gsplat=True)), "extras": list(rows.values())})
    assert "system library libusb-1.0.so.0 is missing -> sudo apt-get install libusb-1.0-0" in text
