"""Optional imports: any import failure is "unavailable, because ..."; a missing system library gets its apt line."""

from __future__ import annotations

import importlib

import pytest

from tests.conftest import optional
from vision3d.utils import optional as opt

LIBUSB = "libusb-1.0.so.0: cannot open shared object file: No such file or directory"


@pytest.fixture
def broken_open3d(monkeypatch):
    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "open3d":
            raise OSError(LIBUSB)
        if name == "brokenpkg":
            raise RuntimeError("compiled for another numpy")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)


def test_os_error_is_unavailable_with_the_apt_line(broken_open3d):
    assert not opt.available("open3d")
    why = opt.why_unavailable("open3d")
    assert "libusb-1.0.so.0" in why and "sudo apt-get install libusb-1.0-0" in why
    with pytest.raises(opt.MissingDependencyError, match=r"system library libusb-1.0.so.0 is missing.*apt-get install libusb-1.0-0"):
        opt.require("open3d", "meshing")


def test_any_exception_is_unavailable_with_the_pip_line(broken_open3d):
    assert not opt.available("brokenpkg")
    assert "RuntimeError: compiled for another numpy" in opt.why_unavailable("brokenpkg")
    with pytest.raises(opt.MissingDependencyError, match="pip install brokenpkg"):
        opt.require("brokenpkg")
    assert opt.why_unavailable("json") is None and opt.require("json").dumps(1) == "1"


def test_unknown_library_gets_a_guessed_package():
    line = opt.system_install_line("libfoo-2.so.3")
    assert line.startswith("sudo apt-get install libfoo-2") and "guessed" in line


def test_test_helper_skips_with_the_reason(broken_open3d):
    with pytest.raises(pytest.skip.Exception, match="libusb"):
        optional("open3d")
    assert optional("json").loads("2") == 2
