"""Datasets (RE10K, DL3DV, folders, synthetic) and view samplers.

Every dataset yields :class:`ViewsExample` (images ``[V, 3, H, W]`` in [0, 1], :class:`Cameras`
with K in pixels and OpenCV cam-to-world); :func:`collate_views` batches them to ``[B, V, ...]``.
:class:`SceneSampler` shards scenes over DDP ranks and DataLoader workers, deterministically and
resumably. :mod:`vision3d.data.synthetic` writes rendered procedural scenes in the RE10K layout.
"""

from .dl3dv import DL3DVDataset, DL3DVRawDataset, convert_dl3dv
from .example import ViewsBatch, ViewsExample, collate_views
from .loader import make_loader
from .folder import ImageSet, load_image_folder, load_images, load_video
from .preprocess import BadSceneError, decode_image, encode_jpeg, resize_and_center_crop
from .re10k import ChunkDataset, ChunkDatasetConfig, RE10KDataset, read_chunk, read_index, write_chunk, write_index
from .samplers import (
    AllViewsSampler,
    BoundedViewSampler,
    EvaluationViewSampler,
    NotEnoughViews,
    SampleKey,
    SceneSampler,
    SceneSkipped,
    many_view_sampler,
)

__all__ = [
    "make_loader",
    "DL3DVDataset",
    "DL3DVRawDataset",
    "convert_dl3dv",
    "ImageSet",
    "load_image_folder",
    "load_images",
    "load_video",
    "ViewsBatch",
    "ViewsExample",
    "collate_views",
    "BadSceneError",
    "decode_image",
    "encode_jpeg",
    "resize_and_center_crop",
    "ChunkDataset",
    "ChunkDatasetConfig",
    "RE10KDataset",
    "read_chunk",
    "read_index",
    "write_chunk",
    "write_index",
    "AllViewsSampler",
    "BoundedViewSampler",
    "EvaluationViewSampler",
    "NotEnoughViews",
    "SampleKey",
    "SceneSampler",
    "SceneSkipped",
    "many_view_sampler",
]
