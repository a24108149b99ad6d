"""Metrics and evaluation protocols."""

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
    "psnr",
    "ssim",
    "lpips",
    "lpips_available",
    "lpips_weight_paths",
    "lpips_missing_message",
    "LPIPSWeightsMissing",
    "Metrics",
]
