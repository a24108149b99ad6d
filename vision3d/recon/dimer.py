"""DiMeR: disentangled mesh reconstruction from 4 normal maps (geometry) and 4 RGB views (texture).

Source: L. Jiang, J. Lin, K. Chen, W. Ge, X. Yang, Y. Jiang, Y. Lyu, X. Zheng, Y. Chen,
"DiMeR: Disentangled Mesh Reconstruction Model", arXiv:2504.17670 (2025).
Authors' code: github.com/lutao2021/DiMeR, commit b29e953f941200cec6e17cce885d4f1e33d67182
(``models/DiMeR``; built on InstantMesh/LRM code). The repository has **no licence file**: it was
read for facts only (shapes, key names, constants, order of operations) and nothing is copied.
Weights (``LutaoJiang/DiMeR`` on the Hugging Face hub: ``DiMeR_geometry.ckpt``,
``DiMeR_texture.ckpt``) carry no licence either and are not shipped; see ``models/dimer/card.md``.

Architecture (one network class, two trained instances):

* image encoder: DINO ViT-B/16 whose every block is modulated (adaLN: shift/scale of both
  pre-norms, no gates) by a camera embedding ``MLP(16 -> D -> D)`` of the flattened OpenGL
  camera-to-world ``[3, 4]`` and the normalised intrinsics ``(fx, fy, cx, cy)``; ImageNet
  normalisation; DINO-style bicubic position-embedding resampling (``+0.1`` trick);
  block parameters use timm's names so a timm ``vit_base_patch16_224.dino`` state dict loads;
* triplane transformer: learned ``3 * 32 * 32`` queries, blocks of cross-attention to the tokens
  of all views, self-attention and an MLP (pre-norm, bias-free attention projections), final
  LayerNorm, ``ConvTranspose2d(k=2, s=2)`` per plane to ``[B, 3, 80, 64, 64]``;
* triplane sampling: points scaled by ``2 / box_warp``, projected to the planes (x, y), (x, z),
  (z, y), bilinear ``grid_sample`` (``align_corners=False``, zeros padding), features concatenated
  plane-major;
* decoders: 4-layer ReLU MLPs (hidden 64) for SDF, RGB (``sigmoid * 1.002 - 0.001``) and
  metallic/roughness (``sigmoid``; roughness mapped to ``[0.04^2, 1]``);
* mesh: SDF on a ``(192 + 1)^3`` grid spanning ``[-1.05, 1.05]^3``, FlexiCubes without the
  deformation/weight MLPs (:mod:`vision3d.mesh.flexicubes`), vertex colours queried from the
  texture network at the vertices rotated by ``R_y(-pi/2) R_x(-pi/2)`` (the authors' export
  rotation); the mesh is returned in the rig's world frame (z up), where the authors save it.

The cameras are the authors' fixed rig (:func:`dimer_rig`): azimuths 0/90/180/270 degrees,
elevation 5 degrees, radius 3.5, vertical field of view 30 degrees, looking at the origin.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from vision3d.geometry import Cameras, fov_to_focal, look_at, opencv_to_opengl
from vision3d.layers.attention import attention, merge_heads, split_heads
from vision3d.mesh.flexicubes import flexicubes, voxel_grid
from vision3d.mesh.mesh import Mesh

from .base import ReconOutput, Reconstructor, register

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------- config
@dataclass
class DiMeRConfig:
    """Sizes of one DiMeR network (defaults: the released model)."""

    img_size: int = 224
    """image size the encoder's position embedding was trained at (grid = img_size / patch_size)"""
    patch_size: int = 16
    """ViT patch size"""
    encoder_dim: int = 768
    """ViT width"""
    encoder_depth: int = 12
    """ViT blocks"""
    encoder_heads: int = 12
    """ViT attention heads"""
    encoder_mlp_dim: int = 3072
    """ViT MLP hidden width"""
    encoder_eps: float = 1e-12
    """LayerNorm eps of the encoder (the Hugging Face DINO config)"""
    camera_dim: int = 16
    """camera vector: 12 (OpenGL c2w [3, 4]) + 4 (fx, fy, cx, cy normalised)"""
    transformer_dim: int = 1024
    """triplane transformer width"""
    transformer_depth: int = 16
    """triplane transformer blocks"""
    transformer_heads: int = 16
    """triplane transformer heads"""
    triplane_low_res: int = 32
    """triplane query resolution (the planes come out at twice this)"""
    triplane_dim: int = 80
    """channels per plane"""
    mlp_hidden: int = 64
    """decoder MLP width"""
    mlp_layers: int = 4
    """decoder MLP linear layers"""
    grid_res: int = 192
    """FlexiCubes grid resolution (cubes per axis)"""
    grid_scale: float = 2.1
    """side length of the FlexiCubes grid (centred at the origin)"""
    box_warp: float = 2.0
    """triplane extent: points are scaled by 2 / box_warp before sampling"""
    flexicubes_weight_scale: float = 0.5
    """FlexiCubes weight scale (only matters with learned weights; DiMeR uses none)"""
    query_chunk: int = 262144
    """points per chunk when querying the triplane MLPs (bounds memory on big grids)"""
    max_grid_gib: float = 16.0
    """refuse grids whose FlexiCubes bookkeeping would need more memory than this (GiB)"""
    attn_backend: str = "auto"
    """attention backend: auto, sdpa, xformers or math"""

    @classmethod
    def from_dict(cls, d: dict) -> "DiMeRConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"DiMeRConfig: unknown fields {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------- cameras
def dimer_rig(
    batch_size: int = 1,
    width: int = 512,
    height: int = 512,
    radius: float = 3.5,
    fov_deg: float = 30.0,
    azimuths_deg: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0),
    elevation_deg: float = 5.0,
) -> Cameras:
    """The authors' fixed 4-view rig as :class:`Cameras` ``[B, 4]`` (OpenCV c2w, pixel K, world z up)."""
    az = torch.deg2rad(torch.tensor(azimuths_deg, dtype=torch.float64))
    el = torch.deg2rad(torch.full_like(az, elevation_deg))
    pos = torch.stack(
        (radius * el.cos() * az.cos(), radius * el.cos() * az.sin(), radius * el.sin()), -1
    ).float()
    c2w_cv = look_at(pos, torch.zeros(3), up=(0.0, 0.0, 1.0))
    fx, fy = fov_to_focal(math.radians(fov_deg), width), fov_to_focal(math.radians(fov_deg), height)
    K = torch.tensor([[fx, 0, 0.5 * width], [0, fy, 0.5 * height], [0, 0, 1]], dtype=torch.float32)
    n = len(azimuths_deg)
    return Cameras(
        K=K.expand(batch_size, n, 3, 3).clone(),
        cam_to_world=c2w_cv.expand(batch_size, n, 4, 4).clone(),
        width=width,
        height=height,
    )


