"""FFNet (MetaMixer): FFN-like convolutional token mixers, as timm models, with re-parameterisation.

Source
------
- Paper: Seokju Yun, Dongheon Lee, Youngmin Ro, "MetaMixer Is All You Need" (later retitled
  "FFNet: MetaMixer-based Efficient Convolutional Mixer Design"), 2024, arXiv:2406.02021.
- Code: https://github.com/ysj9909/FFNet (commit f3c3e4c56821eb1665300abe9248e4d8ea0d9c02),
  ``models/ffnet.py`` and ``export_model.py``; Apache-2.0 licence (code and released weights).
  This file is a re-implementation on ``timm.layers``; no line of the authors' code is kept.
- Weights: GitHub release v1.0 of the authors' repository (``ffnet_{1,2,3}.pth.tar``,
  ``*_distillation.pth.tar``, ``ffnet_3_384.pth.tar``, ``ffnet_4_384.pth.tar``). vision3d never
  downloads: pass ``pretrained_cfg_overlay=dict(file=path)``. ``checkpoint_filter_fn`` converts
  the authors' key layout (EMA/``model``/``state_dict`` wrappers, ``module.`` prefix).

Architecture
------------
Stem: 3x3 s2 conv+BN -> GELU -> 3x3 s2 conv+BN. Four stages (strides 4, 8, 16, 32); stages 1-3
start with a patch merging ``x -> RepDW7x7 s2 (groups = C_in, C_out = 2 C_in) -> y + conv1x1(BN(y))``.
Each FFBlock is two residual branches (optional layer scale):

- FFNified attention (token mixer): ``dw_k2(GELU(dw_k1(conv1x1+BN(x))))``, then an optional SE;
- ConvNeXt-like channel mixer: ``fc2(GELU(fc1(dw_k(x))))`` with hidden width ``3 C``.

Depthwise convolutions with kernel 7 are RepVGG-style pairs (7x7 conv+BN plus 3x3 conv+BN);
kernel-3 token-mixer convs are plain biased depthwise convs, kernel-3 channel-mixer convs are
conv+BN. A final BatchNorm precedes average pooling and the linear classifier.

Re-parameterisation: ``model.reparameterize()`` (or ``timm.utils.reparameterize_model(model)``)
folds every BatchNorm that follows or precedes a conv into it, merges each RepVGG pair into one
7x7 depthwise conv, and merges the patch-merging 1x1 skip into its conv, exactly like the
authors' ``export_model.replace_batchnorm``; outputs are unchanged (float32 re-association only).

Speed (eager CPU; see "fast paths" below): activations are channels-last inside the model, 1x1 convs
run as GEMMs on the NHWC view (their weights stay ``[C_out, C_in, 1, 1]`` conv weights, so every
state-dict key and shape is the authors'/timm's as before), activations run on the NHWC view, and
in eval mode the training structure folds its BatchNorms and RepVGG pairs on the fly (cached,
exactly invalidated), so it computes like the deploy structure. TorchScript keeps the plain
module calls (the exact slow twin, also used as the oracle in ``tests/backbones/test_ffnet.py``).
Measured with ``tools/bench/backbones.py --peers --threads 1`` (CPU, batch 1, 224 px, 3 runs on a
shared 2-core machine; time per GMAC, ffnet_1 / convnext_nano, median per-round ratio): training
structure in eval 1.34x before -> 1.18x (runs 1.06, 1.18, 1.18), deploy 1.18x -> 1.12x.

Official variants (ImageNet-1k; README of the authors' repository)

==========  ==========  ==========  =======  ======  ==============  ===============
timm name   resolution  top-1       params   FLOPs   counted: train  counted: deploy
==========  ==========  ==========  =======  ======  ==============  ===============
ffnet_1     256         81.3/82.1d  13.7M    2.9G    13,775,656      13,660,152
ffnet_2     256         82.9/83.7d  26.9M    6.0G    27,208,408      26,908,440
ffnet_3     256 / 384   83.9/84.5d  48.3M    10.1G   48,817,896      48,330,632
ffnet_4     384         85.3        79.2M    43.1G   79,868,968      79,200,360
==========  ==========  ==========  =======  ======  ==============  ===============

("d": trained with distillation.) The authors train with stochastic depth 0.1 / 0.15 / 0.35 / 0.4
(pass ``drop_path_rate``; the default here is 0, timm's convention). The README counts the re-parameterised (deploy) structure,
rounded to one decimal; both columns equal the authors' code (training structure, and after
their ``replace_batchnorm``) with 1000 classes.
"""

