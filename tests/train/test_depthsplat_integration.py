"""Proof that the DepthSplat host trains with a vision3d backbone: a tiny host whose monocular branch
is ``affnet_t`` (through the timm seam) is trained with ``vision3d.train`` on synthetic RE10K-format
scenes and beats the trivial baseline (every target pixel = the mean colour of the context views) on
held-out scenes by a stated margin."""

from __future__ import annotations

import json

import torch

from tests.train.util import trivial_baselines
from vision3d.data import ChunkDataset, ChunkDatasetConfig, EvaluationViewSampler
from vision3d.data.synthetic import synthetic_scenes, write_synthetic_dataset
from vision3d.eval.protocol import evaluate
from vision3d.train.config import DataConfig, OptimConfig, TrainConfig
from vision3d.train.engine import train

SIZE, VIEWS, STEPS = 32, 12, 40
MARGIN_DB = 2.0  # asserted advantage over the mean-context-colour baseline on held-out views
LEARN_DB = 0.5  # asserted gain of training itself


def test_tiny_host_with_affnet_backbone_beats_mean_colour(tmp_path):
    torch.set_num_threads(1)  # tiny ops: one thread is far faster on a shared 2-core runner
    root = tmp_path / "syn"
    kw = dict(num_views=VIEWS, width=SIZE, height=SIZE, density=0.1)
    write_synthetic_dataset(root, "train", num_scenes=6, seed=1, **kw)
    write_synthetic_dataset(root, "test", num_scenes=2, seed=2, **kw)
    index = {k: {"context": [3, 7], "target": [4, 5, 6]} for k, _ in synthetic_scenes(2, 2)}
    (root / "index.json").write_text(json.dumps(index))
    near, far = 0.5, 20.0
    test = ChunkDataset(
        ChunkDatasetConfig(roots=[root], split="test", image_shape=(SIZE, SIZE), near=near, far=far),
        EvaluationViewSampler(root / "index.json"),
    )
    cfg = TrainConfig(
        model="depthsplat_tiny", model_kwargs=dict(backbone="affnet_t", backbone_kwargs={}),
        out=str(tmp_path / "run"), device="cpu", progress=False, seed=0,
        data=DataConfig(root=str(root), image_shape=(SIZE, SIZE), num_context=2, num_target=2, min_gap=3, max_gap=5,
                        gap_warmup_steps=0, batch_size=1, num_workers=0, near=near, far=far),
        optim=OptimConfig(lr=1e-3, warmup_steps=10, max_steps=STEPS, weight_decay=0.0),
        log_every=20, ckpt_every=10_000, image_every=0,
    )
    torch.manual_seed(0)
    from vision3d.train.engine import build_model

    before = evaluate(build_model(cfg), test, tmp_path / "before", lpips=False, progress=False, save_renders=False)
    result = train(cfg)
    after = evaluate(result.model, test, tmp_path / "after", lpips=False, progress=False, save_renders=False)
    p0 = before.summary["mean_over_images"]["psnr"]
    psnr = after.summary["mean_over_images"]["psnr"]
    baselines = trivial_baselines(test)
    base = baselines["mean_colour"]
    print(f"held-out PSNR: host {p0:.2f} -> {psnr:.2f} dB after {STEPS} steps; baselines "
          + ", ".join(f"{k} {v:.2f}" for k, v in baselines.items()))
    assert psnr > p0 + LEARN_DB, f"held-out PSNR {p0:.2f} -> {psnr:.2f} dB: training gained less than {LEARN_DB} dB"
    assert psnr > base + MARGIN_DB, f"host {psnr:.2f} dB vs mean colour {base:.2f} dB: less than {MARGIN_DB} dB better"
