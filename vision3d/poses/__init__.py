"""Camera estimation for unposed images.

One interface (:class:`PoseEstimator`, registered by name): ``known`` (cameras given with the photos),
``colmap`` (incremental SfM with pycolmap, the ``[sfm]`` extra), ``vggt`` and ``flashvggt``
(feed-forward, :mod:`vision3d.poses.feedforward`). :mod:`vision3d.poses.bundle_adjust` refines
given cameras on SIFT tracks (the feed-forward estimators' ``bundle_adjust=True``; its SIFT
extraction and matching also serve ``colmap``). :mod:`vision3d.poses.path` makes smooth camera
paths through posed cameras.
"""

from .base import (
    PoseEstimationError,
    PoseEstimator,
    PoseInput,
    PoseResult,
    create_pose_estimator,
    list_pose_estimators,
    register_pose_estimator,
)

__all__ = [
    "PoseEstimationError",
    "PoseEstimator",
    "PoseInput",
    "PoseResult",
    "create_pose_estimator",
    "list_pose_estimators",
    "register_pose_estimator",
]
