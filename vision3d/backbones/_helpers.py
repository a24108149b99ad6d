"""Helpers shared by the vision3d backbones: local-only pretrained weights, checkpoint
unwrapping, and errors that name the variant, key and shape when a checkpoint does not fit."""

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function
from timm.models._builder import resolve_pretrained_cfg

from vision3d.utils.state import state_dict_differences

__all__ = ["require_local_weights", "local_weights_path", "unwrap_state_dict", "check_converted_state_dict", "check_input", "factory_device", "is_tracing", "bn_scale_shift", "conv_with_weights",
           "bn_folds", "pointwise_conv", "act_nhwc", "bn_sources", "FoldCache", "clear_fold_caches"]


def local_weights_path(url: str) -> Path:
    """Where vision3d looks for a downloaded checkpoint of ``url``: timm's/torch's hub cache,
    ``<torch.hub.get_dir()>/checkpoints/<file name of the url>``."""
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def require_local_weights(variant: str, pretrained: bool, kwargs: Dict[str, Any], where: str) -> None:
    """Point ``pretrained=True`` at local weights, or raise an error that says where to get them.

    vision3d never downloads weights at run time. ``pretrained=True`` uses, in this order,
    ``pretrained_cfg_overlay=dict(file=path)`` (or ``state_dict=...``), then the checkpoint the authors
    publish at the cfg's ``url`` if it was saved to :func:`local_weights_path` (``kwargs`` is updated
    to load it). Otherwise the ``ValueError`` names the URL (or ``where``, for weights without a direct
    link) and the local path to save it to.

    Args:
        variant: registered model name (``affnet_et``).
        pretrained: the ``pretrained`` argument of the model function.
        kwargs: the model function's keyword arguments (``pretrained_cfg_overlay`` may be set).
        where: human-readable location of the authors' weights when the cfg has no direct URL.
    """
    if not pretrained:
        return
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    name = f"{variant}.{cfg.tag}" if getattr(cfg, "tag", None) else variant
    if cfg.state_dict is not None:
        return
    if cfg.file:
        if not Path(cfg.file).is_file():
            raise FileNotFoundError(f"{name}: pretrained_cfg_overlay file {cfg.file!r} does not exist")
        return
    if cfg.url:
        local = local_weights_path(cfg.url)
        if local.is_file():
            kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {}, file=str(local))
            return
        raise ValueError(
            f"{name}: pretrained=True needs the authors' checkpoint on disk (vision3d does not download weights): "
            f"download {cfg.url} to {local} (used automatically), or pass "
            f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/ckpt'))"
        )
    raise ValueError(
        f"{name}: pretrained=True needs a local weights file (vision3d does not download weights); "
        f"get the checkpoint from {where} and pass "
        f"timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='/path/to/ckpt'))"
    )


def unwrap_state_dict(checkpoint: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: EMA weights first, then ``model``/``state_dict``.

    Also strips a DistributedDataParallel ``module.`` prefix.
    """
    sd = checkpoint
    for key in ("state_dict_ema", "model_ema", "ema", "model", "state_dict", "net"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict) and sd[key]:
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint: expected a dict of tensors, got {type(sd).__name__}")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items() if torch.is_tensor(v)}


def check_converted_state_dict(
    state_dict: Dict[str, torch.Tensor], model: nn.Module, skip: Sequence[str] = ()
) -> None:
    """Raise ``ValueError`` naming the variant, key and shapes when a converted checkpoint does not fit.

    Args:
        state_dict: converted (vision3d layout) tensors.
        model: the target model; its ``pretrained_cfg['architecture']`` names the variant.
        skip: key prefixes not checked for shape (the classifier, which timm drops when
            ``num_classes`` differs).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    variant = cfg.get("architecture", type(model).__name__)
    parts = state_dict_differences(model.state_dict(), state_dict, skip)
    if parts:
        raise ValueError(
            f"{variant}: checkpoint does not fit this variant (is it from another variant?): " + "; ".join(parts)
        )


@register_notrace_function  # FX keeps it as one call that runs on the real tensor (its branches read shapes)
def check_input(x: torch.Tensor, in_chans: int, name: str) -> None:
    """Raise ``ValueError`` naming the model unless ``x`` is ``[B, in_chans, H, W]`` with ``H, W >= 1``.

    Shape-only checks: TorchScript compiles it, FX records it as a leaf call (timm's
    ``register_notrace_function``), ``torch.compile``/``torch.export`` resolve it at trace time.
    """
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{name}: expected an image batch [B, {in_chans}, H, W], got shape {list(x.shape)}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name}: input spatial size must be at least 1x1, got {list(x.shape[2:])}")


