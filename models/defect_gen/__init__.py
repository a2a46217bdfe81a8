"""Defect-Gen: two-stage diffusion (large model for noisy steps, small patch model for late steps) that
generates defect image + mask pairs on real normal fabric."""

from models.defect_gen.config import PRESETS, DefectGenConfig, preset
from models.defect_gen.pipeline import DefectGenPipeline
from models.defect_gen.placement import REASONS, GenerationReport, RejectionRules, generate_on_normals
from models.defect_gen.schedule import Step, descent
from models.defect_gen.training import train_pipeline

__all__ = [
    "PRESETS",
    "REASONS",
    "DefectGenConfig",
    "DefectGenPipeline",
    "GenerationReport",
    "RejectionRules",
    "Step",
    "descent",
    "generate_on_normals",
    "preset",
    "train_pipeline",
]
