"""View samplers, sharding over ranks x workers, determinism and resuming."""

from __future__ import annotations

import pytest
import torch

from tests.data.util import make_example, write_split
from vision3d.data import (
    BoundedViewSampler,
    NotEnoughViews,
    RE10KDataset,
    SceneSampler,
    collate_views,
    make_loader,
    many_view_sampler,
)
from vision3d.data.samplers import farthest_point_order


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_bounded_gap_targets_and_warmup():
    s = BoundedViewSampler(num_context_views=2, num_target_views=4, min_gap=45, max_gap=135, warm_up_steps=30_000,
                           initial_min_gap=25, initial_max_gap=45)
    assert s.gap_range(0) == (25, 45) and s.gap_range(15_000) == (35, 90) and s.gap_range(10**6) == (45, 135)
    gaps = set()
    for i in range(200):
        ctx, tgt = s.sample("x", 300, None, _g(i), step=10**6)
        gap = int(ctx[1] - ctx[0])
        gaps.add(gap)
        assert 45 <= gap <= 135 and ctx[0] >= 0 and ctx[1] < 300
        assert ((tgt >= ctx[0]) & (tgt <= ctx[1])).all() and tgt.shape == (4,)
    assert max(gaps) - min(gaps) > 50  # the full range is drawn (unlike the published clamp)
    quirk = BoundedViewSampler(min_gap=45, max_gap=135, warm_up_steps=0, pixelsplat_gap_quirk=True)
    assert {int(quirk.sample("x", 300, None, _g(i))[0].diff()) for i in range(20)} == {45}
    with pytest.raises(NotEnoughViews, match="x: 40 frames"):
        s.sample("x", 40, None, _g(), step=10**6)


def test_bounded_test_stage_and_extrapolation():
    s = BoundedViewSampler(min_gap=10, max_gap=20, stage="test", warm_up_steps=0)
    ctx, tgt = s.sample("x", 100, None, _g())
    assert ctx.tolist() == [0, 20] and tgt.tolist() == list(range(21))
    ext = BoundedViewSampler(min_gap=10, max_gap=10, max_distance_to_context=5, num_target_views=50, warm_up_steps=0)
    ctx, tgt = ext.sample("x", 100, None, _g(3))
    assert tgt.min() >= max(0, int(ctx[0]) - 5) and tgt.max() <= int(ctx[1]) + 5
    assert ((tgt < ctx[0]) | (tgt > ctx[1])).any()


def test_many_view_sampler_farthest_point():
    n = 300
    t = torch.linspace(0, 6.0, n)
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, 0, 3], c2w[:, 1, 3] = t.cos() * t, t.sin()
    s = many_view_sampler(num_context_views=24, num_target_views=8)
    ctx, tgt = s.sample("x", n, c2w, _g(), step=10**6)
    assert ctx.shape == (24,) and len(set(ctx.tolist())) == 24 and (ctx.diff() > 0).all()
    assert tgt.shape == (8,) and len(set(tgt.tolist())) == 8  # ZPressor draws targets without replacement
    s36 = many_view_sampler(num_context_views=36, stage="test")
    ctx, _ = s36.sample("x", n, c2w, _g())
    assert ctx.shape == (36,) and len(set(ctx.tolist())) == 36
    pts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [10, 0, 0], [5, 0, 0]])
    assert farthest_point_order(pts, 3).tolist() == [2, 0, 3]


def test_random_extra_views_distinct_sorted():
    s = BoundedViewSampler(num_context_views=5, min_gap=4, max_gap=10, warm_up_steps=0)
    for i in range(50):
        ctx, _ = s.sample("x", 30, None, _g(i))
        assert (ctx.diff() > 0).all() and ctx.shape == (5,)


