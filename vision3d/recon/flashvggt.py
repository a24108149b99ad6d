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
  ``keyframe_every`` > 0 and ``K = S // keyframe_every >= 2``, K more frames, those nearest to the
  k-means centres of the per-frame mean embedded tokens, clustered exactly as the authors'
  ``torch_kmeans`` 0.2.0 ``KMeans(n_clusters=K, random_state=42)`` does: that ``random_state`` is
  swallowed by the distance's keyword arguments, so the package's default seed 123 applies, with 8
  random restarts drawn on the tokens' device, up to 100 Lloyd iterations, the least-inertia
  restart kept — :func:`kmeans_centres` reproduces it bit for bit on the same device). Key positions for RoPE are the nearest-resampled patch positions. The
  same ``qkv`` weights project queries (full set) and keys/values (descriptors), so a VGGT
  checkpoint loads as is; with ``f = 1`` there are no key frames (as in the authors' code) and it is
  exactly VGGT's dense attention.
* **Chunk-recursive inference** (the streaming variant): frames are processed in chunks; each
  global block keeps a cache of the keys/values of all earlier descriptors (and of frame 0's
  full-resolution reference tokens from the first chunk) and a chunk attends to the cache plus
  its own descriptors. Memory then grows with the number of descriptors, not of tokens. The
  camera head runs once at the end on the cached camera tokens of all frames; the DPT head runs
  per chunk. With a single chunk the result equals the one-shot forward with frame 0 as the only
  key frame.

Verification: ``tests/fixtures/vggt/flashvggt.*`` (the authors' descriptor attention, ``f = 2``,
frame 0 as key frame) is reproduced to 2.4e-7; ``flashvggt_keyframes.*`` (6 frames, key frames every
2: the authors' torch_kmeans selection, 4 key frames) exactly, key frames included.

``memory_drop_rate`` (the streaming variant's option, ``FlashVGGTConfig.memory_drop_rate``): in a
chunk-recursive pass only every r-th frame of each chunk (frames 0, r, 2r, ... counted within the
chunk) contributes descriptors, to the chunk's own attention and to the cache; frame 0's
reference tokens are kept whole.

Differences from the authors' code: the
stream cache stores projected keys/values rather than pre-projection tokens; the authors' stream
variant (``flashvggt_stream/``) also differs in ways not reproduced here: it resamples the
projected, normalised and rotated keys/values with ``nearest`` (not bilinear) interpolation, and
its global blocks outside ``global_start_idx..global_end_idx`` (9..19 of 24) attend within each
frame only; the camera head of a chunk-recursive pass sees the camera tokens of all chunks at the
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
    memory_drop_rate: int = 1
    """Chunk-recursive passes only: keep the descriptors of every this-many-th frame of each chunk
    (frames 0, r, 2r, ... within the chunk) in its attention and in the cache; 1 keeps all."""


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
        drop_rate: int = 1,  # with a cache: descriptors of every drop_rate-th frame of this chunk only
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
        step = drop_rate if cache is not None else 1
        x_kv = torch.cat([xf[:, :, :patch_start], small], 2)[:, ::step].reshape(b, -1, c)
        pos_kv = None
        if pos is not None:
            pf = pos.view(b, s, t, 2)
            sp = pf[:, :, patch_start:].reshape(b * s, h, w, 2).permute(0, 3, 1, 2).float()
            sp = F.interpolate(sp, size=(h // f, w // f), mode="nearest").to(pos.dtype)
            sp = sp.permute(0, 2, 3, 1).reshape(b, s, -1, 2)
            pos_kv = torch.cat([pf[:, :, :patch_start], sp], 2)[:, ::step].reshape(b, -1, 2)
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


def kmeans_centres(
    x: Tensor,  # [B, N, D] points
    k: int,
    *,
    seed: int = 123,
    num_init: int = 8,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> Tensor:  # [B, k, D] cluster centres of the best restart
    """Lloyd's k-means exactly as ``torch_kmeans`` 0.2.0 ``KMeans()(x).centers`` computes it (the
    authors' key-frame clustering; its defaults are ours).

    ``num_init`` restarts, each from ``k`` distinct points drawn by ``torch.multinomial`` (uniform
    weights, no replacement, one ``torch.Generator`` on ``x``'s device seeded with ``seed``, one row
    per batch element and restart); assignment by ``F.pairwise_distance`` (eps 1e-6 on the
    difference), first nearest centre on ties; update to the mean of each cluster (an empty
    cluster's centre becomes the zero vector, as ``F.normalize`` of an empty row gives); stop after
    ``max_iter`` updates or once the mean centre shift of every restart of every batch element is
    below ``tol``; keep the restart with the least inertia (first on ties). Same device, same
    result as the package; CPU and CUDA draw different initial points.
    """
    b, n, d = x.shape
    if not 2 <= k < n:
        raise ValueError(f"kmeans_centres: need 2 <= k < N points, got k={k}, N={n}")
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    weights = torch.full((b * num_init, n), 1.0 / n, dtype=x.dtype, device=x.device)
    idx = torch.multinomial(weights, k, replacement=False, generator=gen)  # [B*num_init, k]
    centres = x.gather(1, idx.view(b, -1, 1).expand(b, -1, d)).view(b, num_init, k, d)
    points = x[:, None, :, None, :]  # [B, 1, N, 1, D] against centres [B, M, 1, k, D]
    labels = torch.arange(k, device=x.device)

    def assign(c: Tensor) -> Tensor:  # [B, M, k, D] -> [B, M, N]
        return F.pairwise_distance(points, c[:, :, None]).argmin(-1)

    for _ in range(max_iter):
        old = centres
        member = (assign(centres)[..., None] == labels).transpose(-1, -2).to(x.dtype)  # [B, M, k, N]
        centres = torch.matmul(F.normalize(member, p=1.0, dim=-1), x[:, None].expand(b, num_init, n, d))
        shift = torch.linalg.vector_norm(centres - old, dim=-1)
        if (shift.masked_fill(shift == float("inf"), 0).mean(-1) < tol).all():
            break
    own = centres.gather(2, assign(centres)[..., None].expand(b, num_init, n, d))  # [B, M, N, D]
    sq = torch.linalg.vector_norm(x[:, None] - own, dim=-1) ** 2
    inertia = sq.masked_fill(sq == float("inf"), 0).sum(-1)  # [B, M]
    return centres[torch.arange(b, device=x.device), inertia.argmin(-1)]


@torch.no_grad()
def select_keyframes(frame_tokens: Tensor, every: int) -> Tensor:  # [B, S, T, C] -> [B, 1 + K] long
    """The authors' key frames: frame 0, then, when ``K = S // every >= 2``, for each of the ``K``
    k-means centres (:func:`kmeans_centres`, torch_kmeans' procedure and seed) of the per-frame mean
    tokens the nearest frame (Euclidean, ``torch.cdist``; first frame on ties). Frames may repeat
    (frame 0, or two centres with one nearest frame), as in the authors' code. ``every == 1`` asks
    for as many clusters as frames, which torch_kmeans refuses: an error here too."""
    b, s = frame_tokens.shape[:2]
    zero = torch.zeros(b, 1, dtype=torch.long, device=frame_tokens.device)
    k = s // every if every > 0 else 0
    if k <= 1:
        return zero
    if k >= s:
        raise ValueError(f"select_keyframes: keyframe_every={every} asks for {k} k-means clusters of {s} frames; "
                         "k-means needs fewer clusters than frames (use keyframe_every 0 or >= 2)")
    feats = frame_tokens.mean(2)  # [B, S, C]
    if feats.dtype in (torch.float16, torch.bfloat16):
        feats = feats.float()
    centres = kmeans_centres(feats, k)
    nearest = torch.cdist(feats, centres).argmin(1)  # [B, K]
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
                                     keyframes=self._keyframes, cache=cache, drop_rate=self.cfg.memory_drop_rate)

    def before_blocks(self, tokens: Tensor) -> None:
        if self.cfg.kv_downfactor == 1:  # the authors' attention ignores key frames without downsampling
            self._keyframes = None
        elif self._caches is not None:  # chunk-recursive: frame 0 is the only key frame, first chunk only
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
        if not isinstance(cfg.memory_drop_rate, int) or cfg.memory_drop_rate < 1:
            raise ValueError(f"FlashVGGTConfig.memory_drop_rate must be an int >= 1, got {cfg.memory_drop_rate!r}")
        if cfg.keyframe_every < 0:
            raise ValueError(f"FlashVGGTConfig.keyframe_every must be >= 0, got {cfg.keyframe_every}")
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
