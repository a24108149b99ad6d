"""Feed-forward pose estimation: VGGT and FlashVGGT predict every camera of an unposed image set in
one pass, plus depth maps whose confident pixels become the sparse points for the Gaussian fit.

Models: :mod:`vision3d.recon.vggt` (Wang et al., "VGGT: Visual Geometry Grounded Transformer",
arXiv 2503.11651, facebookresearch/vggt) and :mod:`vision3d.recon.flashvggt`. Their weights are
never downloaded here: pass the authors' checkpoint (converted on the fly) or the output of
``vision3d convert vggt|flashvggt`` as ``weights``.

Images go through VGGT's own preprocessing (:func:`~vision3d.recon.vggt.preprocess_images`, mode
``crop``: width to ``resolution``, height to a multiple of 14, centre crop of taller images); the
predicted intrinsics are mapped back to the input size through the same crop and resize. The
world frame is the first camera's, with VGGT's arbitrary scale.

With ``bundle_adjust=True`` the predicted cameras are refined as in VGGT's ``demo_colmap.py``, by
a bundle adjustment on SIFT tracks (:mod:`vision3d.poses.bundle_adjust`, pycolmap, the ``[sfm]``
extra); its triangulated points, with their colours, replace the depth points.

Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path

import torch
from torch import nn

from vision3d.geometry import Cameras

from .base import PoseEstimationError, PoseEstimator, PoseInput, PoseResult, register_pose_estimator
from .bundle_adjust import BundleAdjustOptions, bundle_adjust


class FeedForwardPoses(PoseEstimator):
    """Poses (and confident depth points) from a feed-forward camera network."""

    model_name = ""  # registered reconstructor that predicts cameras
    converter = ""  # "module:function" converting the authors' checkpoint layout
    optional_prefixes: tuple[str, ...] = ()  # weights a checkpoint may lack (unused by pose estimation)

    def __init__(
        self,
        weights: str | os.PathLike | None = None,  # authors' .pt/.ckpt or a converted .safetensors
        device: str | torch.device = "auto",
        resolution: int = 518,  # VGGT's input width
        conf_percentile: float = 50.0,  # keep depth points above this confidence percentile
        max_points: int = 100_000,  # subsample the point cloud to at most this many points
        model: nn.Module | None = None,  # an already built model (tests, notebooks)
        model_name: str | None = None,  # another registered variant of the same family (e.g. vggt_tiny)
        bundle_adjust: bool = False,  # refine the predicted cameras by bundle adjustment (needs pycolmap)
        ba_options: BundleAdjustOptions | dict | None = None,  # its settings (fields of BundleAdjustOptions)
    ) -> None:
        if model_name is not None:
            self.model_name = model_name
        self.weights = Path(weights) if weights else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else torch.device(device)
        self.resolution, self.conf_percentile, self.max_points = int(resolution), float(conf_percentile), int(max_points)
        self._model = model
        self.bundle_adjust = bool(bundle_adjust)
        if isinstance(ba_options, dict):
            ba_options = BundleAdjustOptions(**ba_options)
        if ba_options is not None and not isinstance(ba_options, BundleAdjustOptions):
            raise TypeError(
                f"{type(self).__name__}: ba_options must be BundleAdjustOptions or a dict, got {type(ba_options)}"
            )
        self.ba_options = ba_options or BundleAdjustOptions()

    # ------------------------------------------------------------------ model
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = self._load()
        return self._model.to(self.device).eval()

    def _load(self) -> nn.Module:
        from vision3d import recon

        if self.weights is None:
            raise PoseEstimationError(
                f"--poses {self.name} needs the {self.model_name} weights (vision3d never downloads them): pass "
                f"--pose-weights PATH with the authors' checkpoint or the output of `vision3d convert {self.name} "
                "SRC DEST`; see models/vggt/card.md for where to get them and their licence"
            )
        if not self.weights.is_file():
            raise FileNotFoundError(f"{self.weights}: {self.name} weights not found")
        if self.weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(self.weights))
        else:
            from vision3d.utils.io import read_checkpoint

            module, fn = self.converter.split(":")
            state = getattr(importlib.import_module(module), fn)(read_checkpoint(self.weights))
        model = recon.create(self.model_name)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(self.optional_prefixes)]
        if missing or unexpected:
            raise ValueError(
                f"{self.weights}: does not fit {self.model_name}: missing {missing[:3]} ({len(missing)}), "
                f"unexpected {unexpected[:3]} ({len(unexpected)})"
            )
        return model

    # ------------------------------------------------------------------ estimation
    @torch.no_grad()
    def estimate(self, inputs: PoseInput, work_dir: str | os.PathLike) -> PoseResult:
        from vision3d.recon.vggt import preprocess_images

        t0 = time.perf_counter()
        model = self.model()
        V, _, H, W = inputs.images.shape
        x = preprocess_images(list(inputs.images), mode="crop", target=self.resolution)  # [V, 3, h, w]
        h, w = x.shape[-2:]
        resized_h = max(14, round(H * self.resolution / W / 14) * 14)  # before the centre crop
        use_bf16 = self.device.type == "cuda"
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(x[None].to(self.device))
        pred = out.cameras[0].to(device="cpu", dtype=torch.float32)  # batch [V], sized w x h
        # undo the centre crop (rows), then the resize, to get cameras of the input images
        K = pred.K.clone()
        K[..., 1, 2] += (resized_h - h) // 2
        cameras = Cameras(K, pred.cam_to_world, w, resized_h).resize(W, H)
        info = {
            "estimator": self.name, "model": self.model_name, "registered": V, "input_images": V,
            "network_size": [int(w), int(h)], "weights": str(self.weights) if self.weights else None,
        }
        if self.bundle_adjust:
            ba = bundle_adjust(inputs.images, cameras, Path(work_dir) / "bundle_adjust", self.ba_options,
                               names=inputs.names)
            info.update(points=int(ba.points.shape[0]), seconds=time.perf_counter() - t0, bundle_adjustment=ba.info)
            return PoseResult(images=inputs.images, names=list(inputs.names), cameras=ba.cameras,
                              points=ba.points, colors=ba.colors, info=info)

        # sparse points: confident depth pixels unprojected with the predicted cameras
        depth = out.depth[0, :, 0].float().cpu()  # [V, h, w]
        conf = out.confidence[0, :, 0].float().cpu()
        pts = pred.unproject(depth)  # [V, h, w, 3]
        cols = x.permute(0, 2, 3, 1)
        flat = conf.flatten()
        sample = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        keep = (conf >= torch.quantile(sample, self.conf_percentile / 100.0)) & torch.isfinite(pts).all(-1)
        pts, cols = pts[keep], cols[keep]
        if pts.shape[0] > self.max_points:
            idx = torch.randperm(pts.shape[0], generator=torch.Generator().manual_seed(0))[: self.max_points]
            pts, cols = pts[idx], cols[idx]
        info.update(points=int(pts.shape[0]), seconds=time.perf_counter() - t0)
        return PoseResult(images=inputs.images, names=list(inputs.names), cameras=cameras,
                          points=pts.contiguous(), colors=cols.contiguous().clamp(0, 1), info=info)


@register_pose_estimator("vggt")
class VGGTPoses(FeedForwardPoses):
    model_name = "vggt_1b"
    converter = "vision3d.recon.vggt:convert_vggt_checkpoint"


@register_pose_estimator("flashvggt")
class FlashVGGTPoses(FeedForwardPoses):
    model_name = "flashvggt_1b"
    converter = "vision3d.recon.flashvggt:convert_flashvggt_checkpoint"
    optional_prefixes = ("point_head.",)  # the authors' FlashVGGT has no point head
