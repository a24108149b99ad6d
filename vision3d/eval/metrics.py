"""Image metrics: PSNR, SSIM and LPIPS, per image, on channels-first images in ``[0, 1]``.

- PSNR: ``10 log10(max_val^2 / MSE)`` over each image's channels and pixels.
- SSIM: Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity"
  (IEEE TIP 2004), through :func:`kornia.metrics.ssim` (Apache-2.0): Gaussian window of 11 taps,
  sigma 1.5, ``c1 = (0.01 L)^2``, ``c2 = (0.03 L)^2``. With ``padding="valid"`` (the default) the map
  excludes the 5-pixel border, as scikit-image's ``structural_similarity(gaussian_weights=True,
  use_sample_covariance=False)`` does; that is the protocol of the feed-forward 3DGS papers
  (pixelSplat, arXiv 2312.12337, and MVSplat, arXiv 2403.14627, evaluate with scikit-image).
  ``padding="same"`` keeps the border with reflect padding.
- LPIPS: Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"
  (CVPR 2018, arXiv 1801.03924), through the ``lpips`` package (richzhang/PerceptualSimilarity,
  BSD-2-Clause), version 0.1 linear heads (shipped inside that package). Its backbone is torchvision's
  ImageNet VGG16 or AlexNet, which torchvision would download into the torch hub cache on first use;
  here nothing is downloaded: :func:`lpips_available` checks the cache and :func:`lpips` raises
  :class:`LPIPSWeightsMissing` saying which file to put where.

Images are ``[..., C, H, W]`` (e.g. ``[B, V, 3, H, W]``); every metric returns one value per image,
``[...]``.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from vision3d.utils.optional import install_line, require

__all__ = [
    "psnr",
    "ssim",
    "lpips",
    "lpips_available",
    "lpips_weight_paths",
    "lpips_missing_message",
    "LPIPSWeightsMissing",
    "Metrics",
]

LpipsNet = Literal["vgg", "alex"]

# torchvision ImageNet checkpoints used by lpips.pretrained_networks (torchvision's IMAGENET1K_V1 weights)
_BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}


def _check_pair(pred: Tensor, target: Tensor, what: str) -> None:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{what}: expected tensors, got {type(pred).__name__} and {type(target).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"{what}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.ndim < 3:
        raise ValueError(f"{what}: expected channels-first images [..., C, H, W], got {tuple(pred.shape)}")


# ---------------------------------------------------------------------------------------- PSNR
def psnr(
    pred: Tensor,  # [..., C, H, W] in [0, max_val]
    target: Tensor,  # [..., C, H, W] in [0, max_val]
    *,
    max_val: float = 1.0,
) -> Tensor:  # [...] dB; +inf where the images are identical
    """Peak signal-to-noise ratio of each image (MSE over channels and pixels), in float32 or wider."""
    _check_pair(pred, target, "psnr")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    mse = (pred.to(dtype) - target.to(dtype)).square().mean(dim=(-3, -2, -1))
    return 10.0 * torch.log10(max_val**2 / mse)


# ---------------------------------------------------------------------------------------- SSIM
def ssim(
    pred: Tensor,  # [..., C, H, W] in [0, max_val]
    target: Tensor,  # [..., C, H, W] in [0, max_val]
    *,
    window_size: int = 11,
    max_val: float = 1.0,
    padding: Literal["valid", "same"] = "valid",
) -> Tensor:  # [...] mean SSIM of each image
    """Structural similarity of each image, averaged over channels and pixels (see module docstring)."""
    _check_pair(pred, target, "ssim")
    kornia = require("kornia", "SSIM")
    h, w = pred.shape[-2:]
    if padding == "valid" and (h < window_size or w < window_size):
        raise ValueError(f"ssim: images of {h}x{w} are smaller than the {window_size}-pixel window")
    lead = pred.shape[:-3]
    c = pred.shape[-3]
    a = pred.reshape(-1, c, h, w)
    b = target.reshape(-1, c, h, w)
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    smap = kornia.metrics.ssim(a.to(dtype), b.to(dtype), window_size, max_val=float(max_val), eps=0.0, padding=padding)
    return smap.mean(dim=(-3, -2, -1)).reshape(lead)


# ---------------------------------------------------------------------------------------- LPIPS
class LPIPSWeightsMissing(FileNotFoundError):
    """The ImageNet backbone weights LPIPS needs are not on disk (and are never downloaded here)."""


def _hub_checkpoints_dir() -> Path:
    """Where torchvision looks for (and would download) checkpoints: ``torch.hub.get_dir()/checkpoints``.

    ``torch.hub.get_dir()`` is ``$TORCH_HOME/hub``; ``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch``,
    i.e. ``~/.cache/torch``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def _check_net(net: str) -> None:
    if net not in _BACKBONE_FILES:
        raise ValueError(f"lpips: net must be 'vgg' or 'alex', got {net!r}")


def lpips_weight_paths(net: LpipsNet = "vgg") -> dict[str, Path]:
    """Files LPIPS(``net``) reads: ``backbone`` (torchvision, hub cache) and ``linear`` (lpips package).

    ``linear`` is present only when the ``lpips`` package is installed.
    """
    _check_net(net)
    out = {"backbone": _hub_checkpoints_dir() / _BACKBONE_FILES[net][0]}
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        out["linear"] = Path(spec.origin).parent / "weights" / "v0.1" / f"{net}.pth"
    return out


def lpips_available(net: LpipsNet = "vgg") -> bool:
    """True when the ``lpips`` package and every weight file LPIPS(``net``) needs are on disk.

    Checks files only: nothing is imported from torchvision's model zoo and nothing is downloaded.
    """
    paths = lpips_weight_paths(net)
    return "linear" in paths and all(p.is_file() for p in paths.values())


