"""EWA: Experts Weights Averaging, a training scheme for timm Vision Transformers.

Source
------
- Paper: Yongqi Huang, Peng Ye, Xiaoshui Huang, Sheng Li, Tao Chen, Tong He, Wanli Ouyang,
  "Experts Weights Averaging: A New General Training Scheme for Vision Transformers", 2023,
  arXiv:2308.06093. No official code repository was found (see "Defaults" below); everything here
  follows the paper's abstract. Written for vision3d (Apache-2.0); no weights are released.

The scheme
----------
EWA is not a new architecture. During training, selected FFNs of a ViT are replaced by MoE layers
(:class:`EWAMoE`, built on :class:`vision3d.layers.moe.MoE`) whose experts start as copies of the FFN
and whose tokens are routed by *random uniform partition*: the ``T`` tokens of the batch are randomly
permuted and split into ``E`` equal parts, one per expert (no gate, no auxiliary loss, each token sees
exactly one expert with weight 1). After every optimiser step the experts of each MoE are averaged
towards each other with the *share rate* ``beta`` (each expert keeps ``1 - beta`` of itself and
receives ``beta`` spread evenly over the other ``E - 1`` experts), for every parameter tensor:

.. math::

    W_i \\leftarrow (1 - \\beta)\\, W_i + \\frac{\\beta}{E - 1} \\sum_{j \\ne i} W_j
    \\;=\\; \\bar W + \\Bigl(1 - \\frac{\\beta E}{E - 1}\\Bigr)(W_i - \\bar W),
    \\qquad \\bar W = \\frac{1}{E}\\sum_j W_j .

The update keeps the experts' mean :math:`\\bar W` fixed and shrinks every expert's deviation from it
by :math:`1 - \\beta E / (E - 1)`. After training each MoE collapses into one FFN with weights
:math:`\\bar W` (:func:`ewa_to_vit`), which gives back a standard timm ViT. In ``eval()`` mode an
:class:`EWAMoE` already computes with :math:`\\bar W`, so evaluation during training measures the
model that will be deployed.

API
---
- :func:`vit_to_ewa` / :func:`ewa_to_vit`: dense FFN -> MoE with copied experts, MoE -> dense (in place);
  :func:`collapse_state_dict`: the same on a state dict (EWA checkpoint -> timm ViT checkpoint).
- Automatic averaging (:func:`enable_auto_averaging`, on by default in the registered variants): one
  global ``torch.optim`` step post-hook averages each MoE exactly once per ``optimizer.step()`` of an
  optimiser holding its experts, so any loop trains EWA unchanged (a plain ``loss.backward();
  optimizer.step()`` loop, timm's ``train.py --model ewa_vit_tiny_patch16_224`` after ``import
  vision3d``; gradient accumulation and skipped AMP steps included). By hand instead:
  :func:`ewa_average_` (one MoE) or :class:`EWAHook` (``hook.step()`` after ``optimizer.step()``, or
  ``hook.attach(optimizer)``); creating a hook turns the automatic averaging off.
- Registered training-time variants ``ewa_vit_{tiny,small,base}_patch16_224``
  (:class:`EWAVisionTransformer`, a timm ``VisionTransformer``): ``num_experts=4`` experts in every
  other block, ``moe_blocks = (1, 3, 5, 7, 9, 11)`` (the V-MoE "every 2" placement), share rate
  :data:`DEFAULT_SHARE_RATE`; all are constructor arguments. Like timm's ``vit_*`` they are fixed-size
  (``fixed_input_size``; a wrong size raises a ``ValueError`` naming both sizes); pass
  ``dynamic_img_size=True`` for any size (then FX tracing fails inside timm's position-embedding
  resampling, as for timm's own ViTs). ``pretrained=True`` takes a local dense timm ViT checkpoint
  (experts are initialised as copies of its FFNs) or an EWA checkpoint via
  ``pretrained_cfg_overlay=dict(file=...)``.
- Tracing: in ``eval()`` an :class:`EWAMoE` is a plain FFN (cached mean weights), so TorchScript, FX,
  ``torch.compile(fullgraph=True)`` and ``torch.export`` work; routed training runs eagerly (FX leaf).

Defaults (what the paper says, what was measured here)
-------------------------------------------------------
Searched (Dec 2026): the abstract (arXiv:2308.06093, also at huggingface.co/papers/2308.06093) and
third-party summaries were reachable; the paper body, its tables and its hyper-parameters were not.
What those sources state: during training some FFNs are replaced by MoEs routing tokens by random uniform
partition; EWA runs on these MoEs at the end of every iteration; after training every MoE becomes an FFN
by averaging its experts; the scheme improves ViTs on 2-D and 3-D tasks and in fine-tuning at no
inference cost, and EWA also helps naive MoE on small datasets (the abstract). A summary page
(sciencestack.ai/paper/2308.06093) describes the analysis as weight-decay-like dynamics plus an
aggregation of historical weights, and an "Early EWA" variant for naive MoE. No authors' code was found:
in github.com/tencent-ailab/Frequency_Aug_VAE_MoESR issue #14 (2023-12) the first author raises EWA, and a
2024-05 question there whether EWA is open-sourced got no answer. The paper's share rate, MoE blocks,
expert count and start of averaging are therefore unknown here; they were measured instead.

Experiment (``tools/bench/ewa.py``, reproduces this table): timm ViT patch 8, width 64, depth 4, 2 heads,
4 experts per MoE; 10-class procedural shapes x stripe-orientation task, 32 x 32, 1000 training images
with flips (dense reaches ~83 % train vs ~63 % held-out accuracy: the overfitting regime), 2000 held-out;
AdamW 1e-3, 10 % warm-up, cosine, 600 steps of 64; 5 seeds, each seed with the same data, initial
weights, batches and flips for every setting; EWA evaluated after collapsing. Held-out accuracy %,
mean +- std over seeds; paired = per-seed difference to dense, with a paired two-sided t-test::

    setting                          acc.            paired vs dense   seeds > dense   p
    dense                            62.51 +- 2.60
    beta 0.1, every other (1, 3)     62.66 +- 2.78   +0.15 +- 3.06     1/5             0.92
    beta 0.3, every other (1, 3)     63.04 +- 2.55   +0.53 +- 1.19     3/5             0.38
    beta 0.5, every other (1, 3)     62.62 +- 1.58   +0.11 +- 1.61     3/5             0.89
    beta 0.8, every other (1, 3)     61.60 +- 2.24   -0.91 +- 2.55     3/5             0.47
    beta 0.1, last half (2, 3)       62.96 +- 2.42   +0.45 +- 2.09     4/5             0.66
    beta 0.3, last half (2, 3)       62.54 +- 2.67   +0.03 +- 1.71     3/5             0.97
    beta 0.5, last half (2, 3)       63.19 +- 3.28   +0.68 +- 1.74     3/5             0.43
    beta 0.8, last half (2, 3)       63.94 +- 1.80   +1.43 +- 1.91     4/5             0.17

(~36 CPU seconds a run; seeds 3 and 4, run twice in separate processes, gave bit-identical accuracies.)
No setting differs from dense beyond the seed spread (every p > 0.15; the paired spread, 1.2-3.1
points, exceeds every mean difference), and no share rate or placement is separated from another. Note
that with ``E = 4`` a share rate ``beta >= 0.75`` shrinks the experts' deviations by ``1 - 4 beta / 3 <= 0``,
i.e. collapses (0.75) or over-corrects (0.8: factor -0.07) them at every step, so the best-looking row
is the one closest to dense training. The experiment therefore cannot settle the defaults; they stay at
``share_rate = 0.5`` (deviations kept at 1/3 per step, the middle of the range, and the smallest spread
over seeds at every-other placement) and the every-other-block placement (V-MoE's "every 2" layout).
Both are a convention, not a measured optimum and not the paper's (unknown) values.

Training-time parameter counts (1000 classes; each MoE block adds ``E - 1`` FFN copies)

==========================  ============  ====================  ==========================
timm name                   dense ViT     per-FFN parameters    training time (E=4, 6 MoE)
==========================  ============  ====================  ==========================
ewa_vit_tiny_patch16_224     5,717,416       295,872            11,043,112
ewa_vit_small_patch16_224   22,050,664     1,181,568            43,318,888
ewa_vit_base_patch16_224    86,567,656     4,722,432           171,571,432
==========================  ============  ====================  ==========================
"""

