"""The shipped pre-trained clicker: current with the recipe, and unpacked weight for weight (seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loom.stages.clicking import (
    SHIPPED_CLICKERS,
    load_clicker,
    pretrain_clicker,
    recipe_key,
    ship_clicker,
    unpack_shipped_clicker,
)
from models.clicker import ClickerConfig, ClickSegmenter

pytestmark = pytest.mark.usefixtures("single_thread")


def test_the_default_recipe_has_a_shipped_decoder() -> None:
    # Changing the default recipe or CLICKER_CODE_VERSION changes the key: every fresh workspace would then
    # pre-train for minutes at `loom up`. Re-ship with `loom clicker pretrain --retrain --ship`.
    name = f"clicker-default-{recipe_key('default', 0)}"
    shipped = sorted(p.name for p in SHIPPED_CLICKERS.iterdir() if p.is_dir())
    assert shipped == [name], f"shipped {shipped}, the default recipe's key is {name}"
    assert (SHIPPED_CLICKERS / name / "decoder.safetensors").stat().st_size < 1_000_000


def test_ship_and_unpack_give_the_same_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ClickSegmenter(ClickerConfig(image_size=64, min_crop=32, pretrained=True))
    model.save_pretrained(tmp_path / "clicker-x", metadata={"recipe": "x"})
    shipped = ship_clicker(tmp_path / "clicker-x", tmp_path / "shipped")
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "decoder.safetensors"]
    unpacked = load_clicker(unpack_shipped_clicker(shipped, tmp_path / "cache" / "clicker-x"))
    original, again = model.state_dict(), unpacked.state_dict()
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_a_clicker_with_a_trained_backbone_cannot_ship(tmp_path: Path) -> None:
    model = ClickSegmenter(ClickerConfig(image_size=64, min_crop=32, pretrained=True))
    with torch.no_grad():
        next(model.backbone.parameters()).add_(0.01)
    model.save_pretrained(tmp_path / "clicker-y")
    with pytest.raises(ValueError, match="not the frozen ImageNet"):
        ship_clicker(tmp_path / "clicker-y", tmp_path / "shipped")
    tiny = ClickSegmenter(ClickerConfig(tiny=True, width=16, aux_channels=8, image_size=64, min_crop=32))
    tiny.save_pretrained(tmp_path / "clicker-z")
    with pytest.raises(ValueError, match="not the frozen ImageNet"):
        ship_clicker(tmp_path / "clicker-z", tmp_path / "shipped")


def test_pretraining_the_default_recipe_unpacks_the_shipped_decoder(tmp_path: Path) -> None:
    model_dir = pretrain_clicker(tmp_path, "default")  # seconds, not the minutes of training
    assert (model_dir / "model.safetensors").is_file()
    assert load_clicker(model_dir).config.image_size == 192
