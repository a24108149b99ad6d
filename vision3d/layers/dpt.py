"""DPT dense-prediction head over multi-frame transformer tokens.

Ranftl et al., "Vision Transformers for Dense Prediction", arXiv:2103.13413, in the variant of VGGT
(Wang et al., arXiv:2503.11651; github.com/facebookresearch/vggt at a24d9de, ``vggt/heads/dpt_head.py``,
``heads/utils.py``, ``heads/head_act.py``; VGGT licence): four token layers are normalised, projected
by 1x1 convolutions, given a sinusoidal position embedding on a diagonal-normalised UV grid, resized
to strides 4/8/16/32 of the patch grid, fused coarse-to-fine by residual fusion blocks (bilinear,
``align_corners=True``), upsampled to the image size and read out as values plus a confidence.

Sub-module names follow the authors' (``projects``, ``resize_layers``, ``scratch.layer1_rn``,
``scratch.refinenet1.resConfUnit1`` ...) so that checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def uv_grid(width: int, height: int, aspect: float, dtype=None, device=None) -> Tensor:  # [height, width, 2]
    """UV grid spanning ``[-sx, sx] x [-sy, sy]`` with ``(sx, sy) = (aspect, 1) / sqrt(aspect^2 + 1)``,
    sampled at ``width x height`` cell centres; last axis (u, v)."""
    diag = (aspect**2 + 1.0) ** 0.5
    sx, sy = aspect / diag, 1.0 / diag
    xs = torch.linspace(-sx * (width - 1) / width, sx * (width - 1) / width, width, dtype=dtype, device=device)
    ys = torch.linspace(-sy * (height - 1) / height, sy * (height - 1) / height, height, dtype=dtype, device=device)
    v, u = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([u, v], -1)


def sincos_embed_1d(dim: int, pos: Tensor, omega0: float = 100.0) -> Tensor:  # pos [M] -> [M, dim]
    """``[sin(pos * w), cos(pos * w)]`` with ``w_i = omega0 ** (-i / (dim / 2))``, computed in float64."""
    if dim % 2:
        raise ValueError(f"sincos_embed_1d: dim must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega0**omega
    ang = pos.reshape(-1).to(torch.float64)[:, None] * omega
    return torch.cat([ang.sin(), ang.cos()], 1).float()


def uv_pos_embed(x: Tensor, image_w: int, image_h: int, ratio: float = 0.1) -> Tensor:  # [N, C, h, w]
    """Add ``ratio`` times the sinusoidal embedding of the UV grid of ``x``'s size (VGGT's DPT)."""
    n, c, h, w = x.shape
    grid = uv_grid(w, h, image_w / image_h, dtype=x.dtype, device=x.device).reshape(-1, 2)
    emb = torch.cat([sincos_embed_1d(c // 2, grid[:, 0]), sincos_embed_1d(c // 2, grid[:, 1])], -1)
    emb = emb.view(h, w, c).permute(2, 0, 1).to(x.dtype)
    return x + ratio * emb[None]


def _interp(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ResidualConvUnit(nn.Module):
    """``relu(x) + conv2(relu(conv1(relu(x))))``.

    The skip adds ``relu(x)``, not ``x``: the VGGT authors' unit applies an in-place ReLU to its
    input before the convolutions, so their skip sees the rectified tensor; trained weights expect
    that. ``rectified_skip=False`` adds ``x`` itself (Depth Anything / DepthSplat, whose ReLU is not
    in-place).
    """

    def __init__(self, ch: int, rectified_skip: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.rectified_skip = rectified_skip

    def forward(self, x: Tensor) -> Tensor:  # [N, ch, h, w]
        r = F.relu(x)
        return (r if self.rectified_skip else x) + self.conv2(F.relu(self.conv1(r)))


class FusionBlock(nn.Module):
    """Adds a refined skip (if any), refines, upsamples (to ``size`` or x2), then a 1x1 conv."""

    def __init__(self, ch: int, has_residual: bool = True, rectified_skip: bool = True):
        super().__init__()
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(ch, rectified_skip)
        self.has_residual = has_residual
        self.resConfUnit2 = ResidualConvUnit(ch, rectified_skip)
        self.out_conv = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        return self.out_conv(_interp(x, size))


def inverse_log(y: Tensor) -> Tensor:
    """``sign(y) * (exp(|y|) - 1)``."""
    return torch.sign(y) * torch.expm1(y.abs())


_ACTS = {
    "exp": torch.exp,
    "inv_log": inverse_log,
    "linear": lambda t: t,
    "relu": F.relu,
}


class DPTHead(nn.Module):
    """DPT head on VGGT-style token lists.

    Args:
        dim_in: token width (VGGT: ``2 * embed_dim``, frame and global outputs concatenated).
        patch_size: pixels per patch.
        output_dim: channels read out; the last one is the confidence.
        activation: ``"exp"`` (depth), ``"inv_log"`` (points), ``"linear"`` or ``"relu"``.
        conf_activation: ``"expp1"`` (``1 + exp``), ``"expp0"`` or ``"sigmoid"``.
        features: fusion width (VGGT: 256).
        out_channels: per-level projection widths (VGGT: 256, 512, 1024, 1024).
        layer_idx: which entries of the token list feed the four levels (VGGT: 4, 11, 17, 23).
        frames_chunk: frames processed at once (bounds memory; results do not depend on it).
    """

    def __init__(
        self,
        dim_in: int,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: tuple[int, ...] = (256, 512, 1024, 1024),
        layer_idx: tuple[int, ...] = (4, 11, 17, 23),
        frames_chunk: int = 8,
    ):
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"DPTHead: activation must be one of {sorted(_ACTS)}, got {activation!r}")
        if conf_activation not in ("expp1", "expp0", "sigmoid"):
            raise ValueError(f"DPTHead: conf_activation must be expp1/expp0/sigmoid, got {conf_activation!r}")
        if len(out_channels) != 4 or len(layer_idx) != 4:
            raise ValueError("DPTHead: out_channels and layer_idx must have 4 entries")
        self.patch_size, self.activation, self.conf_activation = patch_size, activation, conf_activation
        self.layer_idx = tuple(layer_idx)
        self.frames_chunk = frames_chunk
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, 1) for oc in out_channels])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], 4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], 3, stride=2, padding=1),
        ])
        s = nn.Module()
        for i, oc in enumerate(out_channels):
            setattr(s, f"layer{i + 1}_rn", nn.Conv2d(oc, features, 3, padding=1, bias=False))
        s.refinenet1 = FusionBlock(features)
        s.refinenet2 = FusionBlock(features)
        s.refinenet3 = FusionBlock(features)
        s.refinenet4 = FusionBlock(features, has_residual=False)
        s.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        s.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(32, output_dim, 1)
        )
        self.scratch = s

    def forward(
        self,
        tokens: list[Tensor],  # each [B, S, T, dim_in]; patch tokens start at patch_start
        image_hw: tuple[int, int],
        patch_start: int,
    ) -> tuple[Tensor, Tensor]:  # values [B, S, H, W, output_dim - 1], confidence [B, S, H, W]
        b, s = tokens[self.layer_idx[-1]].shape[:2]
        chunk = self.frames_chunk if self.frames_chunk and self.frames_chunk > 0 else s
        vals, confs = [], []
        for f0 in range(0, s, chunk):
            v, c = self._forward_frames(tokens, image_hw, patch_start, f0, min(f0 + chunk, s))
            vals.append(v)
            confs.append(c)
        return torch.cat(vals, 1), torch.cat(confs, 1)

    def _forward_frames(self, tokens, image_hw, patch_start, f0, f1):
        h_img, w_img = image_hw
        ph, pw = h_img // self.patch_size, w_img // self.patch_size
        feats = []
        for level, li in enumerate(self.layer_idx):
            x = tokens[li][:, f0:f1, patch_start:]
            b, s = x.shape[:2]
            x = self.norm(x.reshape(b * s, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape(b * s, -1, ph, pw)
            x = uv_pos_embed(self.projects[level](x), w_img, h_img)
            feats.append(self.resize_layers[level](x))
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i + 1}_rn")(f) for i, f in enumerate(feats))
        out = sc.refinenet4(l4, size=l3.shape[-2:])
        out = sc.refinenet3(out, l3, size=l2.shape[-2:])
        out = sc.refinenet2(out, l2, size=l1.shape[-2:])
        out = sc.refinenet1(out, l1)
        out = sc.output_conv1(out)
        out = _interp(out, (ph * self.patch_size, pw * self.patch_size))
        out = uv_pos_embed(out, w_img, h_img)
        out = sc.output_conv2(out).permute(0, 2, 3, 1)  # [b*s, H, W, output_dim]
        vals = _ACTS[self.activation](out[..., :-1])
        c = out[..., -1]
        if self.conf_activation == "expp1":
            conf = 1.0 + c.exp()
        elif self.conf_activation == "expp0":
            conf = c.exp()
        else:
            conf = torch.sigmoid(c)
        return vals.reshape(b, s, *vals.shape[1:]), conf.reshape(b, s, *conf.shape[1:])