import copy
import weakref
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_filter_fn
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

from vision3d.backbones._helpers import (
    check_converted_state_dict,
    check_input,
    is_tracing,
    require_local_weights,
    unwrap_state_dict,
)
from vision3d.layers.moe import MoE, RandomUniformPartitionRouter, experts_mean_state

__all__ = [
    "EWAMoE",
    "EWAHook",
    "enable_auto_averaging",
    "EWAVisionTransformer",
    "ewa_average_",
    "vit_to_ewa",
    "ewa_to_vit",
    "collapse_state_dict",
    "checkpoint_filter_fn",
]


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters are non-persistent buffers (no gradients, not saved)."""
    dense = copy.deepcopy(module)
    for m in dense.modules():
        for name, p in list(m._parameters.items()):
            if p is None:
                continue
            del m._parameters[name]
            m.register_buffer(name, p.detach().clone(), persistent=False)
    return dense


class EWAMoE(MoE):
    """MoE with random-uniform-partition routing; in ``eval()`` it runs the experts' mean (the collapsed FFN).

    Args:
        experts: ``E`` modules of the same structure (copies of one FFN).
        generator: optional ``torch.Generator`` for reproducible partitions.
        share_rate: ``beta`` of the automatic averaging after every optimiser step that updates these
            experts (see :func:`enable_auto_averaging`); ``None`` = no automatic averaging (use
            :class:`EWAHook` or :func:`ewa_average_` by hand).

    The eval path runs ``mean_expert``, a copy of the FFN holding the experts' mean as non-persistent
    buffers (not parameters, not in the state dict). It is recomputed when the experts changed: on
    ``eval()``, after ``load_state_dict`` and, in eager eval forwards, whenever an expert tensor was
    replaced or modified in place (tensor version counters), so it is never stale and never re-averaged
    needlessly. TorchScript, FX, ``torch.compile`` and ``torch.export`` see it as a plain FFN (eval mode;
    routed training is eager-only: its token counts are data dependent).
    """

    __jit_ignored_attributes__ = ["router"]  # TorchScript: eval path only (the router returns a dataclass)

    def __init__(
        self,
        experts: Sequence[nn.Module],
        generator: Optional[torch.Generator] = None,
        share_rate: Optional[float] = None,
    ):
        super().__init__(experts, RandomUniformPartitionRouter(len(experts), generator))
        self.mean_expert = _frozen_copy(self.experts[0])
        self._mean_key: Optional[Tuple[Any, ...]] = None
        self.share_rate: Optional[float] = None
        self._last_averaged: Optional[Tuple[Any, ...]] = None
        self.register_load_state_dict_post_hook(_refresh_after_load)
        if share_rate is not None:
            enable_auto_averaging(self, share_rate)

    @classmethod
    def from_dense(
        cls, ffn: nn.Module, num_experts: int, generator: Optional[torch.Generator] = None,
        share_rate: Optional[float] = None,
    ) -> "EWAMoE":
        return cls([copy.deepcopy(ffn) for _ in range(num_experts)], generator, share_rate)

    def __setstate__(self, state: Dict[str, Any]) -> None:  # deepcopy / unpickle: the copy averages too
        super().__setstate__(state)
        if getattr(self, "share_rate", None) is not None:
            _AUTO_MOES.add(self)

    def _experts_key(self) -> Tuple[Any, ...]:
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for e in self.experts for t in e.parameters())

    @torch.no_grad()
    def refresh_mean(self) -> None:
        """Recompute ``mean_expert`` from the experts (done automatically; public for explicit use)."""
        mean = experts_mean_state(self.experts)
        for name, t in self.mean_expert.named_buffers():
            if name in mean:
                t.copy_(mean[name])
        self._mean_key = self._experts_key()

    def train(self, mode: bool = True) -> "EWAMoE":
        super().train(mode)
        if not mode:
            self.refresh_mean()
        return self

    @torch.jit.unused
    def _forward_routed(self, x: Tensor) -> Tensor:
        return super().forward(x)

    @torch.jit.unused
    def _refresh_if_stale(self) -> None:
        if is_tracing():
            return
        if self._mean_key != self._experts_key():
            self.refresh_mean()

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C]
        if self.training:
            return self._forward_routed(x)
        if not torch.jit.is_scripting():
            self.aux_loss = None
            self._refresh_if_stale()
        return self.mean_expert(x)


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    module.refresh_mean()


# automatic averaging: one global optimiser step post-hook serves every EWAMoE with a share rate
_AUTO_MOES: "weakref.WeakSet[EWAMoE]" = weakref.WeakSet()
_STEP_HOOK: List[Any] = []


def _ewa_after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _AUTO_MOES:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for moe in list(_AUTO_MOES):
        if moe.share_rate is None:
            continue
        first = next(moe.experts[0].parameters(), None)
        if first is None or id(first) not in stepped:
            continue
        key = moe._experts_key()
        if key == moe._last_averaged:  # no update since the last averaging (nested optimiser wrappers)
            continue
        ewa_average_(moe, moe.share_rate)
        moe._last_averaged = moe._experts_key()


def enable_auto_averaging(module: nn.Module, share_rate: Optional[float]) -> None:
    """Average the experts of every :class:`EWAMoE` in ``module`` after each optimiser step that updates them.

    One global ``torch.optim`` step post-hook (``register_optimizer_step_post_hook``, installed once)
    runs :func:`ewa_average_` on each registered MoE whose expert parameters the stepping optimiser
    holds, once per ``optimizer.step()`` (gradient accumulation, ``GradScaler`` skipped steps and
    several optimisers are handled by construction). Any training loop works unchanged: a plain
    ``loss.backward(); optimizer.step()`` loop or timm's ``train.py``. ``share_rate=None`` turns it off
    (e.g. before attaching an :class:`EWAHook` by hand). Copies made with ``copy.deepcopy`` or pickling
    stay registered; an EMA copy is never stepped by an optimiser, so it is never averaged.
    """
    if share_rate is not None and not 0.0 <= share_rate <= 1.0:
        raise ValueError(f"enable_auto_averaging: share_rate must be in [0, 1], got {share_rate}")
    moes = [m for m in module.modules() if isinstance(m, EWAMoE)]
    if not moes:
        raise ValueError(f"enable_auto_averaging: {type(module).__name__} has no EWAMoE layer")
    for moe in moes:
        moe.share_rate = share_rate
        if share_rate is None:
            _AUTO_MOES.discard(moe)
        else:
            _AUTO_MOES.add(moe)
    if share_rate is not None and not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(_ewa_after_optimizer_step))


@torch.no_grad()
def ewa_average_(moe: MoE, share_rate: float) -> None:
    """One EWA step on ``moe`` in place: ``W_i <- (1 - beta) W_i + beta / (E - 1) * sum_{j != i} W_j``.

    Applied to every parameter tensor (and floating buffer) of the experts; a no-op for ``E == 1``.
    """
    if not 0.0 <= share_rate <= 1.0:
        raise ValueError(f"ewa_average_: share_rate must be in [0, 1], got {share_rate}")
    E = len(moe.experts)
    if E < 2 or share_rate == 0.0:
        return
    named = [dict(e.named_parameters()) for e in moe.experts]
    keep = 1.0 - share_rate * E / (E - 1)  # coefficient on W_i after rewriting with the sum
    give = share_rate / (E - 1)  # coefficient on sum_j W_j
    for name in named[0]:
        ws = [n[name] for n in named]
        total = torch.stack([w.detach() for w in ws]).sum(0)
        for w in ws:
            w.mul_(keep).add_(total, alpha=give)


def _ewa_modules(model: nn.Module) -> List[MoE]:
    return [m for m in model.modules() if isinstance(m, EWAMoE)]


class EWAHook:
    """Experts Weights Averaging after every optimiser step.

    Args:
        model: a model containing :class:`EWAMoE` layers.
        share_rate: ``beta`` in [0, 1] (see the module docstring).

    Use ``hook.step()`` after ``optimizer.step()``, or ``hook.attach(optimizer)`` once (returns the
    removable handle of ``optimizer.register_step_post_hook``). Creating a hook turns the model's
    automatic averaging (:func:`enable_auto_averaging`) off, so the averaging never runs twice.
    """

    def __init__(self, model: nn.Module, share_rate: float):
        if not 0.0 <= share_rate <= 1.0:
            raise ValueError(f"EWAHook: share_rate must be in [0, 1], got {share_rate}")
        self.moes = _ewa_modules(model)
        if not self.moes:
            raise ValueError(f"EWAHook: {type(model).__name__} has no EWAMoE layer; convert it with vit_to_ewa first")
        self.share_rate = share_rate
        enable_auto_averaging(model, None)  # averaging by hand: the automatic one would run a second time

    def step(self) -> None:
        for moe in self.moes:
            ewa_average_(moe, self.share_rate)

    def __call__(self, optimizer: Any = None, args: Any = None, kwargs: Any = None) -> None:
        self.step()

    def attach(self, optimizer: torch.optim.Optimizer):
        return optimizer.register_step_post_hook(self)


def _default_moe_blocks(depth: int) -> List[int]:
    return list(range(1, depth, 2))


def vit_to_ewa(
    model: nn.Module,
    moe_blocks: Optional[Iterable[int]] = None,
    num_experts: int = 4,
    share_rate: Optional[float] = None,
) -> nn.Module:
    """Replace ``model.blocks[i].mlp`` by an :class:`EWAMoE` of ``num_experts`` copies, in place.

    Args:
        model: a timm ViT-like model (``model.blocks[i].mlp``).
        moe_blocks: block indices (default: every other block, ``1, 3, 5, ...``).
        num_experts: experts per MoE (>= 1).
        share_rate: turn on automatic averaging with this ``beta`` (:func:`enable_auto_averaging`);
            ``None`` leaves it to an :class:`EWAHook`.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"vit_to_ewa: {type(model).__name__} has no .blocks (expected a timm VisionTransformer)")
    if num_experts < 1:
        raise ValueError(f"vit_to_ewa: num_experts must be >= 1, got {num_experts}")
    idx = _default_moe_blocks(len(blocks)) if moe_blocks is None else list(moe_blocks)
    for i in idx:
        if not 0 <= i < len(blocks):
            raise ValueError(f"vit_to_ewa: moe block {i} out of range for a model with {len(blocks)} blocks")
        mlp = blocks[i].mlp
        if isinstance(mlp, MoE):
            raise ValueError(f"vit_to_ewa: block {i} is already an MoE")
        blocks[i].mlp = EWAMoE.from_dense(mlp, num_experts, share_rate=share_rate)
    return model


