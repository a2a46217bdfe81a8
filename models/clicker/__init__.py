"""Defect-Click: a click-to-mask segmenter that corrects existing masks (RITM / FocalClick family)."""

from models.clicker.baselines import GrabCutSegmenter, TeacherMapGrowing
from models.clicker.clicks import Click, disk_maps, error_click, interior_click
from models.clicker.loss import ClickLoss, normalized_focal_loss
from models.clicker.noc import (
    NocObject,
    Segmenter,
    defect_objects,
    evaluate_noc,
    restrict_prelabel,
    split_objects,
)
from models.clicker.predictor import ClickAnswer, ClickPredictor, image_digest
from models.clicker.torch_model import ClickerConfig, ClickSegmenter, ImageFeatures, fuse_for_inference
from models.clicker.training import ClickObject, ClickTrainConfig, degrade_mask, train_clicker
from models.clicker.zoom import Crop, ZoomConfig, roi_crop

__all__ = [
    "Click",
    "ClickAnswer",
    "ClickLoss",
    "ClickObject",
    "ClickPredictor",
    "ClickSegmenter",
    "ClickTrainConfig",
    "ClickerConfig",
    "Crop",
    "GrabCutSegmenter",
    "ImageFeatures",
    "NocObject",
    "Segmenter",
    "TeacherMapGrowing",
    "ZoomConfig",
    "defect_objects",
    "degrade_mask",
    "disk_maps",
    "error_click",
    "evaluate_noc",
    "fuse_for_inference",
    "image_digest",
    "interior_click",
    "normalized_focal_loss",
    "restrict_prelabel",
    "roi_crop",
    "split_objects",
    "train_clicker",
]
