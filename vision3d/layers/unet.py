"""2-D U-Net with cross-view self-attention (the refinement U-Net of MVSplat / DepthSplat).

An ADM/LDM-style U-Net without timestep conditioning, as DepthSplat configures it (Xu et al.,
arXiv 2410.13862; github.com/cvg/depthsplat @ 2dad25a, MIT,
``src/model/encoder/unimatch/ldm_unet/unet.py``, ``util.py``), written for vision3d:

- an input 3x3 convolution, then per level ``num_res_blocks`` residual blocks (GroupNorm, SiLU,
  conv, GroupNorm, SiLU, conv; 1x1 skip when the width changes) followed by a stride-2 3x3
  convolution except at the last level; attention blocks after the residual blocks at the
  downsampling rates listed in ``attn_resolutions``;
- a middle of two residual blocks;
- the mirrored decoder (``num_res_blocks + 1`` blocks per level on ``concat(x, skip)``, nearest 2x
  upsampling + 3x3 conv between levels);
- GroupNorm, SiLU, 3x3 conv out.

GroupNorm uses 8 groups (4 when the width is not a multiple of 8) and runs in float32. The
attention blocks attend over the tokens of *all views of a scene jointly* (cross-view
self-attention): heads of ``head_channels`` channels, the authors' legacy ``qkv`` layout (per head
``q, k, v`` contiguous), softmax in float32, a residual 1x1 output projection.

Sub-module names follow the authors' (``input_blocks``, ``middle_block``, ``output_blocks``,
``in_layers``, ``out_layers``, ``skip_connection``, ``qkv``, ``proj_out``, ``op``, ``conv``,
``out``) so that their checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attention


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


def group_norm(ch: int) -> GroupNorm32:
    return GroupNorm32(8 if ch % 8 == 0 else 4, ch)


class ResBlock(nn.Module):
    def __init__(self, ch: int, out_ch: int | None = None):
        super().__init__()
        out_ch = out_ch or ch
        self.in_layers = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.out_layers = nn.Sequential(
            group_norm(out_ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        nn.init.zeros_(self.out_layers[3].weight)
        nn.init.zeros_(self.out_layers[3].bias)
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:  # [N, ch, H, W]
        return self.skip_connection(x) + self.out_layers(self.in_layers(x))


class CrossViewAttention(nn.Module):
    """Self-attention over the tokens of all ``num_views`` views of a scene (batch ``[B*V]``)."""

    def __init__(self, ch: int, head_channels: int, backend: str = "auto"):
        super().__init__()
        if ch % head_channels:
            raise ValueError(f"CrossViewAttention: {ch} channels are not a multiple of head_channels={head_channels}")
        self.heads = ch // head_channels
        self.backend = backend
        self.num_views = 1  # set per forward by the owner (UNet.forward)
        self.norm = group_norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:  # [B*V, ch, H, W]
        N, C, H, W = x.shape
        V = self.num_views
        if N % V:
            raise ValueError(f"CrossViewAttention: batch {N} is not a multiple of {V} views")
        t = x.reshape(N, C, H * W)
        qkv = self.qkv(self.norm(t))  # [B*V, 3C, T]
        qkv = qkv.view(N // V, V, 3 * C, H * W).permute(0, 2, 1, 3).reshape(N // V, 3 * C, V * H * W)
        hc = C // self.heads
        qkv = qkv.view(N // V, self.heads, 3 * hc, V * H * W)
        q, k, v = (s.transpose(-1, -2).float() for s in qkv.split(hc, dim=2))  # [B, heads, V*T, hc]
        a = attention(q, k, v, backend=self.backend).to(x.dtype)  # [B, heads, V*T, hc]
        a = a.transpose(-1, -2).reshape(N // V, C, V, H * W).permute(0, 2, 1, 3).reshape(N, C, H * W)
        return (t + self.proj_out(a)).view(N, C, H, W)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """U-Net ``[B*V, ch, H, W] -> [B*V, out_ch, H, W]``; ``H`` and ``W`` must be divisible by
    ``2 ** (len(channel_mult) - 1)``."""

    def __init__(
        self,
        in_ch: int,
        model_ch: int,
        out_ch: int,
        channel_mult: tuple[int, ...] = (1, 1, 1),
        num_res_blocks: int = 1,
        attn_resolutions: tuple[int, ...] = (4,),
        head_channels: int = 32,
        backend: str = "auto",
    ):
        super().__init__()
        self.levels = len(channel_mult)
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(in_ch, model_ch, 3, padding=1))])
        chans = [model_ch]
        ch, ds = model_ch, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, mult * model_ch)]
                ch = mult * model_ch
                if ds in attn_resolutions:
                    layers.append(CrossViewAttention(ch, head_channels, backend))
                self.input_blocks.append(nn.Sequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(nn.Sequential(Downsample(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = nn.Sequential(ResBlock(ch), nn.Identity(), ResBlock(ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), model_ch * mult)]
                ch = model_ch * mult
                if ds in attn_resolutions:
                    layers.append(CrossViewAttention(ch, head_channels, backend))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(nn.Sequential(*layers))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(model_ch, out_ch, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(self, x: Tensor, num_views: int) -> Tensor:  # x [B*V, in_ch, H, W], views of a scene adjacent
        f = 2 ** (self.levels - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"UNet: a {x.shape[-1]}x{x.shape[-2]} feature map is not divisible by {f} ({self.levels} levels)"
            )
        for m in self.modules():
            if isinstance(m, CrossViewAttention):
                m.num_views = num_views
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h)
            skips.append(h)
        h = self.middle_block(h)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], 1))
        return self.out(h)
