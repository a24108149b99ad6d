"""Engine test helpers: a deterministic in-memory dataset of posed views (mechanics, not quality), and the
kill-then-resume harness of the exact-resume tests."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp

from vision3d.data import SampleKey, ViewsExample
from vision3d.geometry import Cameras


class RandomViewsDataset(torch.utils.data.Dataset):
    """Scene i: smooth random images seen from cameras on a small arc, all seeded by i."""

    def __init__(self, num_scenes: int = 8, views: int = 2, targets: int = 2, size: int = 8):
        self.n, self.v, self.t, self.size = num_scenes, views, targets, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> ViewsExample:
        index = key.index if isinstance(key, SampleKey) else int(key)
        g = torch.Generator().manual_seed(1000 + index)
        s = self.size
        n = self.v + self.t
        low = torch.rand(n, 3, 2, 2, generator=g)
        imgs = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
        K = torch.tensor([[1.2 * s, 0, s / 2], [0, 1.2 * s, s / 2], [0, 0, 1]])
        c2w = torch.eye(4).repeat(n, 1, 1)
        c2w[:, 0, 3] = torch.linspace(-0.2, 0.2, n) + 0.05 * torch.rand(n, generator=g)
        cams = Cameras(K.expand(n, 3, 3), c2w, s, s, near=0.01, far=100.0)
        c, t = slice(0, self.v), slice(self.v, n)
        return ViewsExample(
            scene=f"scene{index:03d}", context_images=imgs[c], context_cameras=cams[c], target_images=imgs[t],
            target_cameras=cams[t], context_indices=torch.arange(self.v), target_indices=torch.arange(self.v, n),
            near=0.01, far=100.0,
            epoch=key.epoch if isinstance(key, SampleKey) else 0,
            position=key.position if isinstance(key, SampleKey) else -1,
        )


def kill_after_checkpoint(child: Callable, cfg, run: Path, first: str = "step_00000004", timeout: float = 120.0) -> int:
    """Run ``child(cfg)`` in a spawned process, SIGKILL it once ``run/ckpts/<first>`` exists, and return the step
    of the last checkpoint it left (``child`` must be a module-level function, for spawn)."""
    from vision3d.train.checkpoint import latest_checkpoint

    p = mp.get_context("spawn").Process(target=child, args=(cfg,))
    p.start()
    deadline = time.time() + timeout
    while time.time() < deadline and not (Path(run) / "ckpts" / first).exists():
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    last = latest_checkpoint(run)
    assert last is not None, "the child wrote no checkpoint before it was killed"
    return int(last.name.split("_")[1])


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, killed_at: int) -> None:
    """Bit-identical state dicts (a resumed run against the uninterrupted one)."""
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=f"{n} differs after resuming at step {killed_at}")
