"""VolSplat: feed-forward 3D Gaussian splatting with voxel-aligned prediction.

Source: W. Wang, Y. Chen, Z. Zhang, H. Liu, H. Wang, Z. Feng, W. Qin, Z. Zhu, D. Y. Chen,
B. Zhuang, "VolSplat: Rethinking Feed-Forward 3D Gaussian Splatting with Voxel-Aligned
Prediction", arXiv 2509.19297 (2025). Authors' code: github.com/ziplab/VolSplat, commit
01ef574cea0325a612464fbfc34930299bcf297c, MIT licence (``src/model/encoder/encoder_volsplat.py``,
``common/me_fea.py``, ``common/sparse_net.py``, ``common/gaussian_adapter_depth.py``,
``model_wrapper.py``; read for facts only). No weights are shipped here. This file is an
independent implementation.

Pipeline, as released:

1. **Host** (:mod:`vision3d.recon.depthsplat`): per-view z-depth ``[B, V, 1, H, W]`` and per-pixel
   features; a two-layer 3x3 conv regressor (GELU) reads ``concat(image, depth, match_prob,
   features)`` and the lifted feature is ``concat(regressor_out, image, features, match_prob)``.
2. **Voxelisation** (:func:`voxelize`): every pixel is unprojected with its z-depth (ray through
   the pixel centre, ``z = 1`` direction, camera-to-world), quantised with ``torch.round(P /
   voxel_size)`` (round half to even), keyed by ``(batch, qx, qy, qz)``; all views' pixels in one
   voxel are merged by the mean of their features and the mean of their points (the Gaussian
   anchor is that mean point, not the voxel centre); voxels are in ``torch.unique`` (sorted) order.
3. **Sparse 3-D U-Net** (:class:`SparseUNet`): ``num_blocks`` stride-2 conv-BN-ReLU encoders with
   ``64 * 2^i`` channels, a bottleneck (stride-2 conv to twice the width, an optional voxel
   self-attention block, a stride-1 conv), transposed stride-2 decoders each followed by a 1x1
   conv on ``concat(upsampled, skip)``, and a final transposed conv back to the input voxels; its
   output is added to its input (residual).
4. **Sparse Gaussian head** (:class:`SparseGaussianHead`): 3x3x3 conv, GELU, 3x3x3 conv (no
   biases) to 38 numbers per voxel: opacity logit, 3 offset, 3 scale, 4 quaternion (xyzw), 27 SH.
5. **Gaussian adapter** (:func:`adapt_gaussians`): opacity ``sigmoid`` (padding rows -20), mean
   ``= anchor + (sigmoid(offset) - 0.5) * 3 * voxel_size``, scale ``clamp(softplus(s - 4), 1e-10,
   3)``, quaternion ``q / (|q| + 1e-8)`` reordered xyzw -> wxyz, SH degree 2 times the mask
   ``0.1 * 0.25^l`` per band ``l >= 1``, and the DC replaced by the SH of the voxel's mean image
   colour.
6. **Intermediate depth** (training): the host's first (coarse) depth goes through steps 2-5 with
   the same networks; its rendering is supervised with weight ``intermediate_loss_weight`` (0.9).

Sparse convolutions follow MinkowskiEngine exactly (see :mod:`vision3d.layers.sparse`);
:func:`convert_volsplat_checkpoint` maps the authors' MinkowskiEngine weights (``kernel
[k^3, C_in, C_out]``, x-fastest offsets; ``bn.*``; ``linear.*``) to ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vision3d.gaussians import Gaussians
from vision3d.gaussians.gaussians import rgb_to_sh
from vision3d.geometry import Cameras
from vision3d.layers.attention import attention
from vision3d.layers.sparse import (
    SparseBatchNorm,
    SparseConv3d,
    SparseConvNormAct,
    SparseLinear,
    SparseTensor,
    sparse_cat,
    weight_from_minkowski,
)

from .base import ReconOutput, Reconstructor, register
from .depthsplat import VARIANTS as DEPTHSPLAT_VARIANTS
from .depthsplat import DepthSplat, DepthSplatConfig, DepthSplatFeatures, convert_depthsplat_checkpoint

# raw head output per voxel: opacity, offset xyz, scale xyz, quaternion xyzw, SH (3 x d_sh)
OPACITY_PAD_LOGIT = -20.0


def num_gaussian_channels(sh_degree: int) -> int:
    return 1 + 3 + 3 + 4 + 3 * (sh_degree + 1) ** 2


# ------------------------------------------------------------------------------------------------ voxels
@dataclass
class Voxels:
    """Pixels of all views merged per voxel (batch index in the key, sorted ``torch.unique`` order)."""

    coords: Tensor  # [N, 4] int64 (batch, qx, qy, qz), qx = round(x / voxel_size)
    features: Tensor  # [N, C] mean feature of the voxel's pixels
    points: Tensor  # [N, 3] mean world point of the voxel's pixels (the Gaussian anchor)
    counts: Tensor  # [N] int64 pixels per voxel
    inverse: Tensor  # [M] int64 voxel of each valid pixel (M valid pixels in (b, v, h, w) order)
    valid: Tensor  # [B, V, H, W] bool, pixels that were lifted (finite, positive depth)
    voxel_size: float
    batch_size: int

    def mean(self, values: Tensor) -> Tensor:  # [B, V, C, H, W] -> [N, C]
        """Per-voxel mean of another per-pixel map (e.g. the image colours)."""
        flat = values.permute(0, 1, 3, 4, 2)[self.valid]  # [M, C]
        out = flat.new_zeros(self.coords.shape[0], flat.shape[1]).index_add_(0, self.inverse, flat)
        return out / self.counts[:, None].to(flat.dtype)

    def batch_counts(self) -> Tensor:  # [B] voxels per batch element
        return torch.bincount(self.coords[:, 0], minlength=self.batch_size)

    def to_batched(self, values: Tensor, fill: float = 0.0) -> tuple[Tensor, Tensor]:
        """``values [N, C]`` -> padded ``[B, N_max, C]`` and ``valid [B, N_max]`` (voxels keep their order)."""
        counts = self.batch_counts()
        n_max = int(counts.max()) if counts.numel() else 0
        start = torch.cumsum(counts, 0) - counts
        b = self.coords[:, 0]
        pos = torch.arange(b.numel(), device=b.device) - start[b]
        out = values.new_full((self.batch_size, n_max, values.shape[1]), fill)
        out = out.index_put((b, pos), values)
        valid = torch.zeros(self.batch_size, n_max, dtype=torch.bool, device=b.device)
        valid[b, pos] = True
        return out, valid


def unproject_z_depth(depth: Tensor, cameras: Cameras) -> Tensor:  # depth [B, V, H, W] -> [B, V, H, W, 3]
    """World points of per-pixel z-depth through pixel centres (``Cameras.unproject``)."""
    return cameras.unproject(depth)


def voxelize(
    features: Tensor,  # [B, V, C, H, W]
    depth: Tensor,  # [B, V, 1, H, W] or [B, V, H, W] z-depth, world units
    cameras: Cameras,  # batch [B, V], OpenCV cam-to-world, K in pixels
    voxel_size: float,
) -> Voxels:
    """Lift every pixel with its depth and merge all views' pixels per voxel (the authors' rule).

    Pixels with non-positive depth are not lifted (the authors' depth is always in ``[near,
    far]``); NaN or infinite depth is an error. The result may hold no voxel at all (every depth
    invalid); :class:`VolSplat` refuses that with a clear message.
    """
    if not voxel_size > 0:  # also rejects NaN
        raise ValueError(f"voxelize: voxel_size must be > 0, got {voxel_size}")
    if features.ndim != 5:
        raise ValueError(f"voxelize: features must be [B, V, C, H, W], got {tuple(features.shape)}")
    B, V, C, H, W = features.shape
    if depth.ndim == 5:
        if depth.shape[2] != 1:
            raise ValueError(f"voxelize: depth must be [B, V, 1, H, W], got {tuple(depth.shape)}")
        depth = depth[:, :, 0]
    if tuple(depth.shape) != (B, V, H, W):
        raise ValueError(f"voxelize: depth {tuple(depth.shape)} does not match features [B, V, H, W] = {(B, V, H, W)}")
    bad = ~torch.isfinite(depth)
    if bad.any():
        raise ValueError(
            f"voxelize: depth has {int(bad.sum())} NaN/inf values (of {depth.numel()}); expected finite z-depth"
        )
    points = unproject_z_depth(depth, cameras)  # [B, V, H, W, 3]
    valid = depth > 0
    pts = points[valid]  # [M, 3]
    feats = features.permute(0, 1, 3, 4, 2)[valid]  # [M, C]
    batch = torch.arange(B, device=depth.device)[:, None, None, None].expand(B, V, H, W)[valid]
    with torch.no_grad():
        q = torch.round(pts / voxel_size).long()
        keys = torch.cat([batch[:, None], q], 1)
        coords, inverse, counts = torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    n = coords.shape[0]
    cnt = counts[:, None].to(feats.dtype)
    vf = feats.new_zeros(n, C).index_add_(0, inverse, feats) / cnt
    vp = pts.new_zeros(n, 3).index_add_(0, inverse, pts) / cnt
    return Voxels(coords, vf, vp, counts, inverse, valid, float(voxel_size), B)


# ------------------------------------------------------------------------------------------------ adapter
@dataclass
class AdapterConfig:
    sh_degree: int = 2
    """Spherical-harmonic degree of the predicted colours."""
    scale_min: float = 1e-10
    """Lower clamp of the activated scales (``gaussian_scale_min``)."""
    scale_max: float = 3.0
    """Upper clamp of the activated scales (``gaussian_scale_max``)."""


def sh_mask(sh_degree: int, device=None) -> Tensor:  # [d_sh]
    """The authors' per-coefficient mask: 1 for the DC, ``0.1 * 0.25^l`` for band ``l``."""
    m = torch.ones((sh_degree + 1) ** 2, device=device)
    for band in range(1, sh_degree + 1):
        m[band**2 : (band + 1) ** 2] = 0.1 * 0.25**band
    return m