import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, LayerScale2d, SqueezeExcite, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.utils.model import reparameterize_model

from vision3d.backbones._helpers import (
    FoldCache,
    act_nhwc,
    bn_folds,
    bn_scale_shift,
    bn_sources,
    check_converted_state_dict,
    clear_fold_caches,
    conv_with_weights,
    factory_device,
    pointwise_conv,
    require_local_weights,
    unwrap_state_dict,
)
from vision3d.backbones._helpers import check_input

__all__ = ["FFNet", "checkpoint_filter_fn", "checkpoint_layout"]


# ---------------------------------------------------------------------------------------------
# fast paths (eager, FX, dynamo/inductor, export; TorchScript runs the plain module calls);
# the helpers (pointwise_conv, act_nhwc, FoldCache, ...) live in _helpers.py, shared with AFFNet
# ---------------------------------------------------------------------------------------------
# Activations travel as NCHW-shaped tensors in channels-last memory (``forward_features`` converts
# the input once): depthwise convolutions then run oneDNN's NHWC kernels without layout reorders,
# pointwise convolutions become one GEMM (``F.linear`` on the NHWC view, the weight stays the
# ``[C_out, C_in, 1, 1]`` conv weight so state dicts are unchanged), and activations run on the
# contiguous NHWC view (``aten::gelu`` on a channels-last NCHW tensor is several times slower on
# the CPU). In eval mode every BatchNorm that follows a conv is folded into that conv's weight and
# bias on the fly, and a RepVGG pair into one kernel, so the training structure computes like the
# deploy one; with batch statistics (training) the BatchNorms run as modules.
class ActNhwc(nn.Module):
    """An element-wise activation that runs on the NHWC view of its NCHW-shaped input."""

    def __init__(self, act_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.act = act_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        if not torch.jit.is_scripting():
            return act_nhwc(self.act, x)
        return self.act(x)


# ---------------------------------------------------------------------------------------------
# re-parameterisable blocks
# ---------------------------------------------------------------------------------------------
class ConvBn(nn.Module):
    """Conv (no bias, 'same' padding ``k // 2``) followed by BatchNorm; fuses into one biased conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_chs)
        self.is_pointwise = kernel_size == 1 and stride == 1 and groups == 1
        self.fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H/s, W/s]
        if not torch.jit.is_scripting():
            return self._forward_fast(x)
        return self.bn(self.conv(x))

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.bn, nn.Identity):  # re-parameterised: the conv carries the bias
            return self._conv(x, self.conv.weight, self.conv.bias)
        if bn_folds(self.bn):
            return self._conv(x, *self.fold_cache.get(self.fold_sources(), self.bn.eps, self._fold))
        return self.bn(self._conv(x, self.conv.weight, None))

    def fold_sources(self) -> List[torch.Tensor]:
        return [self.conv.weight] + bn_sources(self.bn)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.is_pointwise:
            return pointwise_conv(x, weight, bias)
        c = self.conv
        return F.conv2d(x, weight, bias, c.stride, c.padding, c.dilation, c.groups)

    def _fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of ``bn(conv(x))`` with the eval-mode BatchNorm folded in (differentiable)."""
        if isinstance(self.bn, nn.Identity):
            return self.conv.weight, self.conv.bias
        scale, shift = bn_scale_shift(self.bn)
        return self.conv.weight * scale.reshape(-1, 1, 1, 1), shift

    @torch.no_grad()
    def fused_weight_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._fold()

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.Identity):
            return
        w, b = self.fused_weight_bias()
        self.conv = conv_with_weights(self.conv, w, b)
        self.bn = nn.Identity()


