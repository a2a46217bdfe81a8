"""The manifest: one row per image, stored as parquet (the contract in docs/architecture.md).

``image_id`` is the sha256 of the image's bytes, so re-ingesting the same bytes is a no-op.
``path`` is relative to the workspace's ``data/`` folder so a checked-out round is relocatable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

COLUMNS: dict[str, str] = {
    "image_id": "string",
    "path": "string",
    "width": "Int64",
    "height": "Int64",
    "source": "string",
    "split": "string",  # train / test / holdout
    "round": "Int64",  # round the image was ingested in
    "label_source": "string",  # none / pseudo / human / synthetic
    "score": "float64",  # image anomaly score of the latest labeler
    "uncertainty": "float64",  # how unsure the latest labeler is (drives review selection)
    "classes": "string",  # comma-separated class names present in the mask
    "review_state": "string",  # none / queued / reviewed / auto_accepted
    "quarantine_reason": "string",  # empty when the image is usable
}
SPLITS = ("train", "test", "holdout")
LABEL_SOURCES = ("none", "pseudo", "human", "synthetic")
REVIEW_STATES = ("none", "queued", "reviewed", "auto_accepted")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Add missing columns with neutral defaults and cast to the contract's dtypes."""
    df = df.copy()
    defaults = {"label_source": "none", "review_state": "none", "quarantine_reason": "", "classes": ""}
    for col, dtype in COLUMNS.items():
        if col not in df.columns:
            df[col] = defaults.get(col, float("nan") if dtype == "float64" else pd.NA)
        df[col] = df[col].astype(dtype)
    return df[list(COLUMNS)].reset_index(drop=True)


def load(path: Path) -> pd.DataFrame:
    return normalize(pd.read_parquet(path)) if Path(path).exists() else empty()


def save(df: pd.DataFrame, path: Path) -> None:
    """Write atomically (tmp + rename) so a crash never leaves half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.parquet")
    normalize(df).sort_values("image_id").reset_index(drop=True).to_parquet(tmp, index=False)
    tmp.replace(path)


def upsert(df: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ``image_id`` is new are appended; existing ids keep their first row (no-op re-ingest)."""
    rows = normalize(rows)
    new = rows[~rows["image_id"].isin(df["image_id"])].drop_duplicates("image_id")
    return normalize(pd.concat([normalize(df), new], ignore_index=True))


def update(df: pd.DataFrame, image_ids: list[str] | pd.Series, **values: object) -> pd.DataFrame:
    """Set columns for the given ids."""
    df = df.copy()
    sel = df["image_id"].isin(list(image_ids))
    for col, val in values.items():
        if col not in COLUMNS:
            raise KeyError(f"unknown manifest column {col!r}")
        df.loc[sel, col] = val
    return normalize(df)


def update_rows(df: pd.DataFrame, updates: pd.DataFrame) -> pd.DataFrame:
    """Set per-image values in one pass: ``updates`` has an ``image_id`` column plus the columns to set."""
    unknown = set(updates.columns) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown manifest columns {sorted(unknown)}")
    out = df.set_index("image_id")
    new = updates.set_index("image_id")
    new = new[new.index.isin(out.index)]
    for col in new.columns:
        out.loc[new.index, col] = new[col].to_numpy()
    return normalize(out.reset_index())


def usable(df: pd.DataFrame) -> pd.DataFrame:
    """Rows not quarantined."""
    return df[df["quarantine_reason"].fillna("") == ""]
