"""open_clip teacher: WinCLIP-style zero-/few-shot anomaly maps and defect classes from prompt ensembles."""

from models.teacher.openclip.torch_model import (
    DEFAULT_CLASS_NAMES,
    OpenClipTeacher,
    OpenClipTeacherConfig,
    encode_prompt_ensembles,
)
from models.teacher.openclip.weights import (
    TINY_MODEL_NAME,
    OpenClipWeightsUnavailable,
    load_clip,
    openclip_weights_available,
    register_model_configs,
)
from models.teacher.openclip.windows import WindowEncoder, harmonic_aggregate, window_indices

__all__ = [
    "DEFAULT_CLASS_NAMES",
    "TINY_MODEL_NAME",
    "OpenClipTeacher",
    "OpenClipTeacherConfig",
    "OpenClipWeightsUnavailable",
    "WindowEncoder",
    "encode_prompt_ensembles",
    "harmonic_aggregate",
    "load_clip",
    "openclip_weights_available",
    "register_model_configs",
    "window_indices",
]
