"""One call that wires a dataset, :class:`SceneSampler` and ``collate_views`` into a DataLoader.

Written for vision3d (Apache-2.0). The training engine calls :func:`make_loader` once per rank
and stores ``SceneSampler.state_after(batch)`` of the last consumed batch in its checkpoint.
"""

from __future__ import annotations

import torch

from .example import collate_views
from .samplers import SceneSampler

__all__ = ["make_loader"]


def make_loader(
    dataset,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    shuffle: bool = True,
    epochs: int | None = None,  # None: endless (train by steps); 1: one pass (evaluation)
    drop_last: bool = False,
    state: dict | None = None,  # SceneSampler state to resume from
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
) -> tuple[torch.utils.data.DataLoader, SceneSampler]:
    """``(loader, sampler)`` for this rank; batches are :class:`~vision3d.data.ViewsBatch`."""
    sampler = SceneSampler.for_dataset(
        dataset, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
        epochs=epochs, batch_size=batch_size,
    )
    if state is not None:
        sampler.load_state_dict(state)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_views,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0 and epochs is None,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return loader, sampler
