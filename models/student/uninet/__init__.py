"""UniNet: two teachers, a student decoder, domain-related feature selection, contrastive and margin losses
and a weighted decision (Wei et al., CVPR 2025); supervised or unsupervised."""

from models.student.uninet.loss import UniNetLoss
from models.student.uninet.torch_model import DomainFeatureSelection, UniNetConfig, UniNetModel

__all__ = ["DomainFeatureSelection", "UniNetConfig", "UniNetLoss", "UniNetModel"]
