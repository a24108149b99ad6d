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


def test_convert_refuses_pickled_objects(tmp_path, capsys):
    torch.save({"state_dict": {}, "obj": Arbitrary()}, tmp_path / "bad.ckpt")
    assert main(["convert", "ilrm", str(tmp_path / "bad.ckpt"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "bad.ckpt: file: expected a tensors-only checkpoint (torch.load weights_only=True)" in err
    assert "Traceback" not in err and not (tmp_path / "x.safetensors").exists()


def test_convert_bad_input_prints_a_message_not_a_traceback(tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    torch.save({"state_dict": {"backbone.layer1.weight": torch.zeros(1)}}, tmp_path / "foreign.ckpt")
    assert main(["convert", "ilrm", str(tmp_path / "foreign.ckpt"), out]) == 2
    assert "foreign.ckpt: key 'backbone.layer1.weight': expected a key of the authors' iLRM layout" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"\x80\x04junk")
    assert main(["convert", "ilrm", str(tmp_path / "junk.ckpt"), out]) == 2
    assert "junk.ckpt: file: expected a tensors-only checkpoint" in capsys.readouterr().err
    assert main(["convert", "nosuch", str(tmp_path / "junk.ckpt"), out]) == 2
    assert "no converter named 'nosuch'" in capsys.readouterr().err
    assert main(["convert", "ilrm", str(tmp_path / "missing.ckpt"), out]) == 2
    assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err
