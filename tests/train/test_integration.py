"""Proof that it trains: a tiny iLRM on synthetic RE10K-format chunks learns geometry, not just colour.

Train and held-out scenes are different procedural scenes (different seeds); held-out PSNR is
measured with the evaluation protocol (index file, context/target frames) before and after
training, and compared with every trivial baseline of ``tests/train/util.py: trivial_baselines``.

Protocol (the same as the DepthSplat and VolSplat learning tests): two context frames 6 apart (frames
2 and 8 of a 12-frame, 120-degree arc) and the three frames between them as targets, on 4 held-out
scenes at 32x32; training draws context gaps of 4..8 frames. Copying the nearest context view (20-30
degrees away) is then a poor guess, so beating it by ``MARGINS_DB`` needs geometry: colour alone
reaches the mean-colour baseline. Measured: ``MEASURED`` below.

Why the earlier 150-step, 6-scene version did not beat the nearest view (14.9 dB vs 18.3 on this protocol):

- the authors' depth range, ``500 * sigmoid(.)``, starts every Gaussian 250 units away (these scenes
  are 2..6 units from the cameras; the data's far plane is 20), with 125 units of distance per unit
  of logit there; and the initial scale ``exp(-6.9)`` = 0.001 units is under 0.01 px at any of these
  distances, so the 2-D footprint is the renderer's 0.3 px^2 dilation and the scale gradient is
  tiny (d cov / d log s = 2 s^2): only Gaussians near the right depth ever get a useful push to
  grow. After 150 steps: median scale 0.008 px, some Gaussians still 466
  units away. The test passes ``max_distance=8`` (a model kwarg: the depth range matched to the
  data, like near/far): Gaussians start 4 units away and their scales reach a median 0.1-0.3 px.
  At the final configuration (64 scenes, 1200 steps, seed 0) the authors' 500 gives 18.98 dB (median
  scale still 0.009 px, some Gaussians 465 units away) against 20.35 with 8.
- 150 steps is too few (training-view PSNR ~16 dB); with more steps the model does not underfit
  6 training scenes but overfits them (1200 steps in the mean-camera frame below: 21.8 dB on
  training views, 17.3 held out; 600 steps with ``max_distance=8``: 18.65 held out). 32 training
  scenes give 20.02 / 20.63 / 19.07 dB held out (seeds 0 / 1 / 2), 64 give the numbers above,
  with a fifth of the spread; 800 steps with 64 scenes give 18.66 (seed 0).

iLRM's own training frame (``scene_transform="mean_camera"``, ``max_distance=6``) was worse here
(18.29 vs 20.02 dB; 1200 steps, 32 scenes, seed 0): every synthetic scene is centred on the same world
point, so in the dataset's frame the Plücker moments already say where the scene is.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.util import assert_beats, axes_centre, format_scores, reproject_via_plane, trivial_baselines
from vision3d.data import ChunkDataset, ChunkDatasetConfig, EvaluationViewSampler
from vision3d.data.synthetic import synthetic_scenes, write_synthetic_dataset
from vision3d.eval.protocol import evaluate
from vision3d.train.config import DataConfig, OptimConfig, TrainConfig
from vision3d.train.engine import build_model, train

SIZE, VIEWS, STEPS, TRAIN_SCENES, TEST_SCENES = 32, 12, 1200, 64, 4
CONTEXT, TARGETS = [2, 8], [4, 5, 6]
MARGIN_DB = 3.0  # asserted improvement of held-out PSNR over the untrained model
MARGINS_DB = {  # asserted lead over each trivial baseline on the held-out views
    "mean_colour": 2.0,
    "nearest_view": 0.5,
    "nearest_reprojected": 0.5,
}
MEASURED = (  # held-out PSNR, 4 scenes, this configuration, training seeds 0 / 1 / 2
    "untrained 10.29 / 10.19 / 10.23 dB -> trained 20.35 / 20.54 / 20.25 dB; "
    "mean colour 12.64 (+7.71 / +7.90 / +7.61), "
    "nearest view 18.26 (+2.09 / +2.28 / +1.99), nearest reprojected 17.67 (+2.68 / +2.87 / +2.58), "
    "two views reprojected 19.96 (+0.39 / +0.58 / +0.29: beaten, but by too little across platforms to assert); "
    "~100 s on one loaded core (64 scenes rendered in ~12 s, 1200 steps in ~89 s)"
)


@pytest.mark.slow  # ~100 s: 64 scenes rendered, 1200 steps
@pytest.mark.usefixtures("one_thread")  # tiny ops: one thread is far faster on a shared 2-core runner
def test_tiny_ilrm_learns(tmp_path):
    root = tmp_path / "syn"
    kw = dict(num_views=VIEWS, width=SIZE, height=SIZE, density=0.1)
    write_synthetic_dataset(root, "train", num_scenes=TRAIN_SCENES, seed=1, **kw)
    write_synthetic_dataset(root, "test", num_scenes=TEST_SCENES, seed=2, **kw)
    index = {k: {"context": CONTEXT, "target": TARGETS} for k, _ in synthetic_scenes(2, TEST_SCENES)}
    (root / "index.json").write_text(json.dumps(index))
    near, far = 0.5, 20.0
    test = ChunkDataset(
        ChunkDatasetConfig(roots=[root], split="test", image_shape=(SIZE, SIZE), near=near, far=far),
        EvaluationViewSampler(root / "index.json"),
    )
    cfg = TrainConfig(
        model="ilrm_tiny", model_kwargs=dict(patch_size=4, dim=64, head_dim=16, num_layers=4, max_distance=8.0),
        out=str(tmp_path / "run"), device="cpu", progress=False, seed=0,
        data=DataConfig(root=str(root), image_shape=(SIZE, SIZE), num_context=2, num_target=2, min_gap=4, max_gap=8,
                        gap_warmup_steps=0, batch_size=2, num_workers=0, near=near, far=far),
        optim=OptimConfig(lr=2e-3, warmup_steps=10, max_steps=STEPS, weight_decay=0.0),
        log_every=50, ckpt_every=10_000, image_every=0,
    )
    torch.manual_seed(0)
    before = evaluate(build_model(cfg), test, tmp_path / "before", lpips=False, progress=False, save_renders=False)
    result = train(cfg)
    after = evaluate(result.model, test, tmp_path / "after", lpips=False, progress=False, save_renders=False)
    p0 = before.summary["mean_over_images"]["psnr"]
    p1 = after.summary["mean_over_images"]["psnr"]
    baselines = trivial_baselines(test)
    print(f"held-out PSNR: iLRM {p0:.2f} -> {p1:.2f} dB after {STEPS} steps; " + format_scores(p1, baselines))
    assert p1 > p0 + MARGIN_DB, f"held-out PSNR {p0:.2f} -> {p1:.2f} dB: less than {MARGIN_DB} dB better"
    assert_beats(p1, baselines, MARGINS_DB, f"tiny iLRM after {STEPS} steps")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"][-1]["step"] == STEPS


def test_nearest_view_baselines_are_sound(tmp_path):
    """The reprojection baseline is exact for the source camera itself and matches the copy for near views."""
    root = tmp_path / "syn"
    write_synthetic_dataset(root, "test", num_scenes=1, seed=2, num_views=VIEWS, width=SIZE, height=SIZE, density=0.1)
    index = {k: {"context": [2, 8], "target": [2, 8]} for k, _ in synthetic_scenes(2, 1)}
    (root / "index.json").write_text(json.dumps(index))
    ds = ChunkDataset(ChunkDatasetConfig(roots=[root], split="test", image_shape=(SIZE, SIZE)), EvaluationViewSampler(root / "index.json"))
    ex = ds[0]
    c = ex.context_cameras
    warped = reproject_via_plane(ex.context_images[0], c[0], c[0], axes_centre(c))
    torch.testing.assert_close(warped, ex.context_images[0].float(), atol=1e-4, rtol=0)
    base = trivial_baselines(ds)  # targets are the context views: copying is perfect, the mean colour is not
    assert base["nearest_view"] == float("inf") and base["nearest_reprojected"] > 40 and base["mean_colour"] < 20
    assert base["two_views_reprojected"] > 40  # a target on a context camera takes that view alone