def adapt_gaussians(
    raw: Tensor,  # [B, N, 38] head output (opacity, offset, scale, quat xyzw, SH)
    valid: Tensor,  # [B, N] bool, real (unpadded) voxels
    anchors: Tensor,  # [B, N, 3] mean world point per voxel
    colors: Tensor,  # [B, N, 3] mean image colour per voxel, in [0, 1]
    voxel_size: float,
    cfg: AdapterConfig = AdapterConfig(),
    eps: float = 1e-8,
) -> Gaussians:
    """Gaussian parameters from the raw head output, exactly the authors' activations."""
    d_sh = (cfg.sh_degree + 1) ** 2
    if raw.shape[-1] != num_gaussian_channels(cfg.sh_degree):
        raise ValueError(
            f"adapt_gaussians: raw has {raw.shape[-1]} channels, expected {num_gaussian_channels(cfg.sh_degree)} "
            f"for sh_degree={cfg.sh_degree}"
        )
    logit, offset, scale, quat, sh = raw.split((1, 3, 3, 4, 3 * d_sh), dim=-1)
    logit = torch.where(valid[..., None], logit, torch.full_like(logit, OPACITY_PAD_LOGIT))
    opacities = torch.sigmoid(logit[..., 0])
    means = anchors + (torch.sigmoid(offset) - 0.5) * voxel_size * 3
    scales = F.softplus(scale - 4.0).clamp(cfg.scale_min, cfg.scale_max)
    quat = quat / (quat.norm(dim=-1, keepdim=True) + eps)
    quats = torch.cat([quat[..., 3:], quat[..., :3]], -1)  # xyzw -> wxyz
    sh = sh.unflatten(-1, (3, d_sh)) * sh_mask(cfg.sh_degree, raw.device).to(raw.dtype)  # [B, N, 3, d_sh]
    sh = torch.cat([rgb_to_sh(colors)[..., None], sh[..., 1:]], -1)
    return Gaussians(means=means, quats=quats, scales=scales, opacities=opacities, sh=sh.transpose(-1, -2))


