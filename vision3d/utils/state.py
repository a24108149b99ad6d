"""What differs between a model's state dict and a checkpoint's, in words an error can carry."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def state_dict_differences(
    own: Mapping[str, torch.Tensor],  # the model's state_dict()
    given: Mapping[str, torch.Tensor],  # the checkpoint's tensors
    skip: Sequence[str] = (),  # key prefixes left out of the comparison
) -> list[str]:
    """Shape mismatches (in the model's order), unexpected and missing keys, each with examples;
    empty when the checkpoint fits. BatchNorm's ``num_batches_tracked`` may be missing."""
    skipped = lambda k: any(k.startswith(s) for s in skip)  # noqa: E731
    mismatched = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape) and not skipped(k)
    ]
    unexpected = [k for k in given if k not in own and not skipped(k)]
    missing = [k for k in own if k not in given and not k.endswith("num_batches_tracked") and not skipped(k)]
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es), e.g. {mismatched[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    return parts
