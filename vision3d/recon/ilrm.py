"""iLRM: an iterative large 3D reconstruction model (posed images -> pixel-aligned 3D Gaussians).

Source: G. Kang, S. Nam, X. Sun, S. Khamis, A. Mohamed, E. Park, "iLRM: An Iterative Large 3D
Reconstruction Model", arXiv 2507.23277 (2025). Authors' code: github.com/Gynjn/iLRM, commit
2bca1c111b5dd68acaf5e2786cd3bd388c028e58 (the released "scale" encoder, ``src/model/encoder/
scalable/``); no licence file in that repository at that commit, so it was read for facts only and
its released checkpoint is not shipped here. This file is an independent implementation.

Architecture, as released:

- **View tokens** come from camera rays alone: each ``p x p`` patch of the per-pixel Plücker map
  ``(o x d, d)`` (unit ``d``, pixel centres at +0.5) is flattened in ``(row, column, channel)``
  order, linearly embedded (no bias) and layer-normalised (no bias).
- **Support tokens** come from the images: the same patchification of ``(2 * rgb - 1, o x d, d)``
  (9 channels per pixel), embedded and normalised the same way.
- **Iterative updates**: ``num_layers / 2`` iterations of (a) a *read* block, in which the view
  tokens of each view cross-attend to the support tokens of that same view, then an MLP, and (b) a
  global self-attention block over the view tokens of all views, then an MLP. Attention has no
  biases, per-head RMSNorm on queries and keys (eps 1e-5), pre-LayerNorm (no bias) and GELU MLPs
  with ratio 4 and no biases.
- **Decoding**: LayerNorm + a linear layer turn each token into ``p * p`` pixel-aligned Gaussians
  of 14 numbers (3 depth logits, 3 SH-DC colour, 3 scale, 4 rotation wxyz, 1 opacity). Activations,
  exactly the authors': distance along the unit ray ``500 * sigmoid(mean of the 3 depth logits)``;
  ``scale = exp(min(s - 6.9, -1.2))``; ``opacity = sigmoid(a - 2)``; quaternion normalised; SH
  degree 0. The authors render with a white background, near 0.01 and far 500
  (:attr:`ILRM.render_kwargs`).

Configurations released: RealEstate10K, 2 context views at 256x256 (``ilrm_re10k``); DL3DV with 2-6
context views, 256x448 centre crops of 270x480 frames (``ilrm_dl3dv``); both patch 8, width 768,
head dim 64, 24 blocks (12 iterations). Image sides must be multiples of the patch size; the
authors centre-crop to multiples of 64 (:func:`crop_to_multiple`).

**Decoupled low-resolution view tokens** (``encoder="wide"``, ``ilrm_dl3dv_wide``): the paper's
wide-coverage DL3DV model, released on the authors' ``wide`` branch (commit
2da9d82b9aee3ac3c3161f65b797b48ac437be4e: ``ilrm.py`` ``IterativeLRM``, ``transformer.py``,
``utils.py``, ``configs/ilrm.yaml``; checkpoints for 16 and 32 input views at 960x540, resized to
960x544). Differences from the above, all taken from that code:

- view tokens are built at ``1 / viewpoint_factor`` of the image resolution (factor 2 released):
  rays through the pixel centres of the downscaled image (``K`` divided by the factor), per pixel
  ``(o, d, o x d)`` (9 channels), patch ``p`` of the low-resolution grid;
- support tokens at full resolution, per pixel ``(o, d, o x d, 2 * rgb - 1)`` (12 channels);
- in the read blocks each view token asks two queries (query projection ``dim -> 2 dim``, the
  pair interleaved in the last axis: feature ``(head, channel, query)``), both attend to the
  view's support tokens, and the two outputs, interleaved the same way, are projected
  ``2 dim -> dim``; self-attention blocks are unchanged;
- one Gaussian per low-resolution pixel, 16 numbers: a 2-D sub-pixel offset
  ``sigmoid(x) - 0.5`` (low-resolution pixels, ``(x, y)``) that moves the Gaussian's ray, then
  the 14 above in the same order and with the same activations;
- rendering: white background, near 0.01, far 1e6 (``configs/ilrm.yaml``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vision3d.gaussians import Gaussians
from vision3d.geometry import Cameras
from vision3d.layers.attention import attention

from vision3d.errors import InputError, guard, short

from .base import ReconOutput, Reconstructor, register

GAUSSIAN_CHANNELS = (3, 3, 3, 4, 1)  # depth logits, SH DC, scale, quaternion wxyz, opacity
OFFSET_CHANNELS = 2  # encoder="wide": sub-pixel (x, y) offset before the 14 above


@dataclass
class ILRMConfig:
    patch_size: int = 8
    """Side of the square pixel patch behind each token."""
    dim: int = 768
    """Token width."""
    head_dim: int = 64
    """Width of one attention head (heads = dim / head_dim)."""
    num_layers: int = 24
    """Blocks; alternately read (cross-attention) and self-attention, so iterations = num_layers / 2."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLPs relative to dim."""
    max_distance: float = 500.0
    """Largest distance of a Gaussian from its camera along the pixel ray."""
    grad_checkpointing: bool = False
    """Recompute block activations in the backward pass (the authors train with it on)."""
    attn_backend: str = "auto"
    """Attention backend: auto | sdpa | xformers | math."""
    encoder: Literal["scale", "wide"] = "scale"
    """'scale': the released main-branch encoder (view tokens and Gaussians at image resolution).
    'wide': the authors' wide-coverage DL3DV encoder (view tokens and Gaussians at 1/viewpoint_factor
    of the image resolution, two queries per view token in the read blocks, sub-pixel offsets)."""
    viewpoint_factor: int = 1
    """Image resolution / view-token resolution; above 1 only with encoder='wide' (released: 2)."""

    def __post_init__(self) -> None:
        if self.dim % self.head_dim:
            raise ValueError(f"ILRMConfig: dim={self.dim} is not a multiple of head_dim={self.head_dim}")
        if self.num_layers % 2:
            raise ValueError(f"ILRMConfig: num_layers={self.num_layers} must be even (read + self-attention pairs)")
        if self.encoder not in ("scale", "wide"):
            raise ValueError(f"ILRMConfig: encoder must be 'scale' or 'wide', got {self.encoder!r}")
        if self.viewpoint_factor < 1:
            raise ValueError(f"ILRMConfig: viewpoint_factor={self.viewpoint_factor} must be >= 1")
        if self.encoder == "scale" and self.viewpoint_factor != 1:
            raise ValueError(
                f"ILRMConfig: viewpoint_factor={self.viewpoint_factor} needs encoder='wide' (the released "
                "'scale' encoder has view tokens at image resolution)"
            )

    @property
    def wide(self) -> bool:
        return self.encoder == "wide"


