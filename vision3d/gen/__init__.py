"""Generation: a small class-conditional DiT (``dit``) and the Dense2MoE path (``dense2moe``).

- :mod:`vision3d.gen.dit`: DiT with adaLN-Zero blocks, flow-matching objective, Euler ODE sampler,
  procedural shapes to train on;
- :mod:`vision3d.gen.dense2moe`: dense FFNs -> shared + routed experts (Taylor metric), Mixture of
  Blocks, load-balancing / distillation / group feature losses, pruning baseline, save/load; works
  on our DiT and in place on diffusers' FLUX, PixArt and DiT transformers (``[gen]`` extra);
- :mod:`vision3d.gen.recipe`: the staged recipe as configs (presets in ``configs/gen/``);
- :mod:`vision3d.gen.quality`: the sample-quality proxy (classifier accuracy, feature Fréchet distance);
- :mod:`vision3d.gen.loop`: the optimisation loop the stages share.

Nothing here is imported by ``import vision3d``; diffusers is imported only by code that needs it.
"""
