"""VGGT: cameras, depth and point maps from unposed images in one forward pass.

Wang, Chen, Karaev, Vedaldi, Rupprecht, Novotny, "VGGT: Visual Geometry Grounded Transformer",
CVPR 2025, arXiv:2503.11651. Authors' code: github.com/facebookresearch/vggt (read at a24d9de:
``vggt/models/aggregator.py``, ``vggt/models/vggt.py``, ``vggt/heads/camera_head.py``,
``vggt/heads/dpt_head.py``, ``vggt/layers/*``, ``vggt/utils/load_fn.py``); code licence: the VGGT
License (Meta). The official 1B checkpoint (``facebook/VGGT-1B``) is released under its own
non-commercial licence and ``facebook/VGGT-1B-Commercial`` under a separate one: see
``models/vggt/card.md``. No weights ship with vision3d; :func:`convert_vggt_checkpoint` converts a
state dict the user downloaded.

Architecture (what this file implements):

* **Patch embedding**: DINOv2 ViT-L/14 with 4 registers, built with timm
  (``vit_large_patch14_reg4_dinov2``, ``dynamic_img_size=True``); its normalised patch tokens
  (registers and class token dropped) are the frame tokens. Images are normalised with the ImageNet
  mean/std first.
* **Special tokens**: one camera token and four register tokens per frame; the first frame uses
  its own pair of learned tokens, all other frames share a second pair (the reference frame is
  frame 0).
* **Alternating attention**: ``depth`` pairs of blocks, a frame block (attention within each frame)
  then a global block (attention across all tokens of all frames); each block is pre-norm
  attention + MLP with LayerScale, QK-LayerNorm and 2-D RoPE (base 100; special tokens at
  position 0, patches from (1, 1)). The output of layer ``i`` is the frame-block output
  concatenated with the global-block output, ``[B, S, 5 + P, 2C]``.
* **Camera head**: the camera tokens of the last layer go through ``trunk_depth`` blocks four
  times, each pass conditioned (adaLN: shift, scale, gate) on the embedding of the previous pose
  estimate and adding a delta; the result is VGGT's ``absT_quaR_FoV`` encoding, turned into
  :class:`~vision3d.geometry.Cameras` by
  :func:`vision3d.geometry.conventions.cameras_from_vggt_pose_encoding`.
* **DPT heads** (:class:`vision3d.layers.dpt.DPTHead`): depth (``exp``) and a point map in the
  first camera's frame (``inv_log``), each with a ``1 + exp`` confidence.

The tracking head is not implemented.

Input policy (VGGT's ``load_and_preprocess_images``, reproduced by :func:`preprocess_images` with
torch resampling instead of PIL): ``"crop"`` resizes to width 518, height rounded to a multiple of
14, centre-cropping heights above 518; ``"pad"`` resizes the long side to 518 and pads to 518x518
with white; images of different sizes after this are centre-padded with white to the largest
height and width. The model itself requires ``H`` and ``W`` to be multiples of the patch size.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor

from vision3d.geometry.conventions import cameras_from_vggt_pose_encoding
from vision3d.layers.attention import attention
from vision3d.layers.dpt import DPTHead
from vision3d.layers.layerscale import LayerScale
from vision3d.layers.rope import RoPE2D, patch_positions
from vision3d.recon.base import ReconOutput, Reconstructor, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------- config
@dataclass
class VGGTConfig:
    """Sizes of a VGGT model (defaults: the published 1B model)."""

    img_size: int = 518
    """Training image size; sets the DINOv2 position grid (img_size / patch_size squared)."""
    patch_size: int = 14
    """Pixels per patch."""
    embed_dim: int = 1024
    """Token width of the aggregator (and of the DINOv2 patch embedding)."""
    depth: int = 24
    """Number of frame/global block pairs."""
    num_heads: int = 16
    """Attention heads in the aggregator."""
    mlp_ratio: float = 4.0
    """MLP hidden width over token width."""
    num_register_tokens: int = 4
    """Register tokens per frame (also the DINOv2 registers)."""
    rope_base: float = 100.0
    """2-D RoPE frequency base."""
    dino_depth: int = 24
    """Blocks of the DINOv2 patch embedding."""
    dino_heads: int = 16
    """Heads of the DINOv2 patch embedding."""
    camera_trunk_depth: int = 4
    """Blocks in the camera head trunk."""
    camera_heads: int = 16
    """Heads in the camera head trunk."""
    camera_iterations: int = 4
    """Refinement iterations of the camera head."""
    dpt_features: int = 256
    """DPT fusion width."""
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    """DPT per-level projection widths."""
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)
    """Aggregator layers feeding the DPT levels."""
    frames_chunk: int = 8
    """Frames per chunk in the DPT heads (memory only; results do not depend on it)."""
    max_frames: int = 512
    """Above this, global attention runs in query chunks (exact, lower peak memory), with a warning."""
    query_chunk: int = 8192
    """Queries per attention call in the global blocks when ``max_frames`` is exceeded."""
    attn_backend: str = "auto"
    """Backend of :func:`vision3d.layers.attention.attention`."""


# ------------------------------------------------------------------------------------- blocks
class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (key names as DINOv2/VGGT/timm)."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:  # [..., dim] -> [..., out]
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with optional QK-LayerNorm and 2-D RoPE (VGGT's ``Attention``)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, rope: RoPE2D | None = None,
                 backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.backend = backend
        self.query_chunk: int | None = None  # set by the model for very long sequences

    def project_qkv(self, x: Tensor, pos: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B, N, C]`` -> q, k, v ``[B, heads, N, D]`` (normalised and rotated)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # [B, h, Nq, D] x2 -> [B, Nq, C]
        if self.query_chunk and q.shape[2] > self.query_chunk:
            o = torch.cat([attention(qc, k, v, backend=self.backend) for qc in q.split(self.query_chunk, 2)], 2)
        else:
            o = attention(q, k, v, backend=self.backend)
        return self.proj(o.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, pos: Tensor | None = None) -> Tensor:  # [B, N, C], pos [B, N, 2]
        return self.attend(*self.project_qkv(x, pos))


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: ``x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float = 0.01,
                 qk_norm: bool = False, rope: RoPE2D | None = None, backend: str = "auto",
                 attn_cls: type[Attention] = Attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_cls(dim, num_heads, qk_norm=qk_norm, rope=rope, backend=backend)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values)
        self.grad_checkpointing = False  # recompute this block in the backward pass (training only)

    def forward(self, x: Tensor, pos: Tensor | None = None, **attn_kwargs) -> Tensor:  # [B, N, C]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, pos, use_reentrant=False, **attn_kwargs)
        return self._forward(x, pos, **attn_kwargs)

    def _forward(self, x: Tensor, pos: Tensor | None = None, **attn_kwargs) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), pos, **attn_kwargs))
        return x + self.ls2(self.mlp(self.norm2(x)))


def _dinov2(cfg: VGGTConfig) -> nn.Module:
    """DINOv2 with registers as a timm VisionTransformer (no class head, any image size)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.dino_depth,
        num_heads=cfg.dino_heads, mlp_ratio=4.0, init_values=1.0, reg_tokens=cfg.num_register_tokens,
        no_embed_class=True, num_classes=0, global_pool="", dynamic_img_size=True,
    )