def _mlp(dim: int, ratio: float) -> nn.Sequential:
    hidden = int(dim * ratio)
    return nn.Sequential(
        nn.LayerNorm(dim, bias=False), nn.Linear(dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False)
    )


class _Attention(nn.Module):
    """Pre-norm multi-head attention without biases, RMSNorm on per-head queries and keys."""

    def __init__(self, dim: int, head_dim: int, cross: bool, backend: str, queries_per_token: int = 1):
        super().__init__()
        self.heads, self.head_dim, self.cross, self.backend = dim // head_dim, head_dim, cross, backend
        self.split = queries_per_token  # encoder="wide": 2 (cross-attention only)
        self.norm = nn.LayerNorm(dim, bias=False)
        if cross:
            self.q = nn.Linear(dim, self.split * dim, bias=False)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-5)
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-5)
        self.proj = nn.Linear(self.split * dim, dim, bias=False)

    def _heads(self, t: Tensor) -> Tensor:  # [B, N, dim] -> [B, heads, N, head_dim]
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # x [B, N, dim], context [B, M, dim]
        h = self.norm(x)
        if self.cross and self.split > 1:
            return self._split_queries(h, context)
        if self.cross:
            q = self._heads(self.q(h))
            k, v = (self._heads(t) for t in self.kv(context).chunk(2, -1))
        else:
            q, k, v = (self._heads(t) for t in self.qkv(h).chunk(3, -1))
        q = self.q_norm(q.float()).to(v.dtype)
        k = self.k_norm(k.float()).to(v.dtype)
        out = attention(q, k, v, backend=self.backend)
        return self.proj(out.transpose(1, 2).flatten(2))

    def _split_queries(self, h: Tensor, context: Tensor) -> Tensor:  # h [B, N, dim] normed, context [B, M, dim]
        """``split`` queries per token; the query features are laid out ``(head, channel, query)``."""
        B, N, _ = h.shape
        s, nh, hd = self.split, self.heads, self.head_dim
        q = self.q(h).unflatten(-1, (nh, hd, s))  # [B, N, nh, hd, s]
        q = q.permute(0, 2, 1, 4, 3).reshape(B, nh, N * s, hd)  # queries ordered (token, query)
        k, v = (self._heads(t) for t in self.kv(context).chunk(2, -1))
        q = self.q_norm(q.float()).to(v.dtype)
        k = self.k_norm(k.float()).to(v.dtype)
        out = attention(q, k, v, backend=self.backend)  # [B, nh, N*s, hd]
        out = out.unflatten(2, (N, s)).permute(0, 2, 1, 4, 3)  # [B, N, nh, hd, s]
        return self.proj(out.reshape(B, N, nh * hd * s))