class RepDwConv(nn.Module):
    """RepVGG-style depthwise conv: ``k x k`` conv+BN plus ``(k//2) x (k//2)`` conv+BN (same stride, groups).

    ``reparameterize()`` zero-pads the small kernel to ``k x k`` and adds both into ``reparam_conv``;
    in eval mode the forward computes that merged kernel on the fly (one conv instead of two).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 7, stride: int = 1) -> None:
        super().__init__()
        small = kernel_size // 2
        if small % 2 == 0:
            raise ValueError(f"RepDwConv: kernel_size {kernel_size} needs an odd kernel_size // 2")
        self.large: Optional[ConvBn] = ConvBn(in_chs, out_chs, kernel_size, stride, groups=in_chs)
        self.small: Optional[ConvBn] = ConvBn(in_chs, out_chs, small, stride, groups=in_chs)
        self.reparam_conv: Optional[nn.Conv2d] = None
        self.fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H/s, W/s]
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        if not torch.jit.is_scripting():
            return self._forward_fast(x)
        return self.large(x) + self.small(x)

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if bn_folds(self.large.bn) and bn_folds(self.small.bn):
            sources = self.large.fold_sources() + self.small.fold_sources()
            w, b = self.fold_cache.get(sources, (self.large.bn.eps, self.small.bn.eps), self._merged)
            c = self.large.conv
            return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
        return self.large(x) + self.small(x)

    def _merged(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The pair as one ``k x k`` kernel and bias (BatchNorms folded; differentiable)."""
        wl, bl = self.large._fold()
        ws, bs = self.small._fold()
        pad = (wl.shape[-1] - ws.shape[-1]) // 2
        return wl + F.pad(ws, [pad] * 4), bl + bs

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        w, b = self._merged()
        self.reparam_conv = conv_with_weights(self.large.conv, w, b)
        self.large = None
        self.small = None


class BnConvSkip(nn.Module):
    """``x + conv1x1(BN(x))`` (no conv bias); ``reparameterize()`` folds BN and identity into one conv."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(dim)
        self.conv: Optional[nn.Conv2d] = nn.Conv2d(dim, dim, 1, bias=False)
        self.reparam_conv: Optional[nn.Conv2d] = None
        self.fold_cache = FoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        if not torch.jit.is_scripting():
            return self._forward_fast(x)
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.conv(self.bn(x))

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return pointwise_conv(x, self.reparam_conv.weight, self.reparam_conv.bias)
        if bn_folds(self.bn):
            sources = [self.conv.weight] + bn_sources(self.bn)
            return x + pointwise_conv(x, *self.fold_cache.get(sources, self.bn.eps, self._fold))
        return x + pointwise_conv(self.bn(x), self.conv.weight, None)

    def _fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``conv(bn(x))`` as one biased 1x1 conv (eval-mode BatchNorm; differentiable)."""
        scale, shift = bn_scale_shift(self.bn)
        w = self.conv.weight  # [C, C, 1, 1]
        return w * scale.reshape(1, -1, 1, 1), w.flatten(1) @ shift

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.reparam_conv is not None:
            return
        fused_w, fused_b = self._fold()
        w = self.conv.weight
        eye = torch.eye(w.shape[0], device=w.device, dtype=w.dtype)[:, :, None, None]
        self.reparam_conv = conv_with_weights(self.conv, fused_w + eye, fused_b)
        self.bn = None
        self.conv = None


def _dw(dim: int, kernel_size: int, with_bn: bool) -> nn.Module:
    """Depthwise conv of the authors' choice: RepVGG pair for kernel 7, else conv(+BN or +bias)."""
    if kernel_size == 7:
        return RepDwConv(dim, dim, kernel_size)
    if with_bn:
        return ConvBn(dim, dim, kernel_size, groups=dim)
    return nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)


