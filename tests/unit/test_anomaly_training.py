"""The anomaly scorers' training loop: which samples train and calibrate, and what their crops look like."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.backbone.efficientnet_lite import normalize
from models.student.anomaly_training import AnomalyTrainConfig, train_anomaly_model
from models.student.cfa import CFAConfig, CFALoss, CFAModel

pytestmark = pytest.mark.usefixtures("single_thread")


def gradient_image(level: int) -> np.ndarray:
    """(64, 64, 3) uint8 that brightens left to right from `level`: a quarter turn or a flip shows."""
    ramp = np.clip(level + np.arange(64) * 2, 0, 255).astype(np.uint8)
    return np.repeat(np.tile(ramp, (64, 1))[..., None], 3, axis=2)


class RecordingCFA(CFAModel):
    """CFA that keeps every crop it trains on and calibrates on."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(CFAConfig(num_classes=1, tiny=True, image_size=64, descriptor_dim=8, bank_size=8))
        self.trained_on: list[torch.Tensor] = []
        self.calibrated_on: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        if self.training:
            self.trained_on.extend(x.detach())
        return super().forward(x)

    def calibrate(self, normal_images: torch.Tensor, batch_size: int = 8) -> None:
        self.calibrated_on.extend(normal_images)
        super().calibrate(normal_images, batch_size)


def matches(crop: torch.Tensor, images: list[torch.Tensor]) -> bool:
    return any(torch.equal(crop, image) for image in images)


@pytest.mark.parametrize("turns_and_jitter", [False, True], ids=["plain-crops", "default"])
def test_scorers_train_on_normal_crops_turned_unless_told_not_to(turns_and_jitter: bool) -> None:
    normals = [(gradient_image(level), np.zeros((64, 64), np.uint8), 1.0) for level in (20, 60, 100)]
    defect_mask = np.zeros((64, 64), np.uint8)
    defect_mask[10:20, 10:20] = 1
    defect = (gradient_image(140), defect_mask, 1.0)
    model = RecordingCFA()
    config = AnomalyTrainConfig(
        epochs=4, batch_size=3, image_size=64, reference_crops=6, turns_and_jitter=turns_and_jitter
    )
    train_anomaly_model(model, CFALoss.from_config(model.config), [*normals, defect], config)

    as_given = list(normalize(np.stack([image for image, _, _ in normals])))
    seen = model.trained_on + model.calibrated_on
    assert seen and not matches(normalize(defect[0][None])[0], seen)  # unsupervised: normals only
    untouched = [matches(crop, as_given) for crop in seen]
    if turns_and_jitter:
        assert not all(untouched)
    else:
        assert all(untouched)
