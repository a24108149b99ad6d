"""torch.compile(fullgraph=True) and torch.export on the smallest variant of each family (CPU, eval).

TorchScript and FX (forward, backward, FX-then-script) are covered by timm's own tests in
``tests/backbones/timm_suite``. ``backend="eager"`` checks that dynamo captures the whole model in one
graph (what ``fullgraph=True`` demands) without spending CPU minutes in inductor's C++ codegen.
"""

import pytest
import timm
import torch

import vision3d  # noqa: F401  (registers the models)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SMALLEST = {"affnet_et": 64, "ffnet_1": 64, "transnext_micro": 64, "ewa_vit_tiny_patch16_224": 32}


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    size = SMALLEST[name]
    kw = dict(img_size=size, patch_size=8) if name.startswith("ewa") else {}
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kw).eval(), torch.randn(1, 3, size, size)


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    model, x = _model(name)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_export(name):
    model, x = _model(name)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=1e-4)
