"""Backbone teacher: pretrained patch features scored against the pool and against normal references."""

from models.teacher.backbone.memory_bank import CompressedMemoryBank, MemoryBankConfig
from models.teacher.backbone.torch_model import BackboneTeacher, TeacherConfig
from models.teacher.types import TeacherPrediction

__all__ = [
    "BackboneTeacher",
    "CompressedMemoryBank",
    "MemoryBankConfig",
    "TeacherConfig",
    "TeacherPrediction",
]
