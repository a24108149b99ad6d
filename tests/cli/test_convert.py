"""vision3d convert: authors' checkpoint layout -> our safetensors, loadable by the model."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from tests.conftest import LOCAL_FIXTURES
from vision3d.cli.main import main
from vision3d.recon.ilrm import load_ilrm


def test_convert_ilrm_lightning_checkpoint(tmp_path, capsys):
    t = load_file(str(LOCAL_FIXTURES / "ilrm" / "public.safetensors"))
    ckpt = {"state_dict": {"encoder.scaler." + k[6:]: v for k, v in t.items() if k.startswith("state/")}, "epoch": 1}
    torch.save(ckpt, tmp_path / "authors.ckpt")
    assert main(["convert", "ilrm", str(tmp_path / "authors.ckpt"), str(tmp_path / "ilrm.safetensors")]) == 0
    model = load_ilrm(str(tmp_path / "ilrm.safetensors"))
    assert (model.cfg.patch_size, model.cfg.dim, model.cfg.num_layers) == (2, 32, 4)
    assert "tensors" in capsys.readouterr().out
    assert main(["convert", "--list"]) == 0 and "dimer" in capsys.readouterr().out


class Arbitrary:
    """Stands for any pickled object a checkpoint may smuggle in."""


def test_convert_refuses_pickled_objects(tmp_path):
    import pytest

    torch.save({"state_dict": {}, "obj": Arbitrary()}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match="weights_only"):
        main(["convert", "ilrm", str(tmp_path / "bad.ckpt"), str(tmp_path / "x.safetensors")])
