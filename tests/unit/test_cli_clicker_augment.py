"""`loom clicker evaluate` and `loom augment train|generate` through the CLI (tiny models, CPU, seconds)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from app.cli import app
from loom.config import load_settings
from loom.data.imageio import read_image, read_mask, write_mask, write_png
from loom.datasets.fabric import render_sample
from loom.stages.clicking import (
    champion_clicker_pointer,
    clicker_choice,
    fine_tune_clicker,
    objects_from_masks,
    pretrain_clicker,
    pretrained_clicker_root,
    resolve_clicker,
)
from models.student.checkpoint import read_model_metadata

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 64
#: Seeds 0-3 at 64 px hold two misweave instances, one stain and one knot (one defect per image).
DEFECT_SEEDS = range(4)
CLASS = "misweave"
# Wide enough that rich never wraps the error box in the middle of the class list.
runner = CliRunner(env={"COLUMNS": "240"})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/ + masks/ (class ids) of defect images, prelabels/masks/ (their exact binary masks) and
    normal_set/images/ (defect-free; its own folder, so load_normals finds no masks/ beside it)."""
    root = tmp_path_factory.mktemp("cli-data")
    for seed in DEFECT_SEEDS:
        sample = render_sample(seed, SIZE, SIZE, defect_prob=1.0)
        write_png(root / "images" / f"d{seed}.png", sample.image)
        write_mask(root / "masks" / f"d{seed}.png", sample.mask)
        write_mask(root / "prelabels" / "masks" / f"d{seed}.png", (sample.mask > 0).astype(np.uint8))
    for seed in range(3):
        write_png(
            root / "normal_set" / "images" / f"n{seed}.png", render_sample(100 + seed, SIZE, SIZE, 0.0).image
        )
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose pre-trained clicker is the tiny one (so the fallback needs no long training)."""
    ws = tmp_path_factory.mktemp("cli-ws") / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text(yaml.safe_dump({"round": {"clicker_preset": "tiny"}}))
    return ws


@pytest.fixture(scope="module")
def tiny_clicker(workspace: Path) -> Path:
    """The tiny pre-trained clicker, cached where the workspace looks for its pre-trained one (~3 s)."""
    settings = load_settings(workspace)
    return pretrain_clicker(pretrained_clicker_root(settings), config="tiny")


def _labeled(data: Path) -> list[str]:
    return ["--images", str(data / "images"), "--masks", str(data / "masks")]


def _evaluate(data: Path, workspace: Path, *extra: str) -> dict:
    args = ["clicker", "evaluate", *_labeled(data)]
    result = runner.invoke(app, [*args, "--teacher", "none", "--json", "--workspace", str(workspace), *extra])
    assert result.exit_code == 0, result.output
    return {"json": json.loads(result.stdout), "stderr": result.stderr}


def _check_rows(rows: dict, starts: set[str]) -> None:
    assert set(rows) == starts
    for start, row in rows.items():
        low = 1 if start == "nothing" else 0  # a pre-annotation may already meet the threshold
        assert low <= row["noc85"] <= row["noc90"] <= 20, (start, row)
        assert 0.0 <= row["fail20"] <= 1.0 and row["objects"] == 4, (start, row)


def test_clicker_evaluate_grabcut_json_and_table(data: Path, workspace: Path) -> None:
    out = _evaluate(data, workspace, "--methods", "grabcut")
    result = out["json"]
    assert set(result["methods"]) == {"grabcut"} and result["max_clicks"] == 20
    assert result["objects"] == 4 and result["prelabels"] is None and result["model"] is None
    _check_rows(result["methods"]["grabcut"], {"nothing"})  # teacher none, no --prelabels: one start
    assert "clicker:" not in out["stderr"]  # no clicker in the comparison: none resolved (or trained)

    # With pre-annotations (here the exact masks) the second start appears, at 0 clicks.
    prelabels = ["--prelabels", str(data / "prelabels")]
    result = _evaluate(data, workspace, "--methods", "grabcut", *prelabels)["json"]
    _check_rows(result["methods"]["grabcut"], {"nothing", "prelabel"})
    assert result["methods"]["grabcut"]["prelabel"]["noc90"] == 0.0

    options = ["--teacher", "none", "--methods", "grabcut", "--max-clicks", "5"]
    table = runner.invoke(
        app, ["clicker", "evaluate", *_labeled(data), *options, "--workspace", str(workspace)]
    )
    assert table.exit_code == 0, table.output
    assert "fail@5" in table.stdout and "| GrabCut | nothing |" in table.stdout


def test_clicker_evaluate_with_a_given_tiny_clicker(data: Path, workspace: Path, tiny_clicker: Path) -> None:
    options = ["--methods", "clicker,grabcut", "--model", str(tiny_clicker)]
    out = _evaluate(data, workspace, *options, "--prelabels", str(data / "prelabels"))
    assert f"given clicker {tiny_clicker}" in out["stderr"]
    result = out["json"]
    assert set(result["methods"]) == {"clicker", "grabcut"} and result["model"] == str(tiny_clicker)
    for rows in result["methods"].values():
        _check_rows(rows, {"nothing", "prelabel"})


def test_unknown_method_is_refused(data: Path, workspace: Path) -> None:
    args = ["clicker", "evaluate", *_labeled(data)]
    result = runner.invoke(app, [*args, "--methods", "sam", "--workspace", str(workspace)])
    assert result.exit_code != 0 and "grabcut" in result.output


def test_clicker_resolution_given_champion_pretrained(
    workspace: Path, tiny_clicker: Path, tmp_path: Path
) -> None:
    settings = load_settings(workspace)
    # No champion yet: the pre-trained clicker of the workspace's preset (cached by the fixture).
    assert resolve_clicker(settings, None) == tiny_clicker
    champion = shutil.copytree(tiny_clicker, tmp_path / "champion")
    pointer = champion_clicker_pointer(settings)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    try:
        pointer.write_text(json.dumps({"version": "3", "model_dir": str(champion), "round": 2}))
        model_dir, why = clicker_choice(settings, None)
        assert model_dir == champion and "champion" in why and "v3" in why
        assert resolve_clicker(settings, tiny_clicker) == tiny_clicker  # --model wins over the champion
        pointer.write_text("{not json")
        with pytest.raises(ValueError, match="champion pointer"):
            resolve_clicker(settings, None)
    finally:
        pointer.unlink()
    with pytest.raises(FileNotFoundError, match="not a saved clicker"):
        resolve_clicker(settings, tmp_path)


def _check_pairs(out: Path, count: int, class_id: int) -> None:
    """``count`` image + mask pairs of the normals' size; mask values 0 or ``class_id`` only."""
    images = sorted((out / "images").glob("*.png"))
    masks = sorted((out / "masks").glob("*.png"))
    assert [p.name for p in images] == [p.name for p in masks] and len(images) == count
    classes = json.loads((out / "classes.json").read_text())
    for image_path, mask_path in zip(images, masks, strict=True):
        assert read_image(image_path).shape == (SIZE, SIZE, 3)
        mask = read_mask(mask_path, len(classes))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, class_id}
        assert (mask == class_id).any()


