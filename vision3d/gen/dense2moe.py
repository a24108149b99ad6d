"""Dense2MoE: restructure a dense Diffusion Transformer into a Mixture of Experts (and of Blocks).

Source: Zheng, Ren, Xia, Xiao, Xie, "Dense2MoE: Restructuring Diffusion Transformer to MoE for
Efficient Text-to-Image Generation", ICCV 2025, arXiv:2510.09094. The authors released no code and no
weights; this module is written for vision3d from the paper's description (Apache-2.0).

Taken from the paper:

- every FFN of the DiT blocks becomes an MoE layer of **shared + routed experts** built from the
  FFN's own neurons; the default split (8 slices, 1 shared, top-2 of 7 routed) activates 3/8 of the
  FFN, the paper's 62.5% reduction of activated FFN parameters;
- the neurons are assigned by the **Taylor metric** on calibration data: the importance of hidden
  neuron ``j`` is the first-order estimate of the loss change when it is removed,
  ``I_j = sum_batches |sum_tokens h_j * dL/dh_j|``; the most important neurons form the shared
  expert;
- **Mixture of Blocks (MoB)**: consecutive DiT blocks are grouped and a router conditioned on the
  timestep/class embedding activates ``k`` blocks of each group per sample;
- the **staged distillation**: (1) Taylor-based expert initialisation, (2) knowledge distillation of
  the MoE student from the dense teacher with a load-balancing loss, (3) MoB optimisation with a
  **group feature loss** (the student's features after each block group match the teacher's after
  the same block) plus the output distillation.

Details the paper leaves open, chosen here (each one a config field):

- routed experts group neurons that fire together: balanced k-means on the neurons' calibration
  activation profiles (MoEfication, arXiv:2110.01786), the shared expert first takes the top
  ``num_shared * n`` neurons by Taylor importance (``assignment="taylor_cluster"``; also
  ``"taylor_stride"``: remaining neurons dealt round-robin in importance order, and
  ``"contiguous"``);
- the router is initialised by ridge regression of each token's per-expert Taylor scores
  (standardised per token) on the FFN input, so its top-k at step 0 picks the experts that matter
  for that token (``router_init="taylor"``; or ``"zeros"``/``"random"``);
- combine weights are straight-through (exactly 1 forward, softmax gradient backward), so a
  converted FFN with every expert active *is* the dense FFN, and MoB with every block active *is*
  the dense model (tests check both);
- load balancing: the Switch loss ``E sum_e f_e P_e`` of every MoE and MoB router, averaged;
  distillation losses are MSEs (output velocity; group features);
- MoB groups are contiguous, ``mob_group_size`` blocks, first and last ``mob_keep_ends`` blocks
  always run.

Works on our :class:`vision3d.gen.dit.DiT` and in place on diffusers transformers
(``FluxTransformer2DModel``'s double-stream ``ff``/``ff_context`` and the MLP fused into each
single-stream block's ``proj_out``, see :class:`FusedMLPOut`; ``PixArtTransformer2DModel`` and
``DiTTransformer2DModel``'s ``BasicTransformerBlock.ff``), which keep running in their diffusers
pipelines (module replacement only, no forward is patched).

MoB on diffusers transformers (FLUX's ``transformer_blocks`` and ``single_transformer_blocks``, each
grouped on its own; PixArt's and DiT's ``transformer_blocks``): each grouped block is wrapped in a
:class:`MoBBlock` that takes the block's own arguments (keyword or positional, as under gradient
checkpointing), runs the block on the samples its group router picked and hands the others their
inputs back in the block's return form (FLUX: ``(encoder_hidden_states, hidden_states)``). The router
reads the per-sample conditioning the block already gets: FLUX's ``temb`` (timestep + guidance +
pooled text), PixArt's adaLN-single ``timestep`` embedding, DiT's timestep + class embedding. The
block lists keep their length, so the model's forward is unchanged. Only ``DiTPipeline`` can be
built offline here (FLUX's and PixArt's pipelines need ``transformers`` text encoders); the FLUX and
PixArt paths are tested on the transformer.

Calibration memory is bounded (:func:`calibrate`): a running importance sum and a per-FFN reservoir of
``calib_tokens`` rows; FFNs calibrated in passes under ``calib_budget_mb`` (each pass on the
dense model; the MoEs, which hold the FFN weights a second time until then, are installed after
the last pass). Measured with
``tools/bench/dense2moe.py --calib-memory`` (DiT dim 256, depth 8, 8 batches of 2048 tokens,
calib_tokens 4096; peak RSS growth of calibration + conversion, one thread, 2026-12-03)::

    previous code (every batch's token subset kept, then subsampled)   2028 MB   14.8 s
    reservoir, all FFNs in one pass (calib_budget_mb=0)                  468 MB    9.0 s
    reservoir, 64 MB budget (one FFN per pass, 8 passes)                 171 MB   33.0 s

The rest of the peak is the autograd graph of one calibration batch, which the bound does not cover.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from vision3d.layers.moe import (
    FFNWeights,
    MoE,
    SigmoidGELU,
    SlicedFFN,
    TopKRouter,
    balance_loss,
    ffn_weights,
    split_ffn,
)

__all__ = [
    "Dense2MoEConfig",
    "MoBConfig",
    "find_ffns",
    "calibrate",
    "calibration_bytes",
    "FFNStats",
    "convert_ffn",
    "FusedMLPOut",
    "dense_to_moe",
    "MoBGroup",
    "MoBRouter",
    "MoBBlock",
    "add_mob",
    "set_all_active",
    "load_balance_loss",
    "clear_aux_losses",
    "group_features",
    "group_feature_loss",
    "prune_ffns_magnitude",
    "prune_blocks_magnitude",
    "ffn_fraction_for_budget",
    "activated_parameters",
    "activated_linear_flops",
    "save_converted",
    "load_converted",
]


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class Dense2MoEConfig:
    """How each FFN is split into experts."""

    num_slices: int = 8
    """Equal neuron slices per FFN (hidden width must be a multiple)."""
    num_shared: int = 1
    """Slices merged into the shared expert (always active); 0: no shared expert."""
    top_k: int = 2
    """Routed experts (of ``num_slices - num_shared``) each token activates."""
    assignment: Literal["taylor_cluster", "taylor_stride", "contiguous"] = "taylor_cluster"
    """Neuron-to-expert assignment (see the module docstring)."""
    router_init: Literal["taylor", "zeros", "random"] = "taylor"
    """Router initialisation."""
    ridge: float = 1e-2
    """Ridge weight of the router regression (relative to the input's mean square)."""
    cluster_iters: int = 10
    """Balanced k-means iterations."""
    calib_tokens: int = 4096
    """Tokens per FFN kept for clustering and router fitting (random subset of the calibration)."""
    calib_budget_mb: float = 1024.0
    """Bound on the calibration statistics held at once (:func:`calibration_bytes` per FFN): FFNs are
    calibrated in passes of as many as fit (at least one per pass); 0: all FFNs in one pass."""
    ffn_names: Optional[tuple[str, ...]] = None
    """Qualified module names to convert (default: every FFN :func:`find_ffns` finds)."""

    @property
    def num_routed(self) -> int:
        return self.num_slices - self.num_shared

    @property
    def active_fraction(self) -> float:
        return (self.num_shared + self.top_k) / self.num_slices


@dataclass
class MoBConfig:
    """Mixture of Blocks over a DiT's block list."""

    group_size: int = 2
    """Consecutive blocks per group."""
    top_k: int = 1
    """Blocks each sample runs per group."""
    keep_ends: int = 1
    """Leading and trailing blocks that are never grouped (always run)."""


# ------------------------------------------------------------------------------------------------ finding FFNs
def _diffusers_ffn_weights(ff: nn.Module, name: str) -> FFNWeights:
    """Tensors of a diffusers ``FeedForward`` (``net = [act_proj, dropout, out_linear, (dropout)]``)."""
    act_proj, out = ff.net[0], ff.net[2]
    kind = type(act_proj).__name__
    W, b = act_proj.proj.weight.detach(), None if act_proj.proj.bias is None else act_proj.proj.bias.detach()
    ob = None if out.bias is None else out.bias.detach()
    if kind in ("GEGLU", "SwiGLU"):  # proj emits [value, gate]; hidden = value * act(gate)
        H = W.shape[0] // 2
        act = nn.GELU() if kind == "GEGLU" else nn.SiLU()
        return FFNWeights(W[H:], None if b is None else b[H:], act, out.weight.detach(), ob,
                          W[:H], None if b is None else b[:H], name)
    if kind == "GELU":
        act = nn.GELU(approximate=act_proj.approximate)
    elif kind == "ApproximateGELU":
        act = SigmoidGELU()
    elif kind == "LinearActivation":
        act = act_proj.activation
    else:
        raise TypeError(f"{name}: diffusers FeedForward with activation {kind} is not supported by Dense2MoE")
    return FFNWeights(W, b, act, out.weight.detach(), ob, name=name)


def _is_diffusers_ffn(m: nn.Module) -> bool:
    return type(m).__name__ == "FeedForward" and type(m).__module__.startswith("diffusers")


def _is_flux_single(m: nn.Module) -> bool:
    return type(m).__name__ == "FluxSingleTransformerBlock" and isinstance(getattr(m, "proj_mlp", None), nn.Linear)


class FusedMLPOut(nn.Module):
    """Stands in for a FLUX single-stream block's ``proj_out`` once its MLP is an MoE.

    The block computes ``proj_out(cat([attn, act(proj_mlp(x))]))``; after conversion ``proj_mlp`` and
    ``act_mlp`` are identities, so this module receives ``cat([attn, x])`` and returns
    ``attn_out(attn) + mlp(x)`` (``attn_out`` the attention columns of ``proj_out`` with its bias,
    ``mlp`` the MoE of the MLP columns): the same function, the block's forward unchanged.
    """

    def __init__(self, attn_out: nn.Linear, mlp: nn.Module):
        super().__init__()
        self.attn_out, self.mlp = attn_out, mlp

    def forward(self, h: Tensor) -> Tensor:  # [..., 2 * dim]
        a, x = h.split(self.attn_out.in_features, dim=-1)
        return self.attn_out(a) + self.mlp(x)


def _flux_single_weights(block: nn.Module, name: str) -> FFNWeights:
    dim = block.proj_out.out_features
    W = block.proj_out.weight.detach()
    if W.shape[1] != dim + block.proj_mlp.out_features:
        raise TypeError(f"{name}: proj_out takes {W.shape[1]} inputs, expected dim {dim} + MLP {block.proj_mlp.out_features}")
    act = block.act_mlp if not isinstance(block.act_mlp, nn.Identity) else nn.GELU(approximate="tanh")
    b = block.proj_mlp.bias
    return FFNWeights(block.proj_mlp.weight.detach(), None if b is None else b.detach(), copy.deepcopy(act),
                      W[:, dim:], None, name=name)


def module_ffn_weights(module: nn.Module, name: str) -> FFNWeights:
    """:func:`vision3d.layers.moe.ffn_weights` plus diffusers' ``FeedForward`` and FLUX's fused single-block MLP."""
    if _is_diffusers_ffn(module):
        return _diffusers_ffn_weights(module, name)
    if _is_flux_single(module):
        return _flux_single_weights(module, name)
    return ffn_weights(module, name)


def _probes(module: nn.Module) -> tuple[nn.Module, nn.Module, bool]:
    """(module whose input is the FFN input, module giving the hidden activation, hidden is its output?)."""
    if _is_flux_single(module):
        return module.proj_mlp, module.act_mlp, True
    return module, _out_linear(module), False


def _out_linear(module: nn.Module) -> nn.Linear:
    """The FFN's output projection (its input is the hidden activation)."""
    if _is_diffusers_ffn(module):
        return module.net[2]
    if isinstance(module, SlicedFFN):
        return module.fc_out
    return module.fc2


def find_ffns(model: nn.Module, names: Optional[Sequence[str]] = None) -> dict[str, nn.Module]:
    """The FFNs Dense2MoE converts: ``{qualified name: module}``.

    Default search: our DiT's ``blocks.*.mlp`` (timm ``Mlp``), every diffusers ``FeedForward`` and every
    FLUX single-stream block (its fused MLP; the name is the block's).

    Raises:
        ValueError: a requested name is missing or not an FFN, or the model has no FFN at all.
    """
    modules = dict(model.named_modules())
    if names is not None:
        out = {}
        for n in names:
            if n not in modules:
                raise ValueError(f"{type(model).__name__}: no module named {n!r} to convert to MoE")
            module_ffn_weights(modules[n], n)  # raises TypeError naming the module if it is not an FFN
            out[n] = modules[n]
        return out
    out = {}
    for n, m in modules.items():
        if isinstance(m, MoE):
            continue
        if _is_diffusers_ffn(m) or _is_flux_single(m) or (n.endswith(".mlp") and ".blocks." in f".{n}" and hasattr(m, "fc1")):
            if any(n.startswith(f"{o}.") for o in out):
                continue
            out[n] = m
    if not out:
        raise ValueError(
            f"{type(model).__name__}: found no FFN to convert (looked for DiT blocks.*.mlp and diffusers FeedForward "
            "modules); pass Dense2MoEConfig.ffn_names with the qualified names of its feed-forward modules"
        )
    return out


def _install_fused(block: nn.Module, mlp: nn.Module) -> None:
    """Put ``mlp`` (MoE or pruned slice) in place of a FLUX single block's fused MLP (see :class:`FusedMLPOut`)."""
    dim = block.proj_out.out_features
    W, b = block.proj_out.weight.detach(), block.proj_out.bias
    attn_out = nn.Linear(dim, dim, bias=b is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        attn_out.weight.copy_(W[:, :dim])
        if b is not None:
            attn_out.bias.copy_(b)
    block.proj_mlp, block.act_mlp = nn.Identity(), nn.Identity()
    block.proj_out = FusedMLPOut(attn_out, mlp)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# ------------------------------------------------------------------------------------------------ calibration
@dataclass
class FFNStats:
    """Calibration statistics of one FFN.

    Attributes:
        importance: ``[H]`` Taylor importance ``sum_batches |sum_tokens h_j dL/dh_j|``.
        inputs: ``[T, C]`` a random subset of the FFN's input tokens.
        scores: ``[T, H]`` per-token Taylor scores ``|h_j dL/dh_j|`` of those tokens.
        activations: ``[T, H]`` hidden activations of those tokens.
    """

    importance: Tensor
    inputs: Tensor
    scores: Tensor
    activations: Tensor


def _token_keys_seed(seed: int, name: str) -> int:
    """A per-FFN seed for the token subset: the same tokens are kept whichever FFNs share a calibration pass."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def calibration_bytes(hidden: int, in_dim: int, max_tokens: int) -> int:
    """Bytes :func:`calibrate` keeps for one FFN: ``max_tokens`` rows of inputs, scores and activations (float32)."""
    return 4 * (max_tokens * (in_dim + 2 * hidden + 1) + hidden)


def calibrate(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    batches: Iterable,
    ffns: dict[str, nn.Module],
    *,
    max_tokens: int = 4096,
    seed: int = 0,
) -> dict[str, FFNStats]:
    """Run ``loss_fn(model, batch).backward()`` on each batch and collect each FFN's Taylor statistics.

    Only the hidden activations are differentiated (``torch.autograd.grad``): the parameters'
    ``.grad`` and ``requires_grad`` are left as they were.

    Memory is bounded: the importance is a running sum, and the token subset is a reservoir (each
    token gets a random key from a per-FFN generator; the ``max_tokens`` smallest keys seen so far are
    kept), so an FFN holds at most ``max_tokens`` rows (:func:`calibration_bytes`) however many batches
    there are, and it is a uniform random subset of all calibration tokens. To bound the total,
    calibrate a few FFNs per pass (:func:`dense_to_moe` does, under ``Dense2MoEConfig.calib_budget_mb``).
    """
    acc: dict[str, dict] = {
        n: {"imp": None, "keys": None, "x": None, "s": None, "h": None,
            "g": torch.Generator().manual_seed(_token_keys_seed(seed, n))}
        for n in ffns
    }
    current: dict[str, dict] = {}
    handles = []

    def pre_ffn(name):
        def hook(_m, args):
            current.setdefault(name, {})["x"] = args[0].detach()
        return hook

    def pre_out(name):
        def hook(_m, args):
            current.setdefault(name, {})["h"] = args[0]
        return hook

    def post_out(name):
        def hook(_m, _args, out):
            current.setdefault(name, {})["h"] = out
        return hook

    def keep_tokens(a: dict, x: Tensor, prod: Tensor, h: Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=a["g"])
        if a["keys"] is not None and a["keys"].numel() >= max_tokens:  # full: only keys below the current max compete
            new = torch.nonzero(keys < a["keys"].max()).flatten()
        else:
            new = torch.arange(x.shape[0])
        if new.numel() == 0:
            return
        parts = [(keys[new], x[new], prod[new].abs(), h[new])]
        if a["keys"] is not None:
            parts.insert(0, (a["keys"], a["x"], a["s"], a["h"]))
        k, xx, ss, hh = (torch.cat(t) for t in zip(*parts))
        if k.numel() > max_tokens:
            sel = torch.topk(k, max_tokens, largest=False).indices
            k, xx, ss, hh = k[sel], xx[sel], ss[sel], hh[sel]
        a["keys"], a["x"], a["s"], a["h"] = k, xx, ss, hh

    for n, m in ffns.items():
        x_mod, h_mod, h_is_output = _probes(m)
        handles.append(x_mod.register_forward_pre_hook(pre_ffn(n)))
        handles.append(h_mod.register_forward_hook(post_out(n)) if h_is_output else h_mod.register_forward_pre_hook(pre_out(n)))
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    try:
        for p, _ in saved:  # the hidden activations need a graph; autograd.grad leaves .grad untouched
            p.requires_grad_(True)
        for batch in batches:
            current.clear()
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                names = [n for n in ffns if n in current]
                grads = torch.autograd.grad(loss, [current[n]["h"] for n in names], allow_unused=True)
            for n, grad in zip(names, grads):
                h = current[n]["h"].detach()
                grad = torch.zeros_like(h) if grad is None else grad
                H = h.shape[-1]
                prod = (h * grad).reshape(-1, H).float()
                a = acc[n]
                imp = prod.sum(0).abs()
                a["imp"] = imp if a["imp"] is None else a["imp"] + imp
                x = current[n]["x"].reshape(-1, current[n]["x"].shape[-1]).float()
                keep_tokens(a, x, prod, h.reshape(-1, H).float())
            current.clear()
            del loss, grads
    finally:
        for hd in handles:
            hd.remove()
        for p, rg in saved:
            p.requires_grad_(rg)
        model.train(was_training)
    out = {}
    for n, a in acc.items():
        if a["imp"] is None:
            raise ValueError(f"calibrate: FFN {n} was never called by loss_fn on the calibration batches")
        order = torch.argsort(a["keys"])  # a fixed order (by key), independent of the batch order of arrival
        out[n] = FFNStats(a["imp"], a["x"][order], a["s"][order], a["h"][order])
    return out


# ------------------------------------------------------------------------------------------------ conversion
def _check_split(cfg: Dense2MoEConfig, hidden: int, name: str) -> int:
    if cfg.num_slices < 1 or hidden % cfg.num_slices:
        raise ValueError(
            f"{name}: hidden width {hidden} is not divisible into num_slices={cfg.num_slices} experts "
            f"(choose a divisor of {hidden})"
        )
    if not 0 <= cfg.num_shared < cfg.num_slices:
        raise ValueError(f"{name}: num_shared={cfg.num_shared} must be in [0, num_slices={cfg.num_slices})")
    if not 1 <= cfg.top_k <= cfg.num_routed:
        raise ValueError(
            f"{name}: top_k={cfg.top_k} must be in [1, {cfg.num_routed}] (num_slices={cfg.num_slices} minus "
            f"num_shared={cfg.num_shared} routed experts)"
        )
    return hidden // cfg.num_slices


def _balanced_assign(sim: Tensor, size: int) -> Tensor:
    """Rows of ``sim`` ``[M, k]`` to columns, each column taking exactly ``size`` rows, greedily by similarity.

    Rounds (at most ``k``): every unassigned row bids for its most similar column with room left; a
    column takes its most similar bidders up to its room. Loops over columns, never over rows.
    """
    M, k = sim.shape
    assign = torch.full((M,), -1, dtype=torch.long)
    room = torch.full((k,), size, dtype=torch.long)
    neg = torch.finfo(sim.dtype).min
    while bool((assign < 0).any()):
        s = sim.masked_fill((room == 0)[None, :], neg).masked_fill((assign >= 0)[:, None], neg)
        val, best = s.max(1)
        free = assign < 0
        for c in range(k):
            if room[c] == 0:
                continue
            cand = torch.nonzero(free & (best == c)).flatten()
            if cand.numel() == 0:
                continue
            take = cand[torch.argsort(val[cand], descending=True)[: int(room[c])]]
            assign[take] = c
            room[c] -= take.numel()
    return assign


def _balanced_kmeans(feats: Tensor, k: int, size: int, iters: int, g: torch.Generator) -> list[Tensor]:
    """Split the rows of ``feats`` ``[M, D]`` (M = k * size) into ``k`` groups of ``size`` by balanced k-means."""
    M = feats.shape[0]
    f = torch.nn.functional.normalize(feats, dim=1)
    centroids = f[torch.randperm(M, generator=g)[:k]].clone()
    assign = torch.arange(M) % k
    for _ in range(max(iters, 1)):
        assign = _balanced_assign(f @ centroids.T, size)
        new = torch.zeros_like(centroids).index_add_(0, assign, f)
        centroids = torch.nn.functional.normalize(new, dim=1)
    return [torch.nonzero(assign == c).flatten() for c in range(k)]


def assign_neurons(
    hidden: int, cfg: Dense2MoEConfig, stats: Optional[FFNStats], name: str = "ffn", seed: int = 0
) -> tuple[Optional[Tensor], list[Tensor]]:
    """Neuron ids of the shared expert (or ``None``) and of each routed expert."""
    n = _check_split(cfg, hidden, name)
    if cfg.assignment == "contiguous" or stats is None:
        if cfg.assignment != "contiguous":
            raise ValueError(f"{name}: assignment={cfg.assignment!r} needs calibration statistics (calibrate())")
        ids = torch.arange(hidden)
        shared = ids[: cfg.num_shared * n] if cfg.num_shared else None
        rest = ids[cfg.num_shared * n :]
        return shared, list(rest.split(n))
    order = torch.argsort(stats.importance, descending=True)
    shared = order[: cfg.num_shared * n].sort().values if cfg.num_shared else None
    rest = order[cfg.num_shared * n :]
    if cfg.assignment == "taylor_stride":
        groups = [rest[e :: cfg.num_routed].sort().values for e in range(cfg.num_routed)]
    elif cfg.assignment == "taylor_cluster":
        g = torch.Generator().manual_seed(seed)
        profile = stats.activations[:, rest].T  # [M, T] each neuron's activation over the calibration tokens
        groups = [rest[i].sort().values for i in _balanced_kmeans(profile, cfg.num_routed, n, cfg.cluster_iters, g)]
    else:
        raise ValueError(f"{name}: unknown assignment {cfg.assignment!r} (taylor_cluster, taylor_stride, contiguous)")
    return shared, groups


def _init_router(router: TopKRouter, groups: list[Tensor], stats: Optional[FFNStats], cfg: Dense2MoEConfig, seed: int):
    w = router.gate.weight
    if cfg.router_init == "zeros":
        nn.init.zeros_(w)
        return
    if cfg.router_init == "random" or stats is None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            w.copy_(torch.randn(w.shape, generator=g) * w.shape[1] ** -0.5)
        return
    X = stats.inputs.double()  # [T, C]
    S = torch.stack([stats.scores[:, gi].sum(1) for gi in groups], 1).double()  # [T, E] per-expert Taylor score
    Z = (S - S.mean(1, keepdim=True)) / (S.std(1, keepdim=True) + 1e-12)  # standardised per token
    C = X.shape[1]
    lam = cfg.ridge * X.square().mean() * X.shape[0]
    A = X.T @ X + lam * torch.eye(C, dtype=X.dtype)
    W = torch.linalg.solve(A, X.T @ Z)  # [C, E]
    with torch.no_grad():
        w.copy_(W.T.to(w.dtype))


def convert_ffn(
    ffn: nn.Module, cfg: Dense2MoEConfig, stats: Optional[FFNStats] = None, name: str = "ffn", seed: int = 0
) -> MoE:
    """One dense FFN -> MoE of neuron slices (shared expert + top-k routed experts, straight-through gates)."""
    w = module_ffn_weights(ffn, name)
    shared_ids, groups = assign_neurons(w.hidden, cfg, stats, name, seed)
    shared, routed = split_ffn(w, shared_ids, groups)
    router = TopKRouter(w.in_weight.shape[1], cfg.num_routed, cfg.top_k, renormalize=True,
                        balance_loss=True, straight_through=True).to(w.in_weight.device, w.in_weight.dtype)
    _init_router(router, groups, stats, cfg, seed)
    return MoE(routed, router, shared=shared)


def dense_to_moe(
    model: nn.Module,
    cfg: Optional[Dense2MoEConfig] = None,
    *,
    loss_fn: Optional[Callable[[nn.Module, object], Tensor]] = None,
    calibration: Optional[Iterable] = None,
    seed: int = 0,
) -> dict[str, MoE]:
    """Stage 1 (Taylor initialisation): replace the model's FFNs by MoE layers in place.

    Args:
        model: our DiT or a diffusers transformer.
        cfg: the split; ``assignment``/``router_init`` other than ``"contiguous"``/``"zeros"``/``"random"``
            need ``loss_fn`` and ``calibration``.
        loss_fn: ``loss_fn(model, batch) -> scalar`` whose gradient defines the Taylor metric (the
            denoising loss of the model).
        calibration: the calibration batches.

    Returns:
        ``{name: MoE}`` of the new layers.
    """
    cfg = cfg or Dense2MoEConfig()
    ffns = find_ffns(model, cfg.ffn_names)
    for n, m in ffns.items():  # validate every FFN before touching any (no half-converted model)
        _check_split(cfg, module_ffn_weights(m, n).hidden, n)
    needs_stats = cfg.assignment != "contiguous" or cfg.router_init == "taylor"
    if needs_stats and (loss_fn is None or calibration is None):
        raise ValueError(
            f"dense_to_moe: assignment={cfg.assignment!r}, router_init={cfg.router_init!r} need calibration "
            "(loss_fn and calibration batches); or use assignment='contiguous', router_init='random'"
        )
    passes = [list(ffns)]
    if needs_stats and cfg.calib_budget_mb > 0:
        passes, size = [[]], 0
        for n, m in ffns.items():
            w = module_ffn_weights(m, n)
            b = calibration_bytes(w.hidden, w.in_weight.shape[1], cfg.calib_tokens)
            if passes[-1] and size + b > cfg.calib_budget_mb * 2**20:
                passes.append([])
                size = 0
            passes[-1].append(n)
            size += b
    if len(passes) > 1:
        calibration = list(calibration)  # iterated once per pass
    order = {n: i for i, n in enumerate(ffns)}
    out = {}
    for names in passes:  # every pass calibrates the dense model: the MoEs are installed after the last one
        stats: dict[str, FFNStats] = {}
        if needs_stats:
            stats = calibrate(model, loss_fn, calibration, {n: ffns[n] for n in names},
                              max_tokens=cfg.calib_tokens, seed=seed)
        for n in names:
            out[n] = convert_ffn(ffns[n], cfg, stats.pop(n, None), n, seed + order[n])
    for n, moe in out.items():
        if _is_flux_single(ffns[n]):
            _install_fused(ffns[n], moe)
        else:
            _set_module(model, n, moe)
    model.dense2moe_config = cfg
    return out


# ------------------------------------------------------------------------------------------------ Mixture of Blocks
def _route_blocks(gate: nn.Linear, c: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-sample top-``k`` of ``G`` blocks: (probs [B, G], selected bool [B, G], weight [B, G], balance loss).

    ``weight`` is straight-through: exactly 1 in the forward on the selected blocks, the renormalised
    softmax's gradient backward.
    """
    probs = gate(c).float().softmax(-1)
    # ties (e.g. a zero-initialised router) are broken towards earlier blocks by a tiny index bias
    tie = torch.arange(probs.shape[1], device=c.device, dtype=probs.dtype) * 1e-6
    _, idx = (probs - tie).topk(k, -1)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, idx, True)
    kept = torch.where(selected, probs, torch.zeros_like(probs))
    kept = kept / kept.sum(-1, keepdim=True)
    weight = (kept - kept.detach()) + 1.0  # exactly 1 forward
    return probs, selected, weight, balance_loss(probs, idx)


class MoBGroup(nn.Module):
    """Consecutive DiT blocks of which each sample runs ``k``, chosen by a router on the conditioning.

    ``forward(x [B, N, C], c [B, C_c])``: the router's softmax over the ``G`` blocks keeps each
    sample's top ``k``; the blocks run in their original order, each on the samples that selected
    it, with the straight-through weight (1 forward) on its residual update ``block(x) - x``.
    Unselected blocks are skipped (identity). With ``k = G`` this is the plain block sequence.

    Attributes:
        block_indices: the blocks' indices in the original model (for the group feature loss).
        aux_loss: Switch load-balancing loss of the last forward.
    """

    def __init__(self, blocks: Sequence[nn.Module], cond_dim: int, k: int, block_indices: Sequence[int]):
        super().__init__()
        G = len(blocks)
        if not 1 <= k <= G:
            raise ValueError(f"MoBGroup(blocks {list(block_indices)}): top_k={k} must be in [1, {G}]")
        self.blocks = nn.ModuleList(blocks)
        self.router = nn.Linear(cond_dim, G)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.k = k
        self.block_indices = tuple(block_indices)
        self.aux_loss: Optional[Tensor] = None

    def route(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # c [B, C] -> (probs [B, G], selected bool [B, G], weight [B, G])
        probs, selected, weight, self.aux_loss = _route_blocks(self.router, c, self.k)
        return probs, selected, weight

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        _, selected, weight = self.route(c)
        for j, blk in enumerate(self.blocks):
            rows = torch.nonzero(selected[:, j]).flatten()
            if rows.numel() == 0:
                continue
            xs = x.index_select(0, rows)
            upd = (blk(xs, c.index_select(0, rows)) - xs) * weight[rows, j].to(x.dtype)[:, None, None]
            x = x.index_add(0, rows, upd)
        return x

    def forward_dense(self, x: Tensor, c: Tensor) -> Tensor:
        """Slow twin: every block on every sample, masked (same function as :meth:`forward`)."""
        _, selected, weight = self.route(c)
        for j, blk in enumerate(self.blocks):
            m = (selected[:, j].to(x.dtype) * weight[:, j].to(x.dtype))[:, None, None]
            x = x + m * (blk(x, c) - x)
        return x


def add_mob(model: nn.Module, cfg: Optional[MoBConfig] = None) -> list:
    """Mixture of Blocks in place; returns the groups (:class:`MoBGroup` s or :class:`MoBRouter` s).

    Our DiT: ``model.blocks`` is regrouped into :class:`MoBGroup` s. A diffusers transformer
    (``FluxTransformer2DModel``, ``PixArtTransformer2DModel``, ``DiTTransformer2DModel``): each grouped
    block is wrapped in a :class:`MoBBlock` (the block lists keep their length, so the model's own
    forward is unchanged) and the groups' routers are ``model.mob_routers``.
    """
    cfg = cfg or MoBConfig()
    blocks = getattr(model, "blocks", None)
    if not (isinstance(blocks, nn.ModuleList) and hasattr(model, "condition")):
        return _add_mob_diffusers(model, cfg)
    if any(isinstance(b, MoBGroup) for b in blocks):
        raise ValueError("add_mob: the model already has MoB groups")
    D = len(blocks)
    if cfg.group_size < 2 or not 1 <= cfg.top_k < cfg.group_size:
        raise ValueError(f"add_mob: need group_size >= 2 and 1 <= top_k < group_size, got {cfg.group_size}, {cfg.top_k}")
    inner = D - 2 * cfg.keep_ends
    if inner < cfg.group_size or inner % cfg.group_size:
        raise ValueError(
            f"add_mob: {D} blocks minus 2*keep_ends={2 * cfg.keep_ends} leaves {inner}, "
            f"not a positive multiple of group_size={cfg.group_size}"
        )
    cond_dim = model.cfg.dim
    new, groups = [], []
    i = 0
    while i < D:
        if i < cfg.keep_ends or i >= D - cfg.keep_ends:
            new.append(blocks[i])
            i += 1
            continue
        idx = list(range(i, i + cfg.group_size))
        grp = MoBGroup([blocks[j] for j in idx], cond_dim, cfg.top_k, idx).to(next(model.parameters()).device)
        new.append(grp)
        groups.append(grp)
        i += cfg.group_size
    model.blocks = nn.ModuleList(new)
    model.mob_config = cfg
    return groups


@dataclass(frozen=True)
class _BlockSpec:
    """How a diffusers block is called: its per-sample arguments, what it returns, its conditioning."""

    batch_args: tuple[str, ...]
    """Arguments whose leading dimension is the batch (sliced to the samples that run the block)."""
    outputs: tuple[str, ...]
    """The block returns these inputs, updated, in this order (one name: a bare tensor)."""
    cond: Callable[[nn.Module, dict], Tensor]
    """``cond(block, arguments) -> [B, C]`` the per-sample signal the router reads."""
    cond_dim: Callable[[nn.Module], int]


_FLUX_ARGS = ("hidden_states", "encoder_hidden_states", "temb")
_BASIC_ARGS = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
               "class_labels")


def _basic_cond(block: nn.Module, a: dict) -> Tensor:
    if block.norm_type == "ada_norm_single":  # PixArt: the model's adaLN-single embedding [B, 6 * dim]
        return a["timestep"]
    # DiTTransformer2DModel: the block's own timestep + class embedding [B, dim]
    return block.norm1.emb(a["timestep"], a["class_labels"], hidden_dtype=a["hidden_states"].dtype)


def _basic_cond_dim(block: nn.Module) -> int:
    if block.norm_type == "ada_norm_single":
        return block.scale_shift_table.shape[1] * 6
    return block.norm1.linear.in_features


def _block_spec(block: nn.Module, name: str) -> _BlockSpec:
    kind = type(block).__name__
    if kind == "FluxTransformerBlock":  # returns (encoder_hidden_states, hidden_states), diffusers' order
        return _BlockSpec(_FLUX_ARGS, ("encoder_hidden_states", "hidden_states"), lambda _b, a: a["temb"],
                          lambda b: b.norm1.linear.in_features)
    if kind == "FluxSingleTransformerBlock":
        return _BlockSpec(_FLUX_ARGS, ("encoder_hidden_states", "hidden_states"), lambda _b, a: a["temb"],
                          lambda b: b.norm.linear.in_features)
    if kind == "BasicTransformerBlock":
        if getattr(block, "norm_type", None) not in ("ada_norm_single", "ada_norm_zero"):
            raise TypeError(f"add_mob: {name} has norm_type={getattr(block, 'norm_type', None)!r}; MoB needs a "
                            "per-sample conditioning (ada_norm_single as in PixArt or ada_norm_zero as in DiT)")
        return _BlockSpec(_BASIC_ARGS, ("hidden_states",), _basic_cond, _basic_cond_dim)
    raise TypeError(f"add_mob: {name} is a {kind}; MoB supports FluxTransformerBlock, FluxSingleTransformerBlock "
                    "and diffusers' BasicTransformerBlock")


_BLOCK_LISTS = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "DiTTransformer2DModel": ("transformer_blocks",),
}


