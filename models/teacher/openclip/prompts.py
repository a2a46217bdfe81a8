"""Prompt ensembles of the vision-language teacher: fabric states and defect types, as plain text.

A CLIP text embedding of one sentence is noisy; the mean over many phrasings of the same meaning is not
(WinCLIP's compositional prompt ensemble). A prompt is a template ("a close-up photo of {}.") filled with a
state phrase ("flawless fabric", "woven textile with a hole"); every state phrase is combined with every
template. The state phrases name the material, so the vocabulary fits woven and knitted fabric rather than
generic objects. Everything here is a constant or a pure function of its arguments, so the prompts of a
run are fully determined by the configured class names.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Sentence frames; "{}" takes a state or defect phrase.
TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a close-up photo of {}.",
    "a cropped photo of {}.",
    "a macro photo of {}.",
    "an industrial inspection image of {}.",
    "a photo of a piece of {}.",
)

#: Phrases for defect-free material.
NORMAL_STATES: tuple[str, ...] = (
    "flawless fabric",
    "perfect woven textile",
    "clean cloth",
    "fabric without defects",
    "evenly woven fabric with a regular pattern",
    "undamaged textile",
)

#: Phrases for material with any kind of flaw.
ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged fabric",
    "fabric with a defect",
    "woven textile with a hole",
    "fabric with a stain",
    "cloth with a broken yarn",
    "fabric with a knot",
    "textile with a weaving fault",
    "torn cloth",
)

#: Phrases per defect type of the default fabric class set (the generic `defect` class has none).
CLASS_PHRASES: dict[str, tuple[str, ...]] = {
    "hole": ("fabric with a hole", "woven textile with a hole torn through it", "cloth with a puncture"),
    "stain": ("fabric with a stain", "cloth with a dirty spot", "textile with an oil stain"),
    "broken_yarn": ("fabric with a broken yarn", "cloth with a snapped thread", "textile with a broken end"),
    "knot": ("fabric with a knot", "cloth with a slub of yarn", "textile with a lump in the weave"),
    "misweave": ("fabric with a misweave", "cloth with a float in the weave", "textile with a wrong pattern"),
    "float": ("fabric with a float", "cloth with loose yarn floating over the weave", "textile with a float"),
}


def fill_templates(phrases: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every phrase in every template, phrase-major: [t0(p0), t1(p0), ..., t0(p1), ...]."""
    return [template.format(phrase) for phrase in phrases for template in templates]


def class_phrases(class_name: str) -> tuple[str, ...]:
    """The phrases of a defect class: its own vocabulary, or one built from its name when it has none.

    A project may configure classes outside the default set (e.g. "oil_spot"); their name, with
    underscores as spaces, still says what to look for.
    """
    if class_name in CLASS_PHRASES:
        return CLASS_PHRASES[class_name]
    words = class_name.replace("_", " ").strip()
    if not words:
        raise ValueError(f"class name {class_name!r} has no words to build prompts from")
    return (f"fabric with {words}", f"textile with a {words} defect")


def state_prompts(templates: Sequence[str] = TEMPLATES) -> dict[str, list[str]]:
    """The two state ensembles: {"normal": [...], "anomalous": [...]} (in that order)."""
    return {
        "normal": fill_templates(NORMAL_STATES, templates),
        "anomalous": fill_templates(ANOMALOUS_STATES, templates),
    }


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> dict[str, list[str]]:
    """One ensemble per defect class, in the order of `class_names` (duplicates are an error)."""
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {list(class_names)}")
    return {name: fill_templates(class_phrases(name), templates) for name in class_names}