# ------------------------------------------------------------------------------------------------ sparse nets
class SparseAttention(nn.Module):
    """Self-attention over all voxels of the pass (the authors' optional bottleneck block).

    Batch norm, a linear ``qkv`` (per head the q, k, v chunks are adjacent), SDPA, a linear
    projection, residual. As in the authors' code, all voxels of all batch elements form one sequence.
    """

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"SparseAttention: channels={channels} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = SparseBatchNorm(channels)
        self.qkv = SparseLinear(channels, 3 * channels)
        self.proj = SparseLinear(channels, channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        qkv = self.qkv(self.norm(x)).features  # [N, 3C]
        n = qkv.shape[0]
        q, k, v = qkv.reshape(n, self.num_heads, -1).transpose(0, 1)[None].chunk(3, dim=-1)  # [1, h, N, c]
        o = attention(q, k, v).squeeze(0).transpose(0, 1).reshape(n, -1)
        return x.replace(self.proj(x.replace(o)).features + x.features)


class SparseUNet(nn.Module):
    """The authors' sparse 3-D U-Net (``SparseUNetWithAttention``); output on the input voxels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int = 3,
        base_channels: int = 64,
        use_attention: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"SparseUNet: num_blocks must be >= 1, got {num_blocks}")
        widths = [base_channels * 2**i for i in range(num_blocks)]
        self.encoders = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.encoders.append(SparseConvNormAct(c, w, 3, 2, backend=backend))
            c = w
        mid = [SparseConvNormAct(c, 2 * c, 3, 2, backend=backend)]
        if use_attention:
            mid.append(SparseAttention(2 * c))
        mid.append(SparseConvNormAct(2 * c, 2 * c, 3, 1, backend=backend))
        self.bottleneck = nn.ModuleList(mid)
        self.ups = nn.ModuleList()
        self.fuses = nn.ModuleList()
        c = 2 * c
        for w in reversed(widths):
            self.ups.append(SparseConvNormAct(c, w, 3, 2, transposed=True, backend=backend))
            self.fuses.append(SparseConv3d(2 * w, w, 1, backend=backend))
            c = w
        self.final = SparseConvNormAct(widths[0], out_channels, 3, 2, transposed=True, backend=backend)

    def forward(self, x: SparseTensor) -> SparseTensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        for layer in self.bottleneck:
            x = layer(x)
        for up, fuse, skip in zip(self.ups, self.fuses, reversed(skips)):
            x = fuse(sparse_cat(up(x), skip))
        return self.final(x)


class SparseGaussianHead(nn.Module):
    """3x3x3 conv, GELU, 3x3x3 conv (no biases): raw Gaussian parameters per voxel."""

    def __init__(self, in_channels: int, out_channels: int, backend: str = "auto") -> None:
        super().__init__()
        self.conv1 = SparseConv3d(in_channels, out_channels, 3, backend=backend)
        self.conv2 = SparseConv3d(out_channels, out_channels, 3, backend=backend)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = self.conv1(x)
        return self.conv2(x.replace(F.gelu(x.features)))


def init_like_authors(module: nn.Module) -> None:
    """The authors' head init: Kaiming-normal kernels, fan-out mode, ReLU gain, with MinkowskiEngine's fan
    (``k^3 * C_out``), so ``std = sqrt(2 / (k^3 C_out))``; batch-norm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, SparseConv3d):
            k3 = m.kernel_size**3
            std = (2.0 / (k3 * m.out_channels)) ** 0.5
            with torch.no_grad():
                m.weight.normal_(0.0, std)
        elif isinstance(m, SparseBatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------ converter
def _is_transposed_key(key: str) -> bool:
    return ".upconv." in key or key.startswith("final_upsample.")


_SPARSE_RENAMES = [
    (r"^spare_unet\.encoders\.(\d+)\.conv\.kernel$", r"unet.encoders.\1.conv.weight"),
    (r"^spare_unet\.encoders\.(\d+)\.norm\.bn\.", r"unet.encoders.\1.norm."),
    (r"^spare_unet\.bottleneck\.(\d+)\.conv\.kernel$", r"unet.bottleneck.\1.conv.weight"),
    (r"^spare_unet\.bottleneck\.(\d+)\.norm\.bn\.", r"unet.bottleneck.\1.norm."),
    (r"^spare_unet\.bottleneck\.(\d+)\.qkv\.linear\.", r"unet.bottleneck.\1.qkv."),
    (r"^spare_unet\.bottleneck\.(\d+)\.proj_out\.linear\.", r"unet.bottleneck.\1.proj."),
    (r"^spare_unet\.decoder_blocks\.(\d+)\.0\.upconv\.kernel$", r"unet.ups.\1.conv.weight"),
    (r"^spare_unet\.decoder_blocks\.(\d+)\.0\.norm\.bn\.", r"unet.ups.\1.norm."),
    (r"^spare_unet\.decoder_blocks\.(\d+)\.1\.kernel$", r"unet.fuses.\1.weight"),
    (r"^spare_unet\.final_upsample\.upconv\.kernel$", r"unet.final.conv.weight"),
    (r"^spare_unet\.final_upsample\.norm\.bn\.", r"unet.final.norm."),
    (r"^gaussian_head\.conv([12])\.kernel$", r"head.conv\1.weight"),
]


def convert_sparse_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' ``spare_unet.*`` / ``gaussian_head.*`` MinkowskiEngine weights -> ours (``unet.*``, ``head.*``).

    Kernels ``[k^3, C_in, C_out]`` (x-fastest offsets; ``[C_in, C_out]`` for the 1x1 fuse convs) become
    ``[C_out, C_in, k, k, k]`` (``[C_in, C_out, ...]`` for transposed convs); BN and linear keys are renamed.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for pat, rep in _SPARSE_RENAMES:
            new, n = re.subn(pat, rep, key)
            if n:
                break
        else:
            raise KeyError(f"convert_sparse_state: unexpected key '{key}' (not in the authors' sparse layout)")
        if key.endswith(".kernel"):
            if value.ndim == 2:
                k = 1
            else:
                k = round(value.shape[0] ** (1 / 3))
            value = weight_from_minkowski(value, k, transposed=".upconv." in key)
        out[new] = value
    return out


def convert_volsplat_checkpoint(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' weights (a Lightning ``.ckpt`` dict with ``state_dict``, its ``encoder.*`` keys, or a bare
    ``EncoderVolSplat`` state dict) -> a :class:`VolSplat` state dict: the sparse U-Net and head through
    :func:`convert_sparse_state`, the DepthSplat-style host (depth network, feature upsampler, 2-D Gaussian
    regressor) through :func:`~vision3d.recon.depthsplat.convert_depthsplat_checkpoint` under ``host.``."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    sparse = {k: v for k, v in state.items() if k.startswith(("spare_unet.", "gaussian_head."))}
    rest = {k: v for k, v in state.items() if k not in sparse}
    out = convert_sparse_state(sparse)
    out.update({f"host.{k}": v for k, v in convert_depthsplat_checkpoint(rest).items()})
    return out


# ------------------------------------------------------------------------------------------------ model
@dataclass
class VolSplatConfig:
    host: DepthSplatConfig = field(default_factory=DepthSplatConfig)
    """The DepthSplat-style host (depth network, monocular branch, Gaussian-feature DPT and 2-D regressor);
    its ``sh_degree``, ``scale_min`` and ``scale_max`` also set the voxel Gaussians'."""
    voxel_size: float = 0.001
    """Voxel side in world units (the authors' ``voxel_resolution``)."""
    unet_blocks: int = 3
    """Strided encoder levels of the sparse U-Net (bottleneck at stride 2^(unet_blocks+1))."""
    unet_base_channels: int = 64
    """Width of the first U-Net level (doubled per level; the authors hard-code 64)."""
    unet_attention: bool = False
    """Voxel self-attention in the U-Net bottleneck (off in the authors' model)."""
    supervise_intermediate_depth: bool = True
    """In training, also predict Gaussians from the host's coarse (intermediate) depth and supervise them
    (needs a host with ``num_scales=2``; the authors' ``supervise_intermediate_depth``)."""
    intermediate_loss_weight: float = 0.9
    """Weight of the intermediate-depth rendering loss (the authors' ``intermediate_loss_weight``)."""
    sparse_backend: str = "auto"
    """Sparse convolution backend: auto (spconv on CUDA when installed) | torch | spconv."""

    def __post_init__(self) -> None:
        if isinstance(self.host, dict):
            self.host = DepthSplatConfig(**self.host)
        if not self.voxel_size > 0:
            raise ValueError(f"VolSplatConfig: voxel_size must be > 0, got {self.voxel_size}")
        if self.unet_blocks < 1 or self.unet_base_channels < 1:
            raise ValueError(
                f"VolSplatConfig: unet_blocks={self.unet_blocks} and unet_base_channels={self.unet_base_channels} must be >= 1"
            )


class VolSplat(Reconstructor):
    """Posed context views -> one Gaussian per occupied voxel (batch [B], N = most voxels in the batch;
    padding rows have opacity sigmoid(-20), ``extras['valid']`` marks the real ones), plus depth."""

    render_kwargs = DepthSplat.render_kwargs

    def __init__(self, cfg: VolSplatConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = cfg or VolSplatConfig()
        host_over = overrides.pop("host", None)
        host = cfg.host
        if isinstance(host_over, DepthSplatConfig):
            host = host_over
        elif host_over:
            host = replace(host, **host_over)
        cfg = replace(cfg, host=host, **overrides)
        self.cfg = cfg
        self.host = DepthSplat(cfg.host)
        del self.host.gaussian_head  # VolSplat predicts Gaussians from voxels, not pixels
        h = cfg.host
        channels = h.gaussian_regressor_channels + 3 + h.feature_dpt_features + 1  # the lifted per-pixel feature
        self.adapter = AdapterConfig(h.sh_degree, h.scale_min, h.scale_max)
        self.unet = SparseUNet(
            channels, channels, cfg.unet_blocks, cfg.unet_base_channels, cfg.unet_attention, cfg.sparse_backend
        )
        self.head = SparseGaussianHead(channels, num_gaussian_channels(h.sh_degree), cfg.sparse_backend)
        init_like_authors(self.head)

    @property
    def size_multiple(self) -> int:
        return self.host.size_multiple

    def predict(self, enc: DepthSplatFeatures, depth: Tensor) -> tuple[Gaussians, Voxels, Tensor]:
        """Voxelise the host's lifted features with ``depth`` [B, V, 1, H, W]; sparse U-Net, head, adapter.

        Returns the Gaussians (batch [B], padded), the voxels and ``valid`` [B, N].
        """
        vox = voxelize(enc.gaussian_features, depth, enc.cameras, self.cfg.voxel_size)
        if vox.coords.shape[0] == 0:
            raise ValueError("volsplat: no voxel to predict from: every depth is non-positive")
        x = SparseTensor(vox.features, vox.coords)
        y = self.unet(x)
        raw = self.head(x.replace(y.features + x.features)).features  # [N, 38]
        raw_b, valid = vox.to_batched(raw)
        anchors, _ = vox.to_batched(vox.points)
        colors, _ = vox.to_batched(vox.mean(enc.images))
        return adapt_gaussians(raw_b, valid, anchors, colors, self.cfg.voxel_size, self.adapter), vox, valid

    def forward(
        self,
        images: Tensor,  # [B, V, 3, H, W] in [0, 1]
        cameras: Cameras,  # batch [B, V], OpenCV cam_to_world, K in pixels
    ) -> ReconOutput:
        enc = self.host.encode(images, cameras)
        g, vox, valid = self.predict(enc, enc.depth)
        aux = []
        if self.training and self.cfg.supervise_intermediate_depth and enc.intermediate_depth is not None:
            g_mid, _, _ = self.predict(enc, enc.intermediate_depth)
            aux.append((self.cfg.intermediate_loss_weight, g_mid))
        extras = dict(
            valid=valid, num_gaussians=vox.batch_counts(), voxel_coords=vox.coords,
            match_prob=enc.match_prob, view_indices=enc.view_indices,
        )
        return ReconOutput(gaussians=g, depth=enc.depth, confidence=enc.match_prob, extras=extras, aux_gaussians=aux)


_HOSTS = {name: cfg for name, cfg in DEPTHSPLAT_VARIANTS.items()}
VARIANTS: dict[str, VolSplatConfig] = {
    # released: ViT-B host, two scales, upsample 2, lowest 1/4 (README); RE10K near 0.5 / far 100
    "volsplat_re10k": VolSplatConfig(host=_HOSTS["depthsplat_base"]),
    # ScanNet fine-tune: the same network, far 15
    "volsplat_scannet": VolSplatConfig(host=replace(_HOSTS["depthsplat_base"], far=15.0)),
    # tests and CPU runs: the tiny host with two scales (so the intermediate branch runs), 8-wide U-Net
    "volsplat_tiny": VolSplatConfig(
        host=replace(_HOSTS["depthsplat_tiny"], num_scales=2, upsample_factor=2, lowest_feature_resolution=4),
        voxel_size=0.02, unet_blocks=2, unet_base_channels=8,
    ),
}

for _name, _cfg in VARIANTS.items():
    register(_name)(lambda _c=_cfg, **kw: VolSplat(_c, **kw))
