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

Exact resumption: :class:`FitState` holds everything the loop carries from one step to the next
(raw tensors, each Adam's state dict, the strategy's running statistics, the view-order generator
and the leftover order, the RNG state of the strategy's random draws, the history). Every schedule
(the means' rate, refinement, SH bands) is a function of the absolute step, and the strategy draws
(``split``'s ``torch.randn``, MCMC's relocation and noise) from a private RNG state forked off the
global one, so a fit stopped after step ``k`` and continued from its :class:`FitState` ends
bit-identical to an uninterrupted one on the CPU. Ctrl-C during a step's update (densification,
optimiser steps) is held until the update is complete, so the state handed to ``checkpoint`` on
``KeyboardInterrupt`` is always that of a whole number of steps.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from vision3d.gaussians import Gaussians, num_sh_bases
from vision3d.geometry import Cameras

__all__ = [
    "SceneFitConfig",
    "SceneFitResult",
    "FitState",
    "AppearanceModel",
    "PoseCorrection",
    "fit_view_appearance",
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
    """World scale multiplying the means' learning rate and the densification thresholds; None: 1.1 x the largest distance of a camera centre from their mean (3DGS's ``spatial_lr_scale``)."""

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

    appearance: bool = False
    """Per-image appearance: a learned embedding per training photo, decoded by a small MLP into a colour transform of that photo's render (exposure, white balance, tone), so lighting that differs between photos is not baked into the Gaussians as haze and floaters (gsplat's ``app_opt``, NeRF-W's appearance codes)."""

    appearance_dim: int = 16
    """Length of each photo's appearance embedding (gsplat: 16)."""

    lr_appearance: float = 1e-3
    """Learning rate of the appearance embeddings and MLP (gsplat's ``app_opt_lr``)."""

    appearance_reg: float = 1e-6
    """Weight decay of the appearance embeddings and MLP (gsplat's ``app_opt_reg``)."""

    pose_opt: bool = False
    """Refine each training camera's pose: a learned per-photo rigid correction (translation + 6-D rotation) applied to its cam_to_world, initialised at the identity (gsplat's ``pose_opt``)."""

    lr_pose: float = 1e-5
    """Learning rate of the pose corrections (gsplat's ``pose_opt_lr``)."""

    pose_reg: float = 1e-6
    """Weight decay of the pose corrections (gsplat's ``pose_opt_reg``)."""

    seed: int = 0
    """Seed of the view sampling order (and of the appearance embeddings' initialisation)."""

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
    appearance: "AppearanceModel | None" = None  # config.appearance: the per-photo embeddings and their decoder
    cameras: "Cameras | list[Cameras] | None" = None  # config.pose_opt: the refined training cameras, as given


class AppearanceModel(torch.nn.Module):
    """Per-photo appearance: embedding ``[V, D]`` -> MLP -> an affine colour transform of the render.

    Photo ``v``'s render ``c`` (``[3, H, W]``) becomes ``(I + M_v) c + b_v`` with ``(M_v, b_v)`` decoded
    from its embedding by a two-layer MLP whose last layer starts at zero (the identity). The scene's
    colours are the collection's common appearance; the transform absorbs exposure, white balance and
    tone per photo (gsplat's ``app_opt`` learns the same per-image embedding and MLP, decoding a colour
    per Gaussian; a per-image transform keeps the Gaussians' own colours a plain, exportable scene).
    """

    def __init__(self, num_views: int, dim: int = 16, width: int = 64, generator: torch.Generator | None = None):
        super().__init__()
        if num_views < 1 or dim < 1:
            raise ValueError(f"AppearanceModel: need num_views >= 1 and dim >= 1, got {num_views}, {dim}")
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.embeds = torch.nn.Parameter(0.1 * torch.randn(num_views, dim, generator=gen))  # [V, D]
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.ReLU(), torch.nn.Linear(width, 12))
        with torch.no_grad():  # every weight from ``gen`` (not the global RNG), so a fit is reproducible
            bound = 1.0 / dim**0.5
            self.mlp[0].weight.copy_((torch.rand(width, dim, generator=gen) * 2 - 1) * bound)
            self.mlp[0].bias.copy_((torch.rand(width, generator=gen) * 2 - 1) * bound)
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def affine(self, codes: Tensor) -> tuple[Tensor, Tensor]:  # [B, D] -> A [B, 3, 3], b [B, 3]
        out = self.mlp(codes)
        A = torch.eye(3, dtype=out.dtype, device=out.device) + out[:, :9].reshape(-1, 3, 3)
        return A, out[:, 9:]

    def apply(self, colors: Tensor, codes: Tensor) -> Tensor:  # [B, 3, H, W], [B, D] -> [B, 3, H, W]
        A, b = self.affine(codes)
        return torch.einsum("bij,bjhw->bihw", A, colors) + b[:, :, None, None]

    def mean_code(self) -> Tensor:  # [D]
        return self.embeds.detach().mean(0)

    def bake(self, g: Gaussians, code: Tensor | None = None) -> Gaussians:
        """The Gaussians with the transform of ``code`` (default: the mean embedding) folded into their SH
        colours (exact for opaque pixels), so a viewer shows the collection's mean appearance."""
        from vision3d.gaussians.gaussians import SH_C0

        code = self.mean_code() if code is None else code
        with torch.no_grad():
            A, b = self.affine(code.reshape(1, -1).to(self.embeds))
            A, b = A[0].to(g.sh), b[0].to(g.sh)
            rgb0 = 0.5 + SH_C0 * g.sh[..., 0, :]
            dc = ((rgb0 @ A.T + b) - 0.5) / SH_C0
            rest = g.sh[..., 1:, :] @ A.T
            return replace(g, sh=torch.cat([dc[..., None, :], rest], -2))


class PoseCorrection(torch.nn.Module):
    """Per-photo rigid corrections ``[V, 9]`` (translation, 6-D rotation offset from the identity), applied on
    the right of each cam_to_world (in the camera's frame), zero at the start (gsplat's ``CameraOptModule``)."""

    def __init__(self, num_views: int):
        super().__init__()
        self.deltas = torch.nn.Parameter(torch.zeros(num_views, 9))

    def forward(self, cam_to_world: Tensor, ids: Tensor) -> Tensor:  # [B, 4, 4] OpenCV, [B] -> [B, 4, 4]
        d = self.deltas[ids]
        a1 = d[:, 3:6] + d.new_tensor([1.0, 0.0, 0.0])
        a2 = d[:, 6:9] + d.new_tensor([0.0, 1.0, 0.0])
        b1 = torch.nn.functional.normalize(a1, dim=-1)  # Gram-Schmidt of the 6-D representation (Zhou et al. 2019)
        b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
        R = torch.stack([b1, b2, torch.cross(b1, b2, dim=-1)], -2)
        T = torch.eye(4, dtype=d.dtype, device=d.device).repeat(d.shape[0], 1, 1)
        T = torch.cat([torch.cat([R, d[:, :3, None]], -1), T[:, 3:]], -2)
        return cam_to_world @ T.to(cam_to_world)


# keys of config_dict() that do not change the fitted Gaussians (a resume may change them)
_RESUME_FREE = ("progress", "log_every")


@dataclass
class FitState:
    """Everything :func:`fit_scene` carries from one step to the next: continue a fit exactly with
    ``fit_scene(state, images, cameras, config)``.

    Tensors are detached copies (on the CPU when handed to a ``checkpoint`` callback).
    :meth:`state_dict` holds only tensors and plain containers, so it round-trips through
    ``torch.save`` / ``torch.load(weights_only=True)``.
    """

    step: int  # steps done
    steps: int  # total steps of the run (the schedules depend on it)
    config: dict  # config_dict() of the fit's SceneFitConfig, checked on resume
    device_type: str  # "cpu" or "cuda": the device whose RNG the strategy draws from
    params: dict[str, Tensor]  # raw tensors as in params_from_gaussians (means [N, 3], ... shN [N, K-1, 3])
    optimizers: dict[str, dict]  # each parameter's Adam state_dict()
    strategy: dict[str, Any] | None  # the densification strategy's running state (tensors, floats) or None
    order: list[int]  # views drawn from the permutation generator but not used yet
    order_rng: Tensor  # [S] uint8, the view-order torch.Generator's state
    strategy_rng: Tensor  # [S] uint8, the RNG state the strategy draws from (its device's generator)
    history: list[dict] = field(default_factory=list)  # the history entries so far
    time_s: float = 0.0  # optimisation time so far
    modules: dict[str, dict] = field(default_factory=dict)  # "appearance"/"pose": {"state": state_dict, "optim": Adam's}

    _KEYS = ("step", "steps", "config", "device_type", "params", "optimizers", "strategy", "order", "order_rng",
             "strategy_rng", "history", "time_s", "modules")
    _OPTIONAL = ("modules",)

    def gaussians(self) -> Gaussians:
        """The fitted scene at this state (activated values, detached, every SH band)."""
        with torch.no_grad():
            return gaussians_from_params(self.params).detach()

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._KEYS}

    @classmethod
    def from_state_dict(cls, data: dict, source: str = "fit state") -> "FitState":
        """Check and wrap a :meth:`state_dict` (e.g. read back with ``torch.load(weights_only=True)``)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a dict of fit state, got {type(data).__name__}")
        missing = [k for k in cls._KEYS if k not in data and k not in cls._OPTIONAL]
        if missing:
            raise ValueError(f"{source}: not a scene-fit state (missing {', '.join(missing)})")
        want = {"means", "scales", "quats", "opacities", "sh0", "shN"}
        params, opts = data["params"], data["optimizers"]
        tensors = isinstance(params, dict) and all(isinstance(v, Tensor) for v in params.values())
        if not tensors or set(params) != want:
            got = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"{source}: params must be tensors named {sorted(want)}, got {got}")
        n = {k: v.shape[0] for k, v in params.items()}
        if len(set(n.values())) != 1:
            raise ValueError(f"{source}: params disagree on the number of Gaussians: {n}")
        if not isinstance(opts, dict) or set(opts) != want:
            raise ValueError(f"{source}: optimizers must be one Adam state dict per parameter {sorted(want)}")
        step, steps = int(data["step"]), int(data["steps"])
        if not 0 <= step <= steps:
            raise ValueError(f"{source}: step {step} is outside [0, {steps}]")
        return cls(**{k: data[k] for k in cls._KEYS if k in data})

    def to(self, device: torch.device | str) -> "FitState":
        """A copy with the parameters and the strategy's tensors on ``device`` (optimiser moments follow
        the parameters when loaded)."""
        move = lambda v: v.to(device) if isinstance(v, Tensor) else v  # noqa: E731
        strategy = None if self.strategy is None else {k: move(v) for k, v in self.strategy.items()}
        return replace(self, params={k: v.to(device) for k, v in self.params.items()}, strategy=strategy)


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
@contextlib.contextmanager
def _hold_sigint():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise ``KeyboardInterrupt``; a no-op off the main
    thread or when someone else handles SIGINT."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


@contextlib.contextmanager
def _private_rng(device: torch.device, holder: dict):
    """Run the block with ``device``'s global RNG set to ``holder["state"]``; store the state it leaves in
    ``holder["state"]`` and give the global RNG back untouched (the strategy's draws are the fit's own)."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if cuda:
            torch.cuda.set_rng_state(holder["state"], device)
        else:
            torch.set_rng_state(holder["state"])
        yield
        holder["state"] = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()