@contextmanager
def factory_device(device: Optional[Union[str, torch.device]]) -> Iterator[None]:
    """Build a model's modules directly on ``device`` (timm's ``create_model(device=...)``); no-op for ``None``."""
    if device is None:
        yield
    else:
        with torch.device(device):
            yield


def bn_scale_shift(bn: nn.BatchNorm2d) -> "tuple[torch.Tensor, torch.Tensor]":
    """Eval-mode BatchNorm as ``y = scale * x + shift`` (both ``[C]``; affine-free norms use 1 and 0)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.weight is not None:
        scale = scale * bn.weight
        shift = shift * bn.weight + bn.bias
    return scale, shift


def conv_with_weights(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased ``nn.Conv2d`` with ``like``'s geometry holding ``weight`` and ``bias``."""
    conv = nn.Conv2d(
        like.in_channels,
        like.out_channels,
        like.kernel_size,
        stride=like.stride,
        padding=like.padding,
        dilation=like.dilation,
        groups=like.groups,
        bias=True,
        padding_mode=like.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def is_tracing() -> bool:
    """True under FX symbolic tracing, ``torch.compile`` and ``torch.export`` (eager-only caches step aside)."""
    import torch.fx._symbolic_trace as fx_trace

    symbolic = getattr(fx_trace, "is_fx_symbolic_tracing", None) or fx_trace.is_fx_tracing
    return torch.compiler.is_compiling() or symbolic()


# ---------------------------------------------------------------------------------------------
# eval-time fast paths shared by the convolutional families (FFNet, AFFNet)
# ---------------------------------------------------------------------------------------------
def bn_folds(bn: nn.Module) -> bool:
    """True when ``bn`` normalises with its running statistics (eval mode), so it folds into a conv."""
    return isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.running_mean is not None


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """1x1 conv as a GEMM over the NHWC view: [B, C_in, H, W] -> [B, C_out, H, W] (channels-last)."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)


def act_nhwc(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Element-wise ``act`` applied on the NHWC view (same values, faster kernel for channels-last)."""
    return act(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def bn_sources(bn: nn.Module) -> List[torch.Tensor]:
    return [t for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var) if t is not None]


class FoldCache:
    """Eval-time cache of one module's folded ``(weight, bias)``, exact: keyed by the identity,
    in-place version, dtype and device of every tensor it is computed from (an optimiser step,
    ``load_state_dict`` or ``.to()`` changes the key). Bypassed (recomputed) while tracing
    (FX / ``torch.compile`` / ``torch.export``) and whenever autograd reaches those tensors, so
    gradients flow exactly as through the BatchNorm, and for inference tensors (parameters made
    under ``torch.inference_mode``, which keep no version counter). Writes through ``tensor.data`` do not bump the
    version and are not seen: call :meth:`clear` (or ``model.train()``) after such edits."""

    def __init__(self) -> None:
        self.key: Optional[Tuple[Any, ...]] = None
        self.value: Optional[Tuple[torch.Tensor, ...]] = None

    def get(
        self, sources: Sequence[torch.Tensor], extra: Any, compute: Callable[[], Tuple[torch.Tensor, ...]]
    ) -> Tuple[torch.Tensor, ...]:
        if is_tracing() or (torch.is_grad_enabled() and any(t.requires_grad for t in sources)):
            return compute()
        if any(t.is_inference() for t in sources):  # made under inference_mode: no version counter to key on
            return compute()
        key = (extra,) + tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if self.value is None or key != self.key:
            with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable outside inference mode
                self.value = compute()
            self.key = key
        return self.value

    def clear(self) -> None:
        self.key, self.value = None, None


def clear_fold_caches(model: nn.Module) -> None:
    """Drop every :class:`FoldCache` under ``model`` (called when a model enters training)."""
    for m in model.modules():
        cache = getattr(m, "fold_cache", None)
        if isinstance(cache, FoldCache):
            cache.clear()
