"""Test-time optimisation of a Gaussian scene to posed images (per-scene 3DGS fitting).

The recipe is that of 3D Gaussian Splatting (Kerbl, Kopanas, Leimkühler, Drettakis, SIGGRAPH 2023,
arXiv 2308.04079; graphdeco-inria/gaussian-splatting, ``train.py`` and ``arguments/__init__.py``,
non-commercial research licence) as carried over by gsplat's ``examples/simple_trainer.py``
(nerfstudio-project/gsplat v1.5.3, Apache-2.0):

- the optimised tensors are the *raw* parameters: ``means``, log ``scales``, unnormalised ``quats``
  (wxyz; the renderer normalises), logit ``opacities``, ``sh0`` (DC) and ``shN`` (higher bands);
- one Adam optimiser per tensor (``eps = 1e-15``) with per-tensor learning rates; the means' rate is
  multiplied by the scene scale and decays exponentially to ``lr_means_final_factor`` of its
  initial value over the run (3DGS's ``get_expon_lr_func`` without delay);
- loss ``(1 - lambda) * L1 + lambda * (1 - SSIM)`` with ``lambda = 0.2``; SSIM is
  :func:`vision3d.eval.metrics.ssim` (kornia's 11x11 Gaussian window, "same" padding as in 3DGS's
  loss, differentiable);
- SH bands are switched on one at a time every ``sh_degree_interval`` steps;
- optional densification: gsplat's ``DefaultStrategy`` (clone/split/prune/opacity reset, pure
  PyTorch, so it also runs on the CPU with the torch renderer) or ``MCMCStrategy`` (needs gsplat's
  CUDA relocation kernel). The strategy receives the ``means2d``/``radii`` that
  :func:`vision3d.render.rasterize` returns, in gsplat's ``info`` layout.

Rendering goes through :func:`vision3d.render.rasterize` (gsplat on a GPU, the PyTorch twin on the
CPU), so this is one library function reused by ``vision3d demo`` and ``vision3d reconstruct``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from vision3d.gaussians import Gaussians, num_sh_bases
from vision3d.geometry import Cameras

__all__ = [
    "SceneFitConfig",
    "SceneFitResult",
    "fit_scene",
    "params_from_gaussians",
    "gaussians_from_params",
    "gaussians_from_points",
    "camera_scene_scale",
    "config_dict",
]


@dataclass
class SceneFitConfig:
    steps: int = 3000
    """Optimisation steps (one step = one batch of ``batch_views`` training views)."""

    batch_views: int = 1
    """Training views rendered per step (3DGS uses 1)."""

    lr_means: float = 1.6e-4
    """Initial learning rate of the means, multiplied by the scene scale (3DGS: 1.6e-4)."""

    lr_means_final_factor: float = 0.01
    """The means' learning rate decays exponentially to this fraction of its start by the last step."""

    lr_scales: float = 5e-3
    """Learning rate of the log-scales (3DGS: 5e-3)."""

    lr_quats: float = 1e-3
    """Learning rate of the raw quaternions (3DGS: 1e-3)."""

    lr_opacities: float = 5e-2
    """Learning rate of the logit opacities (3DGS/gsplat: 5e-2)."""

    lr_sh0: float = 2.5e-3
    """Learning rate of the DC SH coefficients (3DGS: 2.5e-3)."""

    lr_shN: float = 2.5e-3 / 20
    """Learning rate of the higher SH bands (3DGS: DC rate / 20)."""

    ssim_weight: float = 0.2
    """Weight ``lambda`` of the D-SSIM term; 0 gives a plain L1 loss (cheaper on the CPU)."""

    sh_degree: int = 0
    """Largest SH degree fitted (0..3)."""

    sh_degree_interval: int = 1000
    """Steps between switching on successive SH bands."""

    scene_scale: float | None = None
    """World scale multiplying the means' learning rate and the densification thresholds; None:
    1.1 x the largest distance of a camera centre from their mean (3DGS's ``spatial_lr_scale``)."""

    densify: Literal["none", "default", "mcmc"] = "none"
    """Densification: none, gsplat's DefaultStrategy (CPU or GPU), or MCMCStrategy (GPU only)."""

    refine_start: int = 500
    """First step at which the strategy grows/prunes Gaussians."""

    refine_stop: int = 15_000
    """Last step at which it does."""

    refine_every: int = 100
    """Steps between refinements."""

    reset_every: int = 3000
    """DefaultStrategy: steps between opacity resets."""

    grow_grad2d: float = 2e-4
    """DefaultStrategy: screen-space gradient threshold for cloning/splitting."""

    cap_max: int = 1_000_000
    """MCMCStrategy: the most Gaussians it may grow to."""

    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Background colour composited behind the Gaussians, RGB in [0, 1]; must match the images'."""

    rasterize_mode: Literal["classic", "antialiased"] = "classic"
    """Rasterizer opacity handling (see :func:`vision3d.render.rasterize`)."""

    backend: Literal["auto", "gsplat", "torch"] = "auto"
    """Renderer backend: auto picks gsplat on CUDA, else the PyTorch twin."""

    seed: int = 0
    """Seed of the view sampling order."""

    log_every: int = 10
    """Steps between entries of the history (and progress-bar updates)."""

    progress: bool = True
    """Show a tqdm progress bar with loss and PSNR."""