class TokenMixer(nn.Module):
    """FFNified attention: ``conv2(act(conv1(fc(x))))``, fc = 1x1 conv+BN, conv1/conv2 depthwise."""

    def __init__(self, dim: int, kernel_size1: int, kernel_size2: int, act_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.fc = ConvBn(dim, dim)
        self.conv1 = _dw(dim, kernel_size1, with_bn=False)
        self.act = act_layer()
        self.conv2 = _dw(dim, kernel_size2, with_bn=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        if not torch.jit.is_scripting():
            return self.conv2(act_nhwc(self.act, self.conv1(self.fc(x))))
        return self.conv2(self.act(self.conv1(self.fc(x))))


class ChannelMixer(nn.Module):
    """ConvNeXt-like FFN: ``fc2(act(fc1(dw(x))))`` with biased 1x1 convs (GEMMs over the NHWC view)."""

    def __init__(self, dim: int, kernel_size: int, expansion_ratio: float, act_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        hidden = int(dim * expansion_ratio)
        self.conv = _dw(dim, kernel_size, with_bn=True)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        if not torch.jit.is_scripting():
            y = self.conv(x).permute(0, 2, 3, 1)  # [B, H, W, C]
            y = F.linear(self.act(F.linear(y, self.fc1.weight.flatten(1), self.fc1.bias)), self.fc2.weight.flatten(1), self.fc2.bias)
            return y.permute(0, 3, 1, 2)
        return self.fc2(self.act(self.fc1(self.conv(x))))


class FFBlock(nn.Module):
    """``x = x + dp(ls1(token_mixer(x))); x = se(x); x = x + dp(ls2(channel_mixer(x)))``."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        kernel_size1: int,
        kernel_size2: int,
        expansion_ratio: float = 3.0,
        use_se: bool = False,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        layer_scale_init_value: Optional[float] = None,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.token_mixer = TokenMixer(dim, kernel_size1, kernel_size2, act_layer)
        self.ls1 = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.se = SqueezeExcite(dim, 0.25) if use_se else nn.Identity()
        self.channel_mixer = ChannelMixer(dim, kernel_size, expansion_ratio, act_layer)
        self.ls2 = LayerScale2d(dim, layer_scale_init_value) if layer_scale_init_value else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W]
        x = x + self.drop_path(self.ls1(self.token_mixer(x)))
        x = self.se(x)
        return x + self.drop_path(self.ls2(self.channel_mixer(x)))


class PatchMerging(nn.Module):
    """Stride-2 RepVGG depthwise 7x7 (channel multiplier ``out/in``) then ``y + conv1x1(BN(y))``."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.dw = RepDwConv(in_chs, out_chs, 7, stride=2)
        self.pw = BnConvSkip(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C_in, H, W] -> [B, C_out, H/2, W/2]
        return self.pw(self.dw(x))


class FFNetStage(nn.Module):
    def __init__(self, downsample: nn.Module, blocks: List[nn.Module]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
class FFNet(nn.Module):
    """FFNet classifier / backbone.

    Args:
        embed_dims: channels of the four stages (strides 4, 8, 16, 32).
        depths: FFBlocks per stage.
        stem_chs: channels after the first stem conv.
        kernel_sizes: channel-mixer depthwise kernel per stage (7 = RepVGG pair).
        kernel_sizes1, kernel_sizes2: token-mixer depthwise kernels per stage.
        expansion_ratios: channel-mixer hidden ratio per stage.
        use_ses: SE after the token mixer of even-indexed blocks, per stage.
        use_gelus: GELU (True) or ReLU per stage.
        layer_scale_init_value: layer-scale init (None or 0 = no layer scale).
        in_chans, num_classes, global_pool, drop_rate, drop_path_rate: timm's meanings.
        device, dtype: where and in which dtype parameters are created (timm's ``create_model`` arguments).
    """

    def __init__(
        self,
        embed_dims: Sequence[int] = (80, 160, 320, 640),
        depths: Sequence[int] = (2, 2, 8, 2),
        stem_chs: int = 64,
        kernel_sizes: Sequence[int] = (3, 3, 3, 3),
        kernel_sizes1: Sequence[int] = (3, 3, 7, 7),
        kernel_sizes2: Sequence[int] = (3, 3, 7, 7),
        expansion_ratios: Sequence[float] = (3, 3, 3, 3),
        use_ses: Sequence[bool] = (False, False, False, False),
        use_gelus: Sequence[bool] = (True, True, True, True),
        layer_scale_init_value: Optional[float] = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        with factory_device(device):
            self._build(
                embed_dims, depths, stem_chs, kernel_sizes, kernel_sizes1, kernel_sizes2, expansion_ratios, use_ses,
                use_gelus, layer_scale_init_value, in_chans, num_classes, global_pool, drop_rate, drop_path_rate,
            )
        if dtype is not None:
            self.to(dtype=dtype)

    def _build(
        self, embed_dims, depths, stem_chs, kernel_sizes, kernel_sizes1, kernel_sizes2, expansion_ratios, use_ses,
        use_gelus, layer_scale_init_value, in_chans, num_classes, global_pool, drop_rate, drop_path_rate,
    ) -> None:
        n = len(embed_dims)
        for name, seq in dict(
            depths=depths,
            kernel_sizes=kernel_sizes,
            kernel_sizes1=kernel_sizes1,
            kernel_sizes2=kernel_sizes2,
            expansion_ratios=expansion_ratios,
            use_ses=use_ses,
            use_gelus=use_gelus,
        ).items():
            if len(seq) != n:
                raise ValueError(f"FFNet: {name} needs {n} entries (one per stage), got {list(seq)}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.stem = nn.Sequential(
            ConvBn(in_chans, stem_chs, 3, stride=2),
            ActNhwc(nn.GELU),
            ConvBn(stem_chs, embed_dims[0], 3, stride=2),
        )
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace(0, rate, total)
        stages, cursor = [], 0
        self.feature_info = []
        for i, dim in enumerate(embed_dims):
            act = nn.GELU if use_gelus[i] else nn.ReLU
            blocks = [
                FFBlock(
                    dim,
                    kernel_sizes[i],
                    kernel_sizes1[i],
                    kernel_sizes2[i],
                    expansion_ratios[i],
                    use_se=use_ses[i] and j % 2 == 0,
                    act_layer=act,
                    layer_scale_init_value=layer_scale_init_value,
                    drop_path=dpr[cursor + j],
                )
                for j in range(depths[i])
            ]
            downsample = PatchMerging(embed_dims[i - 1], dim) if i > 0 else nn.Identity()
            stages.append(FFNetStage(downsample, blocks))
            cursor += depths[i]
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        if not next(self.parameters()).is_meta:
            self.apply(self._init_weights)  # skipped on the meta device (no values; trunc_normal_ is slow there)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- re-parameterisation -------------------------------------------------------------------
    @torch.no_grad()
    def reparameterize(self) -> "FFNet":
        """Fuse into the deploy structure in place (BN folding, RepVGG merge); returns ``self``."""
        reparameterize_model(self, inplace=True)
        return self

    def train(self, mode: bool = True) -> "FFNet":
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
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {n for n, _ in self.named_parameters() if n.endswith(".gamma")}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool, **get_device_dtype(self))  # new head where the model is

    def _name(self) -> str:
        """Variant name for error messages (``"FFNet"`` under TorchScript, which cannot read the cfg dict)."""
        if torch.jit.is_scripting():
            return "FFNet"
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
        """Stage outputs (strides 4..32, NCHW); ``norm`` applies the final BatchNorm to the last one."""
        if output_fmt != "NCHW":
            raise ValueError(f"{self._name()}: output_fmt must be 'NCHW', got {output_fmt!r}")
        check_input(x, self.in_chans, self._name())
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        last = len(self.stages) - 1
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        stages = self.stages if (torch.jit.is_scripting() or not stop_early) else self.stages[: max_index + 1]
        feat_idx = -1
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append((self.norm(x) if norm and feat_idx == last else x).contiguous())
        if intermediates_only:
            return intermediates
        if feat_idx == last:
            x = self.norm(x)
        return x.contiguous(), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, in_chans, H, W] -> [B, num_features, ceil(H/32), ceil(W/32)] (after the final BatchNorm; NCHW-contiguous)."""
        check_input(x, self.in_chans, self._name())
        x = self.stem(x.contiguous(memory_format=torch.channels_last))  # channels-last inside (see "fast paths")
        x = self.stages(x)  # each stage checkpoints its blocks when grad checkpointing is on
        return self.norm(x).contiguous()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[B, num_features, h, w] -> [B, num_classes] logits (or pooled [B, num_features] if ``pre_logits``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in_chans, H, W] -> [B, num_classes]
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# authors' checkpoints
# ---------------------------------------------------------------------------------------------
def _convert_authors(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map the authors' training-structure keys (models/ffnet.py) to this file's layout."""
    # RepVGGDW modules: paths R with both R.conv.c.weight and R.conv1.c.weight
    rep = {k[: -len(".conv.c.weight")] for k in sd if k.endswith(".conv.c.weight")}
    rep = {r for r in rep if f"{r}.conv1.c.weight" in sd}
    out = {}
    for key, value in sd.items():
        k = key
        for r in rep:
            if k.startswith(r + ".conv1."):
                k = r + ".small." + k[len(r) + len(".conv1.") :]
                break
            if k.startswith(r + ".conv."):
                k = r + ".large." + k[len(r) + len(".conv.") :]
                break
        k = re.sub(r"^patch_embed\.", "stem.", k)
        k = re.sub(r"^stages\.(\d+)\.0\.proj\.0\.", r"stages.\1.downsample.dw.", k)
        k = re.sub(r"^stages\.(\d+)\.0\.proj\.1\.conv\.", r"stages.\1.downsample.pw.", k)
        k = re.sub(r"^stages\.(\d+)\.0\.proj\.1\.(weight|bias)$", r"stages.\1.downsample.pw.\2", k)  # fused (deploy)

        def _block(m: "re.Match[str]") -> str:
            i, j = int(m.group(1)), int(m.group(2))
            return f"stages.{i}.blocks.{j - 1 if i > 0 else j}."

        k = re.sub(r"^stages\.(\d+)\.(\d+)\.(?=token_mixer|channel_mixer)", _block, k)
        k = k.replace(".token_mixer.0.main.", ".token_mixer.")
        k = k.replace(".token_mixer.0.layer_scale", ".ls1.gamma")
        k = k.replace(".token_mixer.1.", ".se.")
        k = k.replace(".channel_mixer.main.", ".channel_mixer.")
        k = k.replace(".channel_mixer.layer_scale", ".ls2.gamma")
        k = re.sub(r"\.c\.weight$", ".conv.weight", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        if k.endswith(".gamma"):
            value = value.reshape(-1)
        out[k] = value
    return out


def checkpoint_layout(sd: Dict[str, torch.Tensor]) -> str:
    """Which of the four FFNet key layouts a (unwrapped) state dict looks like.

    ``"authors-train"`` (``models/ffnet.py``: ``patch_embed.0.c.weight`` + BatchNorms),
    ``"authors-deploy"`` (after their ``export_model.replace_batchnorm``: fused convs such as
    ``patch_embed.0.weight``), ``"vision3d-train"`` (``stem.0.conv.weight`` + ``stem.0.bn.*``),
    ``"vision3d-deploy"`` (after :meth:`FFNet.reparameterize`: ``reparam_conv`` / biased ``stem.0.conv``),
    or ``"unknown"``.
    """
    if any(k.startswith("patch_embed.") for k in sd):
        return "authors-train" if "patch_embed.0.c.weight" in sd or any(".c.weight" in k for k in sd) else "authors-deploy"
    if any(k.startswith("stem.") for k in sd):
        deploy = any(".reparam_conv." in k for k in sd) or "stem.0.conv.bias" in sd
        return "vision3d-deploy" if deploy else "vision3d-train"
    return "unknown"


_LAYOUT_WORDS = {
    "authors-train": "the authors' training layout (models/ffnet.py)",
    "authors-deploy": "the authors' re-parameterised layout (export_model.replace_batchnorm)",
    "vision3d-train": "vision3d's training layout",
    "vision3d-deploy": "vision3d's re-parameterised layout (FFNet.reparameterize())",
    "unknown": "no FFNet layout (neither patch_embed.* nor stem.* keys)",
}


def _is_deployed(model: nn.Module) -> bool:
    return any(isinstance(m, (RepDwConv, BnConvSkip)) and m.reparam_conv is not None for m in model.modules())


def _resolve_deploy_keys(sd: Dict[str, torch.Tensor], own: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Place fused authors' tensors (``P.weight`` of a module the authors replaced by one conv) on our
    re-parameterised modules: ``P.weight``, ``P.conv.weight`` (fused ConvBn) or ``P.reparam_conv.weight``."""
    own_set = set(own)
    out = {}
    for k, v in sd.items():
        if k in own_set:
            out[k] = v
            continue
        prefix, _, leaf = k.rpartition(".")
        for cand in (f"{prefix}.conv.{leaf}", f"{prefix}.reparam_conv.{leaf}"):
            if cand in own_set:
                out[cand] = v
                break
        else:
            out[k] = v  # left for the fit check to report
    return out


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Convert an FFNet checkpoint (the authors' layout or ours, training or re-parameterised) to this model's keys.

    Accepts EMA / ``model`` / ``state_dict`` wrappers and a ``module.`` prefix (the authors'
    ``.pth.tar`` files hold ``state_dict`` and ``state_dict_ema``; the EMA is preferred, as in
    timm). A re-parameterised checkpoint (the authors' ``export_model.py`` output, or ours) first
    turns ``model`` into its deploy structure in place (:meth:`FFNet.reparameterize`). Raises
    ``ValueError`` naming the variant, keys and shapes, and the layout the checkpoint looks like,
    when it does not fit.
    """
    sd = unwrap_state_dict(state_dict)
    layout = checkpoint_layout(sd)
    if layout in ("authors-deploy", "vision3d-deploy") and not _is_deployed(model):
        reparameterize_model(model, inplace=True)
    if layout.startswith("authors"):
        sd = _convert_authors(sd)
        if layout == "authors-deploy":
            sd = _resolve_deploy_keys(sd, list(model.state_dict().keys()))
    try:
        check_converted_state_dict(sd, model, skip=("head.fc.",))
    except ValueError as e:
        structure = "re-parameterised" if _is_deployed(model) else "training"
        raise ValueError(f"{e} [the checkpoint looks like {_LAYOUT_WORDS[layout]}; the model has the {structure} structure]") from None
    return sd


# ---------------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------------
_RELEASE = "https://github.com/ysj9909/FFNet/releases/download/v1.0/"
_ARCHS: Dict[str, Dict[str, Any]] = {
    "ffnet_1": dict(embed_dims=(80, 160, 320, 640), depths=(2, 2, 8, 2), kernel_sizes=(3, 3, 3, 3)),
    "ffnet_2": dict(embed_dims=(88, 176, 352, 704), depths=(3, 3, 15, 3), kernel_sizes=(7, 7, 7, 7)),
    "ffnet_3": dict(
        embed_dims=(96, 192, 384, 768), depths=(4, 4, 22, 5), kernel_sizes=(7, 7, 7, 7), layer_scale_init_value=1e-6
    ),
    "ffnet_4": dict(
        embed_dims=(128, 256, 512, 1024), depths=(4, 4, 27, 3), kernel_sizes=(7, 7, 7, 7), layer_scale_init_value=1e-6
    ),
}


def _create_ffnet(variant: str, pretrained: bool = False, **kwargs: Any) -> FFNet:
    require_local_weights(variant, pretrained, kwargs, "the v1.0 release of https://github.com/ysj9909/FFNet")
    model_args = dict(_ARCHS[variant], **kwargs)
    return build_model_with_cfg(
        FFNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)),
        **model_args,
    )


def _cfg(file: str, **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": _RELEASE + file,
        "num_classes": 1000,
        "input_size": (3, 256, 256),
        "pool_size": (8, 8),
        "crop_pct": 0.9,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv",
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2406.02021",
        "paper_name": "MetaMixer Is All You Need",
        "origin_url": "https://github.com/ysj9909/FFNet",
        **kwargs,
    }


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12))
default_cfgs = generate_default_cfgs(
    {
        "ffnet_1.in1k": _cfg("ffnet_1.pth.tar"),
        "ffnet_1.in1k_dist": _cfg("ffnet_1_distillation.pth.tar"),
        "ffnet_2.in1k": _cfg("ffnet_2.pth.tar"),
        "ffnet_2.in1k_dist": _cfg("ffnet_2_distillation.pth.tar"),
        "ffnet_3.in1k": _cfg("ffnet_3.pth.tar", crop_pct=0.95),
        "ffnet_3.in1k_dist": _cfg("ffnet_3_distillation.pth.tar", crop_pct=0.95),
        "ffnet_3.in1k_384": _cfg("ffnet_3_384.pth.tar", crop_pct=0.95, **_384),
        "ffnet_4.in1k_384": _cfg("ffnet_4_384.pth.tar", crop_pct=0.95, **_384),
    }
)


@register_model
def ffnet_1(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-1: 13.7M parameters (deploy), 81.3% top-1 at 256."""
    return _create_ffnet("ffnet_1", pretrained=pretrained, **kwargs)


@register_model
def ffnet_2(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-2: 26.9M parameters (deploy), 82.9% top-1 at 256."""
    return _create_ffnet("ffnet_2", pretrained=pretrained, **kwargs)


@register_model
def ffnet_3(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-3: 48.3M parameters (deploy), 83.9% top-1 at 256, 84.5% at 384."""
    return _create_ffnet("ffnet_3", pretrained=pretrained, **kwargs)


@register_model
def ffnet_4(pretrained: bool = False, **kwargs: Any) -> FFNet:
    """FFNet-4: 79.2M parameters (deploy), 85.3% top-1 at 384."""
    return _create_ffnet("ffnet_4", pretrained=pretrained, **kwargs)
