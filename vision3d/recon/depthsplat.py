"""DepthSplat: multi-view depth + monocular features -> pixel-aligned 3D Gaussians (the host).

Source: H. Xu, S. Peng, F. Wang, H. Blum, D. Barath, A. Geiger, M. Pollefeys, "DepthSplat:
Connecting Gaussian Splatting and Depth", CVPR 2025, arXiv 2410.13862. Authors' code:
github.com/cvg/depthsplat, commit 2dad25a7b9ba7c5537aba08463ef88d8511a06be, MIT licence
(``src/model/encoder/encoder_depthsplat.py``, ``unimatch/mv_unimatch.py``, ``backbone.py``,
``vit_fpn.py``, ``dpt_head.py``, ``ldm_unet/``, ``common/gaussian_adapter.py``). The monocular
branch is DINOv2 (facebookresearch/dinov2, Apache-2.0), here built through timm. Released weights
(Depth Anything V2 initialised ViTs; Depth Anything V2 small is Apache-2.0, base/large CC-BY-NC-4.0)
are not shipped; :func:`convert_depthsplat_checkpoint` reads them. This file is an independent
implementation; the fixture in ``tests/fixtures/depthsplat`` pins it to the authors' code.

Architecture, as the authors' code runs it (images normalised with ImageNet mean/std first):

- **CNN features** (UniMatch's): 7x7/2 conv, then two residual stages at 1/2 and one at 1/4 or 1/8
  (``lowest_feature_resolution``), InstanceNorm without affine, a 1x1 conv to ``feature_channels``;
  the taps at 1/2, 1/2 or 1/4, and the lowest resolution feed the later stages.
- **Multi-view transformer** on the lowest-resolution features with a per-window sine position
  embedding: ``num_transformer_layers`` blocks of window self-attention and window cross-attention
  to the source views (:mod:`vision3d.layers.mvtransformer`); with more than three views each view
  attends to (and matches against) its ``local_mv_match`` nearest views by camera centre.
- **Monocular branch**: any timm ``features_only`` backbone (:class:`~vision3d.layers.features.
  BackboneFeatures`; default DINOv2 ViT-S/14), four maps, each resized to 1/8 (and the last to 1/4
  when the lowest resolution is 1/4).
- **Cost volumes** per scale (one or two scales, coarse to fine): correlation of plane-swept
  source features over ``num_depth_candidates`` inverse-depth candidates between ``1/far`` and
  ``1/near`` (the finer scale: a quarter as many around the upsampled estimate at half the interval),
  :mod:`vision3d.layers.costvolume`.
- **U-Net refinement**: ``concat(cost volume, CNN, transformer, monocular features)`` -> conv,
  GroupNorm, GELU, a cross-view-attention U-Net (:mod:`vision3d.layers.unet`), conv, plus a 1x1
  residual; a head gives per-candidate logits, softmax -> ``match_prob``, expected inverse depth.
- **DPT upsampling**: a DPT head on the monocular maps with the CNN / transformer features (and the
  low-resolution depth) concatenated at 1/2, 1/4, 1/8 predicts a full-resolution inverse-depth
  residual; depth = ``1 / clamp(upsampled + residual, 1/far, 1/near)``. A second DPT head gives the
  per-pixel features of the Gaussian branch.
- **Gaussian head**: ``concat(image, depth, match_prob, features)`` -> conv, GELU, conv; then
  ``concat(that, image, features, match_prob)`` -> conv, GELU, conv (replicate padding) ->
  ``1 + 2 + 3 + 4 + 3 (sh_degree+1)^2`` numbers per pixel. Activations, exactly the authors':
  opacity ``sigmoid``; sub-pixel offset ``sigmoid - 0.5`` pixels moves the ray; scale
  ``clamp(softplus(s - 4), 1e-10, 3)`` (camera frame); quaternion ``q / (|q| + 1e-8)`` (``xyzw`` in
  their layout, camera frame); SH (degree 2) multiplied by ``0.1 * 0.25**l`` per band, and
  ``(rgb - 0.5) / C0`` added to the DC term; mean = camera centre + z-depth times the ray with
  camera z = 1. Rotations and SH are then taken to the world frame with the camera rotation (SH as
  the authors' e3nn code does it, see ``sh_rotation``).

Released configurations (MODEL_ZOO.md, scripts/*.sh): ``depthsplat_small`` (ViT-S, one scale,
upsample 4, lowest 1/4), ``depthsplat_base`` (ViT-B, two scales, upsample 2, lowest 1/4),
``depthsplat_large`` (ViT-L, same), ``depthsplat_base_dl3dv`` (ViT-B, two scales, upsample 4,
lowest 1/8); 128 candidates, 6 transformer layers, U-Net width 128, near 0.5 / far 100 on RE10K.
Note: the authors' encoder never passes its ``num_depth_candidates`` option on; their depth network
always uses 128. Image sides must be multiples of :attr:`DepthSplat.size_multiple` (the authors crop
RE10K/DL3DV to multiples of 16/32 in their data shim).

With a ZPressor (``zpressor=ZPressorConfig(...)``, arXiv 2505.23734, ziplab/ZPressor @ eb7fe82,
``depthsplat/src/model/encoder/unimatch/mv_unimatch.py``) the position-encoded CNN features of all
context views are compressed onto ``min(num_anchors, V)`` anchor views before the multi-view
transformer, as in the ZPressor authors' DepthSplat host; the anchors' own CNN features, images and
cameras go on, the transformer and cost volumes match every other anchor, and Gaussians come from
the anchor views only (``view_indices``). Their warm-up option ``apply_cluster_steps`` (anchors
without compression early in training) is not reproduced; the released setting is 0.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras
from vision3d.geometry.rotations import matrix_to_quat, quat_multiply
from vision3d.layers.costvolume import (
    correlation_volume,
    inverse_depth_candidates,
    nearest_views,
    plane_sweep_warp,
    refined_candidates,
)
from vision3d.layers.dpt import FusionBlock
from vision3d.layers.features import BackboneFeatures
from vision3d.layers.mvtransformer import MultiViewTransformer, add_window_position, all_other_views, gather_sources
from vision3d.layers.unet import UNet

from .base import ReconOutput, Reconstructor, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SH_C0 = 0.28209479177387814
# The authors rotate SH with e3nn's Wigner matrices, whose real basis lives in e3nn's axis frame; in
# the standard (gsplat / INRIA) basis that is the rotation by E3NN_AXES @ R @ E3NN_AXES^T (found by
# matching e3nn 0.6 wigner_D against our exact band rotations to 1e-7).
E3NN_AXES = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
# (upsample_factor, num_scales) pairs the authors' DPT head accepts, with the lowest CNN resolution each needs
_VALID_SCALES = {(8, 1): 8, (4, 1): 4, (4, 2): 8, (2, 2): 4}


@dataclass
class DepthSplatConfig:
    backbone: str = "vit_small_patch14_dinov2"
    """Monocular branch: any timm ``features_only`` model by name (after ``import vision3d``):
    DINOv2 ``vit_{small,base,large}_patch14_dinov2`` (the authors'), or ``affnet*``, ``ffnet_*``,
    ``transnext_*``, ``ewa_vit_*``, ... Widths are adapted by a learned 1x1 projection."""
    mono_channels: int = 384
    """Width of the monocular maps inside the host (the ViT width in the authors': 384/768/1024)."""
    mono_indices: tuple[int, ...] | None = None
    """Blocks tapped from a plain-ViT backbone (None: [2,5,8,11] for 12 blocks, [4,11,17,23] for 24)."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Extra keyword arguments for ``timm.create_model`` (e.g. ``depth``/``embed_dim`` of a small ViT)."""
    feature_channels: int = 128
    """Width of the CNN output and of the multi-view transformer."""
    cnn_channels: tuple[int, int] = (64, 96)
    """Widths of the CNN's first two residual stages (the third is 128 -> feature_channels)."""
    cnn_last_channels: int = 128
    """Width of the CNN's third residual stage before its 1x1 output conv."""
    num_transformer_layers: int = 6
    """Multi-view transformer blocks (self- + cross-attention each)."""
    ffn_expansion: int = 4
    """MLP expansion of the transformer's cross-attention layers (on 2x width)."""
    attn_splits: int = 2
    """Windows per side of the transformer's Swin-style attention (1 = global)."""
    num_depth_candidates: int = 128
    """Inverse-depth candidates of the coarsest cost volume (the finer scale uses a quarter)."""
    num_scales: int = 1
    """Cost-volume scales: 1 or 2."""
    upsample_factor: int = 4
    """Resolution of the finest cost volume relative to the image: 1/upsample_factor (2, 4 or 8)."""
    lowest_feature_resolution: int = 4
    """Resolution of the coarsest CNN features: 1/4 or 1/8 (= upsample_factor * 2**(num_scales-1))."""
    unet_channels: int = 128
    """Width of the refinement U-Net at the coarsest scale (halved at the finer one)."""
    unet_channel_mult: tuple[int, ...] = (1, 1, 1)
    """U-Net level multipliers at the coarsest scale (the finer scale adds one level)."""
    unet_attn_resolutions: tuple[int, ...] = (4,)
    """U-Net downsampling rates with cross-view attention (doubled at the finer scale)."""
    unet_head_channels: int = 32
    """Channels per attention head in the U-Net."""
    dpt_channels: tuple[int, int, int, int] = (48, 96, 192, 384)
    """Widths of the four DPT levels (ViT-S: 48,96,192,384; B: 96..768; L: 128..1024)."""
    depth_dpt_features: int = 32
    """Fusion width of the depth-residual DPT head (S 32, B 48, L 64)."""
    feature_dpt_features: int = 64
    """Fusion width of the Gaussian-feature DPT head (S 64, B 96, L 128)."""
    gaussian_regressor_channels: int = 64
    """Width of the Gaussian regressor convs."""
    sh_degree: int = 2
    """Spherical-harmonic degree of the Gaussians."""
    scale_min: float = 1e-10
    """Lower clamp of the Gaussian scales (world units)."""
    scale_max: float = 3.0
    """Upper clamp of the Gaussian scales."""
    sh_rotation: str = "authors"
    """How SH coefficients go from the camera to the world frame: 'authors' reproduces the authors'
    e3nn-based rotation (the standard-basis rotation by ``P R P^T``, ``P`` the axis change to e3nn's
    frame), which their trained weights expect; 'exact' rotates by ``R`` itself."""
    local_mv_match: int = 2
    """With more than 3 views, each view matches its this-many nearest views (by camera centre)."""
    near: float = 0.5
    """Near depth used when the cameras carry none (RE10K: 0.5)."""
    far: float = 100.0
    """Far depth used when the cameras carry none (RE10K: 100)."""
    attn_backend: str = "auto"
    """Attention backend: auto | sdpa | xformers | math."""
    zpressor: Any = None
    """A ``vision3d.recon.zpressor.ZPressorConfig`` to compress the context to anchor views, or None."""

    def __post_init__(self) -> None:
        key = (self.upsample_factor, self.num_scales)
        if key not in _VALID_SCALES:
            raise ValueError(
                f"DepthSplatConfig: (upsample_factor, num_scales) = {key} is not one the authors' DPT head "
                f"accepts; use one of {sorted(_VALID_SCALES)}"
            )
        if self.lowest_feature_resolution != _VALID_SCALES[key]:
            raise ValueError(
                f"DepthSplatConfig: lowest_feature_resolution={self.lowest_feature_resolution} must be "
                f"{_VALID_SCALES[key]} for upsample_factor={self.upsample_factor}, num_scales={self.num_scales}"
            )
        if self.num_depth_candidates < 2 or self.num_depth_candidates // 4 ** (self.num_scales - 1) < 2:
            raise ValueError(f"DepthSplatConfig: num_depth_candidates={self.num_depth_candidates} is too few")
        if not 0 < self.near < self.far:
            raise ValueError(f"DepthSplatConfig: need 0 < near < far, got near={self.near}, far={self.far}")
        if self.feature_channels % 2:
            raise ValueError(f"DepthSplatConfig: feature_channels={self.feature_channels} must be even")
        if self.sh_rotation not in ("authors", "exact"):
            raise ValueError(f"DepthSplatConfig: sh_rotation must be 'authors' or 'exact', got {self.sh_rotation!r}")
        if isinstance(self.zpressor, dict):
            from .zpressor import ZPressorConfig

            self.zpressor = ZPressorConfig(**self.zpressor)

    def cnn_taps(self) -> tuple[int, int, int]:
        """Widths of the CNN maps the DPT heads read (1/2, next, lowest)."""
        return (self.cnn_channels[0], self.cnn_channels[1], self.feature_channels)


@dataclass
class DepthSplatFeatures:
    """What :meth:`DepthSplat.encode` gives (views: the ones kept, all or the ZPressor anchors)."""

    depth: Tensor  # [B, V, 1, H, W] z-depth, world units
    features: Tensor  # [B, V, F, H, W] full-resolution features of the Gaussian-branch DPT head
    gaussian_features: Tensor  # [B, V, C, H, W] concat(regressor out, image, features, match_prob): the head's input
    match_prob: Tensor  # [B, V, 1, H, W] max over candidates of the matching probability (nearest-upsampled)
    match_prob_volume: Tensor  # [B, V, D, h, w] matching probabilities of the finest cost volume
    inverse_depth_candidates: Tensor  # [B, V, D, h, w] the candidates of that volume (1 / world units)
    view_indices: Tensor  # [B, V] long: indices into the input views of the views kept
    images: Tensor  # [B, V, 3, H, W] in [0, 1] of the views kept
    cameras: Cameras  # batch [B, V] of the views kept
    # [B, V, 1, H, W] z-depth of the coarsest scale, its inverse bilinearly upsampled (align_corners) to the
    # image size: the authors' intermediate depth_preds[0] (num_scales > 1 only, else None); VolSplat supervises it
    intermediate_depth: Tensor | None = None


# --------------------------------------------------------------------------------------------- blocks
class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm1, self.norm2 = nn.InstanceNorm2d(cout), nn.InstanceNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), nn.InstanceNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class CNNEncoder(nn.Module):
    """UniMatch's CNN: ``[N, 3, H, W]`` -> maps at 1/2, 1/2 or 1/4, and 1/4 or 1/8 (high to low)."""

    def __init__(self, dims: tuple[int, int, int], out_ch: int, lowest: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, dims[0], 7, stride=2, padding=3, bias=False)
        self.norm1 = nn.InstanceNorm2d(dims[0])
        layers, cin = [], dims[0]
        for d, s in zip(dims, (1, 1 if lowest == 4 else 2, 2)):
            layers.append(nn.Sequential(_ResidualBlock(cin, d, s), _ResidualBlock(d, d, 1)))
            cin = d
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(dims[2], out_ch, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu(self.norm1(self.conv1(x)))
        a = self.layer1(x)
        b = self.layer2(a)
        return [a, b, self.conv2(self.layer3(b))]


class FeaturePyramid(nn.Module):
    """ViTDet's simple pyramid: the map itself, then 2x (transposed conv, GELU, conv) for each finer scale."""

    def __init__(self, ch: int, num_scales: int):
        super().__init__()
        stages = [nn.Sequential()]
        if num_scales > 1:
            stages.append(nn.Sequential(nn.ConvTranspose2d(ch, ch // 2, 2, stride=2), nn.GELU(), nn.Conv2d(ch // 2, ch // 2, 3, padding=1)))
        if num_scales > 2:
            raise ValueError(f"FeaturePyramid: num_scales={num_scales} (1 or 2 supported, as the authors)")
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:  # low to high resolution
        return [s(x) for s in self.stages]


def _conv1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


class DepthSplatDPT(nn.Module):
    """DepthSplat's DPT head: monocular maps (at 1/8) fused with CNN / transformer features (and the
    low-resolution inverse depth) -> a full-resolution inverse-depth residual, or features."""

    def __init__(
        self,
        in_ch: int,
        features: int,
        out_ch: tuple[int, int, int, int],
        cnn_ch: tuple[int, int, int],
        mv_ch: int,
        upsample_factor: int,
        num_scales: int,
        return_feature: bool,
    ):
        super().__init__()
        self.key, self.return_feature = (upsample_factor, num_scales), return_feature
        d = 0 if return_feature else 1
        c0, c1, c2 = cnn_ch
        o0, o1, o2, o3 = out_ch
        half = mv_ch // 2
        if self.key == (4, 2):
            ins = (c0 + o0, c1 + o1 + half + d, c2 + o2 + mv_ch)
        elif self.key == (2, 2):
            ins = (c0 + c1 + o0 + half + d, c2 + o1 + mv_ch, o2)
        elif self.key == (4, 1):
            ins = (c0 + c1 + o0, c2 + o1 + mv_ch + d, o2)
        else:
            ins = (c0 + o0, c1 + o1, c2 + o2 + mv_ch + d)
        self.concat_projects = nn.ModuleList([_conv1(i, o) for i, o in zip(ins, (o0, o1, o2))])
        self.projects = nn.ModuleList([_conv1(in_ch, o) for o in out_ch])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(o0, o0, 4, stride=4),
            nn.ConvTranspose2d(o1, o1, 2, stride=2),
            nn.Identity(),
            nn.Conv2d(o3, o3, 3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, o in enumerate(out_ch):
            setattr(self.scratch, f"layer{i + 1}_rn", nn.Conv2d(o, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", FusionBlock(features, has_residual=i != 4, rectified_skip=False))
        if not return_feature:
            self.scratch.output_conv = nn.Sequential(
                nn.Conv2d(features, features // 2, 3, padding=1, padding_mode="replicate"),
                nn.GELU(),
                nn.Conv2d(features // 2, 16, 3, padding=1, padding_mode="replicate"),
                nn.GELU(),
                nn.Conv2d(16, 1, 1),
            )
            nn.init.zeros_(self.scratch.output_conv[-1].weight)
            nn.init.zeros_(self.scratch.output_conv[-1].bias)

    def forward(
        self,
        mono: list[Tensor],  # 4 x [N, in_ch, H/8, W/8]
        cnn: list[Tensor],  # 3 CNN maps, high to low resolution
        mv: list[Tensor],  # transformer features, high to low resolution (1 or 2 maps)
        depth: Tensor | None = None,  # [N, 1, h, w] inverse depth at the finest cost volume
    ) -> Tensor:  # [N, 1, H, W] residual or [N, features, H, W]
        l1, l2, l3, l4 = (r(p(x)) for x, p, r in zip(mono, self.projects, self.resize_layers))
        extra = [] if self.return_feature else [depth]
        cp = self.concat_projects
        if self.key == (4, 2):
            l1 = cp[0](torch.cat([cnn[0], l1], 1))
            l2 = cp[1](torch.cat([cnn[1], l2, mv[0], *extra], 1))
            l3 = cp[2](torch.cat([cnn[2], l3, mv[1]], 1))
        elif self.key == (2, 2):
            l1 = cp[0](torch.cat([cnn[0], cnn[1], mv[0], *extra, l1], 1))
            l2 = cp[1](torch.cat([cnn[2], l2, mv[1]], 1))
            l3 = cp[2](l3)
        elif self.key == (4, 1):
            l1 = cp[0](torch.cat([cnn[0], cnn[1], l1], 1))
            l2 = cp[1](torch.cat([cnn[2], l2, mv[0], *extra], 1))
            l3 = cp[2](l3)
        else:
            l1 = cp[0](torch.cat([cnn[0], l1], 1))
            l2 = cp[1](torch.cat([cnn[1], l2], 1))
            l3 = cp[2](torch.cat([cnn[2], l3, mv[0], *extra], 1))
        s = self.scratch
        r1, r2, r3, r4 = s.layer1_rn(l1), s.layer2_rn(l2), s.layer3_rn(l3), s.layer4_rn(l4)
        p = s.refinenet4(r4, size=r3.shape[2:])
        p = s.refinenet3(p, r3, size=r2.shape[2:])
        p = s.refinenet2(p, r2, size=r1.shape[2:])
        p = s.refinenet1(p, r1)
        return p if self.return_feature else s.output_conv(p)


# --------------------------------------------------------------------------------------------- model
def _interp(x: Tensor, size=None, scale=None) -> Tensor:
    return F.interpolate(x, size=size, scale_factor=scale, mode="bilinear", align_corners=True)


class DepthSplat(Reconstructor):
    """Posed context views -> one Gaussian per context pixel (batch [B], N = V*H*W), plus depth."""

    render_kwargs = dict(background=(0.0, 0.0, 0.0), near_plane=0.01, far_plane=1e10, rasterize_mode="classic")

    def __init__(self, cfg: DepthSplatConfig | None = None, **overrides):
        super().__init__()
        base = asdict(cfg) if cfg is not None else {}
        if cfg is not None:
            base["zpressor"] = cfg.zpressor  # keep the dataclass (asdict would flatten it)
        cfg = DepthSplatConfig(**{**base, **overrides})
        self.cfg = cfg
        C, S = cfg.feature_channels, cfg.num_scales
        self.cnn = CNNEncoder((*cfg.cnn_channels, cfg.cnn_last_channels), C, cfg.lowest_feature_resolution)
        self.transformer = MultiViewTransformer(C, cfg.num_transformer_layers, cfg.ffn_expansion, cfg.attn_backend)
        self.mono = BackboneFeatures(
            cfg.backbone, cfg.mono_channels, 4, list(cfg.mono_indices) if cfg.mono_indices else None, **cfg.backbone_kwargs
        )
        if S > 1:
            self.mv_pyramid = FeaturePyramid(C, S)
            self.mono_pyramid = FeaturePyramid(cfg.mono_channels, S)
        self.regressor = nn.ModuleList()
        self.regressor_residual = nn.ModuleList()
        self.depth_head = nn.ModuleList()
        mult, attn = list(cfg.unet_channel_mult), list(cfg.unet_attn_resolutions)
        self.unet_levels = []
        for i in range(S):
            d_i = cfg.num_depth_candidates // 4**i
            cnn_i = C if i == 0 else cfg.cnn_channels[1]
            cin = d_i + cnn_i + C // 2**i + cfg.mono_channels // 2**i
            ch = cfg.unet_channels // 2**i
            if i > 0:
                mult, attn = mult + [1], [a * 2 for a in attn]
            self.unet_levels.append(len(mult))
            self.regressor.append(nn.Sequential(
                nn.Conv2d(cin, ch, 3, padding=1),
                nn.GroupNorm(8, ch),
                nn.GELU(),
                UNet(ch, ch, ch, tuple(mult), 1, tuple(attn), cfg.unet_head_channels, cfg.attn_backend),
                nn.Conv2d(ch, ch, 3, padding=1),
            ))
            self.regressor_residual.append(nn.Conv2d(cin, ch, 1))
            self.depth_head.append(nn.Sequential(
                nn.Conv2d(ch, 2 * ch, 3, padding=1, padding_mode="replicate"),
                nn.GELU(),
                nn.Conv2d(2 * ch, d_i, 3, padding=1, padding_mode="replicate"),
            ))
        dpt = dict(in_ch=cfg.mono_channels, out_ch=tuple(cfg.dpt_channels), cnn_ch=cfg.cnn_taps(), mv_ch=C,
                   upsample_factor=cfg.upsample_factor, num_scales=S)
        self.upsampler = DepthSplatDPT(features=cfg.depth_dpt_features, return_feature=False, **dpt)
        self.feature_upsampler = DepthSplatDPT(features=cfg.feature_dpt_features, return_feature=True, **dpt)
        Fd, R = cfg.feature_dpt_features, cfg.gaussian_regressor_channels
        self.d_sh = (cfg.sh_degree + 1) ** 2
        P = 1 + 2 + 7 + 3 * self.d_sh
        self.gaussian_regressor = nn.Sequential(nn.Conv2d(3 + 1 + 1 + Fd, R, 3, padding=1), nn.GELU(), nn.Conv2d(R, R, 3, padding=1))
        self.gaussian_head = nn.Sequential(
            nn.Conv2d(R + 3 + Fd + 1, P, 3, padding=1, padding_mode="replicate"),
            nn.GELU(),
            nn.Conv2d(P, P, 3, padding=1, padding_mode="replicate"),
        )
        with torch.no_grad():  # the authors' init: colour from the image, scales from softplus(-4)
            self.gaussian_head[-1].weight[10:].zero_()
            self.gaussian_head[-1].bias[10:].zero_()
            self.gaussian_head[-1].weight[3:6].zero_()
            self.gaussian_head[-1].bias[3:6].zero_()
        mask = torch.ones(self.d_sh)
        for l in range(1, cfg.sh_degree + 1):
            mask[l * l : (l + 1) ** 2] = 0.1 * 0.25**l
        self.register_buffer("sh_mask", mask, persistent=False)
        self.register_buffer("img_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("img_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self.zpressor = None
        if cfg.zpressor is not None:
            from .zpressor import ZPressor

            if cfg.zpressor.embed_dim != C:
                raise ValueError(
                    f"DepthSplatConfig.zpressor.embed_dim={cfg.zpressor.embed_dim} must equal feature_channels={C} "
                    "(ZPressor compresses the host's CNN features)"
                )
            self.zpressor = ZPressor.from_config(cfg.zpressor)

    # ------------------------------------------------------------------ sizes
    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (windows, U-Net levels and the 1/8 monocular grid)."""
        c = self.cfg
        m = max(8, c.lowest_feature_resolution * c.attn_splits)
        for i, levels in enumerate(self.unet_levels):
            factor = c.upsample_factor * 2 ** (c.num_scales - 1 - i)
            m = max(m, factor * 2 ** (levels - 1))
        return m

    def _near_far(self, cameras: Cameras, B: int, V: int, ref: Tensor) -> tuple[Tensor, Tensor]:
        def value(v, default, name):
            t = torch.as_tensor(default if v is None else v, dtype=torch.float32, device=ref.device)
            try:
                return t.expand(B, V).reshape(-1)
            except RuntimeError as e:
                raise ValueError(f"depthsplat: cameras.{name} of shape {tuple(t.shape)} does not broadcast to [B, V]={[B, V]}") from e

        near, far = value(cameras.near, self.cfg.near, "near"), value(cameras.far, self.cfg.far, "far")
        if (near <= 0).any() or (far <= near).any():
            raise ValueError(f"depthsplat: need 0 < near < far per view, got near={near.tolist()}, far={far.tolist()}")
        return near, far

    def _check(self, images: Tensor, cameras: Cameras) -> None:
        self.check_inputs(images, cameras, "depthsplat")
        B, V, _, H, W = images.shape
        if V < 2:
            raise ValueError(f"depthsplat: needs at least 2 context views to build a cost volume, got {V}")
        m = self.size_multiple
        if H % m or W % m:
            raise ValueError(
                f"depthsplat: image size {W}x{H} is not a multiple of {m}; centre-crop first with "
                f"vision3d.recon.ilrm.crop_to_multiple(images, cameras, {m})"
            )

    # ------------------------------------------------------------------ depth network
    def encode(
        self,
        images: Tensor,  # [B, V, 3, H, W] in [0, 1]
        cameras: Cameras,  # batch [B, V], OpenCV cam_to_world, K in pixels
    ) -> DepthSplatFeatures:
        self._check(images, cameras)
        cfg = self.cfg
        B, V, _, H, W = images.shape
        cameras = cameras.to(device=images.device, dtype=torch.float32)
        images = images.float()
        x = ((images - self.img_mean) / self.img_std).flatten(0, 1)  # [B*V, 3, H, W]
        cnn = self.cnn(x)  # high to low resolution
        cnn_low = cnn[::-1][: cfg.num_scales]
        c2w = cameras.cam_to_world
        view_idx = torch.arange(V, device=images.device).expand(B, V)
        f0 = add_window_position(cnn_low[0], cfg.attn_splits)
        if self.zpressor is not None:
            # ZPressor (ziplab/ZPressor's DepthSplat host): compress the position-encoded CNN features of
            # all views onto the anchor views; everything after runs on the anchors only
            K = min(cfg.zpressor.num_anchors, V)
            f0, anchor = self.zpressor(f0.unflatten(0, (B, V)), c2w, K)
            bi = torch.arange(B, device=images.device)[:, None]
            images = images[bi, anchor]
            x = x.unflatten(0, (B, V))[bi, anchor].flatten(0, 1)
            cnn = [c.unflatten(0, (B, V))[bi, anchor].flatten(0, 1) for c in cnn]
            cameras = Cameras(
                cameras.K[bi, anchor], c2w[bi, anchor], cameras.width, cameras.height, cameras.near, cameras.far
            )
            f0, view_idx, V = f0.flatten(0, 1), anchor, K
            sources = all_other_views(B, V, images.device)  # the ZPressor host matches all anchors
        else:
            sources = self._sources(c2w, B, V)
        mv = self.transformer(f0.unflatten(0, (B, V)), sources, cfg.attn_splits).flatten(0, 1)
        mono = self._mono(x, H, W)
        return self._depth_and_features(images, cameras, cnn, mv, mono, sources, view_idx)

    def _sources(self, c2w: Tensor, B: int, V: int) -> Tensor:  # [B, V, S] long
        if V > 3:
            return nearest_views(c2w[..., :3, 3], min(self.cfg.local_mv_match, V - 1))[..., 1:]
        return all_other_views(B, V, c2w.device)

    def _mono(self, x: Tensor, H: int, W: int) -> list[Tensor]:
        feats = self.mono(x)
        return [_interp(f, size=(H // 8, W // 8)) for f in feats]

    def _depth_and_features(self, images, cameras, cnn, mv, mono, sources, view_idx) -> DepthSplatFeatures:
        cfg = self.cfg
        B, V, _, H, W = images.shape
        S = cfg.num_scales
        cnn_low = cnn[::-1][:S]
        mv_list = self.mv_pyramid(mv) if S > 1 else [mv]
        mono_last = mono[-1]
        if cfg.lowest_feature_resolution == 4:
            mono_last = _interp(mono_last, scale=2)
        mono_list = self.mono_pyramid(mono_last) if S > 1 else [mono_last]
        near, far = self._near_far(cameras, B, V, images)  # [B*V]
        inv_lo, inv_hi = 1.0 / far, 1.0 / near
        K_norm = cameras.K_normalized  # [B, V, 3, 3]
        c2w = cameras.cam_to_world
        K_img = K_norm * K_norm.new_tensor([W, H, 1.0])[:, None]
        ref_to_src = torch.linalg.inv(gather_sources(c2w, sources)) @ c2w[:, :, None]  # [B, V, S, 4, 4]
        Sv = sources.shape[2]
        inv = None
        for i in range(S):
            factor = cfg.upsample_factor * 2 ** (S - 1 - i)
            K_i = K_img.clone()
            K_i[..., :2, :] = K_i[..., :2, :] / factor
            feat = mv_list[i]  # [B*V, C, h, w]
            h, w = feat.shape[-2:]
            D = cfg.num_depth_candidates // 4**i
            if i == 0:
                cand = inverse_depth_candidates(near, far, D).expand(-1, -1, h, w)  # [B*V, D, h, w]
            else:
                inv = _interp(inv, scale=2).detach()
                interval = (inv_hi - inv_lo) / (cfg.num_depth_candidates - 1) / 2**i
                cand = refined_candidates(inv, near, far, D, interval)
            src = gather_sources(feat.unflatten(0, (B, V)), sources).flatten(0, 2)  # [B*V*S, C, h, w]
            Krep = K_i[:, :, None].expand(B, V, Sv, 3, 3).reshape(-1, 3, 3)
            depth_c = (1.0 / cand)[:, None].expand(-1, Sv, -1, -1, -1).reshape(-1, D, h, w)
            warped = plane_sweep_warp(src, Krep, ref_to_src.reshape(-1, 4, 4), depth_c)
            cost = correlation_volume(feat, warped.unflatten(0, (B * V, Sv)))  # [B*V, D, h, w]
            cat = torch.cat([cost, cnn_low[i], feat, mono_list[i]], 1)
            r = self.regressor[i]
            out = r[4](r[3](r[2](r[1](r[0](cat))), num_views=V)) + self.regressor_residual[i](cat)
            prob = self.depth_head[i](out).softmax(1)  # [B*V, D, h, w]
            inv = (prob * cand).sum(1, keepdim=True)
            if i == 0 and S > 1:
                inv_coarse = F.interpolate(inv, scale_factor=factor, mode="bilinear", align_corners=True)
        mv_hi = mv_list[::-1]
        residual = self.upsampler(mono, cnn, mv_hi, inv)
        inv_full = (_interp(inv, scale=cfg.upsample_factor) + residual).clamp(
            min=inv_lo.view(-1, 1, 1, 1), max=inv_hi.view(-1, 1, 1, 1)
        )
        depth = (1.0 / inv_full).unflatten(0, (B, V))  # [B, V, 1, H, W]
        features = self.feature_upsampler(mono, cnn, mv_hi)  # [B*V, F, H, W]
        mp = F.interpolate(prob.max(1, keepdim=True)[0], size=(H, W), mode="nearest")
        img = images.flatten(0, 1)
        reg = self.gaussian_regressor(torch.cat([img, depth.flatten(0, 1), mp, features], 1))
        gfeat = torch.cat([reg, img, features, mp], 1)
        return DepthSplatFeatures(
            depth=depth,
            features=features.unflatten(0, (B, V)),
            gaussian_features=gfeat.unflatten(0, (B, V)),
            match_prob=mp.unflatten(0, (B, V)),
            match_prob_volume=prob.unflatten(0, (B, V)),
            inverse_depth_candidates=cand.unflatten(0, (B, V)),
            view_indices=view_idx,
            images=images,
            cameras=cameras,
            intermediate_depth=(1.0 / inv_coarse).unflatten(0, (B, V)) if S > 1 else None,
        )

    # ------------------------------------------------------------------ Gaussians
    def gaussian_params(self, enc: DepthSplatFeatures) -> Tensor:  # [B, V, P, H, W] raw head output
        return self.gaussian_head(enc.gaussian_features.flatten(0, 1)).unflatten(0, enc.depth.shape[:2])

    def to_gaussians(self, enc: DepthSplatFeatures, raw: Tensor) -> tuple[Gaussians, dict[str, Tensor]]:
        """The authors' activations (see the module docstring); world-frame Gaussians, batch [B]."""
        cfg = self.cfg
        B, V, _, H, W = raw.shape
        r = raw.permute(0, 1, 3, 4, 2)  # [B, V, H, W, P]
        opacity = r[..., 0].sigmoid()
        offset = r[..., 1:3].sigmoid()
        scales = F.softplus(r[..., 3:6] - 4.0).clamp(cfg.scale_min, cfg.scale_max)
        q = r[..., 6:10]
        q_xyzw = q / (q.norm(dim=-1, keepdim=True) + 1e-8)
        sh = r[..., 10:].unflatten(-1, (3, self.d_sh)) * self.sh_mask  # [B, V, H, W, 3, d_sh]
        rgb = enc.images.permute(0, 1, 3, 4, 2)
        sh = torch.cat([sh[..., :1] + ((rgb - 0.5) / SH_C0)[..., None], sh[..., 1:]], -1)
        ys, xs = torch.meshgrid(
            (torch.arange(H, device=raw.device, dtype=raw.dtype) + 0.5) / H,
            (torch.arange(W, device=raw.device, dtype=raw.dtype) + 0.5) / W,
            indexing="ij",
        )
        xy = torch.stack([xs, ys], -1) + (offset - 0.5) / raw.new_tensor([W, H])  # [B, V, H, W, 2] normalised
        K_norm = enc.cameras.K_normalized
        c2w = enc.cameras.cam_to_world
        d_cam = torch.einsum(
            "bvij,bvhwj->bvhwi", torch.linalg.inv(K_norm), torch.cat([xy, torch.ones_like(xy[..., :1])], -1)
        )
        d_cam = d_cam / d_cam[..., 2:]
        R = c2w[..., :3, :3]
        dirs = torch.einsum("bvij,bvhwj->bvhwi", R, d_cam)
        means = c2w[:, :, None, None, :3, 3] + dirs * enc.depth[:, :, 0, :, :, None]
        q_wxyz = torch.cat([q_xyzw[..., 3:], q_xyzw[..., :3]], -1)
        quats = quat_multiply(matrix_to_quat(R)[:, :, None, None].expand_as(q_wxyz), q_wxyz)
        R_sh = R if cfg.sh_rotation == "exact" else E3NN_AXES.to(R) @ R @ E3NN_AXES.to(R).T
        sh_world = _rotate_sh_per_view(sh.transpose(-1, -2), R_sh)  # [B, V, H, W, d_sh, 3]
        n = V * H * W
        g = Gaussians(
            means=means.reshape(B, n, 3),
            quats=quats.reshape(B, n, 4),
            scales=scales.reshape(B, n, 3),
            opacities=opacity.reshape(B, n),
            sh=sh_world.reshape(B, n, self.d_sh, 3),
        )
        extras = {"scales_cam": scales, "quats_cam_xyzw": q_xyzw, "sh_cam": sh, "offsets": offset - 0.5}
        return g, extras

    def forward(
        self,
        images: Tensor,  # [B, V, 3, H, W] in [0, 1]
        cameras: Cameras,  # batch [B, V], OpenCV cam_to_world, K in pixels
    ) -> ReconOutput:
        enc = self.encode(images, cameras)
        raw = self.gaussian_params(enc)
        g, extras = self.to_gaussians(enc, raw)
        extras.update(raw=raw, match_prob=enc.match_prob, view_indices=enc.view_indices)
        return ReconOutput(gaussians=g, depth=enc.depth, confidence=enc.match_prob, extras=extras)


def _rotate_sh_per_view(sh: Tensor, R: Tensor) -> Tensor:  # sh [B, V, ..., d_sh, 3], R [B, V, 3, 3]
    from vision3d.gaussians.transform import sh_rotation_matrices

    d_sh = sh.shape[-2]
    degree = int(round(d_sh**0.5)) - 1
    if degree == 0:
        return sh
    B, V = R.shape[:2]
    rows = []
    for b in range(B):
        cols = []
        for v in range(V):
            mats = sh_rotation_matrices(R[b, v], degree)
            M = torch.block_diag(*mats).to(sh.dtype)  # [d_sh, d_sh]
            cols.append(torch.einsum("ij,...jc->...ic", M, sh[b, v]))
        rows.append(torch.stack(cols))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------
# the authors' checkpoint layout -> ours

_PREFIXES = [
    ("depth_predictor.backbone.", "cnn."),
    ("depth_predictor.pretrained.", "mono.model.model."),
    ("depth_predictor.transformer.", "transformer."),
    ("depth_predictor.mv_pyramid.", "mv_pyramid."),
    ("depth_predictor.mono_pyramid.", "mono_pyramid."),
    ("depth_predictor.regressor.", "regressor."),
    ("depth_predictor.regressor_residual.", "regressor_residual."),
    ("depth_predictor.depth_head.", "depth_head."),
    ("depth_predictor.upsampler.", "upsampler."),
    ("feature_upsampler.", "feature_upsampler."),
    ("gaussian_regressor.", "gaussian_regressor."),
    ("gaussian_head.", "gaussian_head."),
]
_DROPPED = (r"^depth_predictor\.pretrained\.mask_token$", r"^losses?\.", r"^lpips\.", r"^decoder\.")


def convert_depthsplat_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' weights (a Lightning ``.ckpt`` dict with ``state_dict``, its ``encoder.*`` keys,
    or a bare ``EncoderDepthSplat`` state dict; ZPressor hosts add ``depth_predictor.zipmatch.*``) ->
    a :class:`DepthSplat` state dict. LPIPS-loss weights, DINOv2's unused ``mask_token`` and other
    non-model keys are dropped; an unknown key raises ``KeyError`` naming it."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    out: dict[str, Tensor] = {}
    zip_prefix = "depth_predictor.zipmatch."
    zipmatch = {k: v for k, v in state.items() if k.startswith(zip_prefix)}
    if zipmatch:  # the ZPressor sub-tree has its own layout and converter
        from .zpressor import convert_zpressor_state

        out.update({f"zpressor.{k}": v for k, v in convert_zpressor_state(zipmatch, prefix=zip_prefix).items()})
    for key, value in state.items():
        if any(re.match(p, key) for p in _DROPPED) or key.startswith(zip_prefix):
            continue
        for old, new in _PREFIXES:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            raise KeyError(f"convert_depthsplat_checkpoint: unexpected key '{key}' (not in the authors' DepthSplat layout)")
    return out


def config_from_state_dict(state: dict[str, Tensor], **overrides) -> DepthSplatConfig:
    """Infer the configuration of a converted DepthSplat state dict (released or smaller)."""
    C = state["cnn.conv2.weight"].shape[0]
    S = 2 if "mv_pyramid.stages.1.0.weight" in state else 1
    mono_ch = state["upsampler.projects.0.weight"].shape[1]
    vit_w = state.get("mono.model.model.patch_embed.proj.weight")
    backbone = overrides.pop("backbone", None)
    if backbone is None:
        if vit_w is None:
            raise ValueError("config_from_state_dict: not a DINOv2 monocular branch; pass backbone=<timm name>")
        width = vit_w.shape[0]
        backbone = {384: "vit_small_patch14_dinov2", 768: "vit_base_patch14_dinov2", 1024: "vit_large_patch14_dinov2"}.get(width)
        if backbone is None:
            raise ValueError(f"config_from_state_dict: DINOv2 width {width} is not ViT-S/B/L; pass backbone=<timm name>")
    # the CNN strides do not show in the weights; the DPT head's third concat does: the 1/8 layouts
    # concatenate CNN / transformer features there, the 1/4 layouts only project
    cp2 = state["upsampler.concat_projects.2.weight"]
    lowest = 8 if cp2.shape[1] != cp2.shape[0] else 4
    cfg = dict(
        backbone=backbone,
        mono_channels=mono_ch,
        feature_channels=C,
        cnn_channels=(state["cnn.conv1.weight"].shape[0], state["cnn.layer2.0.conv1.weight"].shape[0]),
        cnn_last_channels=state["cnn.layer3.0.conv1.weight"].shape[0],
        num_transformer_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.layers.")),
        num_depth_candidates=state["depth_head.0.2.weight"].shape[0],
        num_scales=S,
        lowest_feature_resolution=lowest,
        upsample_factor=lowest // 2 ** (S - 1) if S > 1 else lowest,
        unet_channels=state["regressor.0.0.weight"].shape[0],
        dpt_channels=tuple(state[f"upsampler.projects.{i}.weight"].shape[0] for i in range(4)),
        depth_dpt_features=state["upsampler.scratch.layer1_rn.weight"].shape[0],
        feature_dpt_features=state["feature_upsampler.scratch.layer1_rn.weight"].shape[0],
        gaussian_regressor_channels=state["gaussian_regressor.0.weight"].shape[0],
        sh_degree=int(round(((state["gaussian_head.2.weight"].shape[0] - 10) / 3) ** 0.5)) - 1,
    )
    cfg.update(overrides)
    return DepthSplatConfig(**cfg)


VARIANTS: dict[str, DepthSplatConfig] = {
    "depthsplat_small": DepthSplatConfig(),
    "depthsplat_base": DepthSplatConfig(
        backbone="vit_base_patch14_dinov2", mono_channels=768, num_scales=2, upsample_factor=2,
        lowest_feature_resolution=4, dpt_channels=(96, 192, 384, 768), depth_dpt_features=48, feature_dpt_features=96,
    ),
    "depthsplat_large": DepthSplatConfig(
        backbone="vit_large_patch14_dinov2", mono_channels=1024, num_scales=2, upsample_factor=2,
        lowest_feature_resolution=4, dpt_channels=(128, 256, 512, 1024), depth_dpt_features=64, feature_dpt_features=128,
    ),
    "depthsplat_base_dl3dv": DepthSplatConfig(
        backbone="vit_base_patch14_dinov2", mono_channels=768, num_scales=2, upsample_factor=4,
        lowest_feature_resolution=8, dpt_channels=(96, 192, 384, 768), depth_dpt_features=48, feature_dpt_features=96,
    ),
    # tests and CPU runs: a 2-block 32-wide DINOv2-style ViT and small widths everywhere
    "depthsplat_tiny": DepthSplatConfig(
        backbone="vit_small_patch14_dinov2", backbone_kwargs=dict(embed_dim=32, depth=4, num_heads=2, img_size=56),
        mono_channels=32, feature_channels=32, cnn_channels=(16, 24), cnn_last_channels=32, num_transformer_layers=2,
        num_depth_candidates=16, unet_channels=16, unet_head_channels=8, dpt_channels=(8, 16, 32, 32),
        depth_dpt_features=16, feature_dpt_features=16, gaussian_regressor_channels=16,
    ),
}

for _name, _cfg in VARIANTS.items():
    register(_name)(lambda _c=_cfg, **kw: DepthSplat(_c, **kw))
