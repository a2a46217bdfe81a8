"""FPN segmentation student on EfficientNet-Lite0."""

from models.student.checkpoint import read_model_metadata
from models.student.fpn.loss import IGNORE_INDEX, SegmentationLoss
from models.student.fpn.torch_model import (
    FPNConfig,
    FPNSegmenter,
    SegmentationOutput,
    image_score,
)

__all__ = [
    "IGNORE_INDEX",
    "FPNConfig",
    "FPNSegmenter",
    "SegmentationLoss",
    "SegmentationOutput",
    "image_score",
    "read_model_metadata",
]
