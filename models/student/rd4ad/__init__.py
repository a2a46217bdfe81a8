"""RD4AD: reverse distillation from a one-class bottleneck embedding (unsupervised scorer)."""

from models.student.rd4ad.loss import RD4ADLoss
from models.student.rd4ad.torch_model import DistillationOutput, RD4ADConfig, RD4ADModel

__all__ = ["DistillationOutput", "RD4ADConfig", "RD4ADLoss", "RD4ADModel"]
