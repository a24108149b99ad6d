"""View samplers (which frames of a scene are context and which are targets) and the scene sampler
that shards a dataset across DDP ranks and DataLoader workers, deterministically and resumably.

Sources (facts read, no code copied):

- :class:`BoundedViewSampler` follows ``ViewSamplerBounded`` of pixelSplat (Charatan et al.,
  arXiv:2312.12337, github.com/dcharatan/pixelsplat @2331f53, MIT) as kept by MVSplat (Chen et al.,
  arXiv:2403.14627, github.com/donydchen/mvsplat @175b17a, MIT), and ``ViewSamplerBoundedV2``
  of DepthSplat (Xu et al., arXiv:2410.13862, github.com/cvg/depthsplat @2dad25a, MIT): a gap
  between the outermost context frames drawn in ``[min_gap, max_gap]`` (frames, not metres),
  warmed up linearly from ``initial_*`` over ``warm_up_steps`` training steps; targets drawn
  between the context frames (optionally ``max_distance_to_context`` frames beyond them);
  extra context views (more than two) drawn between the outer two at random or by farthest-point
  sampling of the camera centres; at test time the full gap from frame 0 and every frame between.
  The published code clamps ``max_gap = min(num_views - 1, min_gap)`` for non-circular scenes,
  which makes the drawn gap always ``min_gap`` (MVSplat keeps this "to follow initial pixelsplat
  cfgs"); ``pixelsplat_gap_quirk=True`` reproduces it, the default draws in the full range.
- The variable context count of :class:`BoundedViewSampler` (``num_context_views_max``) follows
  iLRM's DL3DV training (Kang et al., arXiv:2507.23277, github.com/Gynjn/iLRM @2bca1c1, no licence
  file: read for facts only): ``config/experiment/dl3dv.yaml`` sets ``min_views: 2, max_views: 6``
  and ``ViewSamplerBoundedV2.sample`` draws the count uniformly in that range (inclusive) and divides
  the gap bounds by ``max(max_views // count, 1)``.
- :func:`many_view_sampler` is the ZPressor setting (Wang et al., arXiv:2505.23734,
  github.com/ziplab/ZPressor @84b3080, MIT, ``depthsplat/train.sh``): 12 (train) up to 36+ (eval) context views
  spread by farthest-point sampling over a wide gap, 8 targets.
- :class:`EvaluationViewSampler` reads the published evaluation-index JSON files: a mapping
  ``scene key -> {"context": [...], "target": [...]}`` or ``null`` for a skipped scene. They are
  **not shipped** with vision3d; get them from the authors' repositories:
  ``assets/evaluation_index_re10k.json`` and ``assets/evaluation_index_acid.json`` of pixelSplat,
  MVSplat and DepthSplat (2 context views); ``assets/dl3dv_start_0_distance_*_ctx_*v_*.json`` of
  DepthSplat (DL3DV, 2-12 context views); ``depthsplat/assets/{re10k,acid,dl3dv}_evaluation/*.json``
  of ZPressor (8-36 context views).

:class:`SceneSampler` is vision3d's own (Apache-2.0): a chunk-grouped permutation per epoch, cut
into one contiguous block per rank, so that DataLoader workers (which take whole batches of the
sampler's stream in turn) never see a scene twice and the union over ranks covers every scene once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, NamedTuple, Protocol, Sequence

import torch
from torch import Tensor

__all__ = [
    "NotEnoughViews",
    "SceneSkipped",
    "ViewSampler",
    "BoundedViewSampler",
    "many_view_sampler",
    "EvaluationViewSampler",
    "AllViewsSampler",
    "SampleKey",
    "SceneSampler",
    "farthest_point_order",
]


class NotEnoughViews(ValueError):
    """The scene has too few frames for the requested sampling."""


class SceneSkipped(ValueError):
    """The evaluation index marks this scene as skipped (``null``) or does not list it."""


class ViewSampler(Protocol):
    def sample(
        self,
        scene: str,
        num_views: int,
        cam_to_world: Tensor | None,  # [N, 4, 4] OpenCV, used by farthest-point sampling
        generator: torch.Generator,
        step: int = 0,
    ) -> tuple[Tensor, Tensor]:  # context [Vc] int64, target [Vt] int64
        ...


def farthest_point_order(points: Tensor, k: int) -> Tensor:  # [N, 3] -> [k] int64
    """Indices of ``k`` points by farthest-point sampling, starting from the point farthest from the mean."""
    n = points.shape[0]
    k = min(k, n)
    pts = points.double()
    dist = ((pts - pts.mean(0)) ** 2).sum(-1)
    chosen = [int(dist.argmax())]
    best = torch.full((n,), float("inf"), dtype=torch.float64)
    for _ in range(k - 1):
        d = ((pts - pts[chosen[-1]]) ** 2).sum(-1)
        best = torch.minimum(best, d)
        chosen.append(int(best.argmax()))
    return torch.tensor(chosen, dtype=torch.int64)


def _randint(low: int, high_inclusive: int, g: torch.Generator) -> int:
    return int(torch.randint(low, high_inclusive + 1, (), generator=g))


@dataclass
class BoundedViewSampler:
    """Context frames a bounded gap apart, targets between them (pixelSplat/MVSplat/DepthSplat).

    Defaults are MVSplat/DepthSplat's RE10K training setting (``bounded_re10k.yaml``: gap 45..135,
    warmed up from 25..45 over 30k steps, 4 targets); DL3DV (DepthSplat ``boundedv2_dl3dv.yaml``):
    ``num_context_views=2..6, min_gap=20, max_gap=50, initial 15..30, warm_up_steps=10000,
    extra_views="farthest_point"``.

    **Variable context count** (``num_context_views_max`` set; iLRM's DL3DV training, Gynjn/iLRM
    ``config/experiment/dl3dv.yaml`` ``min_views: 2, max_views: 6`` read by
    ``ViewSamplerBoundedV2.sample``): during training the count is drawn uniformly from
    ``num_context_views..num_context_views_max`` (both inclusive) and, with ``shrink_gap``, both gap
    bounds are divided (integer division) by ``max(num_context_views_max // count, 1)``, as the
    authors do, so that few views are drawn closer together. The authors draw the count per example
    with Python's ``random`` in each DataLoader worker and train with one example per GPU, so each
    rank has its own count at each step. Here the count is a pure function of ``(count_seed,
    count_rank, step)`` (:meth:`context_count`): :class:`SceneSampler` gives every example of a
    batch the same ``step``, so a batch shares one count and collates, ranks draw independently,
    and a resumed run (which restores the sampler position, hence the steps) draws the same counts.
    At ``stage="test"`` the count is ``num_context_views``.
    """

    num_context_views: int = 2
    num_context_views_max: int | None = None  # None: always num_context_views; else drawn per batch
    num_target_views: int = 4
    min_gap: int = 45  # frames between the outermost context views
    max_gap: int = 135
    min_distance_to_context: int = 0  # targets at least this many frames inside the context window
    max_distance_to_context: int = 0  # targets may lie this many frames outside it (extrapolation)
    warm_up_steps: int = 30_000  # 0: no warm-up
    initial_min_gap: int = 25
    initial_max_gap: int = 45
    extra_views: Literal["random", "farthest_point", "uniform"] = "random"  # context views beyond two
    targets_with_replacement: bool = True  # pixelSplat/MVSplat draw targets with replacement
    stage: Literal["train", "test"] = "train"  # test: full gap, from frame 0, every frame a target
    cameras_are_circular: bool = False
    pixelsplat_gap_quirk: bool = False  # reproduce the published clamp (gap always == min_gap)
    shrink_gap: bool = True  # with a variable count: gap bounds // max(num_context_views_max // count, 1)
    count_seed: int = 0  # seed of the per-batch context count (the engine passes the run's seed)
    count_rank: int = 0  # DDP rank, so that ranks draw their counts independently

    def __post_init__(self) -> None:
        if self.num_context_views < 1 or self.num_target_views < 0:
            raise ValueError("BoundedViewSampler: need num_context_views >= 1 and num_target_views >= 0")
        if self.num_context_views_max is not None and self.num_context_views_max < self.num_context_views:
            raise ValueError(
                f"BoundedViewSampler: num_context_views_max={self.num_context_views_max} is below "
                f"num_context_views={self.num_context_views}; give a max >= the min, or None for a fixed count"
            )
        if self.min_gap > self.max_gap or self.initial_min_gap > self.initial_max_gap:
            raise ValueError(
                f"BoundedViewSampler: min gap > max gap ({self.min_gap} > {self.max_gap} or initial "
                f"{self.initial_min_gap} > {self.initial_max_gap})"
            )

    def _schedule(self, initial: int, final: int, step: int) -> int:
        fraction = step / self.warm_up_steps
        return min(initial + int((final - initial) * fraction), final)

    def gap_range(self, step: int) -> tuple[int, int]:
        """``(min_gap, max_gap)`` in effect at training step ``step``."""
        if self.stage == "test":
            return self.max_gap, self.max_gap
        if self.warm_up_steps > 0:
            return (
                self._schedule(self.initial_min_gap, self.min_gap, step),
                self._schedule(self.initial_max_gap, self.max_gap, step),
            )
        return self.min_gap, self.max_gap

    @property
    def variable_count(self) -> bool:
        """Whether training draws the context count per batch."""
        return (
            self.stage == "train"
            and self.num_context_views_max is not None
            and self.num_context_views_max > self.num_context_views
        )

    def context_count(self, step: int) -> int:
        """Context views of every example of the batch at sampler step ``step`` (uniform, inclusive)."""
        if not self.variable_count:
            return self.num_context_views
        choices = self.num_context_views_max - self.num_context_views + 1  # type: ignore[operator]
        return self.num_context_views + _mix(self.count_seed, self.count_rank, step, 2) % choices

    def sample(
        self,
        scene: str,
        num_views: int,
        cam_to_world: Tensor | None,  # [N, 4, 4] OpenCV (needed for extra_views="farthest_point")
        generator: torch.Generator,
        step: int = 0,
    ) -> tuple[Tensor, Tensor]:
        g = generator
        n_ctx = self.context_count(step)
        min_gap, max_gap = self.gap_range(step)
        if self.variable_count and self.shrink_gap:
            factor = max(self.num_context_views_max // n_ctx, 1)  # type: ignore[operator]
            min_gap, max_gap = min_gap // factor, max_gap // factor
        if not self.cameras_are_circular:
            max_gap = min(num_views - 1, min_gap if self.pixelsplat_gap_quirk else max_gap)
        min_gap = max(2 * self.min_distance_to_context, min_gap, n_ctx - 1)
        if max_gap < min_gap:
            raise NotEnoughViews(
                f"{scene}: {num_views} frames are too few for a context gap of at least {min_gap} frames"
            )
        gap = _randint(min_gap, max_gap, g)
        span = num_views if self.cameras_are_circular else num_views - gap
        left = 0 if self.stage == "test" else _randint(0, span - 1, g)
        right = left + gap

        # targets
        t_lo = left + self.min_distance_to_context - self.max_distance_to_context
        t_hi = right - self.min_distance_to_context + self.max_distance_to_context
        if not self.cameras_are_circular:
            t_lo, t_hi = max(0, t_lo), min(num_views - 1, t_hi)
        if self.stage == "test":
            target = torch.arange(t_lo, t_hi + 1)
        elif self.targets_with_replacement:
            target = torch.randint(t_lo, t_hi + 1, (self.num_target_views,), generator=g)
        else:
            count = t_hi + 1 - t_lo
            if count < self.num_target_views:
                raise NotEnoughViews(f"{scene}: {count} target candidates for {self.num_target_views} targets")
            target = t_lo + torch.randperm(count, generator=g)[: self.num_target_views]

        # extra context views between the outer two
        n_extra = n_ctx - 2
        if n_ctx == 1:
            context = torch.tensor([left])
        elif n_extra <= 0:
            context = torch.tensor([left, right])
        elif self.extra_views == "farthest_point":
            if cam_to_world is None:
                raise ValueError("BoundedViewSampler: extra_views='farthest_point' needs the cameras")
            window = torch.arange(left, right + 1) % num_views
            local = farthest_point_order(cam_to_world[window, :3, 3], n_ctx)
            context = window[local].sort().values  # ascending, as DepthSplat's sort_context_index
        elif self.extra_views == "uniform":
            context = torch.linspace(left, right, n_ctx).round().long()
        else:
            inner = left + 1 + torch.randperm(gap - 1, generator=g)[:n_extra]
            context = torch.cat([torch.tensor([left]), inner.sort().values, torch.tensor([right])])
        if self.cameras_are_circular:
            context, target = context % num_views, target % num_views
        return context.long(), target.long()


def many_view_sampler(
    num_context_views: int = 12,
    num_target_views: int = 8,
    dataset: Literal["re10k", "dl3dv"] = "re10k",
    **overrides,
) -> BoundedViewSampler:
    """ZPressor's many-view setting (``train.sh``): farthest-point context views over a wide gap.

    RE10K: gap 50..200 warmed up from 15..50 over 10k steps; DL3DV: gap 20..50 from 15..30.
    ZPressor evaluates with 8, 12, 16, 24 and 36 context views (its published index files).
    """
    if dataset == "re10k":
        gaps = dict(min_gap=50, max_gap=200, initial_min_gap=15, initial_max_gap=50)
    elif dataset == "dl3dv":
        gaps = dict(min_gap=20, max_gap=50, initial_min_gap=15, initial_max_gap=30)
    else:
        raise ValueError(f"many_view_sampler: dataset must be 're10k' or 'dl3dv', got {dataset!r}")
    gaps["min_gap"] = max(gaps["min_gap"], num_context_views - 1)
    gaps["initial_min_gap"] = max(gaps["initial_min_gap"], num_context_views - 1)
    gaps["max_gap"] = max(gaps["max_gap"], gaps["min_gap"])
    gaps["initial_max_gap"] = max(gaps["initial_max_gap"], gaps["initial_min_gap"])
    cfg = dict(
        num_context_views=num_context_views,
        num_target_views=num_target_views,
        warm_up_steps=10_000,
        extra_views="farthest_point",
        targets_with_replacement=False,
        **gaps,
    )
    cfg.update(overrides)
    return BoundedViewSampler(**cfg)


@dataclass
class AllViewsSampler:
    """Every frame is both context and target (for rendering a whole scene); ``max_views`` caps it."""

    max_views: int | None = None

    def sample(self, scene, num_views, cam_to_world, generator, step=0) -> tuple[Tensor, Tensor]:
        n = num_views if self.max_views is None else min(num_views, self.max_views)
        idx = torch.linspace(0, num_views - 1, n).round().long() if n < num_views else torch.arange(num_views)
        return idx, idx.clone()


class EvaluationViewSampler:
    """Fixed context/target frames per scene from a published evaluation-index JSON file.

    The file maps scene keys to ``{"context": [int, ...], "target": [int, ...]}`` or ``null``
    (scene skipped by the protocol). See the module docstring for where the files come from.
    """

    def __init__(self, index: str | os.PathLike | dict) -> None:
        if isinstance(index, dict):
            raw, self.path = index, "<dict>"
        else:
            self.path = str(index)
            p = Path(index)
            if not p.is_file():
                raise FileNotFoundError(
                    f"{p}: evaluation index not found (get it from the authors' repo, e.g. "
                    "pixelSplat/MVSplat/DepthSplat assets/evaluation_index_re10k.json)"
                )
            try:
                raw = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{self.path}: expected a JSON object scene key -> entry, got {type(raw).__name__}")
        self.entries: dict[str, tuple[list[int], list[int]] | None] = {}
        for key, entry in raw.items():
            if entry is None:
                self.entries[key] = None
                continue
            if not isinstance(entry, dict) or "context" not in entry or "target" not in entry:
                raise ValueError(f"{self.path}: scene {key}: expected {{'context': [...], 'target': [...]}} or null")
            try:
                ctx = [int(i) for i in entry["context"]]
                tgt = [int(i) for i in entry["target"]]
            except (TypeError, ValueError) as e:
                raise ValueError(f"{self.path}: scene {key}: frame indices must be integers ({e})") from e
            self.entries[key] = (ctx, tgt)

    @property
    def scenes(self) -> list[str]:
        """Scene keys the protocol evaluates (``null`` entries left out), in file order."""
        return [k for k, v in self.entries.items() if v is not None]

    def sample(self, scene, num_views, cam_to_world, generator, step=0) -> tuple[Tensor, Tensor]:
        entry = self.entries.get(scene)
        if entry is None:
            why = "is null (skipped)" if scene in self.entries else "is not listed"
            raise SceneSkipped(f"{self.path}: scene {scene} {why} in the evaluation index")
        ctx, tgt = (torch.tensor(x, dtype=torch.int64) for x in entry)
        bad = [int(i) for i in torch.cat([ctx, tgt]) if i < 0 or i >= num_views]
        if bad:
            raise ValueError(
                f"{self.path}: scene {scene}: frame indices {bad[:5]} out of range for {num_views} frames"
            )
        return ctx, tgt


# ------------------------------------------------------------------------------- scene sampler
class SampleKey(NamedTuple):
    """What :class:`SceneSampler` yields and datasets' ``__getitem__`` accepts."""

    index: int  # dataset index of the scene
    epoch: int
    position: int  # position in this rank's stream for the epoch
    step: int  # training step this sample belongs to (position-based, for warm-up schedules)
    seed: int  # per-sample seed for the view sampler and augmentation


def _mix(*xs: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps), stable across processes and Python runs."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h = z ^ (z >> 31)
    return h & 0x7FFFFFFFFFFFFFFF


class SceneSampler(torch.utils.data.Sampler):
    """Deterministic, sharded, resumable order of scenes (a ``torch.utils.data.Sampler``).

    Each epoch: the groups (chunk files) are permuted, then the scenes inside each group, with a
    generator seeded by ``(seed, epoch)`` (``shuffle=False`` keeps the dataset order). The stream
    is cut into ``world_size`` contiguous blocks (sizes differ by at most one; ``drop_last`` trims
    all to the smallest so every rank has the same number of samples); rank ``r`` reads block
    ``r``, which touches only a few consecutive chunk files. DataLoader workers receive whole
    batches of this stream in turn, so no scene is read twice. One ``iter()`` runs ``epochs``
    epochs from the current one and leaves the sampler at the next (so ``for epoch in ...: for
    batch in loader`` advances by itself; ``set_epoch`` also works); ``epochs=None`` never ends
    (training by steps).

    Resuming: ``state_dict()`` is the state after everything yielded so far; because DataLoader
    prefetches, the engine should instead store :meth:`state_after` of the last consumed batch
    (the batch's ``epochs``/``positions`` fields) and pass it to :meth:`load_state_dict`.
    """

    def __init__(
        self,
        num_scenes: int | None = None,
        *,
        groups: Sequence[Sequence[int]] | None = None,  # dataset indices per chunk (locality)
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        epochs: int | None = 1,  # epochs per iter(); None: an endless stream
        batch_size: int = 1,  # per rank, to turn positions into training steps
        start_step: int = 0,
    ) -> None:
        if groups is None:
            if num_scenes is None:
                raise ValueError("SceneSampler: give num_scenes or groups")
            groups = [list(range(num_scenes))]
        self.groups = [list(g) for g in groups if len(g) > 0]
        self.num_scenes = sum(len(g) for g in self.groups)
        if num_scenes is not None and num_scenes != self.num_scenes:
            raise ValueError(f"SceneSampler: groups hold {self.num_scenes} scenes, num_scenes says {num_scenes}")
        if not 0 <= rank < world_size:
            raise ValueError(f"SceneSampler: rank {rank} outside world of size {world_size}")
        if self.num_scenes < world_size:
            raise ValueError(f"SceneSampler: {self.num_scenes} scenes cannot be shared by {world_size} ranks")
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.shuffle, self.drop_last, self.epochs = shuffle, drop_last, epochs
        self.batch_size, self.start_step = max(1, batch_size), start_step
        self.epoch, self.position = 0, 0

    @classmethod
    def for_dataset(cls, dataset, **kwargs) -> "SceneSampler":
        """Use the dataset's chunk grouping (``dataset.groups``) when it has one."""
        groups = getattr(dataset, "groups", None)
        if groups is None:
            return cls(len(dataset), **kwargs)
        return cls(groups=groups, **kwargs)

    def order(self, epoch: int) -> list[int]:
        """This epoch's full stream (all ranks), chunk-grouped."""
        if not self.shuffle:
            return [i for g in self.groups for i in g]
        gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
        out: list[int] = []
        for gi in torch.randperm(len(self.groups), generator=gen).tolist():
            g = self.groups[gi]
            out.extend(g[j] for j in torch.randperm(len(g), generator=gen).tolist())
        return out

    def rank_slice(self, epoch: int) -> list[int]:
        order = self.order(epoch)
        n, w = len(order), self.world_size
        if self.drop_last:
            per = n // w
            return order[self.rank * per : (self.rank + 1) * per]
        lo = (self.rank * n) // w
        hi = ((self.rank + 1) * n) // w
        return order[lo:hi]

    def __len__(self) -> int:
        """Samples per epoch on this rank."""
        n, w = self.num_scenes, self.world_size
        if self.drop_last:
            return n // w
        return ((self.rank + 1) * n) // w - (self.rank * n) // w

    def __iter__(self) -> Iterator[SampleKey]:
        per_epoch = len(self)
        end = None if self.epochs is None else self.epoch + self.epochs
        while end is None or self.epoch < end:
            block = self.rank_slice(self.epoch)
            while self.position < len(block):
                pos = self.position
                self.position += 1
                step = self.start_step + (self.epoch * per_epoch + pos) // self.batch_size
                yield SampleKey(
                    block[pos], self.epoch, pos, step, _mix(self.seed, self.epoch, self.rank, pos, 1)
                )
            self.epoch, self.position = self.epoch + 1, 0

    # ---------------------------------------------------------------- resuming
    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    @staticmethod
    def state_after(batch) -> dict:
        """State right after the last example of ``batch`` (a :class:`ViewsBatch`)."""
        e, p = batch.epochs.tolist(), batch.positions.tolist()
        last = max(zip(e, p))
        return {"epoch": int(last[0]), "position": int(last[1]) + 1}

    def load_state_dict(self, state: dict) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"SceneSampler: state was saved with seed {state['seed']}, this sampler has {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0
