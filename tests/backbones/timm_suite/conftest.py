"""Runs timm's own ``tests/test_models.py`` (copy in ``test_timm_models.py``) on vision3d's backbones.

``import vision3d`` registers our variants before the copy's module-level ``list_models()`` calls;
collection then keeps only the parametrisations whose ``model_name`` is a vision3d model:

- ``VISION3D_TIMM_SUITE`` unset or ``smallest`` (the default in our suite): the smallest variant of
  each family (``affnet_et``, ``ffnet_1``, ``transnext_micro``, ``ewa_vit_tiny_patch16_224``);
- ``VISION3D_TIMM_SUITE=all``: every registered vision3d variant (168 tests, 22 min on one CPU
  thread: about 1.5 min per variant; see the README's backbones section);
- ``VISION3D_TIMM_SUITE=name1,name2``: the listed variants.

Deselected as well: timm's tests of its own named models (no ``model_name`` of ours) and the tests
that need the network (``test_model_inference``, ``test_model_load_pretrained``,
``test_model_features_pretrained`` download hub weights).
"""

from __future__ import annotations

import os

import timm
from timm.models._registry import model_entrypoint

import vision3d  # noqa: F401  (registers the backbones with timm)

SMALLEST = ("affnet_et", "ffnet_1", "transnext_micro", "ewa_vit_tiny_patch16_224")
NETWORK_TESTS = ("test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained")
# markers timm declares in its pyproject.toml (plus pytest-timeout's, which CI may not have)
TIMM_MARKERS = ("base", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward", "fxbackward", "forward", "backward", "timeout")


def vision3d_models() -> list[str]:
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("vision3d."))


def selected_models() -> set[str]:
    ours = vision3d_models()
    choice = os.environ.get("VISION3D_TIMM_SUITE", "smallest").strip()
    if choice in ("", "smallest"):
        return set(SMALLEST)
    if choice == "all":
        return set(ours)
    names = {n.strip() for n in choice.split(",") if n.strip()}
    unknown = sorted(names - set(ours))
    if unknown:
        raise ValueError(f"VISION3D_TIMM_SUITE: {unknown} are not vision3d models; known: {ours}")
    return names


def pytest_configure(config):
    for name in TIMM_MARKERS:
        config.addinivalue_line("markers", f"{name}: timm test-suite marker")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    wanted = selected_models()
    keep, drop = [], []
    for item in items:
        if not str(item.fspath).startswith(here):
            keep.append(item)
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        name = params.get("model_name")
        base = name.split(".")[0] if isinstance(name, str) else None  # 'affnet_et.in1k' (include_tags=True)
        if item.originalname in NETWORK_TESTS or base not in wanted:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
