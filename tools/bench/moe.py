"""MoE layer speed vs the dense FFN and vs a naive per-expert masked loop; FLUX-sized activated parameters/FLOPs.

Part 1 (throughput): one FFN ``C -> H -> C`` (GELU-tanh) split Dense2MoE-style into 8 neuron slices
(1 shared + top-2 of 7 routed, 3/8 of the FFN active). Timed forward passes (no grad) of

- ``dense``: the FFN itself (timm ``Mlp``);
- ``moe_grouped``: :class:`vision3d.layers.moe.MoE` (one sort by expert, one matmul chain per expert on a
  contiguous slice, one scatter-add);
- ``moe_naive``: the same experts and routing with the common per-expert loop (boolean mask per expert,
  gather, expert, weighted ``index_add``) — the reference implementation;
- ``moe_dense_twin``: every expert on every token (the test oracle).

Ratios are to ``dense`` in the same run. CPU always, CUDA as well when available.

Part 2 (accounting): FLUX.1 [dev]'s transformer (diffusers ``FluxTransformer2DModel`` default config,
built on the meta device: no memory, no download) converted with the same split: total and activated
parameters and linear-layer FLOPs per token: the 19 double-stream blocks' ``ff``/``ff_context`` and
the MLPs fused into the 38 single-stream blocks' ``proj_out`` become MoE layers (attention,
modulation and embeddings stay dense); then MoB on top (groups of 2 consecutive blocks in each
stream, 1 runs per sample, the first and last block of each stream always run: 26 groups).

    PYTHONPATH=. OMP_NUM_THREADS=2 python tools/bench/moe.py --out runs/bench/moe.json

Measured 2026-12-03, shared 2-core CPU (load ~15, one thread; times are noisy), no GPU in this session::

    device dtype        C      H tokens impl                   ms   Mtok/s vs dense
    cpu    float32    256   1024   4096 dense              515.11    0.008     1.00
    cpu    float32    256   1024   4096 moe_grouped        385.32    0.011     0.75
    cpu    float32    256   1024   4096 moe_naive          290.68    0.014     0.56
    cpu    float32    256   1024   4096 moe_dense_twin     857.35    0.005     1.66

    FLUX.1 [dev] transformer, 1 shared + top-2 of 7 routed (3/8 of every FFN active); + MoB:
      total_params             dense   11.891 G   moe   11.893 G (1.000)   moe+mob   11.893 G (1.000)
      activated_params         dense   11.891 G   moe    8.306 G (0.699)   moe+mob    4.643 G (0.390)
      linear_flops_per_token   dense   23.776 G   moe   16.607 G (0.698)   moe+mob    9.283 G (0.390)
      FFNs: 5.739 G -> 2.154 G activated (62.5% fewer)

MoE+MoB activates 39% of FLUX.1 [dev]'s parameters, the paper's "60% fewer" (accounting only: no
FLUX weights are converted or distilled here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn


def naive_moe(moe, x):  # x [T, C]: the per-expert masked loop most MoE code starts from
    routing = moe.router(x)
    out = moe.shared(x) if moe.shared is not None else torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        hit = routing.expert_index == e  # [T, k]
        rows = torch.nonzero(hit.any(-1)).flatten()
        if rows.numel() == 0:
            continue
        w = (routing.weights * hit).sum(-1)[rows]
        out = out.index_add(0, rows, expert(x[rows]) * w[:, None])
    return out


def timeit(fn, device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def build(C: int, H: int, device, dtype):
    from timm.layers import Mlp

    from vision3d.gen.dense2moe import Dense2MoEConfig, convert_ffn

    torch.manual_seed(0)
    mlp = Mlp(C, H, act_layer=lambda: nn.GELU(approximate="tanh")).to(device, dtype).eval()
    cfg = Dense2MoEConfig(num_slices=8, num_shared=1, top_k=2, assignment="contiguous", router_init="random")
    moe = convert_ffn(mlp, cfg, None, "bench.ffn").to(device, dtype).eval()
    return mlp, moe


@torch.no_grad()
def throughput(device: torch.device, C: int, H: int, T: int, repeats: int, dtype=torch.float32) -> list[dict]:
    mlp, moe = build(C, H, device, dtype)
    x = torch.randn(T, C, device=device, dtype=dtype)
    torch.testing.assert_close(moe(x), naive_moe(moe, x), rtol=1e-3, atol=1e-3)
    rows = []
    fns = {"dense": lambda: mlp(x), "moe_grouped": lambda: moe(x), "moe_naive": lambda: naive_moe(moe, x),
           "moe_dense_twin": lambda: moe.forward_dense(x)}
    base = None
    for name, fn in fns.items():
        s = timeit(fn, device, repeats)
        base = s if base is None else base
        rows.append({"device": device.type, "dtype": str(dtype).replace("torch.", ""), "C": C, "H": H, "tokens": T,
                     "impl": name, "ms": s * 1e3, "tokens_per_s": T / s, "time_vs_dense": s / base})
    return rows


def flux_accounting() -> dict:
    from diffusers import FluxTransformer2DModel

    from vision3d.gen.dense2moe import (
        Dense2MoEConfig,
        MoBConfig,
        activated_linear_flops,
        activated_parameters,
        add_mob,
        dense_to_moe,
    )

    with torch.device("meta"):
        flux = FluxTransformer2DModel()  # FLUX.1 [dev] / [schnell] sizes
    dense_params = sum(p.numel() for p in flux.parameters())
    dense_act = activated_parameters(flux)
    dense_flops = activated_linear_flops(flux)
    ff_dense = sum(p.numel() for n, m in flux.named_modules() if n.endswith((".ff", ".ff_context")) for p in m.parameters())
    ff_dense += sum(b.proj_mlp.weight.numel() + b.proj_mlp.bias.numel() + b.proj_mlp.out_features * b.proj_out.out_features
                    for b in flux.single_transformer_blocks)
    cfg = Dense2MoEConfig(num_slices=8, num_shared=1, top_k=2, assignment="contiguous", router_init="zeros")
    layers = dense_to_moe(flux, cfg)
    ff_act = sum(activated_parameters(m) for m in layers.values())
    moe_act, moe_flops = activated_parameters(flux), activated_linear_flops(flux)
    moe_total = sum(p.numel() for p in flux.parameters())
    mob_cfg = MoBConfig(group_size=2, top_k=1, keep_ends=1)
    groups = add_mob(flux, mob_cfg)
    return {
        "model": "FluxTransformer2DModel (default config = FLUX.1 [dev])", "moe_layers": len(layers),
        "total_params_dense": dense_params, "total_params_moe": moe_total,
        "activated_params_dense": dense_act, "activated_params_moe": moe_act,
        "ffn_params_dense": ff_dense, "ffn_activated_moe": ff_act,
        "linear_flops_per_token_dense": dense_flops, "linear_flops_per_token_moe": moe_flops,
        "mob": {"group_size": mob_cfg.group_size, "top_k": mob_cfg.top_k, "keep_ends": mob_cfg.keep_ends,
                "groups": len(groups)},
        "total_params_moe_mob": sum(p.numel() for p in flux.parameters()),
        "activated_params_moe_mob": activated_parameters(flux),
        "linear_flops_per_token_moe_mob": activated_linear_flops(flux),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/moe.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = ap.parse_args(argv)

    cases = [(torch.device("cpu"), 256, 1024, 4096)]
    if args.quick:
        cases = [(torch.device("cpu"), 64, 256, 512)]
    if torch.cuda.is_available():
        cases += [(torch.device("cuda"), 3072, 12288, 8192)] if not args.quick else [(torch.device("cuda"), 256, 1024, 4096)]
    rows = []
    for dev, C, H, T in cases:
        rows += throughput(dev, C, H, T, args.repeats)
        if dev.type == "cuda":
            rows += throughput(dev, C, H, T, args.repeats, torch.bfloat16)
    print(f"{'device':<6} {'dtype':<8} {'C':>5} {'H':>6} {'tokens':>6} {'impl':<15} {'ms':>9} {'Mtok/s':>8} {'vs dense':>8}")
    for r in rows:
        print(f"{r['device']:<6} {r['dtype']:<8} {r['C']:>5} {r['H']:>6} {r['tokens']:>6} {r['impl']:<15} "
              f"{r['ms']:>9.2f} {r['tokens_per_s'] / 1e6:>8.3f} {r['time_vs_dense']:>8.2f}")
    acct = flux_accounting()
    print("\nFLUX.1 [dev] transformer, 1 shared + top-2 of 7 routed (3/8 of every FFN active); MoB: groups of 2 "
          f"blocks, 1 runs per sample, first/last block of each stream always ({acct['mob']['groups']} groups):")
    for k in ("total_params", "activated_params", "linear_flops_per_token"):
        d, m, b = acct[f"{k}_dense"], acct[f"{k}_moe"], acct[f"{k}_moe_mob"]
        print(f"  {k:<24} dense {d / 1e9:8.3f} G   moe {m / 1e9:8.3f} G ({m / d:.3f})   "
              f"moe+mob {b / 1e9:8.3f} G ({b / d:.3f})")
    print(f"  FFNs: {acct['ffn_params_dense'] / 1e9:.3f} G -> {acct['ffn_activated_moe'] / 1e9:.3f} G activated "
          f"({1 - acct['ffn_activated_moe'] / acct['ffn_params_dense']:.1%} fewer)")
    from vision3d.utils.io import write_text_atomic

    write_text_atomic(Path(args.out), json.dumps({"throughput": rows, "flux": acct}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
