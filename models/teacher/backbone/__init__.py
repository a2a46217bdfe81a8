"""Backbone teacher: zero-shot mutual scoring of pretrained patch features over an unlabeled pool."""

from models.teacher.backbone.torch_model import BackboneTeacher, TeacherConfig, TeacherPrediction

__all__ = ["BackboneTeacher", "TeacherConfig", "TeacherPrediction"]
