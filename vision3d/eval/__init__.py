"""Metrics and evaluation protocols: rendering (PSNR, SSIM, LPIPS; :mod:`.protocol`) and geometry
(camera AUC@30, RRA/RTA, AbsRel, delta<1.25; :mod:`.geometry`)."""

from .geometry import accuracy_at, camera_errors, depth_metrics, evaluate_geometry, pose_auc

from .metrics import (
    LPIPSWeightsMissing,
    Metrics,
    lpips,
    lpips_available,
    lpips_missing_message,
    lpips_weight_paths,
    psnr,
    ssim,
)

__all__ = [
    "camera_errors",
    "pose_auc",
    "accuracy_at",
    "depth_metrics",
    "evaluate_geometry",
    "psnr",
    "ssim",
    "lpips",
    "lpips_available",
    "lpips_weight_paths",
    "lpips_missing_message",
    "LPIPSWeightsMissing",
    "Metrics",
]