@dataclass
class SceneFitResult:
    gaussians: Gaussians  # the fitted scene (activated values, detached)
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "psnr", "num_gaussians", "lr_means", "time_s"}
    time_s: float = 0.0  # wall time of the optimisation loop
    steps: int = 0


# ------------------------------------------------------------------ parameters
_EPS = 1e-6


def params_from_gaussians(g: Gaussians, sh_degree: int | None = None) -> dict[str, Tensor]:
    """Raw (unconstrained) tensors of unbatched Gaussians, gsplat's parameter names.

    ``means [N, 3]``, ``scales [N, 3]`` log, ``quats [N, 4]`` wxyz, ``opacities [N]`` logit,
    ``sh0 [N, 1, 3]``, ``shN [N, K-1, 3]`` (``K = (sh_degree + 1)^2``, padded with zeros).
    """
    if len(g.batch_shape) != 0:
        raise ValueError(f"params_from_gaussians: expected unbatched Gaussians, got batch {tuple(g.batch_shape)}")
    deg = g.sh_degree if sh_degree is None else sh_degree
    g = g.with_sh_degree(deg)
    op = g.opacities.clamp(_EPS, 1 - _EPS)
    return {
        "means": g.means.detach().clone(),
        "scales": g.scales.clamp_min(1e-10).log().detach(),
        "quats": g.quats.detach().clone(),
        "opacities": torch.log(op / (1 - op)).detach(),
        "sh0": g.sh[:, :1].detach().clone(),
        "shN": g.sh[:, 1:].detach().clone(),
    }


def gaussians_from_params(params, active_sh_degree: int | None = None) -> Gaussians:
    """Activated :class:`Gaussians` (differentiable) from raw tensors named as in :func:`params_from_gaussians`.

    With ``active_sh_degree`` the bands above it are dropped (for the SH warm-up schedule).
    """
    sh = torch.cat([params["sh0"], params["shN"]], 1)
    if active_sh_degree is not None:
        sh = sh[:, : num_sh_bases(active_sh_degree)]
    return Gaussians(
        means=params["means"],
        quats=params["quats"],
        scales=params["scales"].exp(),
        opacities=torch.sigmoid(params["opacities"]),
        sh=sh,
    )


def gaussians_from_points(
    points: Tensor,  # [N, 3] world
    rgb: Tensor,  # [N, 3] in [0, 1]
    opacity: float = 0.1,
    sh_degree: int = 0,
    knn: int = 3,
    scale_factor: float = 1.0,
    chunk: int = 4096,
) -> Gaussians:
    """Isotropic Gaussians on points, 3DGS's initialisation from a point cloud.

    Each scale is ``scale_factor`` x the RMS distance to the ``knn`` nearest other points;
    rotations are the identity, opacities ``opacity``, colours the DC SH of ``rgb``.
    """
    if points.ndim != 2 or points.shape[-1] != 3:
        raise ValueError(f"gaussians_from_points: points must be [N, 3], got {tuple(points.shape)}")
    if rgb.shape != points.shape:
        raise ValueError(f"gaussians_from_points: rgb must be [N, 3] like points, got {tuple(rgb.shape)}")
    n = points.shape[0]
    if n < 2:
        raise ValueError(f"gaussians_from_points: need at least 2 points, got {n}")
    k = min(knn, n - 1)
    d2 = []
    for i in range(0, n, chunk):
        d = torch.cdist(points[i : i + chunk], points).pow(2)  # [c, N]
        d2.append(d.topk(k + 1, dim=-1, largest=False).values[:, 1:])  # drop the point itself
    dist = torch.cat(d2).mean(-1).clamp_min(1e-14).sqrt() * scale_factor  # [N]
    quats = torch.zeros(n, 4, dtype=points.dtype, device=points.device)
    quats[:, 0] = 1.0
    return Gaussians.from_rgb(
        points,
        quats,
        dist[:, None].expand(n, 3).clone(),
        torch.full((n,), float(opacity), dtype=points.dtype, device=points.device),
        rgb.to(points.dtype).clamp(0, 1),
        sh_degree=sh_degree,
    )


