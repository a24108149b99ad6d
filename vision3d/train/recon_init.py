"""Initial Gaussians for test-time refinement from a feed-forward reconstructor (``--init <name>``).

A registered reconstructor whose output holds 3D Gaussians (today iLRM: ``ilrm_re10k``,
``ilrm_dl3dv``, ``ilrm_dl3dv_wide``, ``ilrm_tiny``) runs once on a few of the posed photos; its
Gaussians, mapped back to the photos' world frame, replace the SfM points as the starting scene of
:func:`vision3d.train.scene_fit.fit_scene`. Steps:

1. **Weights**: our safetensors (``vision3d convert ilrm AUTHORS.ckpt OUT.safetensors``, or a
   ``vision3d train`` run / checkpoint folder) or the authors' checkpoint, converted on the fly by the
   model file's converter; loaded strictly.
2. **Context views**: as many as the variant was trained with (:data:`INIT_RECONSTRUCTORS`), chosen by
   farthest-point sampling on the camera centres
   (:func:`vision3d.data.samplers.farthest_point_order`) or spread evenly over the given order.
3. **Resolution**: resize and centre-crop to the training resolution
   (:func:`vision3d.data.preprocess.resize_and_center_crop`, K through :class:`Cameras`), turned to
   portrait when the photos are, then :func:`vision3d.recon.ilrm.crop_to_multiple`.
4. **Frame and scale**: the cameras are put in the frame the model was trained in. iLRM's, read from
   the authors' code (github.com/Gynjn/iLRM: main branch @ 2bca1c1 ``src/dataset/dataset_re10k.py``
   and ``dataset_dl3dv.py``; ``wide`` branch @ 2da9d82 ``dataset.py``): the world becomes the "mean
   context camera" (origin at the mean centre, forward the normalised mean optical axis, down the mean
   down axis made orthogonal to it, right = down x forward), then every translation is divided by the
   largest absolute coordinate of a context centre. The main branch takes that maximum in the
   dataset's original world frame, which depends on where that frame's origin happens to be; we take
   it in the mean-camera frame, as the wide branch does, so the result does not depend on the photos'
   world frame (tested: a similarity of the input moves the output Gaussians by exactly that
   similarity). The output Gaussians go back with the inverse similarity
   (:func:`vision3d.gaussians.transform_gaussians`: means, rotations, scales, SH).
5. **Clean-up**: drop Gaussians below ``min_opacity``, subsample to ``max_gaussians`` (seeded),
   pad / truncate the SH to the refinement's degree.

The forward pass runs under ``torch.no_grad`` with bf16 autocast on CUDA (float32 on the CPU).
Note: iLRM was trained to be rendered on a **white** background (``ILRM.render_kwargs``); the
returned info carries the model's background so the refinement can use the same one.

Written for vision3d (Apache-2.0); the authors' code was read for facts only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from vision3d.gaussians import Gaussians, Similarity, transform_cameras, transform_gaussians
from vision3d.data.transforms import mean_camera_similarity  # the training-time frame lives with the data transforms
from vision3d.geometry import Cameras

log = logging.getLogger(__name__)

__all__ = [
    "InitSpec",
    "INIT_RECONSTRUCTORS",
    "init_from_reconstructor",
    "check_init",
    "load_init_reconstructor",
    "select_context_views",
    "mean_camera_similarity",
]


# ------------------------------------------------------------------ what each reconstructor expects
def _patch_multiple(model: nn.Module) -> int:  # iLRM: image sides must divide patch x viewpoint factor
    return int(model.cfg.patch_size * model.cfg.viewpoint_factor)


@dataclass(frozen=True)
class InitSpec:
    """How to run one registered reconstructor to initialise a scene."""

    image_shape: tuple[int, int]
    """(H, W) the variant was trained at (landscape; turned to portrait for portrait photos)."""
    context_views: int
    """Context views the variant was trained with (the most, where the authors drew a range)."""
    converter: str
    """``module:function`` turning the authors' checkpoint into our state dict."""
    convert_name: str
    """Name of the converter in ``vision3d convert`` (for error messages)."""
    normalize: Callable[[Cameras], Similarity] = mean_camera_similarity
    """World -> the frame and scale the model was trained in, from the context cameras."""
    multiple_of: Callable[[nn.Module], int] = _patch_multiple
    """Image sides must be multiples of this (centre crop)."""
    source: str = ""
    """Where the numbers come from."""


