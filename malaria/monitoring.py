"""Monitoring features: per-image statistics shared by the training reference and the prediction log."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from malaria.spec import PROBABILITY_DECIMALS

if TYPE_CHECKING:  # pandas is a training/monitoring dependency, not a serving one
    import pandas as pd

logger = logging.getLogger(__name__)

FEATURE_COLUMNS = (
    "width",
    "height",
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "brightness",
)


@lru_cache(maxsize=8)
def _averaging_vector(n_pixels: int) -> np.ndarray:
    return np.full(n_pixels, 1.0 / max(n_pixels, 1), dtype=np.float32)


def image_features_batch(batch: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, float]]:
    """Features of model inputs (n, h, w, 3) in [0, 1], with each image's original (width, height)."""
    # Sums as matrix products (BLAS): about 7x faster than sums over the pixel axis, and this
    # runs for every request on the serving path.
    pixels = np.asarray(batch, dtype=np.float32).reshape(len(batch), -1, 3)
    average = _averaging_vector(pixels.shape[1])
    means = (average @ pixels).astype(np.float64)
    squares = (average @ (pixels * pixels)).astype(np.float64)
    stds = np.sqrt(np.maximum(squares - means**2, 0.0))
    # ITU-R BT.601 luma: how bright the cell looks to a person.
    brightness = means @ np.array([0.299, 0.587, 0.114])
    return [
        {
            "width": int(width),
            "height": int(height),
            "mean_r": float(m[0]),
            "mean_g": float(m[1]),
            "mean_b": float(m[2]),
            "std_r": float(s[0]),
            "std_g": float(s[1]),
            "std_b": float(s[2]),
            "brightness": float(b),
        }
        for (width, height), m, s, b in zip(sizes, means, stds, brightness, strict=True)
    ]


DRIFT_FEATURES = [c for c in FEATURE_COLUMNS if c not in ("width", "height")] + ["width", "height"]
PREDICTION_COLUMN = "probability_parasitized"
PREDICTION_DRIFT_METHOD = "wasserstein"  # normed Wasserstein distance; drift above Evidently's 0.1


class NotEnoughPredictions(ValueError):
    """The window holds too few predictions for a meaningful drift test."""


@dataclass
class DriftResult:
    """What an Evidently drift report found."""

    drift_detected: bool
    drifted_share: float
    drifted_columns: list[str]
    prediction_drift: bool
    prediction_score: float
    n_reference: int
    n_current: int
    html: Path
    json: Path
    live_accuracy: float | None = None  # on reviewed audit cells of the window (the drift flow fills it)
    live_reviews: int = 0
    alerts: list[str] = field(default_factory=list)
    retraining: str | None = None  # the training flow run an alert started (MALARIA_RETRAIN_DEPLOYMENT)

    def summary(self) -> str:
        verdict = "DRIFT DETECTED" if self.drift_detected else "no drift"
        live = (
            f"; live accuracy {self.live_accuracy:.3f} on {self.live_reviews} reviewed audit cells"
            if self.live_accuracy is not None
            else "; no reviewed audit cells"
        )
        return (
            f"{verdict}: {len(self.drifted_columns)}/{len(DRIFT_FEATURES)} image features drifted "
            f"({', '.join(self.drifted_columns) or 'none'}); predicted probability drift: "
            f"{'yes' if self.prediction_drift else 'no'} (score {self.prediction_score:.3g}); "
            f"{self.n_current} predictions vs {self.n_reference} reference images{live}"
        )


def load_prediction_window(
    folder: Path, since: datetime | None = None, model_version: str | None = None
) -> pd.DataFrame:
    """Logged predictions (all days and processes) newer than ``since``, of ``model_version`` if given."""
    import pandas as pd

    rows, unreadable = [], 0
    for path in sorted(Path(folder).glob("predictions-*.jsonl")):
        day = re.match(r"predictions-(\d{4}-\d{2}-\d{2})-", path.name)
        if since is not None and day and day.group(1) < f"{since:%Y-%m-%d}":
            continue  # a file holds the predictions of its (UTC) day: older than the window
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # half a line: a failed write, or one still being written
                unreadable += 1
    if unreadable:
        logger.warning("%d unreadable prediction log lines skipped in %s", unreadable, folder)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    if since is not None:
        frame = frame[frame["time"] >= pd.Timestamp(since)]
    if model_version is not None:
        logged = frame.get("model_version", pd.Series("unknown", index=frame.index)).astype(str)
        other = logged != model_version
        if other.any():
            versions = sorted(logged[other].unique())
            logger.info("%d predictions of other model versions (%s) left out", int(other.sum()), ", ".join(versions))
        frame = frame[~other]
    return frame.reset_index(drop=True)