# ---------------------------------------------------------------------------------- aggregator
class Aggregator(nn.Module):
    """DINOv2 patch tokens + camera/register tokens, then ``depth`` frame/global block pairs."""

    global_attn_cls: type[Attention] = Attention

    def __init__(self, cfg: VGGTConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        self.patch_embed = _dinov2(cfg)
        self.rope = RoPE2D(cfg.rope_base)
        mk = lambda cls: Block(c, cfg.num_heads, cfg.mlp_ratio, 0.01, qk_norm=True, rope=self.rope,  # noqa: E731
                               backend=cfg.attn_backend, attn_cls=cls)
        self.frame_blocks = nn.ModuleList([mk(Attention) for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([mk(self.global_attn_cls) for _ in range(cfg.depth)])
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, c) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, c) * 1e-6)
        self.patch_start = 1 + cfg.num_register_tokens
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def embed(self, images: Tensor, first_is_reference: bool = True) -> tuple[Tensor, Tensor]:
        """Frame tokens ``[B, S, T, C]`` and RoPE positions ``[B*S, T, 2]`` of ``images`` ``[B, S, 3, H, W]``.

        ``first_is_reference``: frame 0 gets the reference camera/register tokens (False for a
        chunk that does not contain the sequence's first frame).
        """
        b, s, _, h, w = images.shape
        p = self.cfg.patch_size
        x = ((images - self.mean) / self.std).reshape(b * s, 3, h, w)
        pt = self.patch_embed.forward_features(x)[:, self.patch_embed.num_prefix_tokens:]
        pt = pt.reshape(b, s, -1, pt.shape[-1])
        idx = torch.ones(s, dtype=torch.long, device=images.device)
        if first_is_reference:
            idx[0] = 0
        cam = self.camera_token[0, idx].unsqueeze(0).expand(b, -1, -1, -1)
        reg = self.register_token[0, idx].unsqueeze(0).expand(b, -1, -1, -1)
        tokens = torch.cat([cam, reg, pt], 2)
        pos = patch_positions(b * s, h // p, w // p, self.patch_start, device=images.device)
        return tokens, pos

    def global_block(self, i: int, x: Tensor, pos: Tensor, b: int, s: int, grid: tuple[int, int]) -> Tensor:
        """Global block ``i`` on ``x`` ``[B, S*T, C]`` (overridden by FlashVGGT)."""
        return self.global_blocks[i](x, pos)

    def before_blocks(self, tokens: Tensor) -> None:
        """Hook on the embedded tokens ``[B, S, T, C]`` before the first block (used by FlashVGGT)."""

    def forward(self, images: Tensor, keep: set[int] | None = None,
                first_is_reference: bool = True) -> list[Tensor | None]:
        """Per-layer tokens ``[B, S, T, 2C]`` (frame output | global output) for ``images`` ``[B, S, 3, H, W]``.

        ``keep``: layer indices to return (others are ``None``, which saves memory); all by default.
        """
        b, s, _, h, w = images.shape
        tokens, pos = self.embed(images, first_is_reference)
        self.before_blocks(tokens)
        t, c = tokens.shape[2], tokens.shape[3]
        grid = (h // self.cfg.patch_size, w // self.cfg.patch_size)
        gpos = pos.reshape(b, s * t, 2)
        x = tokens.reshape(b * s, t, c)
        out: list[Tensor | None] = []
        for i in range(self.cfg.depth):
            x = self.frame_blocks[i](x.reshape(b * s, t, c), pos)
            f = x.reshape(b, s, t, c)
            x = self.global_block(i, x.reshape(b, s * t, c), gpos, b, s, grid)
            out.append(torch.cat([f, x.reshape(b, s, t, c)], -1) if keep is None or i in keep else None)
        return out


# ---------------------------------------------------------------------------------- camera head
class CameraHead(nn.Module):
    """Iterative pose-encoding refinement on the camera tokens (VGGT's ``CameraHead``)."""

    def __init__(self, dim: int, trunk_depth: int = 4, num_heads: int = 16, iterations: int = 4,
                 backend: str = "auto"):
        super().__init__()
        self.iterations = iterations
        self.trunk = nn.Sequential(*[Block(dim, num_heads, 4.0, 0.01, backend=backend) for _ in range(trunk_depth)])
        self.token_norm = nn.LayerNorm(dim)
        self.trunk_norm = nn.LayerNorm(dim)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, 9))
        self.embed_pose = nn.Linear(9, dim)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.adaln_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim, dim // 2, 9)

    def forward(self, cam_tokens: Tensor) -> list[Tensor]:  # [B, S, dim] -> iterations x [B, S, 9]
        b, s, _ = cam_tokens.shape
        tok = self.token_norm(cam_tokens)
        enc = None
        outs = []
        for _ in range(self.iterations):
            cond = self.embed_pose(self.empty_pose_tokens.expand(b, s, -1) if enc is None else enc.detach())
            shift, scale, gate = self.poseLN_modulation(cond).chunk(3, -1)
            y = gate * (self.adaln_norm(tok) * (1 + scale) + shift) + tok
            for blk in self.trunk:
                y = blk(y)
            delta = self.pose_branch(self.trunk_norm(y))
            enc = delta if enc is None else enc + delta
            outs.append(torch.cat([enc[..., :7], F.relu(enc[..., 7:])], -1))
        return outs


