"""The open_clip teacher's default model, ViT-B-16-plus-240 (random weights: none are reachable offline),
builds and labels one 240 x 240 image end to end. Here, not in tests/unit, because the full-size model
takes ~30 s on two CPU cores (building 208M parameters, encoding the prompts, ~2,700 window tokens)."""

from __future__ import annotations

import numpy as np

from models.teacher.openclip import OpenClipTeacher, OpenClipTeacherConfig
from models.teacher.types import TeacherPrediction


def test_vit_b_16_plus_240_labels_one_image() -> None:
    teacher = OpenClipTeacher(OpenClipTeacherConfig(pretrained=None))
    assert teacher.input_size == (240, 240) and teacher.encoder.grid == (15, 15)
    assert [len(windows) for windows in teacher.encoder.windows] == [14 * 14, 13 * 13]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 240, 3), dtype=np.uint8)
    teacher.fit([image])
    prediction = teacher.predict([image])[0]
    assert isinstance(prediction, TeacherPrediction)
    assert prediction.anomaly_map.shape == prediction.mask.shape == (240, 240)
    assert prediction.anomaly_map.dtype == np.float32 and np.isfinite(prediction.anomaly_map).all()
    assert prediction.class_probs is not None and prediction.class_probs.shape == (5, 240, 240)
    np.testing.assert_allclose(prediction.class_probs.sum(axis=0), 1.0, atol=1e-4)
    assert 0.0 <= prediction.score <= 1.0 and 0.0 <= prediction.uncertainty <= 1.0
