"""Defect-Click on the core side: pre-training (cached), per-round fine-tuning and NoC evaluation of folders.

- :func:`pretrain_clicker` trains the click segmenter on the embedded fabric generator's exact masks, with
  teacher-like blurred masks as previous masks for part of the objects, and caches the result in a folder
  named by a hash of (configuration, data recipe, code version); a second call returns that folder.
- :func:`ship_clicker` writes a pre-trained clicker's decoder into ``models/clicker/shipped/`` (the backbone
  stays the frozen ImageNet Lite0, so the decoder is all that was learned: 0.3 MB); :func:`pretrain_clicker`
  unpacks a shipped decoder whose key matches instead of training, so ``loom up`` on a fresh clone does not
  spend minutes pre-training. A changed recipe or code version changes the key and trains again.
- :func:`fine_tune_clicker` continues from a saved clicker on a round's objects (people's masks with the
  pre-annotations they corrected), with fewer steps and a lower learning rate.
- :func:`resolve_clicker` picks a workspace's clicker as the ML backend does: the champion a round promoted
  (``clicker/champion.json``), else the pre-trained one (``clicker/pretrained/``).
- :func:`evaluate_folder` computes the NoC table of the clicker and the baselines (GrabCut, teacher map
  grown from the clicks) on any folder of images + masks, from nothing and from pre-annotations (given, or
  computed with the project's teacher zero-shot over the folder).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from loom.config import DEFAULT_CLASSES, PROJECT_ROOT, Settings
from models.clicker import (
    ClickerConfig,
    ClickObject,
    ClickPredictor,
    ClickSegmenter,
    ClickTrainConfig,
    GrabCutSegmenter,
    NocObject,
    Segmenter,
    TeacherMapGrowing,
    evaluate_noc,
    image_digest,
    split_objects,
    train_clicker,
)
from models.clicker.noc import OBJECT_GAP, STARTS, NocRun

log = logging.getLogger(__name__)

#: Pre-trained clickers shipped with the project: ``<recipe key>/config.json`` + ``decoder.safetensors``.
SHIPPED_CLICKERS = PROJECT_ROOT / "models" / "clicker" / "shipped"
#: Weights of a ClickSegmenter that belong to the backbone (not shipped: they are the ImageNet ones).
BACKBONE_PREFIX = "backbone."

#: Bump when a change to the clicker's code or recipe should invalidate cached pre-trained models.
CLICKER_CODE_VERSION = "2"
METHODS = ("clicker", "grabcut", "teacher_grow")
#: Learning rate of the per-round fine-tuning: over 3 seeds, 2e-4 beat the pre-trained clicker's mean NoC@85
#: of both starts with every seed, 5e-4 with 2 of 3 (BENCHMARKS.md, Defect-Click).
FINE_TUNE_LR = 2e-4
#: Offset of the rendering seed of fine-tuning's rehearsal images (not pre-training's images).
REHEARSAL_SEED = 7919
#: Method names in tables.
METHOD_TITLES = {
    "clicker": "Defect-Click",
    "grabcut": "GrabCut",
    "teacher_grow": "teacher map grown",
}


@dataclass(frozen=True)
class PretrainRecipe:
    """What :func:`pretrain_clicker` trains on and how (part of the cache key).

    Args:
        images: fabric images rendered (each with at least one defect).
        size: their side in pixels.
        teacher_like_share: share of images whose objects get a teacher-like previous mask (the whole
            defect mask blurred and re-thresholded, so neighbouring defects merge as a teacher's blobs do).
        model: ClickerConfig fields.
        train: ClickTrainConfig fields.
    """

    images: int
    size: int = 256
    teacher_like_share: float = 0.5
    model: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)


RECIPES: dict[str, PretrainRecipe] = {
    "default": PretrainRecipe(
        images=400,
        model={"image_size": 192, "min_crop": 64},
        # The ImageNet backbone stays frozen: a step costs a third (no backward through it), and in the
        # same time 4x the steps do far better than fine-tuning it (BENCHMARKS.md, pre-training recipe).
        # 3,840 steps (~20 min on 2 cores) are affordable because the decoder ships: workspaces unpack it.
        train={"epochs": 24, "steps_per_epoch": 160, "batch_size": 8, "lr": 2e-3, "backbone_lr_factor": 0.0},
    ),
    "tiny": PretrainRecipe(
        images=24,
        size=128,
        model={"tiny": True, "width": 16, "aux_channels": 8, "image_size": 64, "min_crop": 32},
        train={"epochs": 2, "steps_per_epoch": 10, "batch_size": 8, "lr": 3e-3, "recalibrate_batches": 2},
    ),
}


# ---- objects ---------------------------------------------------------------------------------------


def objects_from_masks(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    prelabels: Sequence[np.ndarray | None] | None = None,
    names: Sequence[str] | None = None,
    gap: int = OBJECT_GAP,
) -> list[NocObject]:
    """Every defect object of every mask (see :func:`models.clicker.defect_objects`), with its restricted
    pre-annotation.

    Args:
        images: (H, W, 3) uint8.
        masks: (H, W) binary or class-index masks (>0 = defect).
        prelabels: (H, W) bool pre-annotations of the whole images (or None per image / for all).
        names: image names (objects are named ``name#k``).
        gap: components this close are one object (0: plain 8-connected components).
    """
    objects: list[NocObject] = []
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        prelabel = None if prelabels is None else prelabels[index]
        name = names[index] if names is not None else str(index)
        objects.extend(split_objects(image, mask, prelabel, name, gap=gap))
    return objects


def as_training_objects(objects: Sequence[NocObject]) -> list[ClickObject]:
    """NoC objects -> training objects (the restricted pre-annotation becomes the previous mask)."""
    return [ClickObject(o.image, o.mask, o.prelabel) for o in objects]


def teacher_like_mask(defect_mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A patch-feature teacher's kind of mask for a whole image: blurred, re-thresholded, a little shifted."""
    blurred = ndimage.gaussian_filter(defect_mask.astype(np.float32), rng.uniform(2.5, 6.0))
    if blurred.max() <= 0:
        return np.zeros(defect_mask.shape, bool)
    mask = blurred >= rng.uniform(0.1, 0.45) * blurred.max()
    shift = rng.integers(-3, 4, 2)
    return np.roll(mask, (int(shift[0]), int(shift[1])), axis=(0, 1))


def pretrain_objects(
    recipe: PretrainRecipe, seed: int = 0, classes: Sequence[str] = DEFAULT_CLASSES
) -> list[ClickObject]:
    """Objects of ``recipe.images`` rendered fabric images with exact masks (one per defect object)."""
    from loom.datasets.fabric import render_sample

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC11C, 1]))
    objects: list[ClickObject] = []
    for index in range(recipe.images):
        # Its own seed stream, so these images are not the ones `generate` draws for a dataset folder.
        image_seed = int(np.random.SeedSequence([seed, 0xC11C, 0, index]).generate_state(1, np.uint64)[0])
        sample = render_sample(image_seed, recipe.size, recipe.size, defect_prob=1.0, classes=classes)
        defect = sample.mask > 0
        prev = teacher_like_mask(defect, rng) if rng.random() < recipe.teacher_like_share else None
        for obj in split_objects(sample.image, defect, prev):
            objects.append(ClickObject(obj.image, obj.mask, obj.prelabel if prev is not None else None))
    return objects


