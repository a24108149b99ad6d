"""Shared test setup: small thread count (2-core CI), seeded RNG, paths to reference fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
# reference outputs of the authors' code, kept in the repository so a clone checks parity on its own
LOCAL_FIXTURES = REPO / "tests" / "fixtures"

def optional(module: str):
    """Import an optional package or skip the test, saying why (any import failure counts: open3d raises
    OSError for a missing libusb, which ``pytest.importorskip`` does not catch)."""
    from vision3d.utils.optional import why_unavailable

    reason = why_unavailable(module)
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)
    import importlib

    return importlib.import_module(module)


def needs(module: str):
    """``skipif`` marker for a test that needs an optional package, with the reason it is unavailable."""
    from vision3d.utils.optional import why_unavailable

    reason = why_unavailable(module)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def fixture_files(model: str, case: str = "public") -> tuple[Path, Path]:
    """(safetensors, json) of a reference fixture under tests/fixtures/<model>/; a missing one is an error."""
    st = LOCAL_FIXTURES / model / f"{case}.safetensors"
    js = LOCAL_FIXTURES / model / f"{case}.json"
    if not st.exists() or not js.exists():
        raise FileNotFoundError(f"reference fixture {st} (and its .json) missing from the repository")
    return st, js


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny ops on a shared 2-core runner run far slower with 2 threads per process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
