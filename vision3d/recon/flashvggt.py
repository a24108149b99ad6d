"""FlashVGGT: VGGT with compressed-descriptor global attention and chunk-recursive inference.

Wang and Xu, "FlashVGGT: Efficient and Scalable Visual Geometry Transformers with Compressed
Descriptor Attention", CVPR 2026, arXiv:2512.01540; project page wzpscott.github.io/flashvggt_page;
authors' code github.com/wzpscott/FlashVGGT (read at 70de435: ``flashvggt/layers/attention.py``,
``flashvggt/models/aggregator.py``, ``flashvggt/models/flash_vggt.py``,
``flashvggt_stream/layers/attention.py``), built on VGGT (VGGT License). Checkpoints are public
(``ZipW/FlashVGGT`` on the Hugging Face hub: ``flashvggt.pt`` single-forward and
``flashvggt_stream.pt`` streaming); their licence is that of VGGT's weights as far as the authors
state it — check before use. None ship with vision3d.

What changes from VGGT (everything else, and every parameter, is VGGT's):

* **Descriptor attention** in the global blocks: queries are all tokens of all frames; keys and
  values come from a compact per-frame descriptor set — the frame's special (camera, register)
  tokens plus its patch tokens resampled bilinearly (``align_corners=False``) from the
  ``h x w`` patch grid to ``(h // f) x (w // f)`` (``f = kv_downfactor``, 4 in the release) —
  with the full-resolution patch tokens of key frames prepended (frame 0 always; with
  ``keyframe_every`` > 0, ``S // keyframe_every`` more frames, those nearest to k-means centres of
  the mean frame tokens). Key positions for RoPE are the nearest-resampled patch positions. The
  same ``qkv`` weights project queries (full set) and keys/values (descriptors), so a VGGT
  checkpoint loads as is; with ``f = 1`` and no key frames it is exactly VGGT's dense attention.
* **Chunk-recursive inference** (the streaming variant): frames are processed in chunks; each
  global block keeps a cache of the keys/values of all earlier descriptors (and of frame 0's
  full-resolution reference tokens from the first chunk) and a chunk attends to the cache plus
  its own descriptors. Memory then grows with the number of descriptors, not of tokens. The
  camera head runs once at the end on the cached camera tokens of all frames; the DPT head runs
  per chunk. With a single chunk the result equals the one-shot forward with frame 0 as the only
  key frame.

Verification: ``tests/fixtures/vggt/flashvggt.*`` (the authors' descriptor attention, ``f = 2``,
frame 0 as key frame) is reproduced to 2.4e-7.

Differences from the authors' code: key frames use a deterministic k-means (evenly spaced
initial centres, Lloyd iterations) instead of ``torch_kmeans`` with ``random_state=42``; the
stream cache stores projected keys/values rather than pre-projection tokens (mathematically the
same); the stream variant's ``memory_drop_rate`` (keeping every n-th cached frame) is not
implemented; the camera head of a chunk-recursive pass sees the camera tokens of all chunks at the
end (an offline choice: a strictly online pose needs the head per chunk); the point head is kept (the authors' FlashVGGT has camera and depth heads only; a converted
FlashVGGT checkpoint therefore leaves ``point_head`` at its initialisation, see
:func:`convert_flashvggt_checkpoint`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vision3d.recon.base import ReconOutput, register
from vision3d.recon.vggt import VGGT, VGGT_TINY, Aggregator, Attention, VGGTConfig, convert_vggt_checkpoint


@dataclass
class FlashVGGTConfig(VGGTConfig):
    """VGGT's sizes plus the descriptor-attention settings (defaults: the authors' release)."""

    kv_downfactor: int = 4
    """Patch-grid downsampling of the per-frame descriptors (1 = every token is a descriptor)."""
    keyframe_every: int = 200
    """One extra full-resolution key frame per this many frames (0: frame 0 only)."""
    use_reference: bool = True
    """Prepend the key frames' full-resolution patch tokens (False only for equivalence tests)."""
    chunk_size: int = 0
    """Frames per chunk for chunk-recursive inference; 0 = one shot up to ``max_frames``."""


