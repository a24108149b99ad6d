"""The README's pretrained-weights example never runs code from a crafted checkpoint."""

from __future__ import annotations

import os
import pickle
from importlib.metadata import version

import pytest
import timm
import torch

import vision3d  # noqa: F401  (registers the backbones)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_installed_timm_is_at_least_the_pinned_safe_release():
    major, minor, patch = (int(x) for x in version("timm").split(".")[:3])
    assert (major, minor, patch) >= (1, 0, 26), "timm < 1.0.26 unpickles pretrained_cfg_overlay files with weights_only=False"


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickled_code_checkpoint_is_refused_through_the_readme_example(tmp_path, how):
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "ffnet_1.pth"
    payload = {"state_dict": {"w": torch.zeros(1)}, "evil": _RunsCode(str(marker))}
    if how == "torch.save":
        torch.save(payload, ckpt)
    else:
        with ckpt.open("wb") as f:
            pickle.dump(payload, f)
    # README: m = timm.create_model("ffnet_1", pretrained=True, pretrained_cfg_overlay=dict(file="ffnet_1.pth"))
    with pytest.raises(Exception) as e:
        timm.create_model("ffnet_1", pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt)))
    assert not marker.exists(), "the checkpoint's pickled code ran"
    assert "weights_only" in str(e.value) or "Unpickl" in type(e.value).__name__ + str(e.value)