def test_scene_sampler_shards_cover_once_and_blocks():
    groups = [list(range(0, 4)), list(range(4, 11)), list(range(11, 13))]
    for world in (1, 2, 3, 5):
        seen = []
        for r in range(world):
            seen += [k.index for k in SceneSampler(groups=groups, rank=r, world_size=world, seed=3, epochs=1)]
        assert sorted(seen) == list(range(13)), world
    a = [k.index for k in SceneSampler(groups=groups, seed=1)]
    b = [k.index for k in SceneSampler(groups=groups, seed=1)]
    c = [k.index for k in SceneSampler(groups=groups, seed=2)]
    assert a == b and a != c
    # chunk locality: each group is one contiguous run of the stream
    runs = [next(gi for gi, g in enumerate(groups) if i in g) for i in a]
    assert sum(1 for x, y in zip(runs, runs[1:]) if x != y) == len(groups) - 1
    even = [len(SceneSampler(groups=groups, rank=r, world_size=3, drop_last=True)) for r in range(3)]
    assert even == [4, 4, 4]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("re10k")
    exs = [make_example(f"scene{i:02d}", n_views=8, width=16, height=16, seed=i, blobs=False) for i in range(11)]
    write_split(root, "train", [exs[:4], exs[4:9], exs[9:]])
    return RE10KDataset(root, "train", BoundedViewSampler(min_gap=2, max_gap=5, warm_up_steps=0), image_shape=None,
                        cache_chunks=3)


def test_union_over_ranks_and_workers_covers_every_scene_once(small_dataset):
    ds, world, workers = small_dataset, 3, 2
    seen = []
    for rank in range(world):
        loader, _ = make_loader(ds, 2, rank=rank, world_size=world, seed=7, num_workers=workers, epochs=1)
        for batch in loader:
            seen += batch.scenes
    assert sorted(seen) == sorted(ds.keys) and len(seen) == len(set(seen)) == 11


def test_deterministic_views_and_resume(small_dataset):
    ds = small_dataset

    def run(sampler, n_batches=None):
        out = []
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_views)
        for i, b in enumerate(loader):
            out.append(b)
            if n_batches is not None and i + 1 == n_batches:
                break
        return out

    full = run(SceneSampler.for_dataset(ds, seed=5, epochs=2, batch_size=2))
    again = run(SceneSampler.for_dataset(ds, seed=5, epochs=2, batch_size=2))
    sig = lambda bs: [(b.scenes, b.context_indices.tolist(), b.target_indices.tolist()) for b in bs]  # noqa: E731
    assert sig(full) == sig(again)
    # epochs differ in order and in sampled views
    assert [s for b in full for s in b.scenes][:11] != [s for b in full for s in b.scenes][11:]
    # interrupt after 4 batches (the DataLoader has already prefetched further), resume from the batch
    part = run(SceneSampler.for_dataset(ds, seed=5, epochs=2, batch_size=2), n_batches=4)
    state = SceneSampler.state_after(part[-1])
    resumed_sampler = SceneSampler.for_dataset(ds, seed=5, epochs=2, batch_size=2)
    resumed_sampler.load_state_dict(state)
    rest = run(resumed_sampler)
    flat = lambda bs: [(s, c) for b in bs for s, c in zip(b.scenes, b.context_indices.tolist())]  # noqa: E731
    assert flat(part) + flat(rest) == flat(full)
    with pytest.raises(ValueError, match="seed"):
        SceneSampler.for_dataset(ds, seed=6).load_state_dict({**state, "seed": 5})


