"""The seam between the backbones and the 3-D models: any timm ``features_only`` encoder by name.

:class:`BackboneFeatures` builds ``timm.create_model(name, features_only=True, pretrained=False)``
(after ``import vision3d``, so every vision3d backbone — ``affnet*``, ``ffnet_*``, ``transnext_*``,
``ewa_vit_*`` — and every timm model with feature extraction is accepted), takes ``num_levels``
feature maps from it and adapts each to the width the host wants with a learned 1x1 projection
(none when the widths already agree, so e.g. DINOv2 features reach a DepthSplat host unchanged).
It is the one adapter of the suite: reconstructors take a backbone *name*, never a model-specific
wrapper.

Which maps: hierarchical nets give their last ``num_levels`` stages; plain ViTs (all maps at the
patch stride) give the blocks ``out_indices`` (default: evenly spaced, ending at the last block;
DINOv2's ``[2, 5, 8, 11]`` for 12 blocks and ``[4, 11, 17, 23]`` for 24, as Depth Anything and
DepthSplat take them) with the final norm applied to each (DINOv2's ``get_intermediate_layers``).

Input size: images are resized (bilinear, ``align_corners=True``) down to the nearest multiple of
the backbone's largest stride (the patch size for ViTs: DepthSplat resizes to multiples of 14).

DINOv2 position embeddings: for a timm DINOv2 ViT the patch position embedding is resampled as the
DINOv2 code does (bicubic, no antialiasing, scale factor ``(n + 0.1) / M``) instead of timm's
antialiased resize, so the released DINOv2 / Depth Anything / DepthSplat weights see the
embedding they were trained with at every input size.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _dinov2_pos_embed(self, x: Tensor) -> Tensor:  # bound to a timm VisionTransformer; x [B, h, w, C] tokens
    B, h, w, C = x.shape
    pos = self.pos_embed
    n_prefix = self.num_prefix_tokens
    M = int(math.sqrt(pos.shape[1] - n_prefix))
    if (h, w) != (M, M):
        grid = pos[:, n_prefix:].float().reshape(1, M, M, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic", antialias=False)
        pos = torch.cat([pos[:, :n_prefix].float(), grid.permute(0, 2, 3, 1).reshape(1, h * w, C)], 1).to(x.dtype)
    prefix = [self.cls_token.expand(B, -1, -1)] if self.cls_token is not None else []
    if self.reg_token is not None:
        prefix.append(self.reg_token.expand(B, -1, -1))
    return self.pos_drop(torch.cat(prefix + [x.reshape(B, h * w, C)], 1) + pos)


def default_vit_indices(depth: int, num_levels: int) -> list[int]:
    """Blocks tapped from a plain ViT of ``depth`` blocks (DINOv2/DPT convention for 12 and 24)."""
    if num_levels == 4 and depth == 12:
        return [2, 5, 8, 11]
    if num_levels == 4 and depth == 24:
        return [4, 11, 17, 23]
    step = depth / num_levels
    return [int(round(step * (i + 1))) - 1 for i in range(num_levels)]


class BackboneFeatures(nn.Module):
    """``images [N, 3, H, W]`` (already normalised) -> ``num_levels`` maps ``[N, out_channels[i], h_i, w_i]``."""

    def __init__(
        self,
        name: str,
        out_channels: int | list[int],
        num_levels: int = 4,
        out_indices: list[int] | None = None,
        **timm_kwargs,
    ):
        super().__init__()
        import timm

        import vision3d  # noqa: F401  (registers the vision3d backbones in timm)

        self.name = name
        if not timm.is_model(name):
            raise ValueError(
                f"backbone {name!r}: not a timm model name (after `import vision3d`); e.g. "
                "vit_small_patch14_dinov2, affnet_t, ffnet_1, transnext_micro, ewa_vit_tiny_patch16_224"
            )
        model = self._create(timm, name, timm_kwargs)
        from timm.models._features import FeatureGetterNet

        reds = list(model.feature_info.reduction())
        self.is_vit = (
            isinstance(model, FeatureGetterNet) and len(set(reds)) == 1 and hasattr(model.model, "blocks")
        )  # a plain ViT: every map at the patch stride, taps are blocks
        if self.is_vit:
            depth = len(model.model.blocks)
            idx = list(out_indices) if out_indices is not None else default_vit_indices(depth, num_levels)
            if len(idx) != num_levels or max(idx) >= depth or min(idx) < 0:
                raise ValueError(f"backbone {name!r}: out_indices {idx} must be {num_levels} blocks of 0..{depth - 1}")
            # rebuild from the full model with the tapped blocks and the final norm applied to each
            # (DINOv2 intermediates); the features_only build above pruned that norm
            base = self._create(timm, name, timm_kwargs, features_only=False)
            model = FeatureGetterNet(base, out_indices=tuple(idx), norm=True, prune=True)
            if "dinov2" in name and getattr(base, "pos_embed", None) is not None and not base.no_embed_class:
                base._pos_embed = types.MethodType(_dinov2_pos_embed, base)
        chans = list(model.feature_info.channels())
        reds = list(model.feature_info.reduction())
        if not self.is_vit:
            if len(chans) < num_levels:
                raise ValueError(f"backbone {name!r}: gives {len(chans)} feature maps, {num_levels} are needed")
            model = self._create(timm, name, {**timm_kwargs, "out_indices": tuple(range(len(chans) - num_levels, len(chans)))})
            chans, reds = chans[-num_levels:], reds[-num_levels:]
        self.model = model
        self.in_channels = chans
        self.stride = max(reds)
        outs = [out_channels] * num_levels if isinstance(out_channels, int) else list(out_channels)
        if len(outs) != num_levels:
            raise ValueError(f"BackboneFeatures: {len(outs)} output widths for {num_levels} levels")
        self.out_channels = outs
        self.proj = nn.ModuleList(
            [nn.Identity() if c == o else nn.Conv2d(c, o, 1) for c, o in zip(chans, outs)]
        )

    @staticmethod
    def _create(timm, name: str, kwargs: dict, features_only: bool = True) -> nn.Module:
        kwargs = {"pretrained": False, **kwargs}
        if features_only:
            kwargs["features_only"] = True
        try:
            try:
                model = timm.create_model(name, dynamic_img_size=True, **kwargs)
            except TypeError:
                model = timm.create_model(name, **kwargs)
        except (RuntimeError, TypeError, AttributeError, NotImplementedError, AssertionError) as e:
            raise ValueError(
                f"backbone {name!r}: timm cannot build it with features_only=True ({type(e).__name__}: {e}); "
                "pick a model with feature extraction (timm.list_models() names with feature_info)"
            ) from e
        if features_only and not hasattr(model, "feature_info"):
            raise ValueError(
                f"backbone {name!r}: timm built a {type(model).__name__} without feature_info, i.e. not a "
                "features_only feature extractor; pick a model with feature extraction"
            )
        return model

    def forward(self, x: Tensor) -> list[Tensor]:  # x [N, 3, H, W] normalised
        H, W = x.shape[-2:]
        s = self.stride
        h, w = H // s * s, W // s * s
        if h == 0 or w == 0:
            raise ValueError(f"backbone {self.name!r}: {W}x{H} images are smaller than its stride {s}")
        if (h, w) != (H, W):
            x = F.interpolate(x, (h, w), mode="bilinear", align_corners=True)
        feats = self.model(x)
        return [p(f) for p, f in zip(self.proj, feats)]