class ReadBlock(nn.Module):
    """View tokens of each view read the support tokens of the same view."""

    def __init__(self, cfg: ILRMConfig):
        super().__init__()
        self.attn = _Attention(
            cfg.dim, cfg.head_dim, cross=True, backend=cfg.attn_backend, queries_per_token=2 if cfg.wide else 1
        )
        self.mlp = _mlp(cfg.dim, cfg.mlp_ratio)

    def forward(self, x: Tensor, support: Tensor, views: int) -> Tensor:  # x [B, V*L, dim], support [B, V*M, dim]
        xv = x.unflatten(1, (views, -1)).flatten(0, 1)  # [B*V, L, dim]
        sv = support.unflatten(1, (views, -1)).flatten(0, 1)
        x = x + self.attn(xv, sv).unflatten(0, (x.shape[0], views)).flatten(1, 2)
        return x + self.mlp(x)


class SelfBlock(nn.Module):
    """Global self-attention over the view tokens of all views."""

    def __init__(self, cfg: ILRMConfig):
        super().__init__()
        self.attn = _Attention(cfg.dim, cfg.head_dim, cross=False, backend=cfg.attn_backend)
        self.mlp = _mlp(cfg.dim, cfg.mlp_ratio)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


def _patchify(pix: Tensor, p: int) -> Tensor:
    """[B, V, C, H, W] -> [B, V*(H/p)*(W/p), p*p*C] with features ordered (row, column, channel)."""
    B, V, C, H, W = pix.shape
    t = pix.reshape(B, V, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 4, 6, 2)
    return t.reshape(B, V * (H // p) * (W // p), p * p * C)


def _unpatchify(tokens: Tensor, V: int, H: int, W: int, p: int) -> Tensor:
    """[B, V*(H/p)*(W/p), p*p*C] -> [B, V, H*W, C] (pixels row-major)."""
    B = tokens.shape[0]
    t = tokens.reshape(B, V, H // p, W // p, p, p, -1).permute(0, 1, 2, 4, 3, 5, 6)
    return t.reshape(B, V, H * W, -1)


def crop_to_multiple(images: Tensor, cameras: Cameras, multiple: int) -> tuple[Tensor, Cameras]:
    """Centre-crop images ``[B, V, 3, H, W]`` and their cameras to sides divisible by ``multiple``."""
    H, W = images.shape[-2:]
    h, w = (H // multiple) * multiple, (W // multiple) * multiple
    if h == 0 or w == 0:
        raise ValueError(f"crop_to_multiple: {W}x{H} images are smaller than one {multiple}-pixel patch")
    top, left = (H - h) // 2, (W - w) // 2
    return images[..., top : top + h, left : left + w], cameras.crop(left, top, w, h)


class ILRM(Reconstructor):
    """Posed context views -> one pixel-aligned Gaussian per context pixel (batch [B], N = V*H*W);
    with ``encoder="wide"`` one per pixel of the ``1 / viewpoint_factor`` grid (N = V*(H/f)*(W/f))."""

    render_kwargs = dict(background=(1.0, 1.0, 1.0), near_plane=0.01, far_plane=500.0, rasterize_mode="classic")

    def __init__(self, cfg: ILRMConfig | None = None, **overrides):
        super().__init__()
        cfg = ILRMConfig(**{**asdict(cfg or ILRMConfig()), **overrides})  # a private copy
        self.cfg = cfg
        p, d = cfg.patch_size, cfg.dim
        view_ch, support_ch = (9, 12) if cfg.wide else (6, 9)
        out_ch = sum(GAUSSIAN_CHANNELS) + (OFFSET_CHANNELS if cfg.wide else 0)
        self.ray_embed = nn.Linear(view_ch * p * p, d, bias=False)
        self.ray_norm = nn.LayerNorm(d, bias=False)
        self.support_embed = nn.Linear(support_ch * p * p, d, bias=False)
        self.support_norm = nn.LayerNorm(d, bias=False)
        self.blocks = nn.ModuleList(
            [ReadBlock(cfg) if i % 2 == 0 else SelfBlock(cfg) for i in range(cfg.num_layers)]
        )
        self.head = nn.Sequential(nn.LayerNorm(d, bias=False), nn.Linear(d, out_ch * p * p, bias=False))
        if cfg.wide:  # the wide branch renders with far 1e6 (configs/ilrm.yaml gaussians.far_plane)
            self.render_kwargs = {**ILRM.render_kwargs, "far_plane": 1e6}
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.cfg.grad_checkpointing = enable

    def forward(
        self,
        images: Tensor,  # [B, V, 3, H, W] in [0, 1]
        cameras: Cameras,  # batch [B, V], OpenCV cam_to_world, K in pixels
    ) -> ReconOutput:
        self.check_inputs(images, cameras, "ilrm")
        if self.cfg.wide:
            return self._forward_wide(images, cameras)
        B, V, _, H, W = images.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(
                f"ilrm: image size {W}x{H} is not a multiple of the patch size {p}; "
                f"centre-crop first with vision3d.recon.ilrm.crop_to_multiple(images, cameras, {p})"
            )
        cameras = cameras.to(device=images.device, dtype=torch.float32)
        with torch.no_grad():
            origins, dirs = cameras.rays(normalize=True)  # [B, V, H, W, 3]
            moment = torch.cross(origins, dirs, dim=-1)
            rays = torch.cat([moment, dirs], -1).permute(0, 1, 4, 2, 3)  # [B, V, 6, H, W]
        support_pix = torch.cat([images.float() * 2 - 1, rays], 2)
        x = self.ray_norm(self.ray_embed(_patchify(rays, p)))
        support = self.support_norm(self.support_embed(_patchify(support_pix, p)))
        x = self._process(x, support, V)
        raw = _unpatchify(self.head(x).float(), V, H, W, p)  # [B, V, H*W, 14]
        depth_logits, sh_dc, scale, rot, opacity = raw.split(GAUSSIAN_CHANNELS, -1)
        distance = depth_logits.mean(-1, keepdim=True).sigmoid() * self.cfg.max_distance  # [B, V, H*W, 1]
        o = origins.reshape(B, V, H * W, 3)
        d = dirs.reshape(B, V, H * W, 3)
        means = o + distance * d
        gaussians = Gaussians(
            means=means.reshape(B, V * H * W, 3),
            quats=F.normalize(rot, dim=-1).reshape(B, V * H * W, 4),
            scales=(scale - 6.9).clamp(max=-1.2).exp().reshape(B, V * H * W, 3),
            opacities=(opacity - 2.0).sigmoid().reshape(B, V * H * W),
            sh=sh_dc.reshape(B, V * H * W, 1, 3),
        )
        # z-depth per context pixel: distance along the unit ray times the ray's cosine to the optical axis
        with torch.no_grad():
            _, d_z1 = cameras.rays(normalize=False)  # camera-space z = 1
        z = distance.reshape(B, V, H, W) / d_z1.norm(dim=-1)
        return ReconOutput(gaussians=gaussians, depth=z.unsqueeze(2), extras={"raw": raw})

    def _process(self, x: Tensor, support: Tensor, views: int) -> Tensor:  # x [B, V*L, dim], support [B, V*M, dim]
        for blk in self.blocks:
            args = (x, support, views) if isinstance(blk, ReadBlock) else (x,)
            if self.cfg.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, *args, use_reentrant=False)
            else:
                x = blk(*args)
        return x

    def _forward_wide(self, images: Tensor, cameras: Cameras) -> ReconOutput:
        """``encoder="wide"``: view tokens and Gaussians on the ``1 / viewpoint_factor`` grid."""
        B, V, _, H, W = images.shape
        p, f = self.cfg.patch_size, self.cfg.viewpoint_factor
        if H % (p * f) or W % (p * f):
            raise ValueError(
                f"ilrm: image size {W}x{H} is not a multiple of patch size x viewpoint factor = {p * f}; "
                f"centre-crop first with vision3d.recon.ilrm.crop_to_multiple(images, cameras, {p * f}) "
                "(the authors resize 960x540 to 960x544)"
            )
        h, w = H // f, W // f
        cameras = cameras.to(device=images.device, dtype=torch.float32)
        low = cameras.resize(w, h)  # K divided by f: the view-token grid
        with torch.no_grad():
            o, d = cameras.rays(normalize=True)  # [B, V, H, W, 3]
            rays = torch.cat([o, d, torch.cross(o, d, dim=-1)], -1).permute(0, 1, 4, 2, 3)  # [B, V, 9, H, W]
            support_pix = torch.cat([rays, images.float() * 2 - 1], 2)  # [B, V, 12, H, W]
            lo, ld = low.rays(normalize=True)  # [B, V, h, w, 3]
            view_pix = torch.cat([lo, ld, torch.cross(lo, ld, dim=-1)], -1).permute(0, 1, 4, 2, 3)  # [B, V, 9, h, w]
        x = self.ray_norm(self.ray_embed(_patchify(view_pix, p)))  # [B, V*(h/p)*(w/p), dim]
        support = self.support_norm(self.support_embed(_patchify(support_pix, p)))  # [B, V*(H/p)*(W/p), dim]
        x = self._process(x, support, V)
        raw = _unpatchify(self.head(x).float(), V, h, w, p)  # [B, V, h*w, 16]
        offset, depth_logits, sh_dc, scale, rot, opacity = raw.split((OFFSET_CHANNELS, *GAUSSIAN_CHANNELS), -1)
        offset = offset.sigmoid() - 0.5  # [B, V, h*w, 2] low-resolution pixels, (x, y)
        uv = low.pixel_grid().reshape(h * w, 2) + offset  # [B, V, h*w, 2]
        uv1 = torch.cat([uv, torch.ones_like(uv[..., :1])], -1)
        d_cam = torch.einsum("bvij,bvnj->bvni", torch.linalg.inv(low.K), uv1)  # camera z = 1
        dirs = F.normalize(torch.einsum("bvij,bvnj->bvni", low.rotation, d_cam), dim=-1)  # [B, V, h*w, 3]
        distance = depth_logits.mean(-1, keepdim=True).sigmoid() * self.cfg.max_distance  # [B, V, h*w, 1]
        means = low.centers[:, :, None, :] + distance * dirs
        n = V * h * w
        gaussians = Gaussians(
            means=means.reshape(B, n, 3),
            quats=F.normalize(rot, dim=-1).reshape(B, n, 4),
            scales=(scale - 6.9).clamp(max=-1.2).exp().reshape(B, n, 3),
            opacities=(opacity - 2.0).sigmoid().reshape(B, n),
            sh=sh_dc.reshape(B, n, 1, 3),
        )
        z = (distance[..., 0] / d_cam.norm(dim=-1)).reshape(B, V, 1, h, w)  # camera z of each Gaussian
        return ReconOutput(gaussians=gaussians, extras={"raw": raw, "offsets": offset, "depth_lowres": z})


# ---------------------------------------------------------------------------------------------
# the authors' checkpoint layout -> ours

_RENAMES = [
    (r"^input_tokenizer\.", "ray_embed."),
    (r"^input_layernorm\.", "ray_norm."),
    (r"^support_tokenizer\.", "support_embed."),
    (r"^support_layernorm\.", "support_norm."),
    (r"^token_decoder\.", "head."),
    # the wide branch's IterativeLRM (nn.Sequential(Rearrange, Linear, LayerNorm) tokenizers)
    (r"^viewpoint_tokenizer\.1\.", "ray_embed."),
    (r"^viewpoint_tokenizer\.2\.", "ray_norm."),
    (r"^image_tokenizer\.1\.", "support_embed."),
    (r"^image_tokenizer\.2\.", "support_norm."),
    (r"^viewpoint_token_decoder\.", "head."),
    (r"^processor\.blocks\.(\d+)\.read_cross\.", r"blocks.\1.attn."),
    (r"^processor\.blocks\.(\d+)\.attn\.", r"blocks.\1.attn."),
    (r"^processor\.blocks\.(\d+)\.(read_ff|mlp)\.norm\.", r"blocks.\1.mlp.0."),
    (r"^processor\.blocks\.(\d+)\.(read_ff|mlp)\.fc1\.", r"blocks.\1.mlp.1."),
    (r"^processor\.blocks\.(\d+)\.(read_ff|mlp)\.fc2\.", r"blocks.\1.mlp.3."),
]


def convert_ilrm_checkpoint(state: dict[str, Tensor], path=None) -> dict[str, Tensor]:
    """The authors' weights (a Lightning ``.ckpt`` dict, its ``state_dict``, or a bare ``Scaler``
    state dict; or the wide branch's ``{"model": IterativeLRM state dict}`` ``.pt``) -> an
    :class:`ILRM` state dict. LPIPS-loss weights and other non-model keys are dropped.

    Raises :class:`~vision3d.errors.InputError` (naming ``path``, the file it came from) for a
    key outside the authors' layout, a value that is not a tensor, or a half k/v pair.
    """
    where = path if path is not None else "convert_ilrm_checkpoint"
    if not isinstance(state, dict):
        raise InputError(where, "checkpoint", "a dict (Lightning checkpoint or state dict)", type(state).__name__)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    elif "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    prefix = "encoder.scaler."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    out: dict[str, Tensor] = {}
    cross_qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise InputError(where, f"key {short(key)}", "a tensor under a string key", type(value).__name__)
        m = re.match(r"^processor\.blocks\.(\d+)\.read_cross\.([kv])\.weight$", key)
        if m:  # separate k and v projections are fused into kv
            cross_qkv.setdefault(m.group(1), {})[m.group(2)] = value
            continue
        new = key
        for pat, rep in _RENAMES:
            new, n = re.subn(pat, rep, new)
            if n:
                break
        else:
            raise InputError(where, f"key {short(key, 120)}", "a key of the authors' iLRM layout", "an unexpected key")
        out[new] = value
    for i, kv in cross_qkv.items():
        if set(kv) != {"k", "v"}:
            raise InputError(where, f"processor.blocks.{i}.read_cross", "both the k and v projections", sorted(kv))
        out[f"blocks.{i}.attn.kv.weight"] = torch.cat([kv["k"], kv["v"]], 0)
    return out


def config_from_state_dict(state: dict[str, Tensor], viewpoint_factor: int = 2, path=None) -> ILRMConfig:
    """Infer patch size, width, depth and encoder from a converted state dict. The wide encoder's
    ``viewpoint_factor`` does not show in the weights: ``viewpoint_factor`` (released: 2) is used.
    A state dict whose shapes do not describe an iLRM raises :class:`~vision3d.errors.InputError`."""
    where = path if path is not None else "config_from_state_dict"
    for k, ndim in (("ray_embed.weight", 2), ("blocks.0.attn.q.weight", 2), ("blocks.0.attn.q_norm.weight", 1)):
        if k not in state or state[k].ndim != ndim or 0 in state[k].shape:
            got = tuple(state[k].shape) if k in state else "missing"
            raise InputError(where, k, f"a {ndim}-D non-empty tensor (iLRM state dict)", got)
    with guard(where, "an iLRM state dict"):
        cfg = _config_from_state_dict(state, viewpoint_factor)
    p, dim = cfg.patch_size, cfg.dim
    if p < 1 or state["ray_embed.weight"].shape[1] != (9 if cfg.encoder == "wide" else 6) * p * p:
        raise InputError(where, "ray_embed.weight", "width 6*p*p (or 9*p*p for the wide encoder)", tuple(state["ray_embed.weight"].shape))
    if cfg.head_dim < 1 or dim % cfg.head_dim:
        raise InputError(where, "blocks.0.attn.q_norm.weight", f"a head width dividing dim={dim}", cfg.head_dim)
    return cfg


def _config_from_state_dict(state: dict[str, Tensor], viewpoint_factor: int) -> ILRMConfig:
    dim = state["ray_embed.weight"].shape[0]
    wide = state["blocks.0.attn.q.weight"].shape[0] == 2 * dim
    p = int(round((state["ray_embed.weight"].shape[1] / (9 if wide else 6)) ** 0.5))
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    if wide:
        return ILRMConfig(
            patch_size=p, dim=dim, head_dim=head_dim, num_layers=layers, encoder="wide",
            viewpoint_factor=viewpoint_factor,
        )
    return ILRMConfig(patch_size=p, dim=dim, head_dim=head_dim, num_layers=layers)


def load_ilrm(path: str, **overrides) -> ILRM:
    """Build an ILRM from the authors' ``.ckpt`` (or our safetensors), inferring the configuration."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: iLRM checkpoint not found")
    from vision3d.utils.io import read_checkpoint

    state = read_checkpoint(path)
    if path.suffix != ".safetensors":
        state = convert_ilrm_checkpoint(state, path=path)
    cfg = config_from_state_dict(state, path=path)
    model = ILRM(cfg, **overrides)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise InputError(path, "weights", f"tensors shaped for iLRM {cfg}", short(str(e), 300)) from e
    if missing or unexpected:
        raise InputError(path, "weights", f"the keys of iLRM {cfg}", f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


VARIANTS: dict[str, ILRMConfig] = {
    "ilrm_re10k": ILRMConfig(),  # 2 views, 256x256
    "ilrm_dl3dv": ILRMConfig(),  # 2-6 views, 256x448
    "ilrm_dl3dv_wide": ILRMConfig(encoder="wide", viewpoint_factor=2),  # 16 or 32 views, 960x544 (wide branch)
    "ilrm_tiny": ILRMConfig(patch_size=4, dim=64, head_dim=16, num_layers=4),  # tests and CPU runs
}

for _name, _cfg in VARIANTS.items():
    register(_name)(lambda _c=_cfg, **kw: ILRM(_c, **kw))