def camera_scene_scale(cameras: Cameras) -> float:
    """1.1 x the largest distance of a camera centre from the mean centre (3DGS's scene extent)."""
    c = cameras.flatten().centers
    if c.shape[0] < 2:
        return 1.0
    r = float((c - c.mean(0)).norm(dim=-1).max()) * 1.1
    return r if r > 0 else 1.0


def _ssim_loss(pred: Tensor, gt: Tensor) -> Tensor:  # [B, 3, H, W] x2 in [0, 1] -> scalar
    from vision3d.eval.metrics import ssim

    return 1.0 - ssim(pred, gt, window_size=11, padding="same").mean()


# ------------------------------------------------------------------ the loop
def fit_scene(
    init: Gaussians,  # unbatched, N Gaussians: the starting point (never modified)
    images: Tensor,  # [V, 3, H, W] float32 in [0, 1] training views
    cameras: Cameras,  # batch [V], OpenCV cam_to_world, K in pixels, width/height = W/H
    config: SceneFitConfig | None = None,
    callback: Callable[[int, Gaussians, dict], None] | None = None,  # called at every history entry
) -> SceneFitResult:
    """Optimise a Gaussian scene so its renders match ``images`` from ``cameras``.

    Returns the fitted Gaussians (activated, detached, on ``init``'s device) and the history
    (every ``config.log_every`` steps: training loss and PSNR of that step's batch).
    """
    from vision3d.render import rasterize

    cfg = config or SceneFitConfig()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"fit_scene: images must be [V, 3, H, W], got {tuple(images.shape)}")
    if tuple(cameras.batch_shape) != (images.shape[0],):
        raise ValueError(
            f"fit_scene: cameras batch {tuple(cameras.batch_shape)} must be [V] = [{images.shape[0]}] like images"
        )
    if (cameras.height, cameras.width) != tuple(images.shape[-2:]):
        raise ValueError(
            f"fit_scene: cameras are {cameras.width}x{cameras.height} but images are "
            f"{images.shape[-1]}x{images.shape[-2]} (W x H)"
        )
    if len(init.batch_shape) != 0 or init.num == 0:
        raise ValueError(f"fit_scene: init must be unbatched with at least one Gaussian, got {init!r}")
    if not 0 <= cfg.sh_degree <= 3:
        raise ValueError(f"SceneFitConfig.sh_degree must be 0..3, got {cfg.sh_degree}")
    if cfg.steps < 0 or cfg.batch_views < 1:
        raise ValueError(f"SceneFitConfig: steps must be >= 0 and batch_views >= 1, got {cfg.steps}, {cfg.batch_views}")
    device = init.device
    images = images.to(device=device, dtype=torch.float32)
    cameras = cameras.to(device=device, dtype=torch.float32)
    V = images.shape[0]
    scene_scale = cfg.scene_scale if cfg.scene_scale is not None else camera_scene_scale(cameras)
    background = torch.tensor(cfg.background, dtype=torch.float32, device=device)

    params = torch.nn.ParameterDict(
        {k: torch.nn.Parameter(v.float()) for k, v in params_from_gaussians(init, cfg.sh_degree).items()}
    )
    lrs = {
        "means": cfg.lr_means * scene_scale,
        "scales": cfg.lr_scales,
        "quats": cfg.lr_quats,
        "opacities": cfg.lr_opacities,
        "sh0": cfg.lr_sh0,
        "shN": cfg.lr_shN,
    }
    optimizers = {k: torch.optim.Adam([{"params": params[k], "lr": lr, "name": k}], eps=1e-15) for k, lr in lrs.items()}
    gamma = cfg.lr_means_final_factor ** (1.0 / max(cfg.steps, 1))

    strategy, state = _make_strategy(cfg, params, optimizers, scene_scale, device)

    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    history: list[dict] = []
    bar = None
    if cfg.progress and cfg.steps > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="fit", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(cfg.steps):
            if len(order) < cfg.batch_views:
                order += torch.randperm(V, generator=gen).tolist()
            idx, order = order[: cfg.batch_views], order[cfg.batch_views :]
            idx_t = torch.tensor(idx, device=device)
            cams = cameras[idx_t]
            gt = images[idx_t]
            active_deg = min(cfg.sh_degree, step // max(cfg.sh_degree_interval, 1))
            g = gaussians_from_params(params, active_deg)
            out = rasterize(
                g,
                cams,
                sh_degree=active_deg,
                background=background,
                mode="RGB",
                rasterize_mode=cfg.rasterize_mode,
                backend=cfg.backend,
            )
            info = {
                "means2d": out.means2d,
                "radii": out.radii,
                "width": cameras.width,
                "height": cameras.height,
                "n_cameras": len(idx),
                "gaussian_ids": None,
            }
            if strategy is not None:
                strategy.step_pre_backward(params, optimizers, state, step, info)
            pred = out.colors
            l1 = (pred - gt).abs().mean()
            loss = l1 if cfg.ssim_weight == 0 else (1 - cfg.ssim_weight) * l1 + cfg.ssim_weight * _ssim_loss(pred, gt)
            loss.backward()
            if strategy is not None:
                if cfg.densify == "mcmc":
                    strategy.step_post_backward(params, optimizers, state, step, info, lr=optimizers["means"].param_groups[0]["lr"])
                else:
                    strategy.step_post_backward(params, optimizers, state, step, info)
            for opt in optimizers.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            for group in optimizers["means"].param_groups:
                group["lr"] *= gamma
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                with torch.no_grad():
                    mse = (pred.detach().clamp(0, 1) - gt).pow(2).mean()
                    psnr = float(-10 * torch.log10(mse.clamp_min(1e-10)))
                entry = {
                    "step": step + 1,
                    "loss": float(loss.detach()),
                    "psnr": psnr,
                    "num_gaussians": int(params["means"].shape[0]),
                    "lr_means": float(optimizers["means"].param_groups[0]["lr"]),
                    "time_s": time.perf_counter() - t0,
                }
                history.append(entry)
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", psnr=f"{psnr:.2f}", n=entry["num_gaussians"])
                if callback is not None:
                    with torch.no_grad():
                        callback(step + 1, gaussians_from_params(params).detach(), entry)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        fitted = gaussians_from_params(params).detach().to(init.dtype)
    return SceneFitResult(gaussians=fitted, history=history, time_s=elapsed, steps=cfg.steps)


def _make_strategy(cfg: SceneFitConfig, params, optimizers, scene_scale: float, device: torch.device):
    if cfg.densify == "none":
        return None, None
    if cfg.densify == "default":
        from gsplat.strategy import DefaultStrategy

        strategy = DefaultStrategy(
            refine_start_iter=cfg.refine_start,
            refine_stop_iter=cfg.refine_stop,
            refine_every=cfg.refine_every,
            reset_every=cfg.reset_every,
            grow_grad2d=cfg.grow_grad2d,
            absgrad=False,
        )
        strategy.check_sanity(params, optimizers)
        return strategy, strategy.initialize_state(scene_scale=scene_scale)
    if cfg.densify == "mcmc":
        if device.type != "cuda":
            raise ValueError(
                "SceneFitConfig.densify='mcmc' needs gsplat's CUDA relocation kernel; use 'default' or 'none' on the CPU"
            )
        from gsplat.strategy import MCMCStrategy

        strategy = MCMCStrategy(
            cap_max=cfg.cap_max,
            refine_start_iter=cfg.refine_start,
            refine_stop_iter=cfg.refine_stop,
            refine_every=cfg.refine_every,
        )
        strategy.check_sanity(params, optimizers)
        return strategy, strategy.initialize_state()
    raise ValueError(f"SceneFitConfig.densify: {cfg.densify!r} is not 'none', 'default' or 'mcmc'")


def config_dict(cfg: SceneFitConfig) -> dict:
    """The config as plain JSON/YAML-able values."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}