def camera_vector(cameras: Cameras) -> Tensor:  # -> [..., 16]
    """The authors' camera conditioning: OpenGL c2w ``[3, 4]`` row-major (12) + ``(fx, fy, cx, cy) / size``."""
    c2w_gl = opencv_to_opengl(cameras.cam_to_world)
    Kn = cameras.K_normalized
    intr = torch.stack((Kn[..., 0, 0], Kn[..., 1, 1], Kn[..., 0, 2], Kn[..., 1, 2]), -1)
    return torch.cat((c2w_gl[..., :3, :4].flatten(-2), intr), -1)


def export_rotation() -> Tensor:  # [3, 3]
    """The authors' export rotation ``R = R_y(-pi/2) R_x(-pi/2)``: texture is queried at ``v @ R`` (row vectors)."""
    ry = torch.tensor([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # R_y(-pi/2)
    rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # R_x(-pi/2)
    return ry @ rx


# ----------------------------------------------------------------------------------------- encoder
class Attention(nn.Module):
    """Fused-qkv self-attention (timm names: ``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int, bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.heads
        out = attention(split_heads(q, h), split_heads(k, h), split_heads(v, h), backend=self.backend)
        return self.proj(merge_heads(out))


class CrossAttention(nn.Module):
    """Attention of queries ``[B, N, D]`` to a context ``[B, M, Dc]`` (separate q/k/v projections)."""

    def __init__(self, dim: int, context_dim: int, heads: int, bias: bool = False, backend: str = "auto"):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(context_dim, dim, bias=bias)
        self.v = nn.Linear(context_dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.heads
        q, k, v = split_heads(self.q(x), h), split_heads(self.k(context), h), split_heads(self.v(context), h)
        return self.proj(merge_heads(attention(q, k, v, backend=self.backend)))


class ModulatedBlock(nn.Module):
    """Pre-norm ViT block whose two LayerNorm outputs are shifted/scaled by a conditioning vector."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, bias=True, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim)
        self.modulation = nn.Linear(dim, 4 * dim)  # applied to SiLU(cond); zero-init = plain ViT
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:  # x [B, N, D], cond [B, D]
        shift1, scale1, shift2, scale2 = self.modulation(F.silu(cond)).unsqueeze(1).chunk(4, dim=-1)
        x = x + self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class CameraEmbed(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, cam: Tensor) -> Tensor:  # [..., 16] -> [..., D]
        return self.fc2(F.silu(self.fc1(cam)))


class CameraModulatedViT(nn.Module):
    """DINO ViT with camera adaLN in every block; parameter names follow timm's VisionTransformer."""

    def __init__(self, cfg: DiMeRConfig):
        super().__init__()
        d = cfg.encoder_dim
        self.patch_size = cfg.patch_size
        self.grid = cfg.img_size // cfg.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid**2, d) * 0.02)
        self.blocks = nn.ModuleList(
            ModulatedBlock(d, cfg.encoder_heads, cfg.encoder_mlp_dim, cfg.encoder_eps, cfg.attn_backend)
            for _ in range(cfg.encoder_depth)
        )
        self.norm = nn.LayerNorm(d, eps=cfg.encoder_eps)
        self.camera_embed = CameraEmbed(cfg.camera_dim, d)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _pos_embed(self, h: int, w: int) -> Tensor:  # [1, 1 + h*w, D]
        n = self.pos_embed.shape[1] - 1
        if n == h * w and h == w:
            return self.pos_embed
        g = int(math.sqrt(n))
        grid = self.pos_embed[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        # DINO's resampling: scale factors (h + 0.1) / g, bicubic, align_corners=False
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic", align_corners=False)
        if grid.shape[-2:] != (h, w):
            raise RuntimeError(f"position embedding resampled to {tuple(grid.shape[-2:])}, expected {(h, w)}")
        return torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)), 1)

    def forward(self, images: Tensor, cam: Tensor) -> Tensor:  # images [N, 3, H, W] in [0, 1], cam [N, 16]
        """Tokens ``[N, 1 + (H/p)(W/p), D]`` (CLS first), after the final LayerNorm."""
        x = (images - self.mean.to(images)) / self.std.to(images)
        x = self.patch_embed.proj(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), 1) + self._pos_embed(h, w)
        cond = self.camera_embed(cam)
        for blk in self.blocks:
            x = blk(x, cond)
        return self.norm(x)

    def load_timm_state_dict(self, state_dict: dict[str, Tensor], assign: bool = False) -> list[str]:
        """Load a timm ViT (e.g. ``vit_base_patch16_224.dino``) state dict; the camera parts keep their init.

        Returns the names left at initialisation (camera embedding and block modulations).
        """
        own = self.state_dict()
        sd = {k: v for k, v in state_dict.items() if not k.startswith("head") and not k.startswith("fc_norm")}
        unexpected = sorted(set(sd) - set(own))
        if unexpected:
            raise ValueError(f"timm state dict has keys this encoder lacks: {unexpected[:8]}")
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ValueError(f"timm state dict: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        missing = self.load_state_dict(sd, strict=False, assign=assign).missing_keys
        bad = [k for k in missing if not (k.startswith("camera_embed.") or ".modulation." in k)]
        if bad:
            raise ValueError(f"timm state dict lacks encoder weights: {bad[:8]}")
        return missing


# ----------------------------------------------------------------------------------------- triplanes
class TriplaneBlock(nn.Module):
    """Cross-attention to image tokens, self-attention, MLP; pre-norm (LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, context_dim: int, heads: int, backend: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, heads, bias=False, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, bias=False, backend=backend)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.cross_attn(self.norm1(x), context)
        x = x + self.self_attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))


class TriplaneTransformer(nn.Module):
    def __init__(self, cfg: DiMeRConfig):
        super().__init__()
        d, r = cfg.transformer_dim, cfg.triplane_low_res
        self.res = r
        self.pos_embed = nn.Parameter(torch.randn(1, 3 * r * r, d) * d**-0.5)
        self.blocks = nn.ModuleList(
            TriplaneBlock(d, cfg.encoder_dim, cfg.transformer_heads, cfg.attn_backend)
            for _ in range(cfg.transformer_depth)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.deconv = nn.ConvTranspose2d(d, cfg.triplane_dim, kernel_size=2, stride=2)

    def forward(self, tokens: Tensor) -> Tensor:  # [B, L, Dc] -> [B, 3, C, 2r, 2r]
        b, r = tokens.shape[0], self.res
        x = self.pos_embed.expand(b, -1, -1)
        for blk in self.blocks:
            x = blk(x, tokens)
        x = self.norm(x)
        x = x.view(b * 3, r, r, -1).permute(0, 3, 1, 2)  # plane-major within each batch item
        x = self.deconv(x)
        return x.view(b, 3, *x.shape[1:])


def sample_triplane(
    planes: Tensor,  # [B, 3, C, H, W] planes (x, y), (x, z), (z, y)
    points: Tensor,  # [B, M, 3] world
    box_warp: float = 2.0,
) -> Tensor:  # [B, 3, M, C]
    """Bilinear triplane features (zeros outside, ``align_corners=False``)."""
    b, n_planes, c, h, w = planes.shape
    p = points * (2.0 / box_warp)
    uv = torch.stack((p[..., [0, 1]], p[..., [0, 2]], p[..., [2, 1]]), 1)  # [B, 3, M, 2]
    out = F.grid_sample(
        planes.reshape(b * n_planes, c, h, w),
        uv.reshape(b * n_planes, 1, -1, 2).to(planes.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # [B*3, C, 1, M]
    return out[:, :, 0].transpose(1, 2).reshape(b, n_planes, -1, c)


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    for _ in range(layers - 2):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, out_dim))
    seq = nn.Sequential(*mods)
    for m in seq:
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    return seq


class TriplaneDecoder(nn.Module):
    """SDF, RGB and metallic/roughness MLPs on concatenated triplane features."""

    def __init__(self, cfg: DiMeRConfig):
        super().__init__()
        f = 3 * cfg.triplane_dim
        self.sdf = _mlp(f, cfg.mlp_hidden, 1, cfg.mlp_layers)
        self.rgb = _mlp(f, cfg.mlp_hidden, 3, cfg.mlp_layers)
        self.material = _mlp(f, cfg.mlp_hidden, 2, cfg.mlp_layers)


@dataclass
class TextureQuery:
    rgb: Tensor  # [B, M, 3] in [-0.001, 1.001]
    metallic: Tensor  # [B, M] in [0, 1]
    roughness: Tensor  # [B, M] in [0.04^2, 1]


class DiMeRNet(nn.Module):
    """One DiMeR network: views + cameras -> triplanes -> SDF / texture fields."""

    def __init__(self, cfg: DiMeRConfig | None = None, **overrides):
        super().__init__()
        cfg = cfg or DiMeRConfig()
        if overrides:
            cfg = DiMeRConfig(**{**asdict(cfg), **overrides})
        self.cfg = cfg
        self.encoder = CameraModulatedViT(cfg)
        self.transformer = TriplaneTransformer(cfg)
        self.decoder = TriplaneDecoder(cfg)

    def encode(self, images: Tensor, cam: Tensor) -> Tensor:  # [B, V, 3, H, W] in [0, 1], [B, V, 16]
        """Encoder tokens ``[B*V, 1 + L, D]``."""
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"DiMeR: images must be [B, V, 3, H, W], got {tuple(images.shape)}")
        if cam.shape != (*images.shape[:2], self.cfg.camera_dim):
            raise ValueError(
                f"DiMeR: camera vectors must be [B, V, {self.cfg.camera_dim}] = "
                f"{[*images.shape[:2], self.cfg.camera_dim]}, got {list(cam.shape)}"
            )
        h, w = images.shape[-2:]
        if h % self.cfg.patch_size or w % self.cfg.patch_size:
            raise ValueError(f"DiMeR: image size {w}x{h} is not a multiple of the patch size {self.cfg.patch_size}")
        return self.encoder(images.flatten(0, 1), cam.flatten(0, 1).to(images))

    def forward_planes(self, images: Tensor, cam: Tensor) -> Tensor:  # -> [B, 3, C, 2r, 2r]
        """Triplanes from views ``[B, V, 3, H, W]`` in [0, 1] and camera vectors ``[B, V, 16]``."""
        tokens = self.encode(images, cam)
        return self.transformer(tokens.reshape(images.shape[0], -1, tokens.shape[-1]))

    def _features(self, planes: Tensor, points: Tensor) -> Tensor:  # [B, M, 3] -> [B, M, 3C]
        f = sample_triplane(planes, points, self.cfg.box_warp)
        return f.permute(0, 2, 1, 3).flatten(2)

    def query_sdf(self, planes: Tensor, points: Tensor, chunk: int | None = None) -> Tensor:  # -> [B, M, 1]
        """SDF at ``points`` [B, M, 3], evaluated ``chunk`` points at a time."""
        chunk = chunk or self.cfg.query_chunk
        parts = [points[:, i : i + chunk] for i in range(0, points.shape[1], chunk)]
        return torch.cat([self.decoder.sdf(self._features(planes, p)) for p in parts], 1)

    def query_texture(self, planes: Tensor, points: Tensor, chunk: int | None = None) -> TextureQuery:
        """Albedo, metallic and roughness at ``points`` [B, M, 3] (the texture network's frame)."""
        chunk = chunk or self.cfg.query_chunk
        rgb, mat = [], []
        for i in range(0, points.shape[1], chunk):
            f = self._features(planes, points[:, i : i + chunk])
            rgb.append(self.decoder.rgb(f))
            mat.append(self.decoder.material(f))
        rgb_t = torch.sigmoid(torch.cat(rgb, 1)) * (1 + 2 * 0.001) - 0.001
        m = torch.sigmoid(torch.cat(mat, 1))
        rmin = 0.04**2
        return TextureQuery(rgb_t, m[..., 0], m[..., 1] * (1 - rmin) + rmin)


# ----------------------------------------------------------------------------------------- converter
def _strip(state_dict: dict) -> dict[str, Tensor]:
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    out = {}
    for k, v in state_dict.items():
        for prefix in ("lrm_generator.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def convert_dimer_checkpoint(state_dict: dict) -> dict[str, Tensor]:
    """Map the authors' state dict (their keys; a Lightning ``.ckpt`` dict or its ``state_dict``, with or
    without the ``lrm_generator.`` prefix; geometry or texture checkpoint) to :class:`DiMeRNet` keys.

    Raises ``ValueError`` naming keys it does not know (e.g. the deformation/weight MLPs, which the
    released DiMeR does not use).
    """
    sd = _strip(state_dict)
    out: dict[str, Tensor] = {}
    unknown = []
    enc = "encoder.model."
    mlp_names = {"net_sdf": "sdf", "net_rgb": "rgb", "net_material": "material"}
    for k, v in sd.items():
        if k.startswith(enc + "encoder.layer."):
            rest = k[len(enc + "encoder.layer.") :]
            i, sub = rest.split(".", 1)
            p = f"encoder.blocks.{i}."
            if sub.startswith("attention.attention."):
                continue  # q/k/v fused below
            table = {
                "attention.output.dense.": "attn.proj.",
                "intermediate.dense.": "mlp.fc1.",
                "output.dense.": "mlp.fc2.",
                "layernorm_before.": "norm1.",
                "layernorm_after.": "norm2.",
                "adaLN_modulation.1.": "modulation.",
            }
            for a, b in table.items():
                if sub.startswith(a):
                    out[p + b + sub[len(a) :]] = v
                    break
            else:
                unknown.append(k)
        elif k == enc + "embeddings.cls_token":
            out["encoder.cls_token"] = v
        elif k == enc + "embeddings.position_embeddings":
            out["encoder.pos_embed"] = v
        elif k.startswith(enc + "embeddings.patch_embeddings.projection."):
            out["encoder.patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith(enc + "layernorm."):
            out["encoder.norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith(enc + "pooler."):
            continue  # built with add_pooling_layer=False; tolerated if present
        elif k.startswith("encoder.camera_embedder."):
            idx, name = k[len("encoder.camera_embedder.") :].split(".")
            out[f"encoder.camera_embed.{ {'0': 'fc1', '2': 'fc2'}[idx] }.{name}"] = v
        elif k.startswith("transformer.layers."):
            i, sub = k[len("transformer.layers.") :].split(".", 1)
            p = f"transformer.blocks.{i}."
            if sub.startswith("norm"):
                out[p + sub] = v
            elif sub == "cross_attn.in_proj_weight":
                for name, w in zip("qkv", v.chunk(3, 0)):
                    out[p + f"cross_attn.{name}.weight"] = w
            elif sub in ("cross_attn.q_proj_weight", "cross_attn.k_proj_weight", "cross_attn.v_proj_weight"):
                out[p + f"cross_attn.{sub.split('.')[1][0]}.weight"] = v
            elif sub == "cross_attn.out_proj.weight":
                out[p + "cross_attn.proj.weight"] = v
            elif sub == "self_attn.in_proj_weight":
                out[p + "self_attn.qkv.weight"] = v
            elif sub == "self_attn.out_proj.weight":
                out[p + "self_attn.proj.weight"] = v
            elif sub.startswith("mlp.0."):
                out[p + "mlp.fc1." + sub[6:]] = v
            elif sub.startswith("mlp.3."):
                out[p + "mlp.fc2." + sub[6:]] = v
            else:
                unknown.append(k)
        elif k == "transformer.pos_embed" or k.startswith(("transformer.norm.", "transformer.deconv.")):
            out[k] = v
        elif k.startswith("synthesizer.decoder."):
            net, rest = k[len("synthesizer.decoder.") :].split(".", 1)
            if net not in mlp_names:
                unknown.append(k)
                continue
            out[f"decoder.{mlp_names[net]}.{rest}"] = v
        else:
            unknown.append(k)
    # fuse the encoder's q/k/v
    layers = sorted({int(k.split(".")[4]) for k in sd if k.startswith(enc + "encoder.layer.")})
    for i in layers:
        base = f"{enc}encoder.layer.{i}.attention.attention."
        for name in ("weight", "bias"):
            parts = [sd.get(f"{base}{t}.{name}") for t in ("query", "key", "value")]
            if any(p is None for p in parts):
                raise ValueError(f"convert_dimer_checkpoint: missing {base}query/key/value.{name}")
            out[f"encoder.blocks.{i}.attn.qkv.{name}"] = torch.cat(parts, 0)
    if unknown:
        raise ValueError(
            "convert_dimer_checkpoint: keys not part of the released DiMeR layout "
            f"(use_deformation_weight=False): {sorted(unknown)[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    return out


def infer_config(state_dict: dict[str, Tensor], **overrides) -> DiMeRConfig:
    """Sizes read from a converted state dict (head counts default to width / 64 unless given)."""
    enc_dim = state_dict["encoder.cls_token"].shape[-1]
    n_pos = state_dict["encoder.pos_embed"].shape[1] - 1
    patch = state_dict["encoder.patch_embed.proj.weight"].shape[-1]
    t_dim = state_dict["transformer.pos_embed"].shape[-1]
    cfg = dict(
        patch_size=patch,
        img_size=int(round(math.sqrt(n_pos))) * patch,
        encoder_dim=enc_dim,
        encoder_depth=len({k.split(".")[2] for k in state_dict if k.startswith("encoder.blocks.")}),
        encoder_heads=max(1, enc_dim // 64),
        encoder_mlp_dim=state_dict["encoder.blocks.0.mlp.fc1.weight"].shape[0],
        camera_dim=state_dict["encoder.camera_embed.fc1.weight"].shape[1],
        transformer_dim=t_dim,
        transformer_depth=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.blocks.")}),
        transformer_heads=max(1, t_dim // 64),
        triplane_low_res=int(round(math.sqrt(state_dict["transformer.pos_embed"].shape[1] / 3))),
        triplane_dim=state_dict["transformer.deconv.weight"].shape[1],
        mlp_hidden=state_dict["decoder.sdf.0.weight"].shape[0],
        mlp_layers=len([k for k in state_dict if k.startswith("decoder.sdf.") and k.endswith(".weight")]),
    )
    cfg.update(overrides)
    return DiMeRConfig(**cfg)


def save_converted(path: str | os.PathLike, state_dict: dict[str, Tensor], cfg: DiMeRConfig) -> Path:
    """Write ``path`` (.safetensors) and its config ``path.with_suffix('.json')``."""
    from safetensors.torch import save_file

    from vision3d.utils.io import atomic_path, write_text_atomic

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp))
    write_text_atomic(path.with_suffix(".json"), json.dumps({"model": "dimer", "config": asdict(cfg)}, indent=1))
    return path


def load_dimer_net(path: str | os.PathLike, **overrides) -> DiMeRNet:
    """Build a :class:`DiMeRNet` from a converted ``.safetensors`` (+ ``.json``) or an authors' ``.ckpt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
        meta = path.with_suffix(".json")
        cfg = DiMeRConfig.from_dict(json.loads(meta.read_text())["config"]) if meta.is_file() else infer_config(sd)
        if overrides:
            cfg = DiMeRConfig(**{**asdict(cfg), **overrides})
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report which file could not be read
            raise ValueError(f"{path}: cannot read as a PyTorch checkpoint ({e})") from e
        sd = convert_dimer_checkpoint(raw)
        cfg = infer_config(sd, **overrides)
    net = DiMeRNet(cfg)
    res = net.load_state_dict(sd, strict=False)
    if res.missing_keys or res.unexpected_keys:
        raise ValueError(f"{path}: missing {res.missing_keys[:6]}, unexpected {res.unexpected_keys[:6]}")
    return net


# ----------------------------------------------------------------------------------------- reconstructor
@dataclass
class MeshExtraction:
    mesh: Mesh  # world frame of the rig (z up)
    sdf: Tensor  # [(R+1)^3] SDF at the grid vertices
    message: str = ""  # non-empty when the mesh is empty
    extras: dict = field(default_factory=dict)


class DiMeR(Reconstructor):
    """Geometry network (normal maps) + optional texture network (RGB) -> vertex-coloured mesh."""

    def __init__(self, geometry: DiMeRNet | None = None, texture: DiMeRNet | None = None, **cfg):
        super().__init__()
        self.geometry = geometry if geometry is not None else DiMeRNet(DiMeRConfig(**cfg))
        self.texture = texture
        self._grid_cache: tuple | None = None

    @property
    def cfg(self) -> DiMeRConfig:
        return self.geometry.cfg

    def grid(self, device: torch.device) -> tuple[Tensor, Tensor]:  # ([N, 3] world, [R^3, 8])
        r = self.cfg.grid_res
        # vertices + SDF (16 B each), cube corners (64 B) and per-cube masks/gathers (~24 B)
        need = ((r + 1) ** 3 * 16 + r**3 * 88) / 2**30
        if need > self.cfg.max_grid_gib:
            raise ValueError(
                f"DiMeR: a {r}^3 FlexiCubes grid needs about {need:.1f} GiB (limit max_grid_gib="
                f"{self.cfg.max_grid_gib}); lower grid_res (released: 192)"
            )
        if self._grid_cache is None or self._grid_cache[0] != (r, device):
            v, c = voxel_grid(r, device)
            self._grid_cache = ((r, device), v * self.cfg.grid_scale, c)
        return self._grid_cache[1], self._grid_cache[2]

    @torch.no_grad()
    def extract_mesh(self, planes: Tensor, texture_planes: Tensor | None = None) -> MeshExtraction:
        """Mesh from geometry ``planes`` [1, 3, C, H, W]; vertex colours from ``texture_planes`` if given.

        The SDF is evaluated ``query_chunk`` grid vertices at a time; an SDF without a sign change
        gives an empty mesh, a warning and ``message`` saying why.
        """
        if planes.shape[0] != 1:
            raise ValueError(f"DiMeR.extract_mesh: one shape at a time, got batch {planes.shape[0]}")
        verts, cubes = self.grid(planes.device)
        sdf = self.geometry.query_sdf(planes, verts[None])[0, :, 0].float()
        fc = flexicubes(verts, sdf, cubes, self.cfg.grid_res, weight_scale=self.cfg.flexicubes_weight_scale)
        if fc.empty:
            warnings.warn(f"DiMeR: {fc.message}", stacklevel=2)
            return MeshExtraction(Mesh(fc.vertices, fc.faces), sdf, fc.message)
        colors = None
        extras = {}
        if texture_planes is not None:
            if self.texture is None:
                raise ValueError("DiMeR.extract_mesh: texture planes given but no texture network loaded")
            q = self.texture.query_texture(texture_planes, (fc.vertices @ export_rotation().to(fc.vertices))[None])
            colors = q.rgb[0].clamp(0, 1)
            extras = {"metallic": q.metallic[0], "roughness": q.roughness[0]}
        mesh = Mesh(fc.vertices, fc.faces, colors)
        return MeshExtraction(mesh.with_normals(), sdf, "", extras)

    def forward(
        self,
        images: Tensor | None,  # [B, V, 3, H, W] RGB in [0, 1] (texture), or None for geometry only
        cameras: Cameras,  # batch [B, V]: the rig of dimer_rig()
        normals: Tensor | None = None,  # [B, V, 3, H, W] world normals mapped (n + 1) / 2, white background
    ) -> ReconOutput:
        if normals is None:
            raise ValueError("DiMeR needs normal maps: pass normals=[B, V, 3, H, W] ((n + 1) / 2, white background)")
        self.check_inputs(normals, cameras, "DiMeR (normals)")
        if normals.shape[0] != 1:
            raise ValueError(f"DiMeR reconstructs one object per call: batch must be 1, got {normals.shape[0]}")
        if images is not None:
            self.check_inputs(images, cameras, "DiMeR (images)")
            if self.texture is None:
                raise ValueError("DiMeR: RGB views given but no texture network loaded (pass texture=DiMeRNet)")
        cam = camera_vector(cameras).to(normals)
        planes = self.geometry.forward_planes(normals, cam)
        tex_planes = self.texture.forward_planes(images, cam) if images is not None else None
        out = self.extract_mesh(planes, tex_planes)
        extras = {"planes": planes, "sdf": out.sdf}
        if tex_planes is not None:
            extras["texture_planes"] = tex_planes
        extras.update(out.extras)
        return ReconOutput(mesh=out.mesh, extras=extras)


@register("dimer")
def dimer(**cfg) -> DiMeR:
    """DiMeR at the released size (geometry network only; attach ``texture=DiMeRNet()`` for colours)."""
    return DiMeR(**cfg)


@register("dimer_tiny")
def dimer_tiny(**cfg) -> DiMeR:
    """A tiny DiMeR (the reference fixture's sizes) for tests."""
    tiny = dict(
        img_size=32, patch_size=8, encoder_dim=32, encoder_depth=2, encoder_heads=2, encoder_mlp_dim=128,
        transformer_dim=32, transformer_depth=2, transformer_heads=2, triplane_low_res=4, triplane_dim=8,
        grid_res=16,
    )  # fmt: skip
    tiny.update(cfg)
    return DiMeR(**tiny)