_ILRM_CONVERTER = "vision3d.recon.ilrm:convert_ilrm_checkpoint"
INIT_RECONSTRUCTORS: dict[str, InitSpec] = {
    "ilrm_re10k": InitSpec((256, 256), 2, _ILRM_CONVERTER, "ilrm", source="configs/re10k/ilrm.yaml: 2 views, 256x256"),
    "ilrm_dl3dv": InitSpec(
        (256, 448), 6, _ILRM_CONVERTER, "ilrm",
        source="configs/dl3dv/ilrm.yaml: 2-6 views (the most: 6), 256x448 centre crops",
    ),
    "ilrm_dl3dv_wide": InitSpec(
        (544, 960), 32, _ILRM_CONVERTER, "ilrm",
        source="Gynjn/iLRM wide branch configs/ilrm.yaml: 32 input views, 960x540 resized to 960x544",
    ),
    "ilrm_tiny": InitSpec((64, 64), 2, _ILRM_CONVERTER, "ilrm", source="tests and CPU runs (no released weights)"),
}
"""Reconstructors that output Gaussians and can initialise a scene; a new one (e.g. VolSplat) adds a row."""


def _spec(name: str) -> InitSpec:
    from vision3d import recon

    registered = recon.list_models()
    usable = [n for n in sorted(INIT_RECONSTRUCTORS) if n in registered]
    if name not in registered:
        raise ValueError(
            f"--init {name!r}: no such reconstructor; expected sfm, random or one that outputs Gaussians: "
            f"{', '.join(usable)}"
        )
    if name not in INIT_RECONSTRUCTORS:
        raise ValueError(
            f"--init {name!r}: this reconstructor outputs no 3D Gaussians to start from (a mesh, or depth and "
            f"cameras); reconstructors that do: {', '.join(usable)}"
        )
    return INIT_RECONSTRUCTORS[name]


# ------------------------------------------------------------------ the model
def check_init(name: str, weights: str | Path | None) -> Path:
    """Fail fast (before pose estimation): ``name`` outputs Gaussians and ``weights`` is given and exists."""
    spec = _spec(name)
    if weights is None:
        raise ValueError(
            f"--init {name} needs the model weights (vision3d never downloads them): pass --init-weights PATH, the "
            f"authors' checkpoint or its conversion `vision3d convert {spec.convert_name} AUTHORS.ckpt "
            f"{name}.safetensors`"
        )
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"{path}: --init-weights not found (expected the {name} weights)")
    return path


def load_init_reconstructor(
    name: str, weights: str | Path | None, *, device: torch.device | str = "cpu", model_kwargs: dict | None = None
) -> nn.Module:
    """Build ``name`` and load ``weights`` strictly: our ``.safetensors``, a ``vision3d train`` run or
    checkpoint folder, or the authors' checkpoint (``.ckpt`` / ``.pt`` / ``.pth``, converted here)."""
    import importlib

    from vision3d import recon
    from vision3d.train.checkpoint import load_model_weights
    from vision3d.utils.io import read_checkpoint

    path = check_init(name, weights)
    spec = _spec(name)
    if path.is_dir():
        from vision3d.eval.protocol import load_model_for_eval

        model, cfg = load_model_for_eval(path, name)
        if cfg is not None and cfg.model != name:
            raise ValueError(f"{path}: a run of {cfg.model!r}, not {name!r}; pass --init {cfg.model}")
        return model.to(device).eval()
    state = read_checkpoint(path)
    if path.suffix != ".safetensors":
        module, fn = spec.converter.split(":")
        try:
            state = getattr(importlib.import_module(module), fn)(state)
        except KeyError as e:
            raise ValueError(f"{path}: not a {name} checkpoint in the authors' layout ({e})") from e
    model = recon.create(name, **(model_kwargs or {}))
    load_model_weights(model, state, str(path))
    return model.to(device).eval()


def select_context_views(
    cameras: Cameras,  # batch [V], OpenCV cam_to_world
    count: int,
    how: Literal["farthest", "even"] = "farthest",
) -> list[int]:  # sorted indices into the V views
    """``count`` views: farthest-point sampling on the centres (first: the one farthest from their mean),
    or spread evenly over the given order (centres of ``count`` equal slices)."""
    from vision3d.data.samplers import farthest_point_order

    v = int(cameras.batch_shape[0])
    count = min(int(count), v)
    if count < 1:
        raise ValueError(f"select_context_views: need at least one view, got count={count} of {v}")
    if how == "farthest":
        idx = farthest_point_order(cameras.centers.detach().cpu(), count).tolist()
    elif how == "even":
        idx = [min(v - 1, int((i + 0.5) * v / count)) for i in range(count)]
    else:
        raise ValueError(f"select_context_views: how must be 'farthest' or 'even', got {how!r}")
    return sorted(set(idx))


