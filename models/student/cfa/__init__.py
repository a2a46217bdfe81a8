"""CFA: coupled-hypersphere feature adaptation with a compressed memory bank (unsupervised scorer)."""

from models.student.cfa.loss import CFALoss
from models.student.cfa.torch_model import CFAConfig, CFAModel, CFATrainOutput

__all__ = ["CFAConfig", "CFALoss", "CFAModel", "CFATrainOutput"]
