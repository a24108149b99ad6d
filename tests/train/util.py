"""A deterministic in-memory dataset of posed views for engine tests (mechanics, not quality)."""

from __future__ import annotations

import torch

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
