"""timm backbones (AFFNet, FFNet/MetaMixer, TransNeXt, EWA-ViT), registered with timm on import.

Importing this package imports each model file, whose ``@register_model`` functions add the
variants to timm's registry; ``timm.create_model(name)`` then builds them.
"""

import importlib as _importlib
import importlib.util as _util

# TODO(lead): replace with plain imports once every file has landed
for _name in ("affnet", "ffnet", "transnext", "ewa"):
    if _util.find_spec(f"{__name__}.{_name}") is not None:
        _importlib.import_module(f"{__name__}.{_name}")
