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

Conversions: :meth:`MoE.from_dense` copies one dense FFN into every expert (the MoE then computes
exactly the dense function when the combine weights of each token sum to one);
:func:`average_experts` / :meth:`MoE.to_dense` collapse the experts into one FFN whose parameters are
the element-wise mean of the experts' parameters.

Sources: Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
Layer", arXiv:1701.06538 (top-k gating); Fedus et al., "Switch Transformers", arXiv:2101.03961
(load-balancing loss ``num_experts * sum_e f_e * P_e``); Huang et al., "Experts Weights Averaging",
arXiv:2308.06093 (random uniform partition, expert averaging). Written for vision3d, Apache-2.0.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor

__all__ = [
    "Routing",
    "Router",
    "RandomUniformPartitionRouter",
    "TopKRouter",
    "MoE",
    "dispatch",
    "combine",
    "average_experts",
    "experts_mean_state",
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
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, renormalize: bool = True, balance_loss: bool = True):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"TopKRouter: k must be in [1, num_experts={num_experts}], got {k}")
        self.num_experts, self.k = num_experts, k
        self.renormalize, self.balance_loss = renormalize, balance_loss
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, tokens: Tensor) -> Routing:  # tokens [T, C]
        probs = self.gate(tokens).float().softmax(dim=-1)  # [T, E]
        weights, index = probs.topk(self.k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        aux = None
        if self.balance_loss:
            frac = F.one_hot(index, self.num_experts).float().sum(1).mean(0) / self.k  # [E]
            aux = self.num_experts * (frac * probs.mean(0)).sum()
        return Routing(index, weights.to(tokens.dtype), aux)


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


@register_notrace_module  # FX: one leaf (data-dependent dispatch: per-expert token counts)
class MoE(nn.Module):
    """Experts + router with sort-based dispatch and weighted scatter-add combine.

    Args:
        experts: ``E`` modules mapping ``[n, C] -> [n, C_out]`` (same structure, e.g. copies of one Mlp).
        router: a :class:`Router` over ``E`` experts.

    Attributes:
        aux_loss: the router's auxiliary loss from the last forward (``None`` if it has none).
    """

    def __init__(self, experts: Sequence[nn.Module], router: Router):
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(f"MoE: {len(experts)} experts but the router routes to {router.num_experts}")
        self.experts = nn.ModuleList(experts)
        self.router = router
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

    def forward(self, x: Tensor) -> Tensor:  # [..., C] -> [..., C_out]
        lead = x.shape[:-1]
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(tokens)
        self.aux_loss = routing.aux_loss
        out = self.forward_experts(tokens, routing)
        return out.reshape(*lead, out.shape[-1])
