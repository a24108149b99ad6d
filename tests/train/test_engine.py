"""Engine mechanics on the CPU: exact resume after SIGKILL, 2-process gloo DDP == one process."""

from __future__ import annotations

import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from tests.train.util import RandomViewsDataset, assert_same_weights, kill_after_checkpoint
from vision3d.data import collate_views
from vision3d.train.checkpoint import latest_checkpoint, load_checkpoint
from vision3d.train.config import DataConfig, OptimConfig, TrainConfig
from vision3d.train.engine import Loss, build_model, forward_loss, train

TINY = dict(patch_size=4, dim=32, head_dim=16, num_layers=2)


def _cfg(out, **kw) -> TrainConfig:
    base = TrainConfig(
        model="ilrm_tiny", model_kwargs=TINY, out=str(out), device="cpu", progress=False,
        data=DataConfig(batch_size=2, num_workers=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=3, max_steps=24, ema_decay=0.9),
        log_every=1, ckpt_every=2, image_every=0, seed=7,
    )
    return replace(base, **kw)


def _child(cfg):
    torch.set_num_threads(1)
    train(cfg, RandomViewsDataset(num_scenes=5, size=16))


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    torch.set_num_threads(1)
    ref = train(_cfg(tmp_path / "ref"), RandomViewsDataset(num_scenes=5, size=16))
    assert ref.step == 24
    run = tmp_path / "killed"
    killed_at = kill_after_checkpoint(_child, _cfg(run), run)
    assert killed_at < 24, "the run finished before it could be killed; the test proves nothing"
    resumed = train(_cfg(run, resume=True), RandomViewsDataset(num_scenes=5, size=16))
    assert resumed.step == 24
    assert_same_weights(ref.model, resumed.model, killed_at)
    _, sa, ema_a = load_checkpoint(latest_checkpoint(tmp_path / "ref"))
    _, sb, ema_b = load_checkpoint(latest_checkpoint(run))
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=0, atol=0)
    assert sa["sampler"] == sb["sampler"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, tmp):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = _cfg(tmp / "unused")
    torch.manual_seed(0)
    model = build_model(cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ds = RandomViewsDataset(num_scenes=4, size=16)
    batch = collate_views([ds[i] for i in range(rank * 2, rank * 2 + 2)])
    loss, _, _ = forward_loss(ddp, Loss(cfg.loss, torch.device("cpu")), batch, 0, torch.autocast("cpu", enabled=False))
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    # and the whole engine under gloo: two steps, one checkpoint holding both ranks' state
    train(_cfg(tmp / "ddp_run", optim=OptimConfig(max_steps=2, warmup_steps=0)), ds)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), tmp_path), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)
    cfg = _cfg(tmp_path / "unused")
    torch.manual_seed(0)
    model = build_model(cfg)
    ds = RandomViewsDataset(num_scenes=4, size=16)
    batch = collate_views([ds[i] for i in range(4)])
    loss, _, _ = forward_loss(model, Loss(cfg.loss, torch.device("cpu")), batch, 0, torch.autocast("cpu", enabled=False))
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[n], p.grad, atol=1e-7, rtol=1e-5, msg=n)
    _, state, _ = load_checkpoint(latest_checkpoint(tmp_path / "ddp_run"))
    assert state["world_size"] == 2 and len(state["sampler"]) == 2 and len(state["rng"]) == 2
