"""timm backbones (AFFNet, FFNet/MetaMixer, TransNeXt, EWA-ViT), registered with timm on import.

Importing this package imports each model file, whose ``@register_model`` functions add the
variants to timm's registry; ``timm.create_model(name)`` then builds them.
"""

from . import affnet, ewa, ffnet, transnext  # noqa: F401
