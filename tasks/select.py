"""Choose what people see and what trains without them: review selection and calibrated auto-accept.

Selection (loom/stages/selection.py, ``round.selection``) queues the round's reviews: the backlog, a random
audit, then the strategy's picks. After the review, what people said of the audited images calibrates
auto-accept (loom/stages/calibration.py, ``round.accept_risk``), which decides which open pseudo-labels train
the student.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import task

from loom.config import Settings
from loom.data import manifest
from loom.data.human import human_mask_of, image_of
from loom.data.imageio import read_mask
from loom.stages import calibration, selection
from loom.stages.embeddings import cached_embeddings
from tasks.common import ONCE_PER_ROUND, load_manifest, pseudo_mask_path, save_manifest, task_logger
from tasks.pseudo_label import PseudoLabels


@dataclass
class Selection:
    review: list[str]  # image ids for people: still queued from earlier rounds, the audit, the picks
    audit: list[str] = field(default_factory=list)  # drawn at random: their reviews calibrate auto-accept
    strategy: str = ""
    confidence: dict[str, float] = field(default_factory=dict)  # image id -> 1 - uncertainty at selection
    provisionally_accepted: int = 0  # candidates auto-accept already passed, not sent to people


@dataclass
class AutoAccept:
    accepted: list[str]  # pseudo-labeled train images used for training without review
    threshold: float | None  # lowest confidence accepted (None: nothing accepted)
    audits: int  # audited reviews the decision rests on (all rounds)
    audit_error: float | None  # share of them whose pseudo-label was wrong (None: no audits yet)
    risk: float  # the target it was calibrated for
    candidates: int = 0  # open pseudo-labeled train images it judged


def candidates_of(
    settings: Settings, df: pd.DataFrame, pool: pd.DataFrame, labels: PseudoLabels
) -> selection.Candidates:
    """What selection looks at for the unreviewed train images ``pool`` (rows of the manifest ``df``)."""
    df = manifest.usable(df)
    human = df[(df["label_source"] == "human") & (df["split"] == "train")]
    counts: dict[str, int] = {}
    for names in human["classes"].fillna(""):
        for name in filter(None, names.split(",")):
            counts[name] = counts.get(name, 0) + 1
    rows = df.set_index("image_id")

    def load(image_id: str) -> np.ndarray:
        return image_of(settings, rows.loc[image_id])

    cache = settings.stack_dir / "cache" / "embeddings.npz"
    ids = pool["image_id"].tolist()
    disagreement = [labels.disagreement.get(i) for i in ids]
    return selection.Candidates(
        uncertainty=pool["uncertainty"].fillna(1.0).to_numpy(dtype=np.float64),
        score=pool["score"].fillna(0.0).to_numpy(dtype=np.float64),
        classes=[tuple(filter(None, str(c).split(","))) for c in pool["classes"].fillna("")],
        disagreement=None if None in disagreement else np.array(disagreement, dtype=np.float64),
        embeddings=cached_embeddings(cache, ids, load),
        labeled_embeddings=cached_embeddings(cache, human["image_id"].tolist(), load),
        labeled_counts=counts,
    )


def open_pool(df: pd.DataFrame) -> pd.DataFrame:
    """Pseudo-labeled train images nobody has reviewed or been asked to review."""
    pool = manifest.usable(df)
    pool = pool[(pool["split"] == "train") & (pool["label_source"] == "pseudo")]
    return pool[pool["review_state"].isin(["none", "auto_accepted"])]


def read_calibration(settings: Settings) -> pd.DataFrame:
    """Every audit so far: image_id, round (its pseudo-label's), confidence, wrong (NA until reviewed)."""
    columns = {"image_id": "string", "round": "int64", "confidence": "float64", "wrong": "boolean"}
    if settings.calibration_path.exists():
        return pd.read_parquet(settings.calibration_path).astype(columns)
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def write_calibration(settings: Settings, audits: pd.DataFrame) -> None:
    staging = settings.calibration_path.with_suffix(".tmp")
    audits.to_parquet(staging, index=False)
    staging.replace(settings.calibration_path)


def answered(audits: pd.DataFrame) -> pd.DataFrame:
    """The audits people have reviewed: what calibration rests on."""
    return audits[audits["wrong"].notna()]


@task(name="select-for-review", cache_policy=ONCE_PER_ROUND, persist_result=True)
def select_for_review(settings: Settings, labels: PseudoLabels) -> Selection:
    """Queue the round's reviews: what is still queued, a random audit, then the strategy's picks.

    Images already queued in an earlier round stay queued (they are not sent twice) and count against
    the budget, so a backlog of unreviewed work slows new requests instead of growing without end.
    Candidates that auto-accept, calibrated on the audits so far, already passes are not sent: as the
    teacher and the student improve more pass, and a round may need fewer reviews than its budget.
    """
    rp = settings.round
    df = load_manifest(settings)
    queued = manifest.usable(df)
    queued = queued[(queued["split"] == "train") & (queued["review_state"] == "queued")]
    pool = open_pool(df).sort_values("image_id")
    uncertainty, flagged = judged(pool)
    acceptable = calibration.acceptable(uncertainty, flagged)
    audits = read_calibration(settings)
    passed = passes_auto_accept(settings, uncertainty, flagged, answered(audits))
    budget = max(0, rp.review_budget - len(queued))
    n_audit = round(budget * rp.audit_share)
    plan = selection.plan_review(
        rp.selection,
        candidates_of(settings, df, pool, labels),
        budget,
        n_audit,
        acceptable,
        passed,
        rp.seed + labels.round_no,
    )
    confidence = 1.0 - uncertainty
    ids = pool["image_id"].tolist()
    sel = Selection(
        review=queued["image_id"].tolist() + [ids[i] for i in plan.review],
        audit=[ids[i] for i in plan.audit],
        strategy=rp.selection,
        confidence=dict(zip(ids, confidence.tolist(), strict=True)),
        provisionally_accepted=int(passed.sum()),
    )
    new = pd.DataFrame(
        {
            "image_id": sel.audit,
            "round": labels.round_no,
            "confidence": [sel.confidence[i] for i in sel.audit],
            "wrong": pd.NA,
        }
    ).astype(audits.dtypes.to_dict())
    new = new[~new["image_id"].isin(audits["image_id"])]  # an audit is drawn once, whatever reruns
    write_calibration(settings, pd.concat([audits, new], ignore_index=True))
    save_manifest(settings, manifest.update(df, sel.review, review_state="queued"))
    task_logger().info(
        "review (%s): %d images to people (%d still queued, %d audit), %d candidates pass auto-accept",
        rp.selection,
        len(sel.review),
        len(queued),
        len(sel.audit),
        sel.provisionally_accepted,
    )
    return sel


@task(name="auto-accept", cache_policy=ONCE_PER_ROUND, persist_result=True)
def auto_accept(settings: Settings, labels: PseudoLabels) -> AutoAccept:
    """Record what people said of the audited images they reviewed (this round's and any left queued from
    earlier ones), then auto-accept the open pseudo-labels that the calibration on every answered audit
    lets through (loom/stages/calibration.py)."""
    log = task_logger()
    df = load_manifest(settings)
    rows = df.set_index("image_id")
    defect_id = settings.class_index("defect")
    audits = read_calibration(settings)
    for k in np.flatnonzero(audits["wrong"].isna().to_numpy()):
        image_id, audit_round = audits.at[k, "image_id"], int(audits.at[k, "round"])
        row = rows.loc[image_id]
        if row["review_state"] != "reviewed":
            continue  # not answered yet: it stays queued, and an audit
        hw = (int(row["height"]), int(row["width"]))
        pseudo = read_mask(pseudo_mask_path(settings, audit_round, image_id), len(settings.classes), hw)
        truth = human_mask_of(settings, image_id, hw)
        audits.loc[k, "wrong"] = calibration.pseudo_label_wrong(pseudo, truth, defect_id)
    write_calibration(settings, audits)
    audits = answered(audits)

    pool = open_pool(df)
    uncertainty, flagged = judged(pool)
    passed = passes_auto_accept(settings, uncertainty, flagged, audits)
    accepted = pool["image_id"][passed].tolist()
    # Confidence is re-judged every round: what was auto-accepted before but does not pass now drops out.
    df.loc[df["review_state"] == "auto_accepted", "review_state"] = "none"
    save_manifest(settings, manifest.update(df, accepted, review_state="auto_accepted"))
    risk = settings.round.accept_risk
    threshold = float(1.0 - uncertainty[passed].max()) if accepted else None
    error = float(np.mean(audits["wrong"].astype(bool))) if len(audits) else None
    log.info(
        "auto-accept at risk %.2f: %d of %d open pseudo-labels (confidence >= %s; %d audits, %s wrong)",
        risk,
        len(accepted),
        len(pool),
        "-" if threshold is None else f"{threshold:.3f}",
        len(audits),
        "-" if error is None else f"{error:.0%}",
    )
    return AutoAccept(accepted, threshold, len(audits), error, risk, candidates=len(pool))


def judged(pool: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N,) review uncertainty and (N,) whether the pseudo-label holds a defect, of manifest rows."""
    uncertainty = pool["uncertainty"].fillna(1.0).to_numpy(dtype=np.float64)
    return uncertainty, (pool["classes"].fillna("") != "").to_numpy()


def passes_auto_accept(
    settings: Settings, uncertainty: np.ndarray, flagged: np.ndarray, audits: pd.DataFrame
) -> np.ndarray:
    """(N,) bool: which pseudo-labels calibrated auto-accept takes, on the answered ``audits``."""
    return calibration.passed_labels(
        audits["confidence"], audits["wrong"], uncertainty, flagged, settings.round.accept_risk
    )