# ---- pre-training and fine-tuning ------------------------------------------------------------------


def recipe_key(config: str, seed: int, recipe: PretrainRecipe | None = None) -> str:
    """Hash of everything a pre-trained clicker depends on (configuration, recipe, code version, seed)."""
    if config not in RECIPES:
        raise ValueError(f"unknown clicker configuration {config!r}: choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[config] if recipe is None else recipe
    payload = {
        "config": config,
        "recipe": asdict(recipe) | {"model": dict(recipe.model), "train": dict(recipe.train)},
        "model_defaults": asdict(ClickerConfig(**recipe.model)),
        "train_defaults": ClickTrainConfig(**recipe.train).to_dict(),
        "code": CLICKER_CODE_VERSION,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_save(model: ClickSegmenter, target: Path, metadata: dict[str, Any]) -> Path:
    """Save into a temporary sibling folder, then rename: a killed run leaves no half-written model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging, metadata=metadata)
        if target.exists():  # someone else finished first (or a re-run): keep one copy
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def pretrain_clicker(
    cache_root: Path,
    config: str = "default",
    seed: int = 0,
    recipe: PretrainRecipe | None = None,
    use_shipped: bool = True,
) -> Path:
    """The pre-trained clicker folder for ``config`` ("default" or "tiny"), trained once and cached.

    Args:
        cache_root: folder of cached pre-trained clickers.
        config: a name of :data:`RECIPES`.
        seed: seeds the rendered images, the sampling and the initial weights.
        recipe: a variant of the named recipe (benchmarks: other lengths); part of the cache key.
        use_shipped: unpack the shipped decoder of the same key, if there is one, instead of training.

    Returns:
        ``cache_root / clicker-<config>-<hash>``, holding ``config.json`` + ``model.safetensors``.
    """
    import torch

    target = Path(cache_root) / f"clicker-{config}-{recipe_key(config, seed, recipe)}"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    if use_shipped and (SHIPPED_CLICKERS / target.name / "decoder.safetensors").is_file():
        return unpack_shipped_clicker(SHIPPED_CLICKERS / target.name, target)
    recipe = RECIPES[config] if recipe is None else recipe
    started = time.perf_counter()
    objects = pretrain_objects(recipe, seed)
    torch.manual_seed(seed)
    model = ClickSegmenter(ClickerConfig(**recipe.model))
    train_config = ClickTrainConfig(**{**recipe.train, "seed": seed})
    log.info("pre-training the clicker (%s) on %d objects of %d images", config, len(objects), recipe.images)
    history = train_clicker(model, objects, train_config)
    seconds = time.perf_counter() - started
    log.info("clicker pre-trained in %.0f s (final loss %.4f)", seconds, history[-1]["loss"])
    metadata = {
        "recipe": config,
        "recipe_key": target.name,
        "objects": len(objects),
        "steps": train_config.epochs * train_config.steps_per_epoch,
        "pretrain_seconds": round(seconds, 1),
        "final_loss": history[-1]["loss"],
    }
    return _atomic_save(model, target, metadata)


def _backbone_is_imagenet(model: ClickSegmenter) -> bool:
    """True when the model's backbone weights (and batch-norm statistics) are exactly the ImageNet Lite0's."""
    import torch

    if model.config.tiny:
        return False
    reference = ClickSegmenter(replace(model.config, pretrained=True)).backbone.state_dict()
    own = model.backbone.state_dict()
    return reference.keys() == own.keys() and all(torch.equal(reference[k], own[k]) for k in reference)


def ship_clicker(model_dir: Path, shipped_root: Path = SHIPPED_CLICKERS) -> Path:
    """Write a pre-trained clicker's decoder for shipping: ``shipped_root/<folder name>/``.

    Only a clicker whose backbone stayed the ImageNet one can ship (the default recipe freezes it): its
    unpacked copy is then the same model, weight for weight.

    Raises:
        ValueError: the backbone was trained (or is the tiny test pyramid).
    """
    from safetensors.torch import save_file

    from models.student.checkpoint import read_model_metadata

    model_dir = Path(model_dir)
    model = load_clicker(model_dir)
    if not _backbone_is_imagenet(model):
        raise ValueError(
            f"{model_dir}: its backbone is not the frozen ImageNet Lite0, so its decoder alone is not the "
            "model; ship only clickers of a recipe with backbone_lr_factor 0"
        )
    target = Path(shipped_root) / model_dir.name
    target.mkdir(parents=True, exist_ok=True)
    decoder = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}
    save_file(decoder, str(target / "decoder.safetensors"))
    (target / "config.json").write_text(json.dumps(read_model_metadata(model_dir), indent=2, sort_keys=True))
    return target


def unpack_shipped_clicker(shipped: Path, target: Path) -> Path:
    """A shipped decoder + the ImageNet backbone -> a saved clicker at ``target`` (as pre-training saves)."""
    from safetensors.torch import load_file

    from models.student.checkpoint import config_from_dict

    metadata = json.loads((shipped / "config.json").read_text())
    config = replace(config_from_dict(ClickerConfig, metadata), pretrained=True)
    model = ClickSegmenter(config)
    missing, unexpected = model.load_state_dict(load_file(str(shipped / "decoder.safetensors")), strict=False)
    missing = [k for k in missing if not k.startswith(BACKBONE_PREFIX)]
    if unexpected or missing:
        raise ValueError(
            f"{shipped} does not fit this ClickSegmenter (unexpected {unexpected[:3]}, missing "
            f"{missing[:3]}): ship it again with `loom clicker pretrain --retrain --ship`"
        )
    log.info("clicker %s unpacked from the shipped decoder (no pre-training needed)", target.name)
    # save_pretrained writes the config fields over the metadata's copies of them.
    return _atomic_save(model.eval(), target, {**metadata, "shipped": True})


def load_clicker(model_dir: Path) -> ClickSegmenter:
    """A saved clicker (weights-only: safetensors)."""
    return ClickSegmenter.from_pretrained(model_dir)


# ---- which clicker a workspace uses ----------------------------------------------------------------


def champion_clicker_pointer(settings: Settings) -> Path:
    """Written by the round when it promotes a clicker: ``{"version", "model_dir", ...}``."""
    return settings.clicker_dir / "champion.json"


def pretrained_clicker_root(settings: Settings) -> Path:
    """Cache folder of the workspace's pre-trained clickers (the backend, the round and the CLI share it)."""
    return settings.clicker_dir / "pretrained"


def clicker_choice(settings: Settings, model: Path | None = None) -> tuple[Path, str]:
    """(model folder, which clicker and why): ``model`` if given, else the champion a round promoted, else
    the pre-trained one (``settings.round.clicker_preset``; trained on the first call, then cached).

    Raises:
        FileNotFoundError: ``model`` or the champion's folder is not a saved clicker.
        ValueError: the champion pointer cannot be read (a broken pointer is reported rather than silently
            replaced by the pre-trained clicker, which would make an evaluation measure another model).
    """
    if model is not None:
        model_dir, why = Path(model), f"given clicker {model}"
    else:
        pointer = champion_clicker_pointer(settings)
        if pointer.is_file():
            try:
                record = json.loads(pointer.read_text())
                model_dir = Path(record["model_dir"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{pointer} is not a champion pointer with a model_dir: {exc}") from exc
            why = f"workspace champion clicker v{record.get('version', '?')} ({model_dir})"
        else:
            preset = settings.round.clicker_preset
            model_dir = pretrain_clicker(pretrained_clicker_root(settings), config=preset)
            why = f"pre-trained clicker ({preset}) {model_dir}"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved clicker (no config.json): {why}")
    log.debug("clicker: %s", why)  # callers show `why` themselves (the CLI on stderr)
    return model_dir, why


def resolve_clicker(settings: Settings, model: Path | None = None) -> Path:
    """The clicker folder :func:`clicker_choice` picks (given, champion, else pre-trained)."""
    return clicker_choice(settings, model)[0]


def fine_tune_clicker(
    base_dir: Path,
    objects: Sequence[ClickObject | NocObject],
    out_dir: Path,
    epochs: int = 4,
    steps_per_epoch: int = 25,
    lr: float = FINE_TUNE_LR,
    batch_size: int = 8,
    seed: int = 0,
    backbone_lr_factor: float = 0.0,
    rehearsal_images: int = 0,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Path, list[dict[str, float]]]:
    """Continue training a saved clicker on a round's objects; saved atomically to ``out_dir``.

    Args:
        base_dir: the clicker to start from (pre-trained or last round's).
        objects: people's object masks, with the pre-annotation they corrected as previous mask.
        out_dir: where the fine-tuned clicker goes (replaced if it exists).
        epochs, steps_per_epoch, lr, batch_size, seed, backbone_lr_factor: loop settings (see
            ClickTrainConfig); the backbone stays frozen by default, as in pre-training.
        rehearsal_images: rendered fabric images whose exact masks are mixed in with people's (as in
            pre-training, other images), so a few dozen objects do not make it forget the rest.
        on_epoch: progress callback, as in :func:`models.clicker.train_clicker`.

    Returns:
        (out_dir, per-epoch history).
    """
    model = load_clicker(base_dir)
    train_objects = [
        ClickObject(o.image, o.mask, o.prelabel) if isinstance(o, NocObject) else o for o in objects
    ]
    if rehearsal_images > 0:
        train_objects += pretrain_objects(PretrainRecipe(images=rehearsal_images), seed=seed + REHEARSAL_SEED)
    config = ClickTrainConfig(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        backbone_lr_factor=backbone_lr_factor,
    )
    history = train_clicker(model, train_objects, config, on_epoch=on_epoch)
    metadata = {
        "base": Path(base_dir).name,
        "fine_tune_objects": len(train_objects),
        "rehearsal_images": rehearsal_images,
        "final_loss": history[-1]["loss"],
    }
    return _atomic_save(model, Path(out_dir), metadata), history


# ---- evaluation ------------------------------------------------------------------------------------


@dataclass
class Prelabels:
    """Pre-annotations of a set of images: masks (H, W) bool, teacher maps (H, W) float32 or None, source."""

    masks: list[np.ndarray]
    maps: list[np.ndarray | None]
    source: str


def teacher_prelabels(
    images: Sequence[np.ndarray], settings: Settings | None = None, teacher: str = "backbone"
) -> Prelabels:
    """The project's teacher zero-shot over ``images`` (the pool it labels), as a round pre-annotates."""
    from loom.config import load_settings
    from loom.stages.teachers import build_teacher

    settings = settings or load_settings()
    model, why = build_teacher(settings, teacher)
    started = time.perf_counter()
    model.fit(list(images), [])
    predictions = model.predict(list(images))
    log.info("%s: %d images in %.0f s", why, len(images), time.perf_counter() - started)
    return Prelabels(
        [p.mask.astype(bool) for p in predictions],
        [p.anomaly_map.astype(np.float32) for p in predictions],
        f"{why}, zero-shot over {len(images)} images",
    )


def read_prelabels(prelabels_dir: Path, stems: Sequence[str], shapes: Sequence[tuple[int, int]]) -> Prelabels:
    """Pre-annotations in the prediction layout (``masks/<stem>.png``, optional ``maps/<stem>.npy``)."""
    from loom.data.imageio import read_mask

    prelabels_dir = Path(prelabels_dir)
    masks, maps = [], []
    for stem, shape in zip(stems, shapes, strict=True):
        path = prelabels_dir / "masks" / f"{stem}.png"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: a pre-annotation folder holds masks/<stem>.png per image"
            )
        masks.append(read_mask(path, 255, expected_hw=shape) > 0)
        map_path = prelabels_dir / "maps" / f"{stem}.npy"
        maps.append(np.load(map_path).astype(np.float32) if map_path.is_file() else None)
    return Prelabels(masks, maps, f"pre-annotations from {prelabels_dir}")


def read_folder(
    images_dir: Path, masks_dir: Path
) -> tuple[list[str], list[np.ndarray], list[np.ndarray | None]]:
    """Images of a folder (sorted by name) and their masks (``masks_dir/<stem>.png``, None when missing)."""
    from loom.data.imageio import IMAGE_SUFFIXES, read_image, read_mask

    if not Path(images_dir).is_dir():
        raise FileNotFoundError(f"{images_dir} is not a folder of images")
    paths = sorted(
        p for p in Path(images_dir).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise FileNotFoundError(f"no images in {images_dir}")
    stems, images, masks = [], [], []
    for path in paths:
        image = read_image(path)
        mask_path = Path(masks_dir) / f"{path.stem}.png"
        stems.append(path.stem)
        images.append(image)
        masks.append(
            read_mask(mask_path, 255, expected_hw=image.shape[:2]) > 0 if mask_path.is_file() else None
        )
    if all(m is None for m in masks):
        raise FileNotFoundError(f"none of the images in {images_dir} has a mask <stem>.png in {masks_dir}")
    return stems, images, masks


def build_methods(
    names: Sequence[str],
    model_dir: Path | None,
    maps: Mapping[str, np.ndarray] | None,
) -> dict[str, Segmenter]:
    """The methods to compare, each as ``segment(image, clicks, prev_mask) -> mask``.

    GrabCut and the teacher growing use the clicker's zoom crop and disk radius (the default ones when no
    clicker is evaluated), so every method sees the same region.
    """
    unknown = set(names) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: choose from {', '.join(METHODS)}")
    config = ClickerConfig()
    predictor = None
    if model_dir is not None:
        predictor = ClickPredictor(load_clicker(model_dir))
        config = predictor.config
    methods: dict[str, Segmenter] = {}
    for name in names:
        if name == "clicker":
            if predictor is None:
                raise ValueError("the clicker needs a model folder")
            methods[name] = predictor.segmenter()
        elif name == "grabcut":
            methods[name] = GrabCutSegmenter(config.zoom, config.click_radius)
        elif name == "teacher_grow" and maps:
            methods[name] = TeacherMapGrowing(maps, config.zoom, click_radius=config.click_radius)
    return methods


def evaluate_objects(
    methods: Mapping[str, Segmenter],
    objects: Sequence[NocObject],
    starts: Sequence[str] = STARTS,
    max_clicks: int = 20,
    on_runs: Callable[[str, str, list[NocRun]], None] | None = None,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """NoC rows per method and start: ``{method: {start: {noc85, noc90, fail20, objects, ...}}}``;
    ``on_runs(method, start, runs)`` receives each row's per-object runs."""
    table: dict[str, dict[str, dict[str, float | int]]] = {}
    for name, segment in methods.items():
        table[name] = {}
        for start in starts:
            started = time.perf_counter()
            keep = None if on_runs is None else lambda runs, n=name, s=start: on_runs(n, s, runs)
            table[name][start] = evaluate_noc(segment, objects, start, max_clicks, on_runs=keep)
            log.info(
                "NoC %s from %s: %s (%.0f s)", name, start, table[name][start], time.perf_counter() - started
            )
    return table


def evaluate_folder(
    images_dir: Path,
    masks_dir: Path,
    model_dir: Path | None = None,
    prelabels_dir: Path | None = None,
    teacher: str = "backbone",
    methods: Sequence[str] = METHODS,
    starts: Sequence[str] = STARTS,
    max_clicks: int = 20,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """The NoC table of a folder of images + masks (PNG, 0 background, >0 defect; binary or class ids).

    Pre-annotations (for the "prelabel" start) come from ``prelabels_dir`` (prediction layout) or from
    ``teacher`` run zero-shot over all images of the folder; ``teacher="none"`` with no folder drops that
    start and the teacher-map baseline. The teacher's maps feed the "teacher map grown" baseline.

    Returns:
        JSON-serialisable: ``{"methods": {method: {start: {"noc85", "noc90", "fail20", "objects", ...}}},
        "images", "objects", "prelabels", "model", "max_clicks", "fail_threshold"}``.
    """
    stems, images, masks = read_folder(images_dir, masks_dir)
    if not any(mask is not None and mask.any() for mask in masks):
        # Checked before the teacher runs: every NoC row would be empty, so say why instead.
        raise ValueError(f"the masks in {masks_dir} hold no defect pixels: there is nothing to click on")
    prelabels: Prelabels | None = None
    if prelabels_dir is not None:
        prelabels = read_prelabels(prelabels_dir, stems, [image.shape[:2] for image in images])
    elif teacher != "none" and ("prelabel" in starts or "teacher_grow" in methods):
        prelabels = teacher_prelabels(images, settings, teacher)
    labeled = [i for i, mask in enumerate(masks) if mask is not None]
    objects = objects_from_masks(
        [images[i] for i in labeled],
        [masks[i] for i in labeled],  # type: ignore[misc]
        None if prelabels is None else [prelabels.masks[i] for i in labeled],
        [stems[i] for i in labeled],
    )
    maps = None
    if prelabels is not None and all(m is not None for m in prelabels.maps):
        maps = {image_digest(images[i]): prelabels.maps[i] for i in labeled}
    starts = [s for s in starts if s != "prelabel" or prelabels is not None]
    names = [m for m in methods if m != "teacher_grow" or maps is not None]
    table = evaluate_objects(build_methods(names, model_dir, maps), objects, starts, max_clicks)
    return {
        "methods": table,
        "images": len(images),
        "labeled_images": len(labeled),
        "objects": len(objects),
        "prelabels": None if prelabels is None else prelabels.source,
        "model": None if model_dir is None else str(model_dir),
        "max_clicks": max_clicks,
        "fail_threshold": 0.9,
    }


def format_table(result: Mapping[str, Any], titles: Mapping[str, str] | None = None) -> str:
    """A markdown table of an :func:`evaluate_folder` result (or any ``{"methods": ...}`` dict).

    Args:
        titles: method name -> row title (default :data:`METHOD_TITLES`).
    """
    titles = METHOD_TITLES if titles is None else titles
    max_clicks = result.get("max_clicks", 20)
    lines = [
        f"| method | start | NoC@85 | NoC@90 | fail@{max_clicks} | IoU@1 | objects | ms/click |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in result["methods"].items():
        for start, row in rows.items():
            begin = "pre-annotation" if start == "prelabel" else "nothing"
            lines.append(
                f"| {titles.get(name, name)} | {begin} "
                f"| {row['noc85']:.2f} | {row['noc90']:.2f} | {row[f'fail{max_clicks}']:.2f} "
                f"| {row['iou1']:.3f} | {row['objects']} | {1000 * row['s_per_click']:.1f} |"
            )
    return "\n".join(lines)