def ewa_to_vit(model: nn.Module) -> nn.Module:
    """Collapse every :class:`EWAMoE` of ``model`` into one FFN with the experts' mean weights, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, EWAMoE):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.to_dense())
    if isinstance(model, EWAVisionTransformer):
        model.moe_blocks = ()
    return model


def collapse_state_dict(state_dict: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """EWA state dict -> dense one: ``X.experts.{e}.Y`` (all ``e``) become their mean under ``X.Y``."""
    import re

    groups: Dict[str, List[Tensor]] = {}
    out: Dict[str, Tensor] = {}
    for k, v in state_dict.items():
        m = re.match(r"^(.*)\.experts\.(\d+)\.(.*)$", k)
        if m:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}", []).append(v)
        else:
            out[k] = v
    for k, vs in groups.items():
        out[k] = torch.stack([v.float() for v in vs]).mean(0).to(vs[0].dtype)
    return out


@register_notrace_function  # FX: shape checks run on the real input, outside the graph
def check_vit_input(x: Tensor, in_chans: int, fixed_hw: List[int], name: str) -> None:
    """``check_input``, and for a fixed-size ViT (``fixed_hw = [H, W]``) a ``ValueError`` naming both sizes."""
    check_input(x, in_chans, name)
    if len(fixed_hw) == 2 and (x.shape[2] != fixed_hw[0] or x.shape[3] != fixed_hw[1]):
        raise ValueError(
            f"{name}: input size ({x.shape[2]}, {x.shape[3]}) differs from the model's ({fixed_hw[0]}, {fixed_hw[1]}); "
            "build it with img_size=... or dynamic_img_size=True"
        )


DEFAULT_SHARE_RATE = 0.5  # a convention: tools/bench/ewa.py separates no share rate (module docstring, "Defaults")


class EWAVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose ``moe_blocks`` FFNs are :class:`EWAMoE` layers (training time).

    Args:
        moe_blocks: block indices turned into MoE (default every other block ``1, 3, 5, ...``).
        num_experts: experts per MoE.
        share_rate: ``beta`` of the automatic averaging after every optimiser step
            (:func:`enable_auto_averaging`; ``None`` = off, average with an :class:`EWAHook`).
        **kwargs: ``VisionTransformer`` arguments.
    """

    def __init__(
        self,
        moe_blocks: Optional[Sequence[int]] = None,
        num_experts: int = 4,
        share_rate: Optional[float] = DEFAULT_SHARE_RATE,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.vit_kwargs = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}
        pe = self.patch_embed
        strict = pe.img_size is not None and pe.strict_img_size and not self.dynamic_img_size
        self.fixed_hw: List[int] = [int(pe.img_size[0]), int(pe.img_size[1])] if strict else []
        self.num_experts = num_experts
        self.moe_blocks = tuple(_default_moe_blocks(len(self.blocks)) if moe_blocks is None else moe_blocks)
        vit_to_ewa(self, self.moe_blocks, num_experts, share_rate=share_rate)

    def _name(self) -> str:
        """Variant name for error messages (``"EWAVisionTransformer"`` under TorchScript)."""
        if torch.jit.is_scripting():
            return "EWAVisionTransformer"
        return self._variant_name()

    @torch.jit.unused
    def _variant_name(self) -> str:
        cfg = getattr(self, "pretrained_cfg", None) or {}
        return cfg.get("architecture", type(self).__name__)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """[B, in_chans, H, W] -> [B, num_classes]: an input check (``ValueError`` naming the sizes), then
        timm's ``forward_features`` and ``forward_head`` (inherited, so TorchScript needs no ``super()``)."""
        check_vit_input(x, self.in_chans, self.fixed_hw, self._name())
        x = self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        return self.forward_head(x)

    @torch.jit.ignore
    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any):
        """timm's ``VisionTransformer.forward_intermediates`` after an input check."""
        check_vit_input(x, self.in_chans, self.fixed_hw, self._name())
        return super().forward_intermediates(x, *args, **kwargs)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        names = {n for n, _ in self.named_parameters()}
        return {n for n in super().no_weight_decay() if n in names}

    def to_vit(self) -> VisionTransformer:
        """A plain timm ``VisionTransformer`` holding the collapsed (expert-mean) weights."""
        vit = VisionTransformer(**self.vit_kwargs)
        vit.load_state_dict(collapse_state_dict(self.state_dict()))
        if hasattr(self, "pretrained_cfg"):
            vit.pretrained_cfg = dict(self.pretrained_cfg)
        return vit.to(next(self.parameters()).device)


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: EWAVisionTransformer) -> Dict[str, Tensor]:
    """Dense timm ViT checkpoint (experts become copies of each FFN) or EWA checkpoint -> this model's keys.

    timm's ViT filter runs first (patch-embed/position-embedding resizing, layer renames). Raises
    ``ValueError`` naming the variant and keys when the checkpoint does not fit.
    """
    sd = unwrap_state_dict(state_dict)
    sd = _vit_filter_fn(sd, model)
    own = model.state_dict()
    out: Dict[str, Tensor] = {}
    for k, v in sd.items():
        if k in own:
            out[k] = v
            continue
        prefix, _, leaf = k.rpartition(".mlp.")
        if prefix and f"{prefix}.mlp.experts.0.{leaf}" in own:
            for e in range(len(model.get_submodule(f"{prefix}.mlp").experts)):
                out[f"{prefix}.mlp.experts.{e}.{leaf}"] = v.clone()
        else:
            out[k] = v
    if getattr(model, "num_classes", 0) == 0:
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    check_converted_state_dict(out, model, skip=("head.",))
    return out


