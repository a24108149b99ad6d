"""A variable context count per batch (iLRM's DL3DV rule: data.num_context..data.num_context_max)
through the whole engine: the counts vary within the range, follow the seed, and a resumed run
continues bit-for-bit (weights and the sequence of counts)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.data.util import make_example, write_split
from vision3d.train.config import DataConfig, OptimConfig, TrainConfig
from vision3d.train.engine import build_dataset, train

STEPS = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("chunks")
    exs = [make_example(f"scene{i:02d}", n_views=10, width=16, height=16, seed=i, blobs=False) for i in range(4)]
    write_split(r, "train", [exs[:2], exs[2:]])
    return r


def _cfg(root, out, **kw) -> TrainConfig:
    data = DataConfig(
        root=str(root), image_shape=(16, 16), num_context=2, num_context_max=4, num_target=2, min_gap=2, max_gap=6,
        gap_warmup_steps=0, extra_views="farthest_point", batch_size=2, num_workers=0, near=0.01, far=100.0,
    )
    base = TrainConfig(
        model="ilrm_tiny", model_kwargs=dict(patch_size=4, dim=32, head_dim=16, num_layers=2), out=str(out),
        device="cpu", progress=False, data=data, optim=OptimConfig(lr=1e-3, warmup_steps=2, max_steps=STEPS),
        log_every=1, ckpt_every=100, image_every=0, seed=3,
    )
    return replace(base, **kw)


def test_engine_runs_and_resumes_with_variable_counts(root, tmp_path):
    torch.set_num_threads(1)
    ref = train(_cfg(root, tmp_path / "ref"))
    assert ref.step == STEPS
    counts = [int(h["context_views"]) for h in ref.history]
    assert len(counts) == STEPS and set(counts) <= {2, 3, 4} and len(set(counts)) > 1
    sampler = build_dataset(_cfg(root, tmp_path / "unused")).view_sampler
    assert counts == [sampler.context_count(step) for step in range(STEPS)]
    other = build_dataset(_cfg(root, tmp_path / "unused", seed=4)).view_sampler
    assert [other.context_count(s) for s in range(32)] != [sampler.context_count(s) for s in range(32)]

    cfg = _cfg(root, tmp_path / "run")
    assert train(cfg, max_steps=STEPS // 2).step == STEPS // 2
    resumed = train(replace(cfg, resume=True))
    assert resumed.step == STEPS
    assert [int(h["context_views"]) for h in resumed.history] == counts[STEPS // 2 :]
    for (n, a), (_, b) in zip(ref.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{n} differs after resuming")


def test_bad_range_is_refused(root, tmp_path):
    with pytest.raises(ValueError, match="num_context_max=1 is below data.num_context=2"):
        build_dataset(_cfg(root, tmp_path / "x", data=replace(_cfg(root, tmp_path).data, num_context_max=1)))
