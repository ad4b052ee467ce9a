"""Evidently drift report: training-image features vs a window of the service's prediction log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from malaria.config import get_settings
from malaria.monitoring import DriftResult, drift_report, load_prediction_window
from malaria.registry import champion_version, reference_features


@task
def load_reference(reference_path: Path | None, version: str | None) -> pd.DataFrame:
    """The drift reference: a given CSV, else the one saved with the version's training run."""
    return pd.read_csv(reference_path) if reference_path else reference_features(get_settings(), version)


@task
def load_window(log_dir: Path, hours: float | None, version: str | None) -> pd.DataFrame:
    since = datetime.now(UTC) - timedelta(hours=hours) if hours else None
    return load_prediction_window(log_dir, since, version)


@task
def report_task(reference: pd.DataFrame, current: pd.DataFrame, out_dir: Path, min_predictions: int) -> DriftResult:
    return drift_report(reference, current, out_dir, min_current=min_predictions)


@flow(name="drift", log_prints=True)
def drift_flow(
    hours: float | None = 24.0,
    log_dir: Path | None = None,
    reference_path: Path | None = None,
    out_dir: Path = Path("reports/drift"),
    min_predictions: int = 50,
) -> DriftResult:
    """Compare recent predictions with the training images; the result says whether drift was found.

    Without ``reference_path`` the reference is the champion's, and only the champion's predictions
    are compared with it: another version's probabilities are another model's.
    """
    settings = get_settings()
    version = None if reference_path else champion_version(settings)
    reference = load_reference(reference_path, version)
    current = load_window(log_dir or settings.prediction_log_dir, hours, version)
    result = report_task(reference, current, out_dir, min_predictions)
    create_markdown_artifact(
        key="drift-summary",
        markdown=f"# Drift report\n\n{result.summary()}\n\nHTML: `{result.html}`\n",
        description="Evidently data drift of image features and predicted probability",
    )
    get_run_logger().info(result.summary())
    return result


if __name__ == "__main__":
    drift_flow()
