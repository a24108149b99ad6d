"""The evaluation protocol end to end on synthetic RE10K-format chunks and a published-style index."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from vision3d.cli.main import main
from vision3d.data import ChunkDataset, ChunkDatasetConfig, EvaluationViewSampler
from vision3d.data.synthetic import synthetic_scenes, write_synthetic_dataset
from vision3d.eval.protocol import evaluate, load_model_for_eval
from vision3d.recon import create
from vision3d.train.checkpoint import save_weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_synthetic_dataset(root, "test", num_scenes=3, seed=5, num_views=10, width=16, height=16, density=0.1)
    keys = [k for k, _ in synthetic_scenes(5, 3)]
    index = {keys[0]: {"context": [0, 6], "target": [2, 3, 4]}, keys[1]: {"context": [1, 7], "target": [5]}, keys[2]: None}
    (root / "index.json").write_text(json.dumps(index))
    return root, keys


def test_evaluate_writes_protocol_files(data, tmp_path):
    root, keys = data
    ds = ChunkDataset(ChunkDatasetConfig(roots=[root], split="test", image_shape=(16, 16)), EvaluationViewSampler(root / "index.json"))
    torch.manual_seed(0)
    model = create("ilrm_tiny")
    res = evaluate(model, ds, tmp_path / "eval", lpips=False, progress=False)
    assert res.summary["scenes"] == 2 and res.summary["images"] == 4  # the null scene is skipped
    rows = list(csv.DictReader((tmp_path / "eval" / "per_view.csv").open()))
    assert [(r["scene"], int(r["frame"])) for r in rows] == [(keys[0], 2), (keys[0], 3), (keys[0], 4), (keys[1], 5)]
    per_scene = list(csv.DictReader((tmp_path / "eval" / "per_scene.csv").open()))
    mean_img = sum(float(r["psnr"]) for r in rows) / 4
    assert abs(res.summary["mean_over_images"]["psnr"] - mean_img) < 1e-9
    assert abs(float(per_scene[0]["psnr"]) - sum(float(r["psnr"]) for r in rows[:3]) / 3) < 1e-6
    assert (tmp_path / "eval" / "renders" / keys[0] / "00002.png").exists()
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 4


def test_eval_command_from_safetensors(data, tmp_path):
    root, _ = data
    torch.manual_seed(0)
    model = create("ilrm_tiny")
    save_weights(tmp_path / "w.safetensors", model.state_dict())
    code = main(["eval", str(tmp_path / "w.safetensors"), "--model", "ilrm_tiny", "--index", str(root / "index.json"),
                 "--root", str(root), "--image-shape", "16", "16", "--device", "cpu", "--lpips", "off",
                 "--out", str(tmp_path / "ev")])
    assert code == 0 and (tmp_path / "ev" / "metrics.json").exists()
    with pytest.raises(ValueError, match="does not fit"):
        load_model_for_eval(tmp_path / "w.safetensors", "ilrm_re10k")


@pytest.mark.parametrize("key", ["../escape", "/tmp/abs_scene", "a/../../b"])
def test_scene_keys_cannot_write_outside_out(data, tmp_path, key):
    from dataclasses import replace

    from vision3d.errors import InputError

    root, _ = data
    ds = ChunkDataset(ChunkDatasetConfig(roots=[root], split="test", image_shape=(16, 16)), EvaluationViewSampler(root / "index.json"))

    class Renamed:  # a dataset whose scene key is hostile
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return replace(ds[i], scene=key)

    torch.manual_seed(0)
    with pytest.raises(InputError, match="scene key: expected a relative name inside"):
        evaluate(create("ilrm_tiny"), Renamed(), tmp_path / "eval", lpips=False, progress=False)
    written = [p for p in tmp_path.rglob("*.png")]
    assert written == [] and not (tmp_path / "escape").exists()
