"""VGGT trains in the one engine: a tiny VGGT learns cameras and depth on synthetic RE10K-format
chunks (held-out camera AUC@30 and AbsRel, measured with ``vision3d eval``'s geometry protocol,
improve by a stated margin), and a run killed mid-way resumes to the same weights as an
uninterrupted one."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from tests.train.util import RandomViewsDataset, assert_same_weights, kill_after_checkpoint
from vision3d.data import ChunkDataset, ChunkDatasetConfig, EvaluationViewSampler
from vision3d.data.synthetic import synthetic_scenes, write_synthetic_dataset
from vision3d.eval.geometry import evaluate_geometry
from vision3d.train.checkpoint import latest_checkpoint
from vision3d.train.config import DataConfig, LossConfig, OptimConfig, TrainConfig
from vision3d.train.engine import build_model, train

SIZE, VIEWS, STEPS = 56, 24, 150
AUC_MARGIN = 0.10  # asserted gain of held-out AUC@30 (untrained: 0.0; after 150 steps: ~0.18)
ABSREL_FACTOR = 0.6  # asserted: held-out AbsRel at most this fraction of the untrained model's


def test_tiny_vggt_learns_cameras_and_depth(tmp_path, one_thread):
    root = tmp_path / "syn"
    kw = dict(num_views=VIEWS, width=SIZE, height=SIZE, density=0.1)
    write_synthetic_dataset(root, "train", num_scenes=12, seed=1, **kw)
    write_synthetic_dataset(root, "test", num_scenes=3, seed=2, **kw)
    index = {k: {"context": [2, 5, 8], "target": [11]} for k, _ in synthetic_scenes(2, 3)}
    (root / "index.json").write_text(json.dumps(index))
    test = ChunkDataset(
        ChunkDatasetConfig(roots=[root], split="test", image_shape=(SIZE, SIZE), near=0.05, far=100.0),
        EvaluationViewSampler(root / "index.json"),
    )
    assert test[0].context_depths is not None, "synthetic chunks must carry depth"
    cfg = TrainConfig(
        model="vggt_tiny", out=str(tmp_path / "run"), device="cpu", progress=False, seed=0,
        data=DataConfig(root=str(root), image_shape=(SIZE, SIZE), num_context=4, num_target=1, min_gap=3, max_gap=9,
                        gap_warmup_steps=0, batch_size=2, num_workers=0, near=0.05, far=100.0),
        optim=OptimConfig(lr=2e-3, warmup_steps=10, max_steps=STEPS, weight_decay=0.0),
        loss=LossConfig(camera=5.0, depth=1.0, point=0.0),
        log_every=10, ckpt_every=10_000, image_every=0,
    )
    torch.manual_seed(0)
    before = evaluate_geometry(build_model(cfg), test, tmp_path / "before", progress=False)["summary"]
    result = train(cfg)
    after = evaluate_geometry(result.model, test, tmp_path / "after", progress=False)["summary"]
    print(f"held-out AUC@30 {before['auc30']:.3f} -> {after['auc30']:.3f}, RRE {before['rre_deg']:.1f} -> "
          f"{after['rre_deg']:.1f} deg, AbsRel {before['abs_rel']:.3f} -> {after['abs_rel']:.3f}")
    assert after["auc30"] >= before["auc30"] + AUC_MARGIN, (before, after)
    assert after["abs_rel"] <= ABSREL_FACTOR * before["abs_rel"], (before, after)
    hist = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert hist[-1]["step"] == STEPS and hist[-1]["loss_camera"] < hist[0]["loss_camera"]
    # `vision3d eval` on the run folder picks the geometry protocol from the recipe and agrees
    from vision3d.cli.eval import Args, run

    assert run(Args(ckpt=str(tmp_path / "run"), index=str(root / "index.json"), root=str(root), device="cpu",
                    out=str(tmp_path / "cli_eval"))) == 0
    cli = json.loads((tmp_path / "cli_eval" / "metrics.json").read_text())
    assert abs(cli["auc30"] - after["auc30"]) < 1e-6 and abs(cli["abs_rel"] - after["abs_rel"]) < 1e-6


class DepthViewsDataset(RandomViewsDataset):
    """RandomViewsDataset with a smooth positive depth map per view (VGGT sizes: multiples of 14)."""

    def __getitem__(self, key):
        ex = super().__getitem__(key)
        g = torch.Generator().manual_seed(7 + ex.context_images.shape[0] + int(ex.scene[5:]))
        low = 1.0 + torch.rand(ex.context_images.shape[0], 1, 2, 2, generator=g)
        d = torch.nn.functional.interpolate(low, size=ex.context_images.shape[-2:], mode="bilinear", align_corners=False)
        return replace(ex, context_depths=d)


def _cfg(out, **kw) -> TrainConfig:
    base = TrainConfig(
        model="vggt_tiny", out=str(out), device="cpu", progress=False, seed=3,
        data=DataConfig(batch_size=2, num_workers=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=2, max_steps=12, ema_decay=0.9),
        loss=LossConfig(depth=1.0, point=1.0), log_every=1, ckpt_every=2, image_every=0,
    )
    return replace(base, **kw)


def _data():
    return DepthViewsDataset(num_scenes=5, views=3, targets=1, size=28)


def _child(cfg):
    torch.set_num_threads(1)
    train(cfg, _data())


def test_vggt_resume_after_kill_matches_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    ref = train(_cfg(tmp_path / "ref"), _data())
    assert ref.step == 12
    run = tmp_path / "killed"
    killed_at = kill_after_checkpoint(_child, _cfg(run), run)
    assert killed_at < 12, "the run finished before it could be killed; the test proves nothing"
    resumed = train(_cfg(run, resume=True), _data())
    assert resumed.step == 12
    assert_same_weights(ref.model, resumed.model, killed_at)


def _ddp_worker(rank, world, port, tmp):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    # camera-only (depth/point heads skipped and frozen) and depth+points: DDP must see every trainable
    # parameter get a gradient, or it stops with "parameters that were not used in producing loss"
    for name, loss in (("camera", LossConfig(depth=0.0, point=0.0)), ("full", LossConfig(depth=1.0, point=1.0))):
        cfg = _cfg(tmp / name, loss=loss, optim=OptimConfig(max_steps=2, warmup_steps=0))
        train(cfg, _data())
    dist.destroy_process_group()


def test_vggt_trains_under_ddp(tmp_path):
    import socket

    from vision3d.train.checkpoint import load_checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    for name in ("camera", "full"):
        _, state, _ = load_checkpoint(latest_checkpoint(tmp_path / name))
        assert state["world_size"] == 2 and len(state["sampler"]) == 2


def test_train_command_fine_tunes_vggt_from_init_weights(tmp_path, capsys, one_thread):
    """`vision3d train` end to end: a preset-style VGGT run (frozen aggregator, init weights, camera
    loss only) on synthetic chunks; the aggregator keeps its initial weights exactly."""
    from vision3d.cli.train import main
    from vision3d.train.checkpoint import load_checkpoint, save_weights

    root = tmp_path / "syn"
    write_synthetic_dataset(root, "train", num_scenes=2, num_views=8, width=28, height=28, density=0.1)
    torch.manual_seed(5)
    init = build_model(TrainConfig(model="flashvggt_tiny")).state_dict()
    save_weights(tmp_path / "init.safetensors", {k: v for k, v in init.items() if not k.startswith("point_head.")})
    args = ["--model", "flashvggt_tiny", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
            "--init-weights", str(tmp_path / "init.safetensors"), "--init-missing-ok", "point_head.",
            "--freeze", "aggregator.*", "--loss.depth", "0", "--loss.point", "0",
            "--data.root", str(root), "--data.image-shape", "28", "28", "--data.num-context", "3",
            "--data.num-target", "1", "--data.min-gap", "2", "--data.max-gap", "5", "--data.gap-warmup-steps", "0",
            "--data.batch-size", "2", "--data.num-workers", "0", "--optim.max-steps", "3", "--optim.warmup-steps", "0",
            "--log-every", "1"]
    assert main(args) == 0
    assert "objective" in capsys.readouterr().out
    weights, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    for k, v in init.items():
        if k.startswith("aggregator."):
            torch.testing.assert_close(weights[k], v, rtol=0, atol=0, msg=k)
    assert any(not torch.equal(weights[k], v) for k, v in init.items() if k.startswith("camera_head."))
    # a missing depth head in the init weights is an error naming the keys
    save_weights(tmp_path / "bad.safetensors", {k: v for k, v in init.items() if not k.startswith("depth_head.")})
    bad = args[:]
    bad[bad.index(str(tmp_path / "init.safetensors"))] = str(tmp_path / "bad.safetensors")
    bad[bad.index(str(tmp_path / "run"))] = str(tmp_path / "run2")
    with pytest.raises(ValueError, match="missing key.*depth_head"):
        main(bad)