def test_infinite_stream_and_steps():
    s = SceneSampler(5, epochs=None, batch_size=2, seed=0)
    it = iter(s)
    keys = [next(it) for _ in range(12)]
    assert [k.epoch for k in keys] == [0] * 5 + [1] * 5 + [2] * 2
    assert [k.step for k in keys] == [i // 2 for i in range(12)]
    assert sorted(k.index for k in keys[:5]) == list(range(5))


def test_epoch_loop_advances_and_set_epoch():
    s = SceneSampler(6, seed=4)
    e0 = [k.index for k in s]
    e1 = [k.index for k in s]
    assert sorted(e0) == sorted(e1) == list(range(6)) and e0 != e1
    s.set_epoch(0)
    assert [k.index for k in s] == e0 and s.state_dict() == {"seed": 4, "epoch": 1, "position": 0}


def test_variable_context_count_rule():
    kw = dict(num_context_views=2, num_context_views_max=6, min_gap=20, max_gap=50, warm_up_steps=0,
              extra_views="farthest_point", num_target_views=4, targets_with_replacement=False)
    s = BoundedViewSampler(count_seed=11, **kw)
    counts = [s.context_count(step) for step in range(500)]
    assert set(counts) == {2, 3, 4, 5, 6}  # both ends included, as random.randint
    assert all(60 <= counts.count(c) <= 140 for c in range(2, 7))  # uniform: 100 expected each
    assert counts == [BoundedViewSampler(count_seed=11, **kw).context_count(t) for t in range(500)]
    assert counts != [BoundedViewSampler(count_seed=11, count_rank=1, **kw).context_count(t) for t in range(500)]
    assert counts != [BoundedViewSampler(count_seed=12, **kw).context_count(t) for t in range(500)]
    n = 200
    c2w = torch.eye(4).repeat(n, 1, 1)
    c2w[:, 0, 3] = torch.linspace(0, 4, n)
    gaps = {c: set() for c in range(2, 7)}
    for step in range(60):
        for i in range(3):  # examples of one batch: different generators, same step -> same count
            ctx, tgt = s.sample("x", n, c2w, _g(100 * step + i), step=step)
            assert ctx.shape == (counts[step],) and (ctx.diff() > 0).all() and tgt.shape == (4,)
            gaps[counts[step]].add(int(ctx[-1] - ctx[0]))
    # the authors' gap shrink: bounds // max(6 // count, 1)
    assert max(gaps[2]) <= 50 // 3 and min(gaps[2]) >= 20 // 3
    assert max(gaps[3]) <= 50 // 2 and all(max(g) <= 50 for g in gaps.values())
    assert max(gaps[6]) > 25
    fixed = BoundedViewSampler(**{**kw, "shrink_gap": False})
    assert max(int(fixed.sample("x", n, c2w, _g(t), step=t)[0].diff().sum()) for t in range(40)) > 25
    # off: the old fixed-count behaviour, bit for bit
    old = BoundedViewSampler(**{**kw, "num_context_views": 3, "num_context_views_max": None})
    ref = BoundedViewSampler(**{**kw, "num_context_views": 3, "num_context_views_max": 3})
    for t in range(10):
        a, b = old.sample("x", n, c2w, _g(t), step=t), ref.sample("x", n, c2w, _g(t), step=t)
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist() and a[0].shape == (3,)
    assert BoundedViewSampler(**{**kw, "stage": "test"}).context_count(5) == 2
    with pytest.raises(ValueError, match="num_context_views_max=1 is below"):
        BoundedViewSampler(num_context_views=2, num_context_views_max=1)


def test_variable_count_batches_collate_and_resume(small_dataset):
    from vision3d.data import ChunkDataset

    sampler = BoundedViewSampler(num_context_views=2, num_context_views_max=4, min_gap=2, max_gap=5, warm_up_steps=0,
                                 extra_views="farthest_point", count_seed=3)
    ds = ChunkDataset(small_dataset.cfg, sampler)

    def batches(state=None, n=10):
        loader, _ = make_loader(ds, 2, seed=5, epochs=None, state=state)
        out = []
        for b in loader:
            out.append(b)
            if len(out) == n:
                return out

    full = batches()
    counts = [b.context_indices.shape[1] for b in full]
    assert len(set(counts)) > 1 and set(counts) <= {2, 3, 4}
    assert all(b.context_images.shape[:2] == (2, c) for b, c in zip(full, counts))
    assert counts == [sampler.context_count(step) for step in range(10)]
    rest = batches(SceneSampler.state_after(full[3]), n=6)
    sig = lambda bs: [(b.scenes, b.context_indices.tolist(), b.target_indices.tolist()) for b in bs]  # noqa: E731
    assert sig(rest) == sig(full[4:])
