"""UniNet: contrastive teacher-student scorer with feature selection (supervised or unsupervised)."""

from models.student.uninet.loss import UniNetLoss
from models.student.uninet.torch_model import FeatureSelection, UniNetConfig, UniNetModel

__all__ = ["FeatureSelection", "UniNetConfig", "UniNetLoss", "UniNetModel"]