# ------------------------------------------------------------------ the initialisation
def init_from_reconstructor(
    name: str,
    weights: str | Path | None,
    images: Tensor,  # [V, 3, H, W] in [0, 1]
    cameras: Cameras,  # batch [V], OpenCV cam_to_world, K in pixels, sized W x H
    *,
    device: torch.device | str = "cpu",
    max_gaussians: int,
    sh_degree: int,
    context_views: int | None = None,
    views: Literal["farthest", "even"] = "farthest",
    image_shape: tuple[int, int] | None = None,
    min_opacity: float = 0.005,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
) -> tuple[Gaussians, dict]:
    """Run reconstructor ``name`` on the posed photos; its Gaussians in the photos' world frame.

    Args:
        context_views: views fed to the model (None: as many as the variant was trained with; at most V).
        views: how they are chosen (see :func:`select_context_views`).
        image_shape: (H, W) fed to the model (None: the training resolution, portrait for portrait photos).
        min_opacity: Gaussians below it are dropped (iLRM: ``sigmoid(a - 2)``, so most are not).
        model_kwargs: extra arguments of ``vision3d.recon.create`` (e.g. a trained run's sizes).
        generator: CPU generator of the subsampling (None: seed 0).
        model: ``name`` already built and loaded from ``weights`` by :func:`load_init_reconstructor` (a
            command loads it before its pose stage, so a bad file fails before any work); None loads it here.

    Returns:
        unbatched float32 Gaussians on ``device`` (SH of ``sh_degree``) and a JSON-safe info dict:
        method, weights, context view indices, network size, counts, the world -> model similarity's
        scale and the model's render background.
    """
    t0 = time.perf_counter()
    spec = _spec(name)
    cameras.check_images(images, "init_from_reconstructor")
    V, _, H, W = images.shape
    if max_gaussians < 1:
        raise ValueError(f"init_from_reconstructor: max_gaussians must be >= 1, got {max_gaussians}")
    if not 0 <= sh_degree <= 3:
        raise ValueError(f"init_from_reconstructor: sh_degree must be 0..3, got {sh_degree}")
    if context_views is not None and context_views < 1:
        raise ValueError(f"init_from_reconstructor: context_views must be >= 1, got {context_views}")
    dev = torch.device(device)
    if model is None:
        model = load_init_reconstructor(name, weights, device=dev, model_kwargs=model_kwargs)
    model = model.to(dev)

    from vision3d.data.preprocess import resize_and_center_crop
    from vision3d.recon.ilrm import crop_to_multiple

    n_ctx = min(V, context_views if context_views is not None else spec.context_views)
    idx = select_context_views(cameras, n_ctx, views)
    if image_shape is None:
        h, w = spec.image_shape
        image_shape = (max(h, w), min(h, w)) if H > W else (min(h, w), max(h, w)) if W > H else (h, w)
    sel = torch.tensor(idx, dtype=torch.long)
    x, cams = resize_and_center_crop(images[sel].detach().cpu(), cameras[sel].to("cpu"), tuple(image_shape),
                                     "lanczos")  # [Vc, 3, h, w], batch [Vc]
    x, cams = crop_to_multiple(x[None], cams[None], spec.multiple_of(model))  # [1, Vc, 3, h', w'], batch [1, Vc]
    cams = cams.to(torch.float64)
    to_model = spec.normalize(cams[0])  # world -> the model's training frame
    model_cams = transform_cameras(cams, to_model).to(device=dev, dtype=torch.float32)
    (log.info if progress else log.debug)(
        "initial Gaussians: %s on %d view(s) %s at %dx%d", name, len(idx), idx, x.shape[-1], x.shape[-2]
    )
    with torch.no_grad(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = model(x.to(dev), model_cams)
    if out.gaussians is None:
        raise ValueError(f"--init {name}: the reconstructor returned no Gaussians")
    g = out.gaussians.detach()[0].map(lambda t: t.float())  # unbatched, model frame
    g = transform_gaussians(g, to_model.inverse())  # the photos' world frame
    n_raw = g.num
    g = g.select(g.opacities >= min_opacity)
    n_opaque = g.num
    if n_opaque == 0:
        raise ValueError(
            f"--init {name}: every one of the {n_raw} Gaussians has opacity below min_opacity={min_opacity} "
            "(untrained weights?); lower it or use --init sfm"
        )
    if n_opaque > max_gaussians:
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        keep = torch.randperm(n_opaque, generator=gen)[:max_gaussians].sort().values
        g = g.select(keep.to(g.device))
    g = g.with_sh_degree(sh_degree)
    background = getattr(model, "render_kwargs", {}).get("background")
    info = {
        "method": name,
        "weights": str(weights),
        "context_views": idx,
        "network_size": [int(x.shape[-1]), int(x.shape[-2])],
        "gaussians_raw": n_raw,
        "gaussians_opaque": n_opaque,
        "num_gaussians": g.num,
        "min_opacity": float(min_opacity),
        "model_frame_scale": to_model.scale,
        "background": list(background) if background is not None else None,
        "time_s": time.perf_counter() - t0,
    }
    return g, info
