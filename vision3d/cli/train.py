"""Train a reconstructor (one GPU, many GPUs via torchrun, or the CPU).

Examples:
    vision3d train --preset configs/re10k/ilrm.yaml --data.root datasets/re10k --out runs/ilrm_re10k
    torchrun --nproc_per_node=8 -m vision3d.train --preset configs/re10k/ilrm.yaml --out runs/ilrm
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:29500 --nproc_per_node=8 -m vision3d.train ...
    vision3d train --preset runs/ilrm/config.yaml --resume      # continue a stopped run
    vision3d train --preset configs/re10k/vggt_finetune.yaml --data.root datasets/re10k --out runs/vggt_re10k

Every model with a training recipe trains here (``vision3d.train.objectives``): the Gaussian
reconstructors (render loss) and VGGT/FlashVGGT (camera, depth and point losses); any other model
is refused before any work starts, with the list of models that train.

``--preset FILE`` loads a YAML preset (or a run's config.yaml) as the defaults; flags override it.
``--backbone NAME`` sets the image encoder of reconstructors that take one by timm name (DepthSplat:
``vit_small_patch14_dinov2``, ``affnet_t``, ``ffnet_1``, ``transnext_micro``, ...), i.e.
``model_kwargs.backbone`` (with the variant's ``backbone_kwargs`` cleared).
"""

from __future__ import annotations

import logging
import sys

from vision3d.cli import pop_option
from vision3d.train.config import TrainConfig, load_config

Args = TrainConfig


def split_preset(argv: list[str]) -> tuple[TrainConfig, list[str]]:
    """Pull ``--preset PATH`` out of argv and load it (unknown keys are an error naming the key)."""
    path, rest = pop_option(argv, "--preset")
    return (TrainConfig() if path is None else load_config(path)), rest


def run(cfg: TrainConfig) -> int:
    from vision3d.train.engine import train
    from vision3d.train.objectives import NotTrainable, recipe_for

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        recipe = recipe_for(cfg.model)
    except NotTrainable as e:
        print(f"vision3d train: {e}", file=sys.stderr)
        return 2
    result = train(cfg)
    if result.history:
        last = result.history[-1]
        shown = [k for k in (recipe.primary, "psnr", "rre_deg", "rte_deg") if k in last]
        print(f"done: step {result.step}, " + ", ".join(f"{k} {last[k]:.5f}" for k in shown) + f" -> {result.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        default, rest = split_preset(argv)
    except (FileNotFoundError, ValueError) as e:
        print(f"vision3d train: {e}", file=sys.stderr)
        return 2
    try:
        backbone, rest = split_backbone(rest)
    except ValueError as e:
        print(f"vision3d train: {e} (a timm model name)", file=sys.stderr)
        return 2
    cfg = tyro.cli(TrainConfig, args=rest, default=default, prog="vision3d train", description=__doc__)
    if backbone is not None:
        cfg.model_kwargs = {**cfg.model_kwargs, "backbone": backbone, "backbone_kwargs": {}}
    return run(cfg)


def split_backbone(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull ``--backbone NAME`` out of argv (the timm name of the reconstructor's image encoder)."""
    return pop_option(argv, "--backbone")