def _snapshot(value):
    """Detached CPU copies of the tensors in nested dicts/lists/tuples (plain values kept)."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


def fit_scene(
    init: Gaussians | FitState,  # unbatched, N Gaussians (never modified), or the state of a fit to continue
    images: Tensor | Sequence[Tensor],  # [V, 3, H, W] float32 in [0, 1] training views, or V of [3, H_i, W_i]
    cameras: Cameras | Sequence[Cameras],  # batch [V] (OpenCV cam_to_world, K in pixels, W x H), or V of batch [1]
    config: SceneFitConfig | None = None,
    callback: Callable[[int, Gaussians, dict], None] | None = None,  # called at every history entry
    *,
    checkpoint: Callable[[FitState], None] | None = None,
    checkpoint_every: int = 0,
) -> SceneFitResult:
    """Optimise a Gaussian scene so its renders match ``images`` from ``cameras``.

    Returns the fitted Gaussians (activated, detached, on ``init``'s device) and the history
    (every ``config.log_every`` steps: training loss and PSNR of that step's batch). Photos of
    different sizes come as lists (one image and one camera each; ``batch_views`` must then be 1, as
    in gsplat's trainer); ``config.appearance`` and ``config.pose_opt`` add per-photo appearance
    embeddings and pose corrections, returned in the result. ``callback(step, gaussians, entry)``
    is called at every history entry (a viewer's hook).

    ``init`` may be a :class:`FitState` (from ``checkpoint``, moved with :meth:`FitState.to` to the
    device to run on); the fit then continues at its step with the same ``images``, ``cameras`` and
    ``config`` (refused when a field that changes the result differs) and ends as the uninterrupted
    fit would. ``checkpoint(state)`` is called after every ``checkpoint_every``-th step (0: never),
    after the last step, and, before re-raising, on ``KeyboardInterrupt`` (with the state of the last
    whole step); the state's tensors are CPU copies the callback may keep.
    """
    from vision3d.render import rasterize

    cfg = config or SceneFitConfig()
    resume = init if isinstance(init, FitState) else None
    listed = isinstance(images, (list, tuple)) or isinstance(cameras, (list, tuple))
    if listed:
        if not (isinstance(images, (list, tuple)) and isinstance(cameras, (list, tuple))) or len(images) != len(cameras):
            raise ValueError("fit_scene: per-photo images and cameras go together, as two lists of the same length")
        for i, (im, c) in enumerate(zip(images, cameras)):
            c.check_images(im[None], f"fit_scene: view {i}", "1")
        sizes = sorted({(c.width, c.height) for c in cameras})
        if cfg.batch_views > 1 and len(sizes) > 1:
            raise ValueError(f"fit_scene: batch_views={cfg.batch_views} needs one image size, the photos have "
                             f"{len(sizes)} ({', '.join(f'{w}x{h}' for w, h in sizes[:4])}); use batch_views=1")
    else:
        cameras.check_images(images, "fit_scene")
    if resume is None and (len(init.batch_shape) != 0 or init.num == 0):
        raise ValueError(f"fit_scene: init must be unbatched with at least one Gaussian, got {init!r}")
    if not 0 <= cfg.sh_degree <= 3:
        raise ValueError(f"SceneFitConfig.sh_degree must be 0..3, got {cfg.sh_degree}")
    if cfg.steps < 0 or cfg.batch_views < 1:
        raise ValueError(f"SceneFitConfig: steps must be >= 0 and batch_views >= 1, got {cfg.steps}, {cfg.batch_views}")
    if checkpoint_every < 0:
        raise ValueError(f"fit_scene: checkpoint_every must be >= 0, got {checkpoint_every}")
    if resume is not None:
        device, out_dtype = resume.params["means"].device, torch.float32
        _check_resume(resume, cfg, device)
        start_params = {k: v.detach().float().clone() for k, v in resume.params.items()}
    else:
        device, out_dtype = init.device, init.dtype
        start_params = {k: v.float() for k, v in params_from_gaussians(init, cfg.sh_degree).items()}
    if listed:
        view_imgs = [im.to(device=device, dtype=torch.float32)[None] for im in images]
        view_cams = [c.to(device=device, dtype=torch.float32) for c in cameras]
        all_cams = Cameras(torch.cat([c.K for c in view_cams]), torch.cat([c.cam_to_world for c in view_cams]),
                           view_cams[0].width, view_cams[0].height)  # poses only (scene scale)
    else:
        images = images.to(device=device, dtype=torch.float32)
        cameras = all_cams = cameras.to(device=device, dtype=torch.float32)
    V = len(images)
    scene_scale = cfg.scene_scale if cfg.scene_scale is not None else camera_scene_scale(all_cams)
    background = torch.tensor(cfg.background, dtype=torch.float32, device=device)

    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in start_params.items()})
    lrs = {
        "means": cfg.lr_means * scene_scale,
        "scales": cfg.lr_scales,
        "quats": cfg.lr_quats,
        "opacities": cfg.lr_opacities,
        "sh0": cfg.lr_sh0,
        "shN": cfg.lr_shN,
    }
    optimizers = {k: torch.optim.Adam([{"params": params[k], "lr": lr, "name": k}], eps=1e-15) for k, lr in lrs.items()}
    strategy, state = _make_strategy(cfg, params, optimizers, scene_scale, device)
    modules: dict[str, torch.nn.Module] = {}
    if cfg.appearance:
        modules["appearance"] = AppearanceModel(V, cfg.appearance_dim, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.pose_opt:
        modules["pose"] = PoseCorrection(V)
    for m in modules.values():
        m.to(device)
    mod_lr = {"appearance": (cfg.lr_appearance, cfg.appearance_reg), "pose": (cfg.lr_pose, cfg.pose_reg)}
    mod_opts = {k: torch.optim.Adam(m.parameters(), lr=mod_lr[k][0], weight_decay=mod_lr[k][1]) for k, m in modules.items()}
    order_gen = torch.Generator().manual_seed(cfg.seed)
    if resume is None:
        start, order, history, time_before = 0, [], [], 0.0
        rng = {"state": torch.Generator(device=device).manual_seed(cfg.seed).get_state()}
    else:
        source = f"fit_scene: resume state at step {resume.step}"
        for k, opt in optimizers.items():
            try:
                opt.load_state_dict(resume.optimizers[k])
            except (ValueError, KeyError, IndexError) as e:
                raise ValueError(f"{source}: optimizer of {k!r} does not fit ({e})") from e
            shapes = {tuple(v.shape) for st in opt.state.values() for v in st.values() if v.ndim > 0}
            if shapes - {tuple(params[k].shape)}:
                want = tuple(params[k].shape)
                raise ValueError(f"{source}: Adam moments of {k!r} are {sorted(shapes)}, the tensor {want}")
        if strategy is not None:
            state = _load_strategy_state(state, resume.strategy, params["means"].shape[0], device, source)
        saved_mods = resume.modules or {}
        if set(saved_mods) != set(modules):
            raise ValueError(f"{source}: it holds modules {sorted(saved_mods)}, the config asks for {sorted(modules)}")
        for k, m in modules.items():
            try:
                m.load_state_dict(saved_mods[k]["state"])
                mod_opts[k].load_state_dict(saved_mods[k]["optim"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ValueError(f"{source}: the {k} module does not fit ({e})") from e
        if any(not 0 <= i < V for i in resume.order):
            raise ValueError(f"{source}: its view order indexes {max(resume.order) + 1} views, images has {V}")
        order_gen.set_state(resume.order_rng)
        start, order, history, time_before = resume.step, list(resume.order), list(resume.history), resume.time_s
        rng = {"state": resume.strategy_rng.clone()}

    def means_lr(step: int) -> float:  # 3DGS's exponential decay, from the absolute step
        return lrs["means"] * cfg.lr_means_final_factor ** (step / max(cfg.steps, 1))

    t0 = time.perf_counter()

    def fit_state(done: int) -> FitState:
        return FitState(
            step=done,
            steps=cfg.steps,
            config=config_dict(cfg),
            device_type=device.type,
            params=_snapshot({k: v.data for k, v in params.items()}),
            optimizers=_snapshot({k: opt.state_dict() for k, opt in optimizers.items()}),
            strategy=_snapshot(state),
            order=list(order),
            order_rng=order_gen.get_state(),
            strategy_rng=_snapshot(rng["state"]),
            history=_snapshot(history),
            time_s=time_before + time.perf_counter() - t0,
            modules={k: {"state": _snapshot(m.state_dict()), "optim": _snapshot(mod_opts[k].state_dict())}
                     for k, m in modules.items()},
        )

    done = saved = start
    bar = None
    if cfg.progress and cfg.steps > start:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="fit", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, cfg.steps):
            # compute: nothing the next step depends on changes here (topping up the order, whole, is idempotent)
            if len(order) < cfg.batch_views:
                with _hold_sigint():
                    order = order + torch.randperm(V, generator=order_gen).tolist()
            idx = order[: cfg.batch_views]
            idx_t = torch.tensor(idx, device=device)
            if listed:
                cams = view_cams[idx[0]] if len(idx) == 1 else Cameras.cat([view_cams[i] for i in idx], 0)
                gt = torch.cat([view_imgs[i] for i in idx])
            else:
                cams, gt = cameras[idx_t], images[idx_t]
            if "pose" in modules:
                cams = replace(cams, cam_to_world=modules["pose"](cams.cam_to_world, idx_t))
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
                "width": cams.width,
                "height": cams.height,
                "n_cameras": len(idx),
                "gaussian_ids": None,
            }
            if strategy is not None:
                strategy.step_pre_backward(params, optimizers, state, step, info)
            pred = out.colors
            if "appearance" in modules:
                pred = modules["appearance"].apply(pred, modules["appearance"].embeds[idx_t])
            l1 = (pred - gt).abs().mean()
            loss = l1 if cfg.ssim_weight == 0 else (1 - cfg.ssim_weight) * l1 + cfg.ssim_weight * _ssim_loss(pred, gt)
            loss.backward()
            # update: Ctrl-C waits until the step is whole
            with _hold_sigint():
                for group in optimizers["means"].param_groups:
                    group["lr"] = means_lr(step)
                if strategy is not None:
                    with _private_rng(device, rng):
                        if cfg.densify == "mcmc":
                            strategy.step_post_backward(params, optimizers, state, step, info, lr=means_lr(step))
                        else:
                            strategy.step_post_backward(params, optimizers, state, step, info)
                for opt in (*optimizers.values(), *mod_opts.values()):
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                order = order[cfg.batch_views :]
                entry = None
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    with torch.no_grad():
                        mse = (pred.detach().clamp(0, 1) - gt).pow(2).mean()
                        psnr = float(-10 * torch.log10(mse.clamp_min(1e-10)))
                    entry = {
                        "step": step + 1,
                        "loss": float(loss.detach()),
                        "psnr": psnr,
                        "num_gaussians": int(params["means"].shape[0]),
                        "lr_means": means_lr(step + 1),
                        "time_s": time_before + time.perf_counter() - t0,
                    }
                    history.append(entry)
                done = step + 1
            if bar is not None:
                if entry is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", psnr=f"{entry['psnr']:.2f}", n=entry["num_gaussians"])
                bar.update(1)
            if entry is not None and callback is not None:
                with torch.no_grad():
                    callback(done, gaussians_from_params(params).detach(), entry)
            due = done == cfg.steps or (checkpoint_every > 0 and done % checkpoint_every == 0)
            if checkpoint is not None and due:
                checkpoint(fit_state(done))
                saved = done
    except KeyboardInterrupt:
        if checkpoint is not None and done != saved:
            checkpoint(fit_state(done))
        raise
    finally:
        if bar is not None:
            bar.close()
    elapsed = time_before + time.perf_counter() - t0
    with torch.no_grad():
        fitted = gaussians_from_params(params).detach().to(out_dtype)
        refined = None
        if "pose" in modules:
            ids = torch.arange(V, device=device)
            c2w = modules["pose"](all_cams.cam_to_world, ids).detach()
            refined = ([replace(c, cam_to_world=c2w[i : i + 1]) for i, c in enumerate(view_cams)] if listed
                       else replace(cameras, cam_to_world=c2w))
    app = modules.get("appearance")
    if app is not None:
        app.requires_grad_(False)
    return SceneFitResult(gaussians=fitted, history=history, time_s=elapsed, steps=cfg.steps, appearance=app,
                          cameras=refined)


def fit_view_appearance(
    appearance: AppearanceModel,
    render: Tensor,  # [3, H, W] the scene's render of the photo (no transform), in [0, 1]
    image: Tensor,  # [3, H, W] the photo, in [0, 1]
    mask: Tensor | None = None,  # [H, W] bool, the pixels to fit on (None: all)
    steps: int = 200,
    lr: float = 0.05,
) -> Tensor:  # [D]
    """The appearance embedding that best explains ``image`` from ``render`` on ``mask`` (L1), the decoder and
    the scene frozen, started at the mean training embedding. The evaluation protocol of collections with
    varying appearance (NeRF-W, Martin-Brualla et al. 2021): fit the held-out photo's code on its left half,
    score its right half."""
    code = appearance.mean_code().clone().requires_grad_(True)
    opt = torch.optim.Adam([code], lr=lr)
    m = torch.ones(image.shape[-2:], dtype=torch.bool, device=image.device) if mask is None else mask
    for _ in range(steps):
        pred = appearance.apply(render[None], code[None])[0]
        loss = (pred - image).abs()[:, m].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return code.detach()


def _check_resume(resume: FitState, cfg: SceneFitConfig, device: torch.device) -> None:
    source = f"fit_scene: resume state at step {resume.step}"
    now = config_dict(cfg)
    diffs = [
        f"{k}: {resume.config.get(k)!r} -> {now[k]!r}"
        for k in now
        if k not in _RESUME_FREE and resume.config.get(k) != now[k]
    ]
    if diffs:
        raise ValueError(f"{source} was fitted with another config; differences: " + "; ".join(diffs))
    if resume.steps != cfg.steps:
        raise ValueError(f"{source}: the run has {resume.steps} steps, config.steps is {cfg.steps}")
    if resume.device_type != device.type:
        raise ValueError(
            f"{source} was fitted on {resume.device_type}; move it with FitState.to() to a {resume.device_type} device"
        )


def _load_strategy_state(fresh: dict, saved: dict | None, n: int, device: torch.device, source: str) -> dict:
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        got = sorted(saved) if isinstance(saved, dict) else saved
        raise ValueError(f"{source}: strategy state must have keys {sorted(fresh)}, got {got}")
    state = {}
    for k, v in saved.items():
        if isinstance(v, Tensor):
            if v.ndim >= 1 and k != "binoms" and v.shape[0] != n:
                raise ValueError(f"{source}: strategy state {k!r} covers {v.shape[0]} Gaussians, the params {n}")
            v = v.to(device, copy=True)
        state[k] = v
    return state


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

