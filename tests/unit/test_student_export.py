"""ONNX export of students: onnxruntime reproduces torch's logits and masks, batch size stays dynamic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from models.backbone.efficientnet_lite import normalize
from models.student.bafpn import BAFPNConfig, BAFPNModel
from models.student.export import export_onnx, onnx_predict, onnx_session
from models.student.fpn import FPNConfig, FPNSegmenter

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64


def trained_looking(model: nn.Module, seed: int = 1) -> nn.Module:
    """Open the attention gates and move batch-norm statistics off their defaults, as training would, and
    standardise each logit channel so the argmax varies over pixels (a fresh classifier calls every pixel
    background)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in getattr(model, "attention", {}).values():
            block.gate.copy_(torch.randn(block.gate.shape, generator=generator))
        model.train()
        model(torch.randn(4, 3, SIZE, SIZE, generator=generator))
        model.eval()
        logits = model.segment(normalize(fabric_batch(4, seed=seed)))
        mean, std = logits.mean(dim=(0, 2, 3)), logits.std(dim=(0, 2, 3))
        # Upsampling is linear and keeps constants, so an affine change of the classifier moves the logits.
        model.classifier.weight.div_(std.view(-1, 1, 1, 1))
        model.classifier.bias.sub_(mean).div_(std)
    return model


def bafpn(tiny: bool = True) -> nn.Module:
    torch.manual_seed(0)
    config = BAFPNConfig(num_classes=3, channels=16, image_size=SIZE, tiny=tiny, pretrained=False)
    return trained_looking(BAFPNModel(config))


def fpn() -> nn.Module:
    torch.manual_seed(0)
    return trained_looking(
        FPNSegmenter(FPNConfig(num_classes=3, fpn_channels=16, image_size=SIZE, tiny=True))
    )


def fabric_batch(batch: int, seed: int = 0) -> np.ndarray:
    """(B, S, S, 3) uint8: a weave with a bright blob in some images, so masks are not all background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    images = np.empty((batch, SIZE, SIZE, 3), np.uint8)
    for i in range(batch):
        gray = 110 + 15 * np.sin(xx * 1.1) * np.sin(yy * 0.9) + rng.normal(0, 6, (SIZE, SIZE))
        if i % 2:
            top, left = rng.integers(0, SIZE - 16, 2)
            gray[top : top + 16, left : left + 16] += 100
        images[i] = np.clip(gray, 0, 255)[..., None].astype(np.uint8)
    return images


@pytest.mark.parametrize("make", [bafpn, fpn, lambda: bafpn(tiny=False)], ids=["bafpn", "fpn", "bafpn-lite0"])
def test_onnx_matches_torch(make, tmp_path: Path) -> None:
    model = make()
    path = export_onnx(model, tmp_path / "student.onnx")
    images = fabric_batch(5)  # exported with a batch of 2: the batch must be dynamic
    with torch.no_grad():
        expected = model.segment(normalize(images)).numpy()

    logits = onnx_predict(onnx_session(path, num_threads=1), images)

    assert logits.shape == expected.shape == (5, 4, SIZE, SIZE) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999
    assert len(np.unique(expected.argmax(1))) > 1  # the comparison covers more than one class
    assert onnx_predict(path, images[:1]).shape == (1, 4, SIZE, SIZE)


def test_export_leaves_the_model_as_it_was_and_records_metadata(tmp_path: Path) -> None:
    model = bafpn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "nested" / "bafpn.onnx")
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["architecture"] == "BAFPNModel"
    assert props["image_size"] == str(SIZE) and props["num_classes"] == "3"


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    path = export_onnx(fpn(), tmp_path / "fpn.onnx", image_size=32)
    session = onnx_session(path, num_threads=1)
    assert onnx_predict(session, fabric_batch(1)[:, :32, :32]).shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="tile larger images"):
        onnx_predict(session, fabric_batch(1))
    with pytest.raises(ValueError, match="uint8"):
        onnx_predict(session, fabric_batch(1)[:, :32, :32].astype(np.float32))
    with pytest.raises(FileNotFoundError, match="export a student first"):
        onnx_session(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="segment"):
        export_onnx(nn.Conv2d(3, 3, 1), tmp_path / "conv.onnx", image_size=32)
