"""AFFNet: adaptive frequency filters as global token mixers, as timm models.

Source
------
- Paper: Zhipeng Huang, Zhizheng Zhang, Cuiling Lan, Zheng-Jun Zha, Yan Lu, Baining Guo,
  "Adaptive Frequency Filters As Efficient Global Token Mixers", ICCV 2023, arXiv:2307.14008.
- Code: https://github.com/microsoft/TokenMixers, folder ``Adaptive Frequency Filters/``
  (commit 99dbe38c2a5c3ea3c655b8c42c763a6d595e18f9), MIT licence. The authors' code is a fork of
  Apple's ml-cvnets (MobileViT family); this file is a re-implementation on ``timm.layers``.
- Weights: ImageNet-1k checkpoints are shared through OneDrive folders linked from the authors'
  README (no direct URL), so ``pretrained=True`` needs a local file:
  ``timm.create_model("affnet_et", pretrained=True, pretrained_cfg_overlay=dict(file=path))``.
  ``checkpoint_filter_fn`` converts the authors' key layout (cvnets names, EMA/``model``/
  ``state_dict`` wrappers, ``module.`` prefixes).

Architecture
------------
A MobileNetV2/MobileViT-style hierarchy: a 3x3 stride-2 stem, two stages of MobileNetV2 inverted
residual blocks, then three stages ``[MV2 stride 2, AFFBlock]``. An AFFBlock runs ``depth``
layers of ``x + AFF(norm2(MV2(norm1(x))))`` where AFF is the adaptive frequency filter
(``rfft2`` with ``norm='ortho'`` -> a block-diagonal complex two-layer MLP with softshrink makes a
per-frequency mask -> ``irfft2`` of mask * spectrum, plus its own input), a final GroupNorm(1),
a 1x1 projection and a 1x1 fusion of ``[input, projection]``. A 1x1 expansion conv
(``min(4 * C, 960)`` channels) precedes global average pooling and the linear classifier.
Normalisation inside the AFF layers is GroupNorm with one group (normalises C, H and W jointly),
activations are SiLU, BatchNorm eps is 1e-5. Any input size works: the filter has no fixed
spatial size (the spectrum is taken of whatever H x W arrives).

Official variants (ImageNet-1k, 256 x 256; README of the authors' repository)

=============  ============  =======  ======  ======  ======================================
timm name      paper name    top-1    params  FLOPs   parameters counted here (1000 classes)
=============  ============  =======  ======  ======  ======================================
affnet_et      AFFNet-ET     73.0     1.4M    0.4G    1,436,264
affnet_t       AFFNet-T      77.0     2.6M    0.8G    2,654,232
affnet         AFFNet        79.8     5.5M    1.5G    5,568,696
=============  ============  =======  ======  ======  ======================================

The table's counts are these numbers truncated to one decimal (2.65M is listed as 2.6M, 5.57M as
5.5M; the authors' cvnets profiler may also leave small tensors out). With 100 classes the AFFNet-ET count equals the parameter count of the authors' own state dict
in the shared reference fixture.

Fast paths
----------
Eager, FX, ``torch.compile`` and ``torch.export`` run the fast path shared with FFNet
(``vision3d/backbones/_helpers.py``); TorchScript runs the plain module calls, and tests check that
both agree (values, gradients, running statistics, float64 oracle). Activations travel as
NCHW-shaped tensors in channels-last memory, 1x1 convs run as GEMMs on the NHWC view, activations
on the NHWC view, and in eval mode each BatchNorm is folded into its conv (cached, keyed on the
source tensors' versions), so the training structure computes like :meth:`AFFNet.reparameterize`'s.
The frequency filter runs its FFTs on NCHW-contiguous data (the transform axes innermost) and its
block-diagonal complex MLP as one real ``[[A, -B], [B, A]]`` GEMM per group and layer (the same
multiply-adds as the four real einsums of the complex product). Features and intermediates are
returned NCHW-contiguous. On one CPU thread at batch 1 and 256 x 256 this took affnet_et from
1.33x to 1.05x of mobilevit_xxs's time per GMAC (1.00x after ``reparameterize()``);
see ``tools/bench/backbones.py --peers``.

The authors' ``mode`` names are ``xx_small``, ``x_small`` and ``small``; their config file also
has unreleased ``base``/``large`` modes, which are not registered here.
"""

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct as _TimmConvNormAct
from timm.layers import (
    ClassifierHead,
    DropPath,
    GroupNorm1,
    get_device_dtype,
    make_divisible,
    register_notrace_module,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from vision3d.backbones._helpers import (
    check_converted_state_dict,
    factory_device,
    FoldCache,
    act_nhwc,
    bn_folds,
    bn_scale_shift,
    bn_sources,
    clear_fold_caches,
    conv_with_weights,
    pointwise_conv,
    require_local_weights,
    unwrap_state_dict,
)
from vision3d.backbones._helpers import check_input

__all__ = ["AFFNet", "checkpoint_filter_fn"]


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------
class ConvNormAct(_TimmConvNormAct):
    """timm's ``ConvNormAct`` (same keys) with ``reparameterize()``: BatchNorm folded into a biased conv,
    its activation kept (``timm.utils.reparameterize_model`` finds it).

    Outside TorchScript it takes the fast path shared with FFNet (see "fast paths" in the module
    docstring): a 1x1 conv runs as a GEMM on the NHWC view, an eval-mode BatchNorm is folded into the
    conv (cached, exact), and the activation runs on the NHWC view. With batch statistics (training)
    the BatchNorm runs as a module."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        c = self.conv
        self.fast = type(c) is nn.Conv2d and c.padding_mode == "zeros" and getattr(self, "aa", None) is None
        self.is_pointwise = self.fast and c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0) and c.groups == 1
        self.fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H/s, W/s]
        if not torch.jit.is_scripting():
            if self.fast:
                return self._forward_fast(x)
        return self.bn(self.conv(x))

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if bn_folds(bn):
            y = self._conv(x, *self.fold_cache.get(self.fold_sources(), bn.eps, self._fold))
            return act_nhwc(bn.act, bn.drop(y))
        if isinstance(bn, nn.Sequential):  # re-parameterised (or no norm): the conv carries the bias
            return act_nhwc(bn, self._conv(x, self.conv.weight, self.conv.bias))
        return bn(self._conv(x, self.conv.weight, self.conv.bias))

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.is_pointwise:
            return pointwise_conv(x, weight, bias)
        c = self.conv
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def fold_sources(self) -> List[torch.Tensor]:
        conv = [self.conv.weight] if self.conv.bias is None else [self.conv.weight, self.conv.bias]
        return conv + bn_sources(self.bn)

    def _fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of ``bn(conv(x))`` with the eval-mode BatchNorm folded in (differentiable)."""
        scale, shift = bn_scale_shift(self.bn)
        bias = shift if self.conv.bias is None else self.conv.bias * scale + shift
        return self.conv.weight * scale.reshape(-1, 1, 1, 1), bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return  # already fused (or no norm)
        self.conv = conv_with_weights(self.conv, *self._fold())
        self.bn = nn.Sequential(getattr(bn, "drop", nn.Identity()), getattr(bn, "act", nn.Identity()))
        self.fold_cache.clear()


class MobileBlock(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 project (no act).

    The expansion is skipped when ``expand_ratio == 1``; the skip connection is used when the
    stride is 1 and the channel count is unchanged. Hidden width is
    ``make_divisible(round(in_chs * expand_ratio), 8)`` as in the authors' code.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        expand_ratio: float = 2.0,
        act_layer: Callable[..., nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        hidden = make_divisible(int(round(in_chs * expand_ratio)), 8)
        self.conv_exp = (
            ConvNormAct(in_chs, hidden, 1, act_layer=act_layer) if expand_ratio != 1 else nn.Identity()
        )
        self.conv_dw = ConvNormAct(hidden, hidden, 3, stride=stride, groups=hidden, act_layer=act_layer)
        self.conv_pwl = ConvNormAct(hidden, out_chs, 1, apply_act=False)
        self.has_skip = stride == 1 and in_chs == out_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H/s, W/s]
        y = self.conv_pwl(self.conv_dw(self.conv_exp(x)))
        return x + y if self.has_skip else y


@register_notrace_module  # FX: one leaf (FFTs in float32 with autocast off, a device-dependent context)
class AdaptiveFrequencyFilter(nn.Module):
    """The AFF token mixer: a content-adaptive mask applied to the 2-D spectrum, plus the input.

    ``X = rfft2(x, norm='ortho')`` is split into ``num_groups`` channel groups; a complex two-layer
    MLP shared over frequencies (weights ``[in, out]`` per group, real part index 0, imaginary
    part index 1; activation applied to real and imaginary parts separately; softshrink on the
    output) gives the mask ``M``; the result is ``irfft2(M * X, s=(H, W), norm='ortho') + x``.
    Computed in float32 with autocast disabled, cast back to the input dtype. :meth:`_filter` is the
    complex statement (TorchScript's path); :meth:`_filter_fast` computes the same with real GEMMs.
    """

    def __init__(
        self,
        dim: int,
        num_groups: int = 8,
        sparsity_threshold: float = 0.01,
        act_layer: Callable[..., nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        if dim % num_groups:
            raise ValueError(f"AdaptiveFrequencyFilter: dim {dim} must be divisible by num_groups {num_groups}")
        self.dim = dim
        self.num_groups = num_groups
        self.group_size = dim // num_groups
        self.sparsity_threshold = sparsity_threshold
        g, s = num_groups, self.group_size
        self.w1 = nn.Parameter(0.02 * torch.randn(2, g, s, s))  # [re/im, group, in, out]
        self.b1 = nn.Parameter(0.02 * torch.randn(2, g, s))  # [re/im, group, out]
        self.w2 = nn.Parameter(0.02 * torch.randn(2, g, s, s))
        self.b2 = nn.Parameter(0.02 * torch.randn(2, g, s))
        self.act1 = act_layer()
        self.act2 = act_layer()
        self.fold_cache = FoldCache()  # eval-time block weights of the fast path

    @staticmethod
    def _complex_linear(
        re: torch.Tensor, im: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        # re/im: [B, G, I, h, w]; w: [2, G, I, O]; b: [2, G, O]
        out_re = torch.einsum("bgihw,gio->bgohw", re, w[0]) - torch.einsum("bgihw,gio->bgohw", im, w[1])
        out_im = torch.einsum("bgihw,gio->bgohw", im, w[0]) + torch.einsum("bgihw,gio->bgohw", re, w[1])
        return out_re + b[0, :, :, None, None], out_im + b[1, :, :, None, None]

    def _filter(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] float32 -> [B, C, H, W] float32
        B, C, H, W = x.shape
        spec = torch.fft.rfft2(x, dim=(2, 3), norm="ortho")  # [B, C, H, W//2+1] complex
        grouped = spec.reshape(B, self.num_groups, self.group_size, H, spec.shape[-1])
        h_re, h_im = self._complex_linear(grouped.real, grouped.imag, self.w1.float(), self.b1.float())
        h_re, h_im = self.act1(h_re), self.act2(h_im)
        m_re, m_im = self._complex_linear(h_re, h_im, self.w2.float(), self.b2.float())
        m_re = F.softshrink(m_re, lambd=self.sparsity_threshold)
        m_im = F.softshrink(m_im, lambd=self.sparsity_threshold)
        mask = torch.complex(m_re, m_im).reshape(B, C, H, spec.shape[-1])
        return torch.fft.irfft2(mask * spec, s=(H, W), dim=(2, 3), norm="ortho")

    def _real_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The two complex layers as real block matrices ``[G, 2S_out, 2S_in]`` and biases ``[G, 2S, 1]``.

        Rows and columns are ordered re block | im block: ``[re'; im'] = [[A, -B], [B, A]] [re; im]``
        with ``A``, ``B`` the real and imaginary weights transposed to (out, in). One GEMM per group
        replaces the four real einsums of the complex product (same multiply-adds).
        """
        g, s = self.num_groups, self.group_size

        def block(w: torch.Tensor) -> torch.Tensor:
            re, im = w[0].float().transpose(1, 2), w[1].float().transpose(1, 2)  # [G, out, in]
            return torch.cat((torch.cat((re, -im), dim=2), torch.cat((im, re), dim=2)), dim=1)

        def bias(b: torch.Tensor) -> torch.Tensor:
            return b.float().permute(1, 0, 2).reshape(g, 2 * s, 1)

        return block(self.w1), bias(self.b1), block(self.w2), bias(self.b2)

    def _filter_fast(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] float32 -> [B, C, H, W] float32
        """:meth:`_filter` with the complex MLP as two batched real GEMMs on the channel-first spectrum.

        The FFTs run on NCHW-contiguous data (their transform axes innermost, what pocketfft/MKL
        want); the GEMMs multiply the block weights into ``[re; im]`` stacked along channels, so
        no transpose of the spectrum is needed. Eval-mode block weights are cached (:class:`FoldCache`).
        """
        B, C, H, W = x.shape
        g, s = self.num_groups, self.group_size
        spec = torch.fft.rfft2(x.contiguous(), dim=(2, 3), norm="ortho")  # [B, C, H, Wf] complex
        wf = spec.shape[-1]
        n = H * wf
        z = torch.cat((spec.real.reshape(B, g, s, n), spec.imag.reshape(B, g, s, n)), dim=2)  # [B, G, 2S, N]
        sources = [self.w1, self.b1, self.w2, self.b2]
        m1, b1, m2, b2 = self.fold_cache.get(sources, None, self._real_weights)
        h = torch.matmul(m1, z) + b1
        h = torch.cat((self.act1(h[:, :, :s]), self.act2(h[:, :, s:])), dim=2)
        m = F.softshrink(torch.matmul(m2, h) + b2, lambd=self.sparsity_threshold)
        mask = torch.complex(m[:, :, :s], m[:, :, s:]).reshape(B, C, H, wf)
        return torch.fft.irfft2(mask * spec, s=(H, W), dim=(2, 3), norm="ortho")

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """The fast filter in float32 with autocast off; the sum keeps ``x``'s memory format (channels-last inside)."""
        if torch.amp.is_autocast_available(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = self._filter_fast(x.float())
        else:  # e.g. the meta device: no autocast to leave
            out = self._filter_fast(x.float())
        return x + out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H, W]
        if torch.jit.is_scripting():
            return self._filter(x.float()).to(x.dtype) + x  # TorchScript: the NCHW complex form, no autocast to leave
        return self._forward_fast(x)


class AFFLayer(nn.Module):
    """One AFF layer: ``x + drop_path(AFF(norm2(MV2(norm1(x)))))`` (MV2 and AFF have inner skips)."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 2.0,
        drop_path: float = 0.0,
        num_groups: int = 8,
        sparsity_threshold: float = 0.01,
        act_layer: Callable[..., nn.Module] = nn.SiLU,
        norm_layer: Callable[..., nn.Module] = GroupNorm1,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.mlp = MobileBlock(dim, dim, stride=1, expand_ratio=mlp_ratio, act_layer=act_layer)
        self.norm2 = norm_layer(dim)
        self.filter = AdaptiveFrequencyFilter(dim, num_groups, sparsity_threshold, act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        y = self.filter(self.norm2(self.mlp(self.norm1(x))))
        return x + self.drop_path(y)


class AFFBlock(nn.Module):
    """AFF layers -> GroupNorm(1) -> 1x1 conv+BN projection -> 1x1 conv+BN+act fusion of [input, projection]."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        depth: int,
        drop_path: Sequence[float] = (),
        fusion: bool = True,
        num_groups: int = 8,
        sparsity_threshold: float = 0.01,
        act_layer: Callable[..., nn.Module] = nn.SiLU,
        norm_layer: Callable[..., nn.Module] = GroupNorm1,
    ) -> None:
        super().__init__()
        dpr = list(drop_path) or [0.0] * depth
        self.layers = nn.Sequential(
            *[
                AFFLayer(dim, ffn_dim / dim, dpr[i], num_groups, sparsity_threshold, act_layer, norm_layer)
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(dim)
        self.conv_proj = ConvNormAct(dim, dim, 1, apply_act=False)
        self.conv_fusion = ConvNormAct(2 * dim, dim, 1, act_layer=act_layer) if fusion else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        y = self.conv_proj(self.norm(self.layers(x)))
        if self.conv_fusion is not None:
            y = self.conv_fusion(torch.cat((x, y), dim=1))
        return y


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
class AFFNet(nn.Module):
    """AFFNet classifier / backbone.

    Args:
        widths: output channels of the five stages (strides 2, 4, 8, 16, 32).
        depths: MV2 block count for stages 0-1, AFF layer count for stages 2-4.
        expand_ratio: MV2 expansion ratio of every MobileNetV2 block outside the AFF layers.
        ffn_ratio: expansion ratio of the MV2 "MLP" inside every AFF layer (ffn_dim / dim).
        stem_chs: stem output channels.
        last_exp_factor: the expansion conv has ``min(last_exp_factor * widths[-1], 960)`` channels.
        num_groups: channel groups of the frequency filter (block-diagonal complex MLP).
        sparsity_threshold: softshrink lambda of the filter mask.
        fusion: fuse the AFFBlock output with its input (True in every released variant).
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: timm's meanings.
        device, dtype: where and in which dtype parameters are created (timm's ``create_model`` arguments).
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 48, 64, 104, 144),
        depths: Sequence[int] = (1, 3, 2, 4, 3),
        expand_ratio: float = 2.0,
        ffn_ratio: float = 2.0,
        stem_chs: int = 16,
        last_exp_factor: int = 4,
        num_groups: int = 8,
        sparsity_threshold: float = 0.01,
        fusion: bool = True,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.SiLU,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        with factory_device(device):
            self._build(
                widths, depths, expand_ratio, ffn_ratio, stem_chs, last_exp_factor, num_groups,
                sparsity_threshold, fusion, in_chans, num_classes, global_pool, drop_rate, drop_path_rate, act_layer,
            )
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(
        self, widths, depths, expand_ratio, ffn_ratio, stem_chs, last_exp_factor, num_groups,
        sparsity_threshold, fusion, in_chans, num_classes, global_pool, drop_rate, drop_path_rate, act_layer,
    ) -> None:
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"AFFNet: widths and depths need 5 entries, got {widths} and {depths}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = ConvNormAct(in_chans, stem_chs, 3, stride=2, act_layer=act_layer)
        aff_total = sum(depths[2:])
        dpr = [drop_path_rate * i / max(aff_total - 1, 1) for i in range(aff_total)]  # linspace(0, rate)
        stages: List[nn.Module] = []
        self.feature_info = []
        prev, reduction, cursor = stem_chs, 2, 0
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            if i < 2:
                blocks = [
                    MobileBlock(prev if j == 0 else width, width, stride if j == 0 else 1, expand_ratio, act_layer)
                    for j in range(depth)
                ]
            else:
                blocks = [
                    MobileBlock(prev, width, stride, expand_ratio, act_layer),
                    AFFBlock(
                        width,
                        int(round(width * ffn_ratio)),
                        depth,
                        dpr[cursor : cursor + depth],
                        fusion,
                        num_groups,
                        sparsity_threshold,
                        act_layer,
                    ),
                ]
                cursor += depth
            stages.append(nn.Sequential(*blocks))
            prev = width
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = min(last_exp_factor * prev, 960)
        self.final_conv = ConvNormAct(prev, self.num_features, 1, act_layer=act_layer)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        if not next(self.parameters()).is_meta:
            self.apply(self._init_weights)  # skipped on the meta device (no values; trunc_normal_ is slow there)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- re-parameterisation -------------------------------------------------------------------
    @torch.no_grad()
    def reparameterize(self) -> "AFFNet":
        """Fold every BatchNorm into its conv (inference structure) in place; returns ``self``.

        Each ``ConvNormAct`` becomes a biased conv followed by its activation; outputs are unchanged up to
        float32 re-association (the GroupNorms of the AFF layers depend on the input and stay). Same
        as ``timm.utils.reparameterize_model(model)``. The state dict then has the fused layout
        (``*.conv.bias``, no ``*.bn.*``); call it after loading the training checkpoint.
        """
        for m in self.modules():
            if isinstance(m, ConvNormAct):
                m.reparameterize()
        return self

    def train(self, mode: bool = True) -> "AFFNet":
        """``nn.Module.train``; entering training also drops the eval-time folded-weight caches."""
        super().train(mode)
        if mode:
            clear_fold_caches(self)
        return self

    # --- timm API ----------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.(\d+)\.layers\.(\d+)", None),
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^final_conv", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable  # checkpoints every MV2 block and every AFFBlock

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # the frequency filter's complex biases (3-D tensors, so timm's ndim<=1 rule misses them)
        return {n for n, _ in self.named_parameters() if n.endswith(".filter.b1") or n.endswith(".filter.b2")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))  # new head where the model is

    def _name(self) -> str:
        """Variant name for error messages (``"AFFNet"`` under TorchScript, which cannot read the cfg dict)."""
        if torch.jit.is_scripting():
            return "AFFNet"
        return self._variant_name()

    @torch.jit.unused
    def _variant_name(self) -> str:
        cfg = getattr(self, "pretrained_cfg", None) or {}
        return cfg.get("architecture", type(self).__name__)

    def forward_intermediates(
        self,
        x: torch.Tensor,  # [B, in_chans, H, W]
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 2..32, NCHW) and, unless ``intermediates_only``, the final features.

        ``norm`` is accepted for API compatibility; AFFNet has no final norm (the 1x1 expansion
        conv is applied to the final features only).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"{self._name()}: output_fmt must be 'NCHW', got {output_fmt!r}")
        check_input(x, self.in_chans, self._name())
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        x = self.stem(x.contiguous(memory_format=torch.channels_last))  # channels-last inside (see "fast paths")
        stages = self.stages if (torch.jit.is_scripting() or not stop_early) else self.stages[: max_index + 1]
        last = len(self.stages) - 1
        feat_idx = -1
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x.contiguous())
        if intermediates_only:
            return intermediates
        if feat_idx == last:
            x = self.final_conv(x)
        return x.contiguous(), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:
            self.final_conv = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, H, W] -> [B, num_features, ceil(H/32), ceil(W/32)] (after the expansion conv)."""
        check_input(x, self.in_chans, self._name())
        x = self.stem(x.contiguous(memory_format=torch.channels_last))  # channels-last inside (see "fast paths")
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.final_conv(x).contiguous()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[B, num_features, h, w] -> [B, num_classes] logits (or [B, num_features] pooled if ``pre_logits``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in_chans, H, W] -> [B, num_classes]
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# authors' checkpoints
# ---------------------------------------------------------------------------------------------
_RENAMES = [
    (re.compile(r"^conv_1\."), "stem."),
    (re.compile(r"^layer_(\d)\."), lambda m: f"stages.{int(m.group(1)) - 1}."),
    (re.compile(r"^conv_1x1_exp\."), "final_conv."),
    (re.compile(r"^classifier\.fc\."), "head.fc."),
    (re.compile(r"\.block\."), "."),
    (re.compile(r"\.exp_1x1\."), ".conv_exp."),
    (re.compile(r"\.conv_3x3\."), ".conv_dw."),
    (re.compile(r"\.red_1x1\."), ".conv_pwl."),
    (re.compile(r"\.norm\.(weight|bias|running_mean|running_var|num_batches_tracked)$"), r".bn.\1"),
    (re.compile(r"\.global_rep\.(\d+)\.(weight|bias)$"), r".norm.\2"),
    (re.compile(r"\.global_rep\."), ".layers."),
    (re.compile(r"\.fusion\."), ".conv_fusion."),
]


def _convert_key(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an AFFNet checkpoint (the authors' cvnets layout, or ours) to this model's keys.

    Accepts EMA / ``model`` / ``state_dict`` wrappers and a ``module.`` prefix. Raises
    ``ValueError`` naming the variant and the offending keys/shapes when the checkpoint belongs
    to another variant.
    """
    sd = unwrap_state_dict(state_dict)
    if any(k.startswith("conv_1.") or k.startswith("layer_1.") for k in sd):
        sd = {_convert_key(k): v for k, v in sd.items()}
    # the authors' GroupNorm keys are 'layer_k.1.global_rep.{n}.{weight,bias}' for the final norm,
    # which the pattern above maps; their per-layer norms keep the names norm1/norm2.
    check_converted_state_dict(sd, model, skip=("head.fc.",))
    return sd


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
_WEIGHTS_WHERE = (
    "the OneDrive folder linked for this variant in the README of "
    "https://github.com/microsoft/TokenMixers/tree/main/Adaptive%20Frequency%20Filters"
)

_ARCHS: Dict[str, Dict[str, Any]] = {
    "affnet_et": dict(widths=(32, 48, 64, 104, 144), depths=(1, 3, 2, 4, 3), expand_ratio=2.0),
    "affnet_t": dict(widths=(32, 48, 96, 160, 192), depths=(1, 3, 2, 4, 3), expand_ratio=4.0),
    "affnet": dict(widths=(32, 64, 128, 256, 320), depths=(1, 3, 2, 4, 3), expand_ratio=4.0),
}


def _create_affnet(variant: str, pretrained: bool = False, **kwargs: Any) -> AFFNet:
    require_local_weights(variant, pretrained, kwargs, _WEIGHTS_WHERE)
    model_args = dict(_ARCHS[variant], **kwargs)
    return build_model_with_cfg(
        AFFNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)),
        **model_args,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 256, 256),
        "pool_size": (8, 8),
        "crop_pct": 0.9,
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "stem.conv",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2307.14008",
        "paper_name": "Adaptive Frequency Filters As Efficient Global Token Mixers",
        "origin_url": "https://github.com/microsoft/TokenMixers",
        "notes": (
            "ImageNet-1k weights are in OneDrive folders linked from the authors' README; pass "
            "pretrained_cfg_overlay=dict(file=...). Inputs in [0, 1] without mean/std normalisation "
            "(cvnets convention).",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "affnet_et.in1k": _cfg(description="AFFNet-ET (authors' mode 'xx_small'), 73.0% top-1"),
        "affnet_t.in1k": _cfg(description="AFFNet-T (authors' mode 'x_small'), 77.0% top-1"),
        "affnet.in1k": _cfg(description="AFFNet (authors' mode 'small'), 79.8% top-1"),
    }
)


@register_model
def affnet_et(pretrained: bool = False, **kwargs: Any) -> AFFNet:
    """AFFNet-ET (extremely tiny), 1.4M parameters."""
    return _create_affnet("affnet_et", pretrained=pretrained, **kwargs)


@register_model
def affnet_t(pretrained: bool = False, **kwargs: Any) -> AFFNet:
    """AFFNet-T (tiny), 2.6M parameters."""
    return _create_affnet("affnet_t", pretrained=pretrained, **kwargs)


@register_model
def affnet(pretrained: bool = False, **kwargs: Any) -> AFFNet:
    """AFFNet, 5.5M parameters."""
    return _create_affnet("affnet", pretrained=pretrained, **kwargs)
