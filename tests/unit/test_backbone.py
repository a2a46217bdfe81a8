"""EfficientNet-Lite0: every checkpoint tensor maps, stage shapes, determinism, ImageNet behaviour kept."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.backbone import (
    FEATURE_CHANNELS,
    FEATURE_STRIDES,
    EfficientNetLite0,
    fuse_batchnorm,
    load_pretrained_lite0,
    normalize,
)
from models.backbone.efficientnet_lite import convert_checkpoint, map_checkpoint_key, pretrained_weights_path


@pytest.fixture(scope="module")
def pretrained() -> EfficientNetLite0:
    return load_pretrained_lite0(pretrained=True)


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(pretrained_weights_path(), map_location="cpu", weights_only=True)


def test_every_checkpoint_tensor_maps_onto_the_model(checkpoint: dict[str, torch.Tensor]) -> None:
    model = EfficientNetLite0()
    converted = convert_checkpoint(checkpoint, model)
    assert set(converted) == set(model.state_dict())
    assert len(converted) == len(checkpoint) == 296
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == 4_652_008  # the published Lite0 size
    assert map_checkpoint_key("_blocks.3._bn1.running_var") == "blocks.3.depthwise.bn.running_var"
    assert map_checkpoint_key("_fc.weight") == "classifier.weight"


def test_pretrained_weights_are_the_checkpoint_values(
    pretrained: EfficientNetLite0, checkpoint: dict[str, torch.Tensor]
) -> None:
    state = pretrained.state_dict()
    for key, tensor in checkpoint.items():
        torch.testing.assert_close(state[map_checkpoint_key(key)], tensor, rtol=0, atol=0)


def test_partial_or_foreign_checkpoints_are_refused(checkpoint: dict[str, torch.Tensor]) -> None:
    model = EfficientNetLite0()
    partial = {key: value for key, value in checkpoint.items() if key != "_blocks.7._project_conv.weight"}
    with pytest.raises(ValueError, match=r"missing \['blocks\.7\.project\.conv\.weight'\]"):
        convert_checkpoint(partial, model)
    with pytest.raises(KeyError, match=r"_blocks\.0\._se_reduce\.weight"):
        convert_checkpoint({**checkpoint, "_blocks.0._se_reduce.weight": torch.zeros(8, 32, 1, 1)}, model)
    reshaped = {**checkpoint, "_fc.bias": torch.zeros(10)}
    with pytest.raises(ValueError, match=r"shape mismatch for classifier\.bias"):
        convert_checkpoint(reshaped, model)


@pytest.mark.parametrize(("height", "width"), [(64, 96), (65, 97), (160, 128)])
def test_feature_shapes_per_stage(height: int, width: int) -> None:
    model = EfficientNetLite0().eval()
    with torch.inference_mode():
        features = model.forward_features(torch.randn(2, 3, height, width))
        logits = model(torch.randn(2, 3, height, width))
    expected = [
        (2, channels, math.ceil(height / stride), math.ceil(width / stride))
        for stride, channels in zip(FEATURE_STRIDES, FEATURE_CHANNELS, strict=True)
    ]
    assert [tuple(feature.shape) for feature in features] == expected
    assert logits.shape == (2, 1000)


def test_max_stride_stops_early_with_the_same_values() -> None:
    model = EfficientNetLite0().eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        full = model.forward_features(images)
        upto_16 = model.forward_features(images, max_stride=16)
    assert len(upto_16) == 4
    for short, long in zip(upto_16, full, strict=False):
        torch.testing.assert_close(short, long, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_stride"):
        model.forward_features(images, max_stride=12)


def test_eval_forward_is_deterministic_and_fusion_keeps_the_function(pretrained: EfficientNetLite0) -> None:
    images = normalize(np.random.default_rng(0).integers(0, 256, (2, 96, 80, 3), dtype=np.uint8))
    with torch.inference_mode():
        first, second = pretrained(images), pretrained(images)
        fused = fuse_batchnorm(pretrained)(images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(fused, first, rtol=1e-4, atol=1e-4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in pretrained.modules())  # the original is untouched


def test_normalize_layouts_and_scale() -> None:
    image = np.zeros((4, 5, 3), dtype=np.uint8)
    image[0, 0] = 255
    image[0, 1] = 127
    tensor = normalize(image)
    assert tensor.shape == (1, 3, 4, 5) and tensor.dtype == torch.float32
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([1.0] * 3)  # (255 - 127) / 128
    assert tensor[0, :, 0, 1].tolist() == pytest.approx([0.0] * 3, abs=1e-6)
    from_float = normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)
    torch.testing.assert_close(from_float, tensor)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        normalize(np.zeros((4, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        normalize(np.zeros((1, 4, 5, 3), dtype=np.int32))


def test_pretrained_model_recognises_a_photograph(pretrained: EfficientNetLite0) -> None:
    """Grace Hopper in uniform (matplotlib's sample photo): ImageNet accuracy survived the port."""
    import matplotlib  # installed with mlflow; its sample photo ships in the wheel

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    from PIL import Image

    image = Image.open(photo).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    crop = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.Resampling.BICUBIC)
    with torch.inference_mode():
        probabilities = pretrained(normalize(np.asarray(crop))).softmax(dim=1)[0]
    top5 = probabilities.topk(5).indices.tolist()
    academic_gown, military_uniform, mortarboard = 400, 652, 667
    assert top5[0] in {academic_gown, military_uniform, mortarboard}
    assert military_uniform in top5
    assert probabilities.max() > 0.15  # random weights give ~0.001


def test_matches_timm_tensorflow_port_exactly(pretrained: EfficientNetLite0) -> None:
    """timm's independent TF-padding port of Lite0, given the same tensors, computes the same logits."""
    import timm  # installed with open_clip_torch

    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ours = pretrained.state_dict()
    theirs = reference.state_dict()
    assert len(ours) == len(theirs)
    # Both modules register tensors in network order; shapes must agree pairwise.
    mapped = {}
    for (their_key, their_tensor), our_tensor in zip(theirs.items(), ours.values(), strict=True):
        assert their_tensor.shape == our_tensor.shape, their_key
        mapped[their_key] = our_tensor
    reference.load_state_dict(mapped)
    images = torch.randn(2, 3, 99, 130)  # odd sizes exercise the asymmetric SAME padding
    with torch.inference_mode():
        torch.testing.assert_close(pretrained(images), reference(images), rtol=1e-5, atol=1e-5)