def drift_report(
    reference: pd.DataFrame, current: pd.DataFrame, out_dir: Path, min_current: int = 50, drift_share: float = 0.5
) -> DriftResult:
    """Evidently DataDriftPreset over the image features plus value drift of the predicted probability."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    if len(current) < min_current:
        raise NotEnoughPredictions(
            f"only {len(current)} predictions in the window; at least {min_current} are needed for a drift test"
        )
    columns = [*DRIFT_FEATURES, PREDICTION_COLUMN]
    # The log holds answers, rounded; the reference holds raw probabilities. Unrounded, a confident model's
    # 3e-9 and 0.0 differ, and every window "drifts" (found by writing the tests' log with PredictionLog).
    reference = reference.assign(**{PREDICTION_COLUMN: reference[PREDICTION_COLUMN].round(PROBABILITY_DECIMALS)})
    definition = DataDefinition(numerical_columns=columns)
    report = Report(
        [
            DataDriftPreset(columns=DRIFT_FEATURES, drift_share=drift_share),
            # A distance, not a test: a confident model's answers pile up at 0 and 1 (ties), where a
            # test picked by the number of distinct values flags identical windows.
            ValueDrift(column=PREDICTION_COLUMN, method=PREDICTION_DRIFT_METHOD),
        ]
    )
    snapshot = report.run(
        current_data=Dataset.from_pandas(current[columns].astype(float), data_definition=definition),
        reference_data=Dataset.from_pandas(reference[columns].astype(float), data_definition=definition),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    html, json_path = out_dir / f"drift-{stamp}.html", out_dir / f"drift-{stamp}.json"
    snapshot.save_html(str(html))
    snapshot.save_json(str(json_path))

    drifted, share, prediction_drift, prediction_score = [], 0.0, False, float("nan")
    for metric in snapshot.dict()["metrics"]:
        config, value = metric["config"], metric["value"]
        if config["type"].endswith("DriftedColumnsCount"):
            share = float(value["share"])
        elif config["type"].endswith("ValueDrift"):
            detected = value < config["threshold"] if "p_value" in config["method"] else value > config["threshold"]
            if config["column"] == PREDICTION_COLUMN:
                prediction_drift, prediction_score = bool(detected), float(value)
            elif detected:
                drifted.append(config["column"])
    return DriftResult(
        drift_detected=share >= drift_share or prediction_drift,
        drifted_share=share,
        drifted_columns=drifted,
        prediction_drift=prediction_drift,
        prediction_score=prediction_score,
        n_reference=len(reference),
        n_current=len(current),
        html=html,
        json=json_path,
    )


# --- the live quality figure: what reviewers say of the served answers -------------------------


def live_quality(reviews: pd.DataFrame) -> pd.DataFrame:
    """Per day and model version: accuracy on audit reviews (the random sample: unbiased), agreement on
    referred ones (hard by construction), each with its count. ``unsure`` labels are left out."""
    import pandas as pd
    from sklearn.metrics import accuracy_score

    columns = ["day", "model_version", "audit_reviews", "audit_accuracy", "refer_reviews", "refer_agreement"]
    labelled = reviews[(reviews["label"] != "unsure") & reviews["model_label"].notna()] if len(reviews) else reviews
    if not len(labelled):
        return pd.DataFrame(columns=columns)
    day = pd.to_datetime(labelled["created_at"]).dt.strftime("%Y-%m-%d")
    rows = []
    for (date, version), group in labelled.groupby([day, labelled["model_version"].fillna("?")]):
        audit, refer = group[group["reason"] == "audit"], group[group["reason"] == "refer"]
        rows.append(
            {
                "day": date,
                "model_version": version,
                "audit_reviews": len(audit),
                "audit_accuracy": accuracy_score(audit["label"], audit["model_label"]) if len(audit) else None,
                "refer_reviews": len(refer),
                "refer_agreement": accuracy_score(refer["label"], refer["model_label"]) if len(refer) else None,
            }
        )
    return pd.DataFrame(rows, columns=columns)


def window_accuracy(quality: pd.DataFrame, model_version: str | None) -> tuple[float | None, int]:
    """Accuracy on the window's audit reviews of one version (all versions if None), and their count."""
    rows = quality if model_version is None else quality[quality["model_version"] == str(model_version)]
    rows = rows[rows["audit_reviews"] > 0]
    total = int(rows["audit_reviews"].sum())
    if not total:
        return None, 0
    return float((rows["audit_accuracy"] * rows["audit_reviews"]).sum() / total), total
