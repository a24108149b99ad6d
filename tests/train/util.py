"""Engine test helpers: a deterministic in-memory dataset of posed views (mechanics, not quality), and the
kill-then-resume harness of the exact-resume tests, and the trivial baselines every "it learns" test must beat."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from vision3d.data import SampleKey, ViewsExample
from vision3d.eval.metrics import psnr
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


# ------------------------------------------------------------------ trivial baselines of the learning tests
def axes_centre(cams) -> torch.Tensor:  # [3]: least-squares meeting point of the cameras' optical axes
    o = cams.cam_to_world[:, :3, 3].double()
    d = F.normalize(cams.cam_to_world[:, :3, 2].double(), dim=-1)
    P = torch.eye(3, dtype=torch.float64) - d[:, :, None] * d[:, None, :]  # projectors orthogonal to each axis
    return torch.linalg.lstsq(P.sum(0), (P @ o[:, :, None]).sum(0)).solution[:, 0]


def reproject_via_plane(img, src, dst, centre):  # [3, H, W] seen by src -> dst's view; outside -> NaN
    """Warp through the plane facing ``src`` at the scene centre (a plane-induced homography: the best
    a model can do with the cameras but no per-pixel depth)."""
    H, W = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).reshape(-1, 3)  # dst pixel centres
    c2w_d = dst.cam_to_world.double()
    rays = (pix @ torch.linalg.inv(dst.K.double()).T) @ c2w_d[:3, :3].T  # [P, 3] world directions
    n = src.cam_to_world[:3, 2].double()  # plane normal: src's viewing direction
    s = ((centre - c2w_d[:3, 3]) @ n) / (rays @ n)
    X = c2w_d[:3, 3] + s[:, None] * rays  # [P, 3] on the plane
    w2c = src.world_to_cam.double()
    q = (X @ w2c[:3, :3].T + w2c[:3, 3]) @ src.K.double().T
    ok = (s > 0) & (q[:, 2] > 1e-9)
    uv = q[:, :2] / q[:, 2:].clamp(min=1e-9)
    grid = torch.stack([uv[:, 0] / W * 2 - 1, uv[:, 1] / H * 2 - 1], -1).reshape(1, H, W, 2).float()
    out = F.grid_sample(img[None].float(), grid, align_corners=False, padding_mode="zeros")[0]
    inside = (ok & (grid.reshape(-1, 2).abs() <= 1).all(-1)).reshape(H, W)
    return torch.where(inside, out, torch.full_like(out, float("nan")))


BASELINES = ("mean_colour", "nearest_view", "nearest_reprojected", "two_views_reprojected")


def trivial_baselines(dataset) -> dict[str, float]:
    """Mean held-out PSNR of the colour-only baselines, over the same target views as ``evaluate``.

    ``mean_colour``: every pixel the mean context colour. ``nearest_view``: the context view whose camera
    centre is nearest, copied. ``nearest_reprojected``: that view warped through the plane facing it at the
    point the context cameras look at (pixels it does not cover: the mean colour). ``two_views_reprojected``:
    the two nearest context views warped the same way and averaged with inverse-distance weights (a pixel
    covered by one only takes that one; by none, the mean colour) -- under PSNR a blend of two misaligned
    guesses beats either, so this is the strongest of the four when the target lies between two views."""
    scores: dict[str, list[float]] = {k: [] for k in BASELINES}
    for i in range(len(dataset)):
        ex = dataset[i]
        ctx, gt = ex.context_images.float(), ex.target_images.float()  # [Vc, 3, H, W], [Vt, 3, H, W]
        mean = ctx.mean(dim=(0, 2, 3))[:, None, None]  # [3, 1, 1]
        centres_c = ex.context_cameras.cam_to_world[:, :3, 3]
        centre = axes_centre(ex.context_cameras)  # the point the context cameras look at
        for j in range(gt.shape[0]):
            tgt = ex.target_cameras[j]
            dist = torch.cdist(tgt.cam_to_world[None, :3, 3], centres_c)[0].double()  # [Vc]
            order = dist.argsort()[:2].tolist()
            k = order[0]
            warped = [reproject_via_plane(ctx[v], ex.context_cameras[v], tgt, centre) for v in order]
            if dist[k] < 1e-9:  # the target is a context camera: all weight on it
                weights = [1.0] + [0.0] * (len(order) - 1)
            else:
                inv = [1.0 / float(dist[v]) for v in order]
                weights = [w / sum(inv) for w in inv]
            num = sum(w * torch.nan_to_num(im, nan=0.0) for w, im in zip(weights, warped))
            den = sum(w * (~torch.isnan(im[:1])).float() for w, im in zip(weights, warped))
            blend = torch.where(den > 0, num / den.clamp(min=1e-12), mean.expand_as(num))
            preds = {
                "mean_colour": mean.expand_as(gt[j]),
                "nearest_view": ctx[k],
                "nearest_reprojected": torch.where(torch.isnan(warped[0]), mean.expand_as(warped[0]), warped[0]),
                "two_views_reprojected": blend,
            }
            for name, pred in preds.items():
                scores[name].append(float(psnr(pred[None].clamp(0, 1), gt[j][None])))
    return {k: sum(v) / len(v) for k, v in scores.items()}


def format_scores(model_psnr: float, baselines: dict[str, float]) -> str:
    return f"model {model_psnr:.2f} dB; " + ", ".join(f"{k} {v:.2f} ({model_psnr - v:+.2f})" for k, v in baselines.items())


def assert_beats(model_psnr: float, baselines: dict[str, float], margins: dict[str, float], what: str) -> None:
    """``model_psnr > baselines[name] + margin`` for each ``name, margin`` of ``margins``, with one message
    listing every score and the lead over each baseline."""
    failed = [f"{n} {baselines[n]:.2f} dB + {m} dB" for n, m in margins.items() if not model_psnr > baselines[n] + m]
    assert not failed, f"{what}: held-out PSNR does not beat " + "; ".join(failed) + " (" + format_scores(model_psnr, baselines) + ")"
