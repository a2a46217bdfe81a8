"""BAFPN segmentation student: bidirectional attention feature pyramid on EfficientNet-Lite0."""

from models.student.bafpn.loss import BAFPNLoss, distillation_loss
from models.student.bafpn.torch_model import BAFPNConfig, BAFPNModel, CosineNonLocalAttention

__all__ = ["BAFPNConfig", "BAFPNLoss", "BAFPNModel", "CosineNonLocalAttention", "distillation_loss"]