class DescriptorAttention(Attention):
    """Global attention from all tokens to per-frame descriptors (FlashVGGT)."""

    downfactor: int = 4

    def forward(
        self,
        x: Tensor,  # [B, S*T, C] tokens of S frames, T = patch_start + h*w each
        pos: Tensor | None = None,  # [B, S*T, 2] RoPE positions
        *,
        n_frames: int,
        grid: tuple[int, int],  # (h, w) patch grid
        patch_start: int,
        keyframes: Tensor | None = None,  # [B, K] frame indices whose full-resolution tokens are prepended
        cache: dict | None = None,  # chunk-recursive key/value cache of this block (updated in place)
    ) -> Tensor:  # [B, S*T, C]
        b, n, c = x.shape
        s = n_frames
        t = n // s
        h, w = grid
        if t * s != n or t != patch_start + h * w:
            raise ValueError(f"DescriptorAttention: {n} tokens do not split into {s} frames of "
                             f"{patch_start} + {h}x{w} tokens")
        f = int(self.downfactor)
        if f < 1 or h // f < 1 or w // f < 1:
            raise ValueError(f"DescriptorAttention: kv_downfactor {f} must be >= 1 and <= the patch grid {h}x{w}")
        wq, wkv = self.qkv.weight[:c], self.qkv.weight[c:]
        bq = self.qkv.bias[:c] if self.qkv.bias is not None else None
        bkv = self.qkv.bias[c:] if self.qkv.bias is not None else None
        q = F.linear(x, wq, bq).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        xf = x.view(b, s, t, c)
        spatial = xf[:, :, patch_start:].reshape(b * s, h, w, c).permute(0, 3, 1, 2)
        small = F.interpolate(spatial.float(), size=(h // f, w // f), mode="bilinear", align_corners=False)
        small = small.to(x.dtype).permute(0, 2, 3, 1).reshape(b, s, -1, c)
        x_kv = torch.cat([xf[:, :, :patch_start], small], 2).reshape(b, -1, c)
        pos_kv = None
        if pos is not None:
            pf = pos.view(b, s, t, 2)
            sp = pf[:, :, patch_start:].reshape(b * s, h, w, 2).permute(0, 3, 1, 2).float()
            sp = F.interpolate(sp, size=(h // f, w // f), mode="nearest").to(pos.dtype)
            sp = sp.permute(0, 2, 3, 1).reshape(b, s, -1, 2)
            pos_kv = torch.cat([pf[:, :, :patch_start], sp], 2).reshape(b, -1, 2)
        if keyframes is not None:
            bi = torch.arange(b, device=x.device)[:, None]
            x_kv = torch.cat([xf[bi, keyframes, patch_start:].reshape(b, -1, c), x_kv], 1)
            if pos is not None:
                pos_kv = torch.cat([pf[bi, keyframes, patch_start:].reshape(b, -1, 2), pos_kv], 1)

        nk = x_kv.shape[1]
        k, v = F.linear(x_kv, wkv, bkv).view(b, nk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos_kv)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        return self.attend(q, k, v)


def select_keyframes(frame_tokens: Tensor, every: int, iters: int = 10) -> Tensor:  # [B, S, T, C] -> [B, 1 + K]
    """Frame 0 plus, when ``S // every >= 2``, the frame nearest to each of ``S // every`` k-means
    centres of the mean frame tokens (deterministic: evenly spaced initial centres)."""
    b, s = frame_tokens.shape[:2]
    zero = torch.zeros(b, 1, dtype=torch.long, device=frame_tokens.device)
    k = s // every if every > 0 else 0
    if k <= 1:
        return zero
    feats = frame_tokens.float().mean(2)  # [B, S, C]
    init = torch.linspace(0, s - 1, k, device=feats.device).round().long()
    centres = feats[:, init].clone()
    for _ in range(iters):
        assign = torch.cdist(feats, centres).argmin(-1)  # [B, S]
        onehot = F.one_hot(assign, k).to(feats.dtype)  # [B, S, k]
        count = onehot.sum(1)  # [B, k]
        mean = torch.einsum("bsk,bsc->bkc", onehot, feats) / count.clamp(min=1)[..., None]
        centres = torch.where(count[..., None] > 0, mean, centres)
    nearest = torch.cdist(centres, feats).argmin(-1)  # [B, k]
    return torch.cat([zero, nearest], 1)


class FlashAggregator(Aggregator):
    """VGGT's aggregator with :class:`DescriptorAttention` in the global blocks."""

    global_attn_cls = DescriptorAttention

    def __init__(self, cfg: FlashVGGTConfig):
        super().__init__(cfg)
        for blk in self.global_blocks:
            blk.attn.downfactor = cfg.kv_downfactor
        self._keyframes: Tensor | None = None
        self._caches: list[dict] | None = None
        self._first_chunk = True

    def global_block(self, i, x, pos, b, s, grid):
        cache = self._caches[i] if self._caches is not None else None
        return self.global_blocks[i](x, pos, n_frames=s, grid=grid, patch_start=self.patch_start,
                                     keyframes=self._keyframes, cache=cache)

    def before_blocks(self, tokens: Tensor) -> None:
        if self._caches is not None:  # chunk-recursive: frame 0 is the only key frame, first chunk only
            first = self._first_chunk and self.cfg.use_reference
            self._keyframes = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device) if first else None
        elif self.cfg.use_reference:
            self._keyframes = select_keyframes(tokens, self.cfg.keyframe_every)
        else:
            self._keyframes = None

    def forward(self, images: Tensor, keep: set[int] | None = None,
                first_is_reference: bool = True) -> list[Tensor | None]:
        try:
            return super().forward(images, keep, first_is_reference)
        finally:
            self._keyframes = None

    def forward_chunk(self, images: Tensor, caches: list[dict], first: bool,
                      keep: set[int] | None = None) -> list[Tensor | None]:
        """One chunk ``[B, s, 3, H, W]`` of a chunk-recursive pass; ``caches`` (one dict per layer)
        carry the earlier chunks' descriptors; the first chunk also stores frame 0's reference tokens."""
        self._caches, self._first_chunk = caches, first
        try:
            return self.forward(images, keep, first_is_reference=first)
        finally:
            self._caches = None


class FlashVGGT(VGGT):
    """FlashVGGT as a :class:`Reconstructor` (same inputs and outputs as :class:`~vision3d.recon.vggt.VGGT`).

    One-shot below ``max_frames`` frames (or when ``chunk_size`` is 0 and the sequence fits);
    chunk-recursive with ``chunk_size`` frames per chunk otherwise (with a warning when it was not
    asked for: more frames than ``max_frames``).
    """

    aggregator_cls = FlashAggregator

    def __init__(self, cfg: FlashVGGTConfig | None = None, **overrides):
        cfg = cfg or FlashVGGTConfig()
        if overrides:
            from dataclasses import asdict

            cfg = FlashVGGTConfig(**{**asdict(cfg), **overrides})
        if cfg.kv_downfactor < 1:
            raise ValueError(f"FlashVGGTConfig.kv_downfactor must be >= 1, got {cfg.kv_downfactor}")
        super().__init__(cfg)

    def predict(self, images: Tensor, chunk_size: int | None = None) -> dict:
        self.check_images(images)
        s = images.shape[1]
        chunk = self.cfg.chunk_size if chunk_size is None else chunk_size
        if not chunk and s > self.cfg.max_frames:
            chunk = self.cfg.max_frames
            warnings.warn(f"FlashVGGT: {s} frames > max_frames={self.cfg.max_frames}; running chunk-recursively "
                          f"with {chunk} frames per chunk (descriptor cache)", stacklevel=2)
        if not chunk or chunk >= s:
            for blk in self.aggregator.global_blocks:
                blk.attn.query_chunk = None
            return self.heads(self.aggregate(images), images.shape[-2:])
        return self.predict_chunked(images, chunk)

    def predict_chunked(self, images: Tensor, chunk: int) -> dict:
        """Chunk-recursive inference over ``images`` ``[B, S, 3, H, W]`` with ``chunk`` frames per chunk."""
        if chunk < 1:
            raise ValueError(f"FlashVGGT.predict_chunked: chunk must be >= 1, got {chunk}")
        cfg = self.cfg
        keep = set(cfg.dpt_layers) | {cfg.depth - 1}
        caches = [dict() for _ in range(cfg.depth)]
        ps = self.aggregator.patch_start
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        cam_tokens, depth, depth_conf, pts, pts_conf = [], [], [], [], []
        for f0 in range(0, images.shape[1], chunk):
            toks = self.aggregator.forward_chunk(images[:, f0:f0 + chunk], caches, first=f0 == 0, keep=keep)
            with torch.autocast(device_type=images.device.type, enabled=False):
                toks = [t.float() if t is not None else None for t in toks]
                cam_tokens.append(toks[-1][:, :, 0])
                d, dc = self.depth_head(toks, hw, ps)
                p, pc = self.point_head(toks, hw, ps)
            depth.append(d), depth_conf.append(dc), pts.append(p), pts_conf.append(pc)
            del toks
        with torch.autocast(device_type=images.device.type, enabled=False):
            poses = self.camera_head(torch.cat(cam_tokens, 1))
        return {"pose_enc": poses[-1], "pose_enc_list": poses, "depth": torch.cat(depth, 1),
                "depth_conf": torch.cat(depth_conf, 1), "world_points": torch.cat(pts, 1),
                "world_points_conf": torch.cat(pts_conf, 1)}

    def forward(self, images: Tensor, cameras=None, chunk_size: int | None = None) -> ReconOutput:
        """As :meth:`VGGT.forward`; ``chunk_size`` forces chunk-recursive inference."""
        return self.to_output(self.predict(images, chunk_size), images.shape[-2:])


def convert_flashvggt_checkpoint(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' FlashVGGT state dict (``flashvggt.pt`` / ``flashvggt_stream.pt``) -> ours.

    FlashVGGT keeps VGGT's parameter layout (descriptor attention reuses the ``qkv`` weights), so
    this is :func:`~vision3d.recon.vggt.convert_vggt_checkpoint` after unwrapping a
    ``{"model": ...}`` or ``{"state_dict": ...}`` container. The authors' model has no point head:
    load with ``strict=False`` and expect ``point_head.*`` missing.
    """
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    elif isinstance(state_dict, dict) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]
    return convert_vggt_checkpoint(state_dict)


@register("flashvggt_1b")
def flashvggt_1b(**overrides) -> FlashVGGT:
    """FlashVGGT at VGGT-1B size, ``kv_downfactor=4``, ``keyframe_every=200`` (the authors' defaults)."""
    return FlashVGGT(FlashVGGTConfig(), **overrides)


@register("flashvggt_tiny")
def flashvggt_tiny(**overrides) -> FlashVGGT:
    """The tiny VGGT configuration with descriptor attention (tests, CPU benchmarks)."""
    return FlashVGGT(FlashVGGTConfig(**VGGT_TINY, kv_downfactor=2, keyframe_every=0), **overrides)
