"""Mixture-of-Experts building blocks: experts, routers, dispatch/combine, dense<->MoE conversion.

A :class:`MoE` layer holds ``num_experts`` copies of one feed-forward module (any ``nn.Module`` mapping
``[..., C] -> [..., C]``, e.g. ``timm.layers.Mlp``) and a router. A forward pass flattens the tokens to
``[T, C]``, asks the router for a :class:`Routing` (for each token, ``k`` expert ids and combine
weights), *dispatches* the token copies sorted by expert, runs each expert on its contiguous slice,
and *combines* the results back with a weighted scatter-add. Routers share one interface
(``router(tokens) -> Routing``), so the same layer serves

- EWA's random uniform partition (:class:`RandomUniformPartitionRouter`, ``vision3d/backbones/ewa.py``);
- learned top-k gating (:class:`TopKRouter`, softmax gate with optional renormalisation and the
  Switch-Transformer load-balancing loss), e.g. for Dense2MoE upcycling.

- shared experts (``MoE(..., shared=ffn)``: a module every token passes through, added to the routed
  output; DeepSeekMoE-style), used by Dense2MoE (``vision3d/gen/dense2moe.py``);
- straight-through gates (``TopKRouter(straight_through=True)``): each kept expert's combine weight is
  exactly 1 in the forward pass while its gradient reaches the gate probabilities, so an MoE whose
  experts are *neuron slices* of one FFN (:class:`SlicedFFN`, :func:`split_ffn`) computes exactly the
  dense FFN when every expert is kept.

:meth:`MoE.forward` is the grouped path (one sort of the token copies by expert, one matmul chain
per expert on its contiguous slice, one scatter-add back; no Python loop over tokens);
:meth:`MoE.forward_dense` is its slow twin (every expert on every token, weighted by the routing
written as a dense ``[T, E]`` matrix) and the test oracle.

Conversions: :meth:`MoE.from_dense` copies one dense FFN into every expert (the MoE then computes
exactly the dense function when the combine weights of each token sum to one);
:func:`average_experts` / :meth:`MoE.to_dense` collapse the experts into one FFN whose parameters are
the element-wise mean of the experts' parameters.

Sources: Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer", arXiv:1701.06538 (top-k gating); Fedus et al., "Switch Transformers", arXiv:2101.03961
(load-balancing loss ``num_experts * sum_e f_e * P_e``); Huang et al., "Experts Weights Averaging",
arXiv:2308.06093 (random uniform partition, expert averaging); Dai et al., "DeepSeekMoE",
arXiv:2401.06066 (shared + fine-grained routed experts); Zhang et al., "MoEfication",
arXiv:2110.01786 (experts as neuron slices of a dense FFN). Written for vision3d, Apache-2.0.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Routing",
    "Router",
    "RandomUniformPartitionRouter",
    "TopKRouter",
    "balance_loss",
    "MoE",
    "dispatch",
    "combine",
    "average_experts",
    "experts_mean_state",
    "FFNWeights",
    "SlicedFFN",
    "ffn_weights",
    "split_ffn",
    "SigmoidGELU",
]


@dataclass
class Routing:
    """Which experts each token goes to.

    Attributes:
        expert_index: ``[T, k]`` long, expert id of each of the token's ``k`` slots.
        weights: ``[T, k]`` float, combine weight of each slot (the output is
            ``sum_slots weight * expert(token)``).
        aux_loss: optional scalar auxiliary loss (load balancing), ``None`` if the router has none.
    """

    expert_index: Tensor
    weights: Tensor
    aux_loss: Optional[Tensor] = None


class Router(nn.Module):
    """Interface: ``forward(tokens [T, C]) -> Routing`` over ``num_experts`` experts."""

    num_experts: int

    def forward(self, tokens: Tensor) -> Routing:  # pragma: no cover - interface
        raise NotImplementedError


class RandomUniformPartitionRouter(Router):
    """Random uniform partition: a random permutation of the ``T`` tokens split into ``E`` equal parts.

    Part ``e`` (sizes differ by at most one when ``E`` does not divide ``T``) goes to expert ``e``
    with weight 1; each token visits exactly one expert. No parameters, no auxiliary loss.

    Args:
        num_experts: ``E``.
        generator: optional ``torch.Generator`` for reproducible partitions.
    """

    def __init__(self, num_experts: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"RandomUniformPartitionRouter: num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.generator = generator

    def forward(self, tokens: Tensor) -> Routing:  # tokens [T, C]
        T = tokens.shape[0]
        gen = self.generator
        perm = torch.randperm(T, generator=gen, device="cpu" if gen is not None else tokens.device).to(tokens.device)
        part = torch.arange(T, device=tokens.device) * self.num_experts // T  # equal contiguous parts (empty if T == 0)
        index = torch.empty(T, dtype=torch.long, device=tokens.device)
        index[perm] = part
        return Routing(index[:, None], torch.ones(T, 1, dtype=tokens.dtype, device=tokens.device))


class TopKRouter(Router):
    """Learned softmax gate keeping each token's ``k`` largest experts.

    Args:
        dim: token width ``C``.
        num_experts: ``E``.
        k: experts per token.
        renormalize: divide the kept probabilities by their sum (so they sum to one).
        balance_loss: also return the Switch load-balancing loss ``E * sum_e f_e * P_e``
            (``f_e`` fraction of slots routed to ``e``, ``P_e`` mean gate probability of ``e``).
        straight_through: combine weights are exactly 1 in the forward pass (``(p - p.detach()) + 1``,
            ``p`` the kept, possibly renormalised probability), so the gate learns through its
            gradient only; with neuron-slice experts and ``k = E`` the layer is then the dense FFN.

    ``k`` may be changed after construction (``router.k = E`` activates every expert).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        k: int = 1,
        renormalize: bool = True,
        balance_loss: bool = True,
        straight_through: bool = False,
    ):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"TopKRouter: k must be in [1, num_experts={num_experts}], got {k}")
        self.num_experts, self.k = num_experts, k
        self.renormalize, self.balance_loss = renormalize, balance_loss
        self.straight_through = straight_through
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, tokens: Tensor) -> Routing:  # tokens [T, C]
        probs = self.gate(tokens).float().softmax(dim=-1)  # [T, E]
        weights, index = probs.topk(self.k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.straight_through:
            weights = (weights - weights.detach()) + 1.0  # exactly 1 forward
        aux = None
        if self.balance_loss:
            aux = balance_loss(probs, index)
        return Routing(index, weights.to(tokens.dtype), aux)


def balance_loss(probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch load-balancing loss ``E * sum_e f_e * P_e`` (1 when perfectly balanced).

    Args:
        probs: ``[T, E]`` gate probabilities (rows sum to one).
        expert_index: ``[T, k]`` kept experts per token.
    """
    E, k = probs.shape[-1], expert_index.shape[-1]
    frac = F.one_hot(expert_index, E).to(probs.dtype).sum(1).mean(0) / k  # [E]
    return E * (frac * probs.mean(0)).sum()


def dispatch(tokens: Tensor, expert_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor, List[int]]:
    """Token copies sorted by expert.

    Args:
        tokens: ``[T, C]``.
        expert_index: ``[T, k]`` expert id per slot.
        num_experts: ``E``.

    Returns:
        ``(sorted_tokens [T*k, C], order [T*k] (flat slot index of each sorted row), counts)`` where
        ``counts[e]`` rows for expert ``e`` follow each other in expert order.
    """
    flat = expert_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    k = expert_index.shape[1]
    return tokens[order // k], order, counts


def combine(expert_out: Tensor, order: Tensor, weights: Tensor, num_tokens: int) -> Tensor:
    """Inverse of :func:`dispatch`: ``out[t] = sum_slots weights[t, s] * expert_out[row of (t, s)]``.

    Args:
        expert_out: ``[T*k, C]`` rows in dispatch order.
        order: ``[T*k]`` from :func:`dispatch`.
        weights: ``[T, k]`` combine weights.
        num_tokens: ``T``.

    Returns:
        ``[T, C]``.
    """
    k = weights.shape[1]
    w = weights.reshape(-1)[order].to(expert_out.dtype)
    out = expert_out.new_zeros(num_tokens, expert_out.shape[-1])
    return out.index_add_(0, order // k, expert_out * w[:, None])


def experts_mean_state(experts: Sequence[nn.Module]) -> dict:
    """Element-wise mean of the experts' parameters and floating buffers (``{name: tensor}``)."""
    states = [dict(e.named_parameters()) | {n: b for n, b in e.named_buffers() if b.is_floating_point()} for e in experts]
    return {n: torch.stack([s[n].detach() for s in states]).mean(0) for n in states[0]}


def average_experts(experts: Sequence[nn.Module]) -> nn.Module:
    """A copy of ``experts[0]`` whose parameters are the element-wise mean over all experts."""
    dense = copy.deepcopy(experts[0])
    mean = experts_mean_state(experts)
    with torch.no_grad():
        for n, t in list(dense.named_parameters()) + list(dense.named_buffers()):
            if n in mean:
                t.copy_(mean[n])
    return dense


class MoE(nn.Module):
    """Experts + router with sort-based dispatch and weighted scatter-add combine.

    Args:
        experts: ``E`` modules mapping ``[n, C] -> [n, C_out]`` (same structure, e.g. copies of one Mlp).
        router: a :class:`Router` over ``E`` experts.
        shared: optional module ``[n, C] -> [n, C_out]`` every token passes through; its output is
            added to the routed experts' combination (not weighted).

    Attributes:
        aux_loss: the router's auxiliary loss from the last forward (``None`` if it has none).
    """

    def __init__(self, experts: Sequence[nn.Module], router: Router, shared: Optional[nn.Module] = None):
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(f"MoE: {len(experts)} experts but the router routes to {router.num_experts}")
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.shared = shared
        self.aux_loss: Optional[Tensor] = None

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @classmethod
    def from_dense(cls, ffn: nn.Module, num_experts: int, router: Optional[Router] = None) -> "MoE":
        """``num_experts`` deep copies of ``ffn`` (identical initial weights); default router: random uniform partition."""
        router = router if router is not None else RandomUniformPartitionRouter(num_experts)
        return cls([copy.deepcopy(ffn) for _ in range(num_experts)], router)

    def to_dense(self) -> nn.Module:
        """One FFN with the mean of the experts' parameters (see :func:`average_experts`)."""
        return average_experts(self.experts)

    def forward_experts(self, tokens: Tensor, routing: Routing) -> Tensor:  # [T, C] -> [T, C_out]
        sorted_tokens, order, counts = dispatch(tokens, routing.expert_index, self.num_experts)
        outs = [e(chunk) for e, chunk in zip(self.experts, sorted_tokens.split(counts)) if chunk.shape[0] > 0]
        return combine(torch.cat(outs, 0), order, routing.weights, tokens.shape[0])

    def forward_experts_dense(self, tokens: Tensor, routing: Routing) -> Tensor:  # [T, C] -> [T, C_out]
        """Slow twin of :meth:`forward_experts`: every expert on every token, weights as a dense ``[T, E]``."""
        dense_w = tokens.new_zeros(tokens.shape[0], self.num_experts, dtype=routing.weights.dtype)
        dense_w = dense_w.scatter_add(1, routing.expert_index, routing.weights)
        outs = torch.stack([e(tokens) for e in self.experts], 1)  # [T, E, C_out]
        return (outs * dense_w[..., None].to(outs.dtype)).sum(1)

    def _run(self, x: Tensor, dense: bool) -> Tensor:
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        self.aux_loss = routing.aux_loss
        out = (self.forward_experts_dense if dense else self.forward_experts)(tokens, routing)
        if self.shared is not None:
            out = out + self.shared(tokens)
        return out.reshape(*lead, out.shape[-1])

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C_out]
        return self._run(x, dense=False)

    def forward_dense(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C_out]
        """The same function as :meth:`forward` computed densely (test oracle; same routing)."""
        return self._run(x, dense=True)


# ------------------------------------------------------------------------------------------------ neuron slices
class SigmoidGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the sigmoid approximation of GELU."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


@dataclass
class FFNWeights:
    """A two-layer FFN ``out = W_out (act(W_in x + b_in) [* (W_val x + b_val)]) + b_out`` as tensors.

    For a GLU (``value_weight`` set) the hidden unit is ``value * act(gate)`` where ``in_*`` is the
    gate branch. Hidden width ``H``; neuron ``j`` is row ``j`` of ``in_weight`` (and of
    ``value_weight``) and column ``j`` of ``out_weight``.

    Attributes:
        in_weight: ``[H, C]``.
        in_bias: ``[H]`` or ``None``.
        act: elementwise activation module.
        out_weight: ``[C_out, H]``.
        out_bias: ``[C_out]`` or ``None``.
        value_weight: ``[H, C]`` for a GLU, else ``None``.
        value_bias: ``[H]`` or ``None``.
        name: where the FFN came from (for messages).
    """

    in_weight: Tensor
    in_bias: Optional[Tensor]
    act: nn.Module
    out_weight: Tensor
    out_bias: Optional[Tensor]
    value_weight: Optional[Tensor] = None
    value_bias: Optional[Tensor] = None
    name: str = "ffn"

    @property
    def hidden(self) -> int:
        return self.in_weight.shape[0]


def _linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class SlicedFFN(nn.Module):
    """The FFN restricted to some of its hidden neurons (an expert of a split FFN).

    Built by :meth:`from_weights`; ``forward`` maps ``[..., C] -> [..., C_out]``. The sum of the
    slices of a partition of the neurons, with the output bias in exactly one of them, is the FFN.
    """

    def __init__(self, fc_in: nn.Linear, act: nn.Module, fc_out: nn.Linear, fc_value: Optional[nn.Linear] = None):
        super().__init__()
        self.fc_in, self.act, self.fc_out, self.fc_value = fc_in, act, fc_out, fc_value

    @classmethod
    def from_weights(cls, w: FFNWeights, neurons: Tensor, out_bias: bool) -> "SlicedFFN":
        """Neurons ``neurons`` (``[n]`` long) of ``w``; ``out_bias`` keeps the FFN's output bias here."""
        idx = neurons.to(w.in_weight.device)
        take_b = lambda b: None if b is None else b[idx]  # noqa: E731
        fc_in = _linear(w.in_weight[idx], take_b(w.in_bias))
        fc_value = None if w.value_weight is None else _linear(w.value_weight[idx], take_b(w.value_bias))
        bias = w.out_bias if out_bias and w.out_bias is not None else None
        fc_out = _linear(w.out_weight[:, idx], bias)
        return cls(fc_in, copy.deepcopy(w.act), fc_out, fc_value)

    @property
    def num_neurons(self) -> int:
        return self.fc_in.out_features

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C_out]
        h = self.act(self.fc_in(x))
        if self.fc_value is not None:
            h = h * self.fc_value(x)
        return self.fc_out(h)