# --------------------------------------------------------------------------------------- model
class VGGT(Reconstructor):
    """VGGT as a :class:`Reconstructor`: images in, cameras, depth, confidences and point maps out.

    ``forward(images, cameras=None)``: ``images`` ``[B, S, 3, H, W]`` in ``[0, 1]`` with ``H``, ``W``
    multiples of the patch size (see :func:`preprocess_images`); input cameras are ignored (VGGT
    predicts them). Returns :class:`ReconOutput` with ``cameras`` (batch ``[B, S]``, world = the
    first camera's frame, OpenCV), ``depth`` ``[B, S, 1, H, W]``, ``confidence`` (depth confidence,
    ``[B, S, 1, H, W]``) and ``extras``: ``pose_enc`` ``[B, S, 9]``, ``world_points``
    ``[B, S, H, W, 3]``, ``world_points_conf`` ``[B, S, H, W]``.
    """

    aggregator_cls = Aggregator

    def __init__(self, cfg: VGGTConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or VGGTConfig()
        if overrides:
            cfg = VGGTConfig(**{**asdict(cfg), **overrides})
        if any(i >= cfg.depth for i in cfg.dpt_layers):
            raise ValueError(f"VGGTConfig.dpt_layers {cfg.dpt_layers} must be < depth {cfg.depth}")
        self.cfg = cfg
        self.aggregator = self.aggregator_cls(cfg)
        d2 = 2 * cfg.embed_dim
        self.camera_head = CameraHead(d2, cfg.camera_trunk_depth, cfg.camera_heads, cfg.camera_iterations,
                                      cfg.attn_backend)
        dpt = dict(patch_size=cfg.patch_size, features=cfg.dpt_features, out_channels=cfg.dpt_out_channels,
                   layer_idx=cfg.dpt_layers, frames_chunk=cfg.frames_chunk)
        self.point_head = DPTHead(d2, output_dim=4, activation="inv_log", conf_activation="expp1", **dpt)
        self.depth_head = DPTHead(d2, output_dim=2, activation="exp", conf_activation="expp1", **dpt)
        self.enabled_heads = {"camera", "depth", "point"}  # see set_heads

    def set_heads(self, camera: bool = True, depth: bool = True, point: bool = True) -> None:
        """Run only these heads (the authors' ``enable_camera/depth/point``; training without a
        loss on a head skips it, which saves its compute and keeps its parameters out of DDP).
        Outputs of a disabled head are absent from :meth:`predict` and ``None`` in :meth:`forward`."""
        self.enabled_heads = {n for n, on in (("camera", camera), ("depth", depth), ("point", point)) if on}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the aggregator's frame and global blocks in the backward pass (less activation
        memory, one more forward of the aggregator per step); training mode only."""
        for blk in [*self.aggregator.frame_blocks, *self.aggregator.global_blocks]:
            blk.grad_checkpointing = bool(enable)

    def check_images(self, images: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(images, Tensor) or images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"{name}: images must be [B, S, 3, H, W] in [0, 1], got "
                             f"{tuple(getattr(images, 'shape', ()))}")
        h, w = images.shape[-2:]
        p = self.cfg.patch_size
        if h % p or w % p or h < p or w < p:
            raise ValueError(f"{name}: image size {w}x{h} must be a positive multiple of the patch size {p}; "
                             "resize with vision3d.recon.vggt.preprocess_images(...)")

    def _set_query_chunking(self, n_frames: int) -> None:
        chunk = None
        if n_frames > self.cfg.max_frames:
            warnings.warn(f"{type(self).__name__}: {n_frames} frames > max_frames={self.cfg.max_frames}; global "
                          "attention runs in query chunks (exact, slower, lower peak memory)", stacklevel=3)
            chunk = self.cfg.query_chunk
        for blk in self.aggregator.global_blocks:
            blk.attn.query_chunk = chunk

    def aggregate(self, images: Tensor) -> list[Tensor | None]:
        """Token list of the aggregator (only the layers the heads need are kept)."""
        return self.aggregator(images, keep=set(self.cfg.dpt_layers) | {self.cfg.depth - 1})

    def predict(self, images: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """The authors' output dict: ``pose_enc`` [B,S,9], ``pose_enc_list``, ``depth`` [B,S,H,W,1],
        ``depth_conf`` [B,S,H,W], ``world_points`` [B,S,H,W,3], ``world_points_conf`` [B,S,H,W]."""
        self.check_images(images)
        self._set_query_chunking(images.shape[1])
        tokens = self.aggregate(images)
        return self.heads(tokens, images.shape[-2:])

    def heads(self, tokens: list[Tensor | None], image_hw) -> dict[str, Tensor | list[Tensor]]:
        ps = self.aggregator.patch_start
        hw = (int(image_hw[0]), int(image_hw[1]))
        out: dict[str, Tensor | list[Tensor]] = {}
        on = self.enabled_heads
        with torch.autocast(device_type=tokens[-1].device.type, enabled=False):
            tokens = [t.float() if t is not None else None for t in tokens]
            if "camera" in on:
                poses = self.camera_head(tokens[-1][:, :, 0])
                out.update(pose_enc=poses[-1], pose_enc_list=poses)
            if "depth" in on:
                out["depth"], out["depth_conf"] = self.depth_head(tokens, hw, ps)
            if "point" in on:
                out["world_points"], out["world_points_conf"] = self.point_head(tokens, hw, ps)
        return out

    def forward(self, images: Tensor, cameras=None) -> ReconOutput:  # images [B, S, 3, H, W] in [0, 1]
        return self.to_output(self.predict(images), images.shape[-2:])

    @staticmethod
    def to_output(pred: dict, image_hw) -> ReconOutput:
        """:class:`ReconOutput` from the authors'-style prediction dict of :meth:`predict` (entries of
        disabled heads are ``None`` / absent). ``extras["pose_enc_list"]`` ``[iterations, B, S, 9]``
        holds every refinement step of the camera head (the camera loss weighs them all)."""
        h, w = int(image_hw[0]), int(image_hw[1])
        extras = {k: pred[k] for k in ("pose_enc", "world_points", "world_points_conf") if k in pred}
        if "pose_enc_list" in pred:
            extras["pose_enc_list"] = torch.stack(list(pred["pose_enc_list"]))
        return ReconOutput(
            cameras=cameras_from_vggt_pose_encoding(pred["pose_enc"], w, h) if "pose_enc" in pred else None,
            depth=pred["depth"].permute(0, 1, 4, 2, 3) if "depth" in pred else None,
            confidence=pred["depth_conf"].unsqueeze(2) if "depth_conf" in pred else None,
            extras=extras,
        )


# ---------------------------------------------------------------------------------- converter
def convert_vggt_checkpoint(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' VGGT state dict (``facebook/VGGT-1B`` ``model.pt`` layout) -> ours.

    The aggregator blocks, camera head and DPT heads keep the authors' key names. The DINOv2 patch
    embedding (``aggregator.patch_embed.*``) moves to timm's layout: ``register_tokens`` ->
    ``reg_token``; the class token absorbs its position (``cls_token + pos_embed[:, 0]``) and
    ``pos_embed`` drops that entry (timm's ``no_embed_class``); ``mask_token`` is dropped. The
    tracking head (``track_head.*``) is dropped (not implemented). A leading ``module.`` or
    ``model.`` prefix is stripped.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"convert_vggt_checkpoint: expected a state dict, got {type(state_dict).__name__}")
    sd = {}
    for k, v in state_dict.items():
        for pre in ("module.", "model."):
            if k.startswith(pre):
                k = k[len(pre):]
        sd[k] = v
    if "aggregator.camera_token" not in sd:
        raise ValueError("convert_vggt_checkpoint: no 'aggregator.camera_token' key; not a VGGT state dict "
                         f"(first keys: {list(sd)[:5]})")
    pe = "aggregator.patch_embed."
    out = {}
    for k, v in sd.items():
        if k.startswith("track_head.") or k == pe + "mask_token":
            continue
        if k == pe + "register_tokens":
            out[pe + "reg_token"] = v
        elif k == pe + "cls_token":
            out[k] = v + sd[pe + "pos_embed"][:, :1]
        elif k == pe + "pos_embed":
            out[k] = v[:, 1:]
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------- preprocess
def preprocess_images(
    images: list[Tensor],  # each [3, h, w] in [0, 1]
    mode: str = "crop",
    target: int = 518,
    patch_size: int = 14,
) -> Tensor:  # [S, 3, H, W] in [0, 1]
    """VGGT's resize/crop/pad policy (``vggt/utils/load_fn.py``), in torch (bicubic with antialias,
    clamped to [0, 1], where the authors use PIL bicubic).

    ``"crop"``: width -> ``target``, height -> ``round(h * target / w / patch) * patch``, centre
    crop of heights above ``target``. ``"pad"``: the long side -> ``target``, the short side rounded
    to a multiple of ``patch``, then white padding to ``target x target``. Images whose sizes still
    differ are centre-padded with white (1.0) to the largest height and width.
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"preprocess_images: mode must be 'crop' or 'pad', got {mode!r}")
    if len(images) == 0:
        raise ValueError("preprocess_images: at least one image is required")
    out = []
    for i, im in enumerate(images):
        if not isinstance(im, Tensor) or im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"preprocess_images: image {i} must be [3, h, w], got {tuple(getattr(im, 'shape', ()))}")
        h, w = im.shape[-2:]
        if mode == "pad" and h > w:
            nh, nw = target, max(patch_size, round(w * target / h / patch_size) * patch_size)
        else:
            nw, nh = target, max(patch_size, round(h * target / w / patch_size) * patch_size)
        x = F.interpolate(im[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp(0.0, 1.0)
        if mode == "crop" and nh > target:
            y0 = (nh - target) // 2
            x = x[:, y0:y0 + target]
        if mode == "pad":
            x = _pad_white(x, target, target)
        out.append(x)
    hmax, wmax = max(x.shape[1] for x in out), max(x.shape[2] for x in out)
    return torch.stack([_pad_white(x, hmax, wmax) for x in out])


def _pad_white(x: Tensor, h: int, w: int) -> Tensor:  # [3, h0, w0] -> [3, h, w]
    dh, dw = h - x.shape[1], w - x.shape[2]
    if dh <= 0 and dw <= 0:
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=1.0)


# ---------------------------------------------------------------------------------- variants
VGGT_TINY = dict(img_size=56, embed_dim=32, depth=4, num_heads=2, dino_depth=2, dino_heads=2,
                 camera_trunk_depth=1, camera_heads=2, dpt_features=16, dpt_out_channels=(8, 16, 32, 32),
                 dpt_layers=(0, 1, 2, 3))
"""The configuration of the test fixture ``tests/fixtures/vggt/public``."""


@register("vggt_1b")
def vggt_1b(**overrides) -> VGGT:
    """The published VGGT-1B configuration (random weights; load a converted checkpoint)."""
    return VGGT(VGGTConfig(), **overrides)


@register("vggt_tiny")
def vggt_tiny(**overrides) -> VGGT:
    """A tiny configuration for tests and CPU benchmarks."""
    return VGGT(VGGTConfig(**VGGT_TINY), **overrides)