def _create_ewa_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> EWAVisionTransformer:
    require_local_weights(variant, pretrained, kwargs, "a timm ViT checkpoint you trained or downloaded yourself")
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        EWAVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "fixed_input_size": True,  # as timm's vit_* (pass dynamic_img_size=True for any size)
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2308.06093",
        "paper_name": "Experts Weights Averaging: A New General Training Scheme for Vision Transformers",
        "notes": (
            "Training-time model: no released weights. pretrained=True takes a local dense timm ViT (or EWA) "
            "checkpoint through pretrained_cfg_overlay=dict(file=...).",
        ),
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "ewa_vit_tiny_patch16_224.untrained": _cfg(),
        "ewa_vit_small_patch16_224.untrained": _cfg(),
        "ewa_vit_base_patch16_224.untrained": _cfg(),
    }
)


@register_model
def ewa_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> EWAVisionTransformer:
    """ViT-Ti/16 with EWA MoE layers (4 experts in blocks 1, 3, ..., 11)."""
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_ewa_vit("ewa_vit_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def ewa_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> EWAVisionTransformer:
    """ViT-S/16 with EWA MoE layers (4 experts in blocks 1, 3, ..., 11)."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_ewa_vit("ewa_vit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def ewa_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> EWAVisionTransformer:
    """ViT-B/16 with EWA MoE layers (4 experts in blocks 1, 3, ..., 11)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_ewa_vit("ewa_vit_base_patch16_224", pretrained, **dict(args, **kwargs))
