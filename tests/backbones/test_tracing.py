"""torch.compile(fullgraph=True) and torch.export on the smallest variant of each family (CPU, eval).

TorchScript and FX (forward, backward, FX-then-script) are covered by timm's own tests in
``tests/backbones/timm_suite``. ``test_compile_fullgraph`` uses ``backend="eager"``: it checks that
dynamo captures the whole model in one graph (what ``fullgraph=True`` demands) without inductor's
C++ code generation. ``test_compile_inductor`` runs the default backend (inductor, C++ on the CPU)
and compares with eager. Inductor compiles for tens of seconds per family on one core (cold cache,
shared 2-core machine: affnet_et 52 s, ffnet_1 54 s, transnext_micro 115 s, ewa_vit_tiny 26 s), so the
default suite runs it on ``INDUCTOR_DEFAULT`` only; ``VISION3D_INDUCTOR=all`` runs every family,
``VISION3D_INDUCTOR=affnet_et,transnext_micro`` the listed ones::

    VISION3D_INDUCTOR=all python -m pytest -q tests/backbones/test_tracing.py -k inductor
"""

import os

import pytest
import timm
import torch

import vision3d  # noqa: F401  (registers the models)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SMALLEST = {"affnet_et": 64, "ffnet_1": 64, "transnext_micro": 64, "ewa_vit_tiny_patch16_224": 32}
INDUCTOR_DEFAULT = ("ffnet_1",)


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    size = SMALLEST[name]
    kw = dict(img_size=size, patch_size=8) if name.startswith("ewa") else {}
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kw).eval(), torch.randn(1, 3, size, size)


def _inductor_selected() -> set:
    choice = os.environ.get("VISION3D_INDUCTOR", "").strip()
    if choice == "all":
        return set(SMALLEST)
    chosen = {n.strip() for n in choice.split(",") if n.strip()}
    unknown = sorted(chosen - set(SMALLEST))
    if unknown:
        raise ValueError(f"VISION3D_INDUCTOR: {unknown} are not among {sorted(SMALLEST)} (or use 'all')")
    return chosen | set(INDUCTOR_DEFAULT)


def _inductor_param(name: str):
    opt_in = pytest.mark.skipif(
        name not in _inductor_selected(), reason=f"inductor on {name}: set VISION3D_INDUCTOR=all (or ={name})"
    )
    return pytest.param(name, marks=opt_in)


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    model, x = _model(name)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [_inductor_param(n) for n in sorted(SMALLEST)])
def test_compile_inductor(name, tmp_path):
    """Default backend (inductor's C++ kernels): one graph, outputs equal eager's within float32 re-association.

    Compiled in a private cache folder: a compile killed half-way (Ctrl-C, a timeout) leaves a truncated ``.so``
    in the shared ``/tmp/torchinductor_<user>`` that later runs would load and fail on ("file too short")."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    torch._dynamo.reset()
    model, x = _model(name)
    compiled = torch.compile(model, fullgraph=True)
    with temporary_cache_dir(str(tmp_path / "inductor")), torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compiled(x), expected, atol=1e-4, rtol=1e-3)
        x2 = torch.randn_like(x)  # a second input through the compiled graph (no recompilation needed)
        torch.testing.assert_close(compiled(x2), model(x2), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_export(name):
    model, x = _model(name)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-4)
