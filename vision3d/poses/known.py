"""The "known" pose estimator: cameras given with the photos (a COLMAP model or ``transforms.json``).

The cameras themselves are read and matched to the files by :mod:`vision3d.data.folder`; this
estimator checks they are there and pinhole, and passes them (and any sparse points of a COLMAP
model) through unchanged. Written for vision3d (Apache-2.0).
"""

from __future__ import annotations

import os

from .base import PoseEstimator, PoseInput, PoseResult, register_pose_estimator

__all__ = ["KnownPoses"]


@register_pose_estimator("known")
class KnownPoses(PoseEstimator):
    needs_known_cameras = True

    def estimate(self, inputs: PoseInput, work_dir: str | os.PathLike) -> PoseResult:
        if inputs.cameras is None:
            raise ValueError(
                f"{inputs.source}: --poses known needs cameras: pass --cameras PATH (a COLMAP model folder or a "
                "transforms.json), put transforms.json or sparse/0 beside the photos, or use --poses colmap"
            )
        return PoseResult(
            images=inputs.images,
            names=list(inputs.names),
            cameras=inputs.cameras,
            points=inputs.points,
            colors=inputs.colors,
            info={"estimator": "known", "registered": len(inputs.names)},
        )