def ffn_weights(module: nn.Module, name: str = "ffn") -> FFNWeights:
    """The tensors of a two-layer FFN: timm ``Mlp`` (``fc1, act, fc2``, no hidden norm) or a :class:`SlicedFFN`.

    Raises:
        TypeError: ``module`` is not an FFN this function knows (message names ``name`` and the type).
    """
    if isinstance(module, SlicedFFN):
        v = module.fc_value
        return FFNWeights(
            module.fc_in.weight.detach(), None if module.fc_in.bias is None else module.fc_in.bias.detach(),
            module.act, module.fc_out.weight.detach(),
            None if module.fc_out.bias is None else module.fc_out.bias.detach(),
            None if v is None else v.weight.detach(), None if v is None or v.bias is None else v.bias.detach(), name,
        )
    fc1, fc2, act = (getattr(module, n, None) for n in ("fc1", "fc2", "act"))
    if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and act is not None:
        norm = getattr(module, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            raise TypeError(f"{name}: {type(module).__name__} normalises its hidden layer ({type(norm).__name__}); "
                            "its neurons cannot be split into experts")
        if fc1.out_features != fc2.in_features:  # timm GluMlp: fc1 emits value and gate halves
            raise TypeError(f"{name}: fc1 has {fc1.out_features} outputs but fc2 {fc2.in_features} inputs "
                            "(a GLU layout this function does not split)")
        b = lambda lin: None if lin.bias is None else lin.bias.detach()  # noqa: E731
        return FFNWeights(fc1.weight.detach(), b(fc1), act, fc2.weight.detach(), b(fc2), name=name)
    raise TypeError(
        f"{name}: {type(module).__name__} is not a feed-forward network vision3d can split "
        "(expected timm Mlp with fc1/act/fc2, a SlicedFFN, or a diffusers FeedForward via vision3d.gen.dense2moe)"
    )


def split_ffn(w: FFNWeights, shared: Optional[Tensor], groups: Sequence[Tensor]) -> tuple[Optional[SlicedFFN], List[SlicedFFN]]:
    """Split an FFN into a shared slice and routed slices.

    Args:
        w: the FFN's tensors.
        shared: ``[n_s]`` neuron ids of the shared expert (``None``: no shared expert).
        groups: one ``[n_e]`` tensor of neuron ids per routed expert.

    The output bias goes to the shared expert (to the first routed expert when there is none), so
    with every expert kept at weight 1 the sum of the slices is the FFN. The neuron sets must
    partition ``range(H)``.
    """
    ids = torch.cat(([shared] if shared is not None else []) + list(groups)).cpu()
    if ids.numel() != w.hidden or not torch.equal(ids.sort().values, torch.arange(w.hidden)):
        raise ValueError(f"{w.name}: expert neuron sets must partition the {w.hidden} hidden neurons "
                         f"(got {ids.numel()} ids, {ids.unique().numel()} distinct)")
    shared_ffn = SlicedFFN.from_weights(w, shared, out_bias=True) if shared is not None else None
    routed = [SlicedFFN.from_weights(w, g, out_bias=shared is None and i == 0) for i, g in enumerate(groups)]
    return shared_ffn, routed


# FX: MoE is one leaf (data-dependent dispatch: per-expert token counts). Registered here, after every name
# of this module exists: importing timm first imports vision3d.backbones (see vision3d/__init__.py), whose
# EWA imports this module, so importing timm at the top made `import vision3d.layers.moe` circular.
from timm.layers import register_notrace_module  # noqa: E402

register_notrace_module(MoE)