def lpips_missing_message(net: LpipsNet = "vgg") -> str:
    """What LPIPS(``net``) lacks on this machine and where to put it (one line per missing item)."""
    _check_net(net)
    paths = lpips_weight_paths(net)
    name, url = _BACKBONE_FILES[net]
    lines = [f"LPIPS(net={net!r}) needs files that are not on disk (nothing is downloaded at run time):"]
    if "linear" not in paths:
        lines.append(f"  - the lpips package: {install_line('lpips')}")
    if not paths["backbone"].is_file():
        lines.append(
            f"  - torchvision's ImageNet {'VGG16' if net == 'vgg' else 'AlexNet'} weights: place {name} "
            f"(from {url}) at {paths['backbone']}  (torch hub cache = $TORCH_HOME/hub/checkpoints; "
            f"TORCH_HOME defaults to ~/.cache/torch)"
        )
    if "linear" in paths and not paths["linear"].is_file():
        lines.append(
            f"  - the LPIPS v0.1 linear heads: {paths['linear']} (reinstall with: pip install --force-reinstall lpips)"
        )
    lines.append("Metrics without LPIPS (PSNR, SSIM) do not need them.")
    return "\n".join(lines)


_missing_message = lpips_missing_message  # the name vision3d.train.engine uses


@functools.lru_cache(maxsize=4)
def _lpips_model(net: str, device: str, random_backbone: bool = False) -> torch.nn.Module:
    lp = require("lpips", "the LPIPS metric")
    if not random_backbone and not lpips_available(net):
        raise LPIPSWeightsMissing(lpips_missing_message(net))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning)  # torchvision's 'pretrained' deprecation
        model = lp.LPIPS(net=net, version="0.1", pnet_rand=random_backbone, verbose=False)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lpips(
    pred: Tensor,  # [..., 3, H, W] in [0, 1]
    target: Tensor,  # [..., 3, H, W] in [0, 1]
    *,
    net: LpipsNet = "vgg",
    pretrained_backbone: bool = True,
) -> Tensor:  # [...] LPIPS distance of each image (lower is better)
    """LPIPS v0.1 distance of each image pair; differentiable in ``pred`` (usable as a loss).

    ``pretrained_backbone=False`` uses a randomly initialised backbone (no ImageNet weights needed)
    under the real linear heads: for tests of the plumbing only, its values are not the metric.

    Raises :class:`LPIPSWeightsMissing` (naming the file and the folder) when the backbone weights
    are not in the torch hub cache, and ``MissingDependencyError`` when ``lpips`` is not installed.
    """
    _check_pair(pred, target, "lpips")
    _check_net(net)
    if pred.shape[-3] != 3:
        raise ValueError(f"lpips: expected RGB images [..., 3, H, W], got {tuple(pred.shape)}")
    model = _lpips_model(net, str(pred.device), not pretrained_backbone)
    lead = pred.shape[:-3]
    h, w = pred.shape[-2:]
    a = pred.reshape(-1, 3, h, w).float()
    b = target.reshape(-1, 3, h, w).float()
    d = model(a, b, normalize=True)  # [B, 1, 1, 1]; normalize maps [0, 1] to the [-1, 1] LPIPS expects
    return d.reshape(lead)


# ---------------------------------------------------------------------------------------- Metrics
@dataclass
class Metrics:
    """Every available metric at once, with running means over an evaluation.

    ``lpips_net``: ``"vgg"`` or ``"alex"``, or ``None`` for no LPIPS. ``require_lpips``: ``"auto"``
    computes LPIPS only when its weights are on disk (so a run that did not ask for it never
    fails), ``True`` raises at construction when they are missing, ``False`` never computes it.
    """

    lpips_net: LpipsNet | None = "vgg"
    require_lpips: bool | Literal["auto"] = "auto"
    ssim_padding: Literal["valid", "same"] = "valid"
    _sums: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    _count: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.lpips_net is not None:
            _check_net(self.lpips_net)
        if self.require_lpips is True:
            if self.lpips_net is None:
                raise ValueError("Metrics: require_lpips=True needs lpips_net='vgg' or 'alex'")
            require("lpips", "the LPIPS metric")
            if not lpips_available(self.lpips_net):
                raise LPIPSWeightsMissing(lpips_missing_message(self.lpips_net))

    @property
    def names(self) -> list[str]:
        return ["psnr", "ssim"] + (["lpips"] if self.use_lpips else [])

    @property
    def use_lpips(self) -> bool:
        if self.lpips_net is None or self.require_lpips is False:
            return False
        return lpips_available(self.lpips_net)

    @torch.no_grad()
    def per_image(
        self,
        pred: Tensor,  # [..., 3, H, W] in [0, 1]
        target: Tensor,  # [..., 3, H, W] in [0, 1]
    ) -> dict[str, Tensor]:  # name -> [...]
        pred = pred.clamp(0, 1)
        out = {"psnr": psnr(pred, target), "ssim": ssim(pred, target, padding=self.ssim_padding)}
        if self.use_lpips:
            out["lpips"] = lpips(pred, target, net=self.lpips_net)
        return out

    def __call__(self, pred: Tensor, target: Tensor) -> dict[str, float]:
        """Means over the images of this batch, also added to the running means."""
        per = self.per_image(pred, target)
        n = next(iter(per.values())).numel()
        for k, v in per.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.double().sum())
        self._count += n
        return {k: float(v.double().mean()) for k, v in per.items()}

    update = __call__

    def compute(self) -> dict[str, float]:
        """Running means over every image seen since construction or :meth:`reset`."""
        if self._count == 0:
            return {}
        return {k: v / self._count for k, v in self._sums.items()}

    def reset(self) -> None:
        self._sums, self._count = {}, 0