def _generate(data: Path, workspace: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = ["augment", "generate", "--n", "2", "--normals", str(data / "normal_set" / "images")]
    result = runner.invoke(app, [*args, "--out", str(out), "--workspace", str(workspace), *extra])
    assert result.exit_code == 0, result.output
    made = re.search(r"^(\d+) of 2 \w+ pairs", result.stdout, re.MULTILINE)
    assert made and "accepted" in result.stdout and "rejected" in result.stdout, result.stdout
    return int(made.group(1)), result.stderr


def test_clicker_pretrain_reuses_the_cache_retrains_on_request_and_ships_only_frozen_backbones(
    workspace: Path, tiny_clicker: Path
) -> None:
    from loom.stages.clicking import SHIPPED_CLICKERS

    cached = runner.invoke(app, ["clicker", "pretrain", "--workspace", str(workspace)])
    assert cached.exit_code == 0, cached.output
    assert str(tiny_clicker) in cached.output
    again = runner.invoke(app, ["clicker", "pretrain", "--retrain", "--workspace", str(workspace)])
    assert again.exit_code == 0, again.output
    retrained = Path(again.output.split("pre-trained clicker: ", 1)[1].split()[0])
    assert retrained != tiny_clicker and retrained.name == tiny_clicker.name
    assert (retrained / "model.safetensors").is_file()
    shipped_before = sorted(p.name for p in SHIPPED_CLICKERS.iterdir())
    ship = runner.invoke(app, ["clicker", "pretrain", "--ship", "--workspace", str(workspace)])
    assert ship.exit_code == 1 and "not the frozen ImageNet" in ship.output
    assert sorted(p.name for p in SHIPPED_CLICKERS.iterdir()) == shipped_before


def test_augment_train_then_generate(data: Path, workspace: Path, tmp_path: Path) -> None:
    settings = load_settings(workspace)
    args = ["augment", "train", *_labeled(data)]
    trained = runner.invoke(app, [*args, "--preset", "tiny", "--workspace", str(workspace)])
    assert trained.exit_code == 0, trained.output
    model = Path(trained.stdout.strip())  # the model folder alone on stdout
    assert (model / "training.json").is_file() and settings.stack_dir / "defect-gen" in model.parents

    class_id = settings.classes.index(CLASS) + 1
    made, _ = _generate(data, workspace, tmp_path / "given", "--class", CLASS, "--model", str(model))
    # A tiny, barely trained model may have every sample rejected; whatever it accepts must be right.
    _check_pairs(tmp_path / "given", made, class_id)
    made, stderr = _generate(data, workspace, tmp_path / "newest", "--class", CLASS)  # the newest cached
    assert f"defect-gen model: {model}" in stderr
    _check_pairs(tmp_path / "newest", made, class_id)


def test_defect_gen_copy_pastes_the_classes_its_square_cannot_hold(
    data: Path, workspace: Path, tmp_path: Path
) -> None:
    from loom.stages.augment import generator_fits, load_folder, load_normals, synthesise, train_defect_gen

    settings = load_settings(workspace)
    labeled = load_folder(data / "images", data / "masks", settings.classes)
    trained = train_defect_gen(labeled.images, labeled.masks, settings.classes, tmp_path / "dg", "tiny")
    model = shutil.copytree(trained, tmp_path / "edited")
    meta = json.loads((model / "defect_gen.json").read_text())
    side = meta["config"]["region_size"]
    # One class that fits the inpainting square and one that does not, whatever the tiny data holds.
    meta["stats"]["knot"] |= {"median_height": side - 2.0, "median_width": side - 2.0}
    meta["stats"][CLASS] |= {"median_height": 3.0, "median_width": side + 1.0}
    (model / "defect_gen.json").write_text(json.dumps(meta))
    fits = generator_fits(model)
    assert fits["knot"] and not fits[CLASS]

    normals = load_normals(data / "normal_set" / "images", settings.classes)
    plan = {"knot": 2, CLASS: 2}
    made = synthesise(
        "defect_gen", labeled.images, labeled.masks, settings.classes, normals, 4, plan=plan, model_dir=model
    )
    assert made.methods == {"knot": "defect_gen", CLASS: "copy_paste"}
    assert made.pair_classes.count(CLASS) == 2  # copy-paste always places its cut
    assert "too_large" in made.counts[CLASS] and "wrong_class" in made.counts["knot"]  # each method's counts
    assert made.pair_methods == [made.methods[name] for name in made.pair_classes]
    everything = synthesise(
        "defect_gen",
        labeled.images,
        labeled.masks,
        settings.classes,
        normals,
        4,
        plan=plan,
        model_dir=model,
        copy_paste_misfits=False,
    )
    assert set(everything.methods.values()) == {"defect_gen"}
    # Asked for by name on the CLI, the class is still generated, with a note saying why it may fall short.
    _, stderr = _generate(data, workspace, tmp_path / "cli", "--class", CLASS, "--model", str(model))
    assert "larger than the generator's square" in stderr


def test_augment_copy_paste(data: Path, workspace: Path, tmp_path: Path) -> None:
    labeled = _labeled(data)
    made, _ = _generate(data, workspace, tmp_path / "cp", "--mode", "copy_paste", "--class", CLASS, *labeled)
    assert made == 2
    _check_pairs(tmp_path / "cp", 2, load_settings(workspace).classes.index(CLASS) + 1)


def test_augment_bad_class_and_preset_are_refused(data: Path, workspace: Path, tmp_path: Path) -> None:
    def generate(name: str) -> Result:
        normals = ["--normals", str(data / "normal_set" / "images"), "--out", str(tmp_path / "x")]
        options = ["--class", name, "--n", "1", *normals, "--mode", "copy_paste", *_labeled(data)]
        return runner.invoke(app, ["augment", "generate", *options, "--workspace", str(workspace)])

    unknown = generate("scratch")
    assert unknown.exit_code != 0 and "scratch" in unknown.output
    assert all(name in unknown.output for name in load_settings(workspace).classes), unknown.output
    # A known class the labeled set has no example of: nothing to cut, said so with the usable classes.
    absent = generate("hole")
    assert absent.exit_code != 0 and "misweave" in absent.output and "hole" in absent.output
    assert not (tmp_path / "x").exists()
    preset = runner.invoke(
        app, ["augment", "train", *_labeled(data), "--preset", "huge", "--workspace", str(workspace)]
    )
    assert preset.exit_code != 0 and "tiny" in preset.output


def test_round_augment_auto_is_defect_gen_only_with_a_gpu(monkeypatch) -> None:
    import torch

    from tasks.augment import augment_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert augment_mode("auto") == "copy_paste"
    assert augment_mode("defect_gen") == "defect_gen" and augment_mode("none") == "none"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert augment_mode("auto") == "defect_gen"


def test_fine_tuning_mixes_rendered_objects_in_when_asked(tmp_path: Path) -> None:
    base = pretrain_clicker(tmp_path / "cache", config="tiny")
    sample = render_sample(DEFECT_SEEDS[0], SIZE, SIZE, defect_prob=1.0)
    objects = objects_from_masks([sample.image], [sample.mask])
    plain, _ = fine_tune_clicker(base, objects, tmp_path / "plain", epochs=1, steps_per_epoch=2)
    mixed, history = fine_tune_clicker(
        base, objects, tmp_path / "mixed", epochs=1, steps_per_epoch=2, rehearsal_images=2
    )
    assert read_model_metadata(plain)["fine_tune_objects"] == len(objects)
    meta = read_model_metadata(mixed)
    assert meta["rehearsal_images"] == 2 and meta["fine_tune_objects"] > len(objects)
    assert np.isfinite(history[-1]["loss"]) and (mixed / "model.safetensors").is_file()