class MoBRouter(nn.Module):
    """The router of one group of diffusers blocks (see :class:`MoBBlock`): ``G`` blocks, ``k`` per sample.

    Lives in ``model.mob_routers``; the group's first block computes the routing on its conditioning and
    caches it here for the others (they run right after it in the model's loop).

    Attributes:
        block_names: qualified names of the group's blocks (for the group feature loss).
        aux_loss: Switch load-balancing loss of the last routing.
    """

    def __init__(self, cond_dim: int, block_names: Sequence[str], k: int):
        super().__init__()
        G = len(block_names)
        if not 1 <= k <= G:
            raise ValueError(f"MoBRouter({list(block_names)}): top_k={k} must be in [1, {G}]")
        self.router = nn.Linear(cond_dim, G)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.k = k
        self.block_names = tuple(block_names)
        self.aux_loss: Optional[Tensor] = None
        self.last: Optional[tuple[Tensor, Tensor]] = None  # (selected [B, G], weight [B, G]) of the last routing

    def route(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        probs, selected, weight, self.aux_loss = _route_blocks(self.router, c, self.k)
        self.last = (selected, weight)
        return probs, selected, weight


class MoBBlock(nn.Module):
    """A diffusers transformer block that runs only on the samples its group's :class:`MoBRouter` picks.

    Called exactly like the block (same positional/keyword arguments); returns what the block returns.
    A sample that skips the block gets its inputs back unchanged (``(encoder_hidden_states,
    hidden_states)`` for FLUX, ``hidden_states`` for ``BasicTransformerBlock``); the others get
    ``x + w * (block(x) - x)`` with the straight-through weight ``w`` (1 in the forward). Attribute
    reads fall through to the wrapped block (``DiTTransformer2DModel`` reads ``transformer_blocks[0].norm1``).
    """

    def __init__(self, block: nn.Module, router: MoBRouter, position: int, name: str):
        super().__init__()
        import inspect

        self.block = block
        self.position = position
        self.spec = _block_spec(block, name)
        self.signature = inspect.signature(block.forward)
        object.__setattr__(self, "group", router)  # not a submodule: its weights live in model.mob_routers

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("block")
            if inner is None:
                raise
            return getattr(inner, name)

    def _run(self, a: dict) -> tuple[Tensor, ...]:
        out = self.block(**a)
        return tuple(out) if len(self.spec.outputs) > 1 else (out,)

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        x = tuple(a[n] for n in self.spec.outputs)
        B = a["hidden_states"].shape[0]
        if self.position == 0:
            _, selected, weight = self.group.route(self.spec.cond(self.block, a))
        else:
            if self.group.last is None or self.group.last[0].shape[0] != B:
                raise RuntimeError(f"MoBBlock {self.group.block_names[self.position]}: its group's first block "
                                   f"{self.group.block_names[0]} did not run on this batch of {B} first")
            selected, weight = self.group.last
        col, w = selected[:, self.position], weight[:, self.position]
        if bool(col.all()):
            ys = self._run(a)
            wb = w.to(x[0].dtype)[:, None, None]
            out = tuple(xi + wb * (yi - xi) for xi, yi in zip(x, ys))
        elif not bool(col.any()):
            out = x
        else:
            rows = torch.nonzero(col).flatten()
            sub = dict(a)
            for n in self.spec.batch_args:
                v = a.get(n)
                if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == B:
                    sub[n] = v.index_select(0, rows)
            ys = self._run(sub)
            wb = w.index_select(0, rows).to(x[0].dtype)[:, None, None]
            out = tuple(xi.index_add(0, rows, wb * (yi - xi.index_select(0, rows))) for xi, yi in zip(x, ys))
        return out if len(out) > 1 else out[0]


def _add_mob_diffusers(model: nn.Module, cfg: MoBConfig) -> list[MoBRouter]:
    lists = _BLOCK_LISTS.get(type(model).__name__)
    if lists is None:
        raise TypeError(f"add_mob: {type(model).__name__} is neither a vision3d DiT nor a supported diffusers "
                        f"transformer ({', '.join(_BLOCK_LISTS)})")
    if hasattr(model, "mob_routers"):
        raise ValueError(f"add_mob: the {type(model).__name__} already has MoB groups")
    if cfg.group_size < 2 or not 1 <= cfg.top_k < cfg.group_size:
        raise ValueError(f"add_mob: need group_size >= 2 and 1 <= top_k < group_size, got {cfg.group_size}, {cfg.top_k}")
    plan = []
    for ln in lists:
        blocks = getattr(model, ln)
        D = len(blocks)
        inner = D - 2 * cfg.keep_ends
        for s in range(cfg.keep_ends, cfg.keep_ends + inner - cfg.group_size + 1, cfg.group_size):
            plan.append((ln, list(range(s, s + cfg.group_size))))  # a trailing remainder < group_size always runs
    if not plan:
        sizes = {ln: len(getattr(model, ln)) for ln in lists}
        raise ValueError(f"add_mob: {type(model).__name__} blocks {sizes} minus 2*keep_ends={2 * cfg.keep_ends} "
                         f"leave no group of group_size={cfg.group_size}")
    for ln, idx in plan:  # validate every block before wrapping any
        for i in idx:
            _block_spec(getattr(model, ln)[i], f"{ln}.{i}")
    param = next(model.parameters())
    routers = nn.ModuleList()
    for ln, idx in plan:
        blocks = getattr(model, ln)
        names = [f"{ln}.{i}" for i in idx]
        first = blocks[idx[0]]
        r = MoBRouter(_block_spec(first, names[0]).cond_dim(first), names, cfg.top_k).to(param.device, param.dtype)
        for j, i in enumerate(idx):
            blocks[i] = MoBBlock(blocks[i], r, j, names[j])
        routers.append(r)
    model.mob_routers = routers
    model.mob_config = cfg
    return list(routers)


def set_all_active(model: nn.Module, active: bool = True) -> dict:
    """Set every MoE router's ``k`` to all experts and every MoB group's ``k`` to all blocks (or restore).

    Returns the previous ``{module: k}`` when activating; pass it back as ``active`` to restore.
    """
    if isinstance(active, dict):
        for m, k in active.items():
            (m.router if isinstance(m, MoE) else m).k = k
        return {}
    prev = {}
    for m in model.modules():
        if isinstance(m, MoE) and isinstance(m.router, TopKRouter):
            prev[m] = m.router.k
            m.router.k = m.router.num_experts
        elif isinstance(m, MoBGroup):
            prev[m] = m.k
            m.k = len(m.blocks)
        elif isinstance(m, MoBRouter):
            prev[m] = m.k
            m.k = len(m.block_names)
    return prev


# ------------------------------------------------------------------------------------------------ losses
def clear_aux_losses(model: nn.Module) -> None:
    """Forget the routers' auxiliary losses (call before a forward: MoB may skip a block's MoE)."""
    for m in model.modules():
        if isinstance(m, (MoE, MoBGroup, MoBRouter)):
            m.aux_loss = None


def load_balance_loss(model: nn.Module) -> Tensor:
    """Mean Switch load-balancing loss over every MoE and MoB router run since :func:`clear_aux_losses` (1 = balanced)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, (MoE, MoBGroup, MoBRouter)) and m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([l.float() for l in losses]).mean()


def _feature(out) -> Tensor:
    """A block's output as one ``[B, N, C]`` tensor (FLUX's ``(encoder_hidden_states, hidden_states)`` concatenated on tokens)."""
    return torch.cat(list(out), 1) if isinstance(out, (tuple, list)) else out


class group_features:
    """Context manager capturing block-group outputs: the student's after each MoB group, the
    teacher's after the same original block.

    ``with group_features(student, teacher) as feats: ...`` then ``feats.student``/``feats.teacher``
    are lists of ``[B, N, C]`` tensors in group order. Our DiT (:class:`MoBGroup` s) and diffusers
    transformers (:class:`MoBRouter` groups; the teacher's block of the same qualified name; FLUX's
    two streams concatenated on the token axis).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module):
        self.student_mods: list[nn.Module] = []
        self.teacher_mods: list[nn.Module] = []
        groups = [m for m in getattr(student, "blocks", []) if isinstance(m, MoBGroup)]
        if groups:
            self.student_mods = groups
            self.teacher_mods = [teacher.blocks[g.block_indices[-1]] for g in groups]
        elif isinstance(getattr(student, "mob_routers", None), nn.ModuleList):
            for r in student.mob_routers:
                last = r.block_names[-1]
                self.student_mods.append(student.get_submodule(last))
                t = teacher.get_submodule(last)
                self.teacher_mods.append(t.block if isinstance(t, MoBBlock) else t)
        if not self.student_mods:
            raise ValueError("group_features: the student has no MoB groups (add_mob first)")
        self.student: list[Tensor] = []
        self.teacher: list[Tensor] = []
        self._handles = []

    def __enter__(self):
        self.student.clear()
        self.teacher.clear()
        for m in self.student_mods:
            self._handles.append(m.register_forward_hook(lambda _m, _a, out: self.student.append(_feature(out))))
        for m in self.teacher_mods:
            self._handles.append(m.register_forward_hook(lambda _m, _a, out: self.teacher.append(_feature(out))))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def group_feature_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
    """Mean over groups of the MSE between the student's and the teacher's group output features."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"group_feature_loss: {len(student_feats)} student vs {len(teacher_feats)} teacher features")
    return torch.stack([(s - t.detach()).square().mean() for s, t in zip(student_feats, teacher_feats)]).mean()


# ------------------------------------------------------------------------------------------------ the pruning baseline
def prune_ffns_magnitude(model: nn.Module, keep_fraction: float, names: Optional[Sequence[str]] = None) -> dict[str, SlicedFFN]:
    """Replace each FFN by its ``keep_fraction`` of hidden neurons with the largest weight magnitude, in place.

    Neuron score: ``||W_in[j]|| * ||W_out[:, j]||`` (times ``||W_value[j]||`` for a GLU). The baseline of the
    paper's comparison at the same activated parameters.
    """
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"prune_ffns_magnitude: keep_fraction must be in (0, 1], got {keep_fraction}")
    out = {}
    for n, m in find_ffns(model, names).items():
        w = module_ffn_weights(m, n)
        score = w.in_weight.norm(dim=1) * w.out_weight.norm(dim=0)
        if w.value_weight is not None:
            score = score * w.value_weight.norm(dim=1)
        keep = max(1, round(w.hidden * keep_fraction))
        ids = torch.argsort(score, descending=True)[:keep].sort().values
        new = SlicedFFN.from_weights(w, ids, out_bias=True)
        if _is_flux_single(m):
            _install_fused(m, new)
        else:
            _set_module(model, n, new)
        out[n] = new
    return out


def _mob_plan(D: int, cfg: MoBConfig, who: str) -> list[list[int]]:
    """Block indices of each MoB group of a ``D``-block list (the same grouping as :func:`add_mob` on our DiT)."""
    if cfg.group_size < 2 or not 1 <= cfg.top_k < cfg.group_size:
        raise ValueError(f"{who}: need group_size >= 2 and 1 <= top_k < group_size, got {cfg.group_size}, {cfg.top_k}")
    inner = D - 2 * cfg.keep_ends
    if inner < cfg.group_size or inner % cfg.group_size:
        raise ValueError(f"{who}: {D} blocks minus 2*keep_ends={2 * cfg.keep_ends} leaves {inner}, "
                         f"not a positive multiple of group_size={cfg.group_size}")
    return [list(range(s, s + cfg.group_size)) for s in range(cfg.keep_ends, D - cfg.keep_ends, cfg.group_size)]


def prune_blocks_magnitude(model: nn.Module, cfg: Optional[MoBConfig] = None, keep: Optional[Sequence[int]] = None) -> list[int]:
    """Static depth pruning of our DiT at the MoB budget: of each MoB group keep the ``top_k`` blocks of largest
    weight magnitude (L2 norm of all the block's parameters), drop the others, in place.

    Every sample then runs the same ``top_k`` blocks per group, the number MoB runs per sample: the
    block half of the pruning baseline at the MoE+MoB activated parameters. ``keep`` (original indices)
    rebuilds a saved structure. Returns the kept original indices (also ``model.pruned_blocks``).
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not hasattr(model, "condition"):
        raise TypeError(f"prune_blocks_magnitude: {type(model).__name__} is not a vision3d DiT (needs .blocks and .condition)")
    if hasattr(model, "pruned_blocks") or any(isinstance(b, MoBGroup) for b in blocks):
        raise ValueError("prune_blocks_magnitude: the model's blocks are already pruned or grouped")
    D = len(blocks)
    if keep is None:
        cfg = cfg or MoBConfig()
        drop = set()
        for idx in _mob_plan(D, cfg, "prune_blocks_magnitude"):
            score = torch.stack([torch.sqrt(sum(p.detach().float().square().sum() for p in blocks[i].parameters()))
                                 for i in idx])
            kept = set(idx[j] for j in torch.argsort(score, descending=True)[: cfg.top_k].tolist())
            drop |= set(idx) - kept
        keep = [i for i in range(D) if i not in drop]
    keep = [int(i) for i in keep]
    if not keep or any(not 0 <= i < D for i in keep) or sorted(set(keep)) != keep:
        raise ValueError(f"prune_blocks_magnitude: kept block indices {keep} must be increasing, distinct, in [0, {D})")
    model.blocks = nn.ModuleList([blocks[i] for i in keep])
    model.pruned_blocks = keep
    return keep


def ffn_fraction_for_budget(model: nn.Module, target: float, names: Optional[Sequence[str]] = None) -> float:
    """The ``keep_fraction`` for :func:`prune_ffns_magnitude` that brings ``model``'s activated parameters to ``target``.

    A kept neuron costs its input row (+ bias) and output column; the output bias stays. Raises
    ``ValueError`` when even one neuron per FFN, or every neuron, misses the target.
    """
    ffns = find_ffns(model, names)
    total = activated_parameters(model)
    ffn_params = sum(activated_parameters(m) for m in ffns.values())
    per_neuron, fixed, hidden = 0.0, 0.0, []
    for n, m in ffns.items():
        w = module_ffn_weights(m, n)
        cost = w.in_weight.shape[1] + (w.in_bias is not None) + w.out_weight.shape[0]
        if w.value_weight is not None:
            cost += w.value_weight.shape[1] + (w.value_bias is not None)
        per_neuron += cost * w.hidden
        fixed += w.out_weight.shape[0] if w.out_bias is not None else 0
        hidden.append(w.hidden)
    rest = total - ffn_params
    f = (target - rest - fixed) / per_neuron
    lo = 1.0 / min(hidden)
    if not lo <= f <= 1.0:
        raise ValueError(f"ffn_fraction_for_budget: target {target:.0f} activated parameters needs FFN keep fraction "
                         f"{f:.4f}, outside [{lo:.4f}, 1] (non-FFN parameters {rest:.0f}, FFN {ffn_params:.0f})")
    return float(f)


# ------------------------------------------------------------------------------------------------ accounting
def activated_parameters(module: nn.Module) -> float:
    """Parameters one token (one sample, for MoB) uses: routed experts count ``k/E``, MoB blocks ``k/G``."""
    if isinstance(module, MoE):
        k = getattr(module.router, "k", 1)
        routed = sum(activated_parameters(e) for e in module.experts) * k / module.num_experts
        shared = activated_parameters(module.shared) if module.shared is not None else 0
        return routed + shared + sum(p.numel() for p in module.router.parameters())
    if isinstance(module, MoBGroup):
        blocks = sum(activated_parameters(b) for b in module.blocks) * module.k / len(module.blocks)
        return blocks + sum(p.numel() for p in module.router.parameters())
    if isinstance(module, MoBBlock):  # its router is counted in model.mob_routers
        return activated_parameters(module.block) * module.group.k / len(module.group.block_names)
    own = sum(p.numel() for p in module.parameters(recurse=False))
    return own + sum(activated_parameters(c) for c in module.children())


def activated_linear_flops(module: nn.Module) -> float:
    """Multiply-add FLOPs (2 per weight) of the linear layers one token runs through, with the same expectations."""
    if isinstance(module, nn.Linear):
        return 2.0 * module.in_features * module.out_features
    if isinstance(module, MoE):
        k = getattr(module.router, "k", 1)
        routed = sum(activated_linear_flops(e) for e in module.experts) * k / module.num_experts
        shared = activated_linear_flops(module.shared) if module.shared is not None else 0
        return routed + shared + activated_linear_flops(module.router)
    if isinstance(module, MoBGroup):
        return sum(activated_linear_flops(b) for b in module.blocks) * module.k / len(module.blocks)
    if isinstance(module, MoBBlock):
        return activated_linear_flops(module.block) * module.group.k / len(module.group.block_names)
    return sum(activated_linear_flops(c) for c in module.children())


# ------------------------------------------------------------------------------------------------ save / load
def _structure(model: nn.Module) -> dict:
    d = {}
    if hasattr(model, "dense2moe_config"):
        d["dense2moe"] = asdict(model.dense2moe_config)
    if hasattr(model, "mob_config"):
        d["mob"] = asdict(model.mob_config)
    if hasattr(model, "pruned_blocks"):
        d["pruned_blocks"] = list(model.pruned_blocks)
    if hasattr(model, "pruned_fraction"):
        d["pruned_fraction"] = model.pruned_fraction
    return d


def save_converted(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (base model config + conversion structure) to ``folder``.

    Our DiT and diffusers models (``save_config`` / ``from_config``) are supported.
    """
    from vision3d.train.checkpoint import save_weights
    from vision3d.utils.io import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg: dict = {"structure": _structure(model)}
    if hasattr(model, "save_config") and hasattr(model, "config"):  # diffusers ModelMixin
        cfg["diffusers_class"] = f"{type(model).__module__}:{type(model).__name__}"
        cfg["diffusers_config"] = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    else:
        cfg["dit"] = asdict(model.cfg)
    save_weights(folder / "model.safetensors", model.state_dict())
    write_text_atomic(folder / "config.json", json.dumps(cfg, indent=1, default=list))
    return folder


def _rebuild(model: nn.Module, structure: dict) -> nn.Module:
    if "pruned_blocks" in structure:
        prune_blocks_magnitude(model, keep=structure["pruned_blocks"])
    if "pruned_fraction" in structure:
        prune_ffns_magnitude(model, structure["pruned_fraction"])
        model.pruned_fraction = structure["pruned_fraction"]
    if "dense2moe" in structure:
        d = dict(structure["dense2moe"])
        if d.get("ffn_names") is not None:
            d["ffn_names"] = tuple(d["ffn_names"])
        cfg = Dense2MoEConfig(**d)
        shape_only = Dense2MoEConfig(**{**asdict(cfg), "assignment": "contiguous", "router_init": "zeros"})
        dense_to_moe(model, shape_only)
        model.dense2moe_config = cfg
    if "mob" in structure:
        add_mob(model, MoBConfig(**structure["mob"]))
    return model


def load_converted(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_converted` (structure from ``config.json``, weights strict)."""
    import importlib

    from safetensors.torch import load_file

    from vision3d.gen.dit import DiT, DiTConfig

    folder = Path(folder)
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, w_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: missing (expected a folder written by save_converted)")
    cfg = json.loads(cfg_path.read_text())
    if "diffusers_class" in cfg:
        mod, _, cls_name = cfg["diffusers_class"].partition(":")
        cls = getattr(importlib.import_module(mod), cls_name)
        model = cls.from_config(cfg["diffusers_config"])
    elif "dit" in cfg:
        d = cfg["dit"]
        model = DiT(DiTConfig(**d))
    else:
        raise ValueError(f"{cfg_path}: neither 'dit' nor 'diffusers_class' is set")
    _rebuild(model, cfg.get("structure", {}))
    state = load_file(str(w_path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{w_path}: weights do not match the structure in config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval()
