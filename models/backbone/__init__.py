"""Pretrained backbones (plain torch)."""

from models.backbone.efficientnet_lite import (
    FEATURE_CHANNELS,
    FEATURE_STRIDES,
    INPUT_MEAN,
    INPUT_STD,
    EfficientNetLite0,
    fuse_batchnorm,
    load_pretrained_lite0,
    normalize,
)

__all__ = [
    "FEATURE_CHANNELS",
    "FEATURE_STRIDES",
    "INPUT_MEAN",
    "INPUT_STD",
    "EfficientNetLite0",
    "fuse_batchnorm",
    "load_pretrained_lite0",
    "normalize",
]
