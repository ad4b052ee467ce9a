"""Evidently drift report: training-image features vs a window of the service's prediction log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from malaria.config import Settings, get_settings
from malaria.monitoring import DriftResult, drift_report, live_quality, load_prediction_window, window_accuracy
from malaria.registry import champion_version, reference_features


@task
def load_reference(settings: Settings, reference_path: Path | None, version: str | None) -> pd.DataFrame:
    """The drift reference: a given CSV, else the one saved with the version's training run."""
    return pd.read_csv(reference_path) if reference_path else reference_features(settings, version)


@task
def load_window(log_dir: Path, hours: float | None, version: str | None) -> pd.DataFrame:
    since = datetime.now(UTC) - timedelta(hours=hours) if hours else None
    return load_prediction_window(log_dir, since, version)


@task
def report_task(reference: pd.DataFrame, current: pd.DataFrame, out_dir: Path, min_predictions: int) -> DriftResult:
    return drift_report(reference, current, out_dir, min_current=min_predictions)


@task
def live_quality_task(settings: Settings, hours: float | None, out_dir: Path) -> pd.DataFrame | None:
    """Reviewed cells per day and model version (``live_quality.csv``); None if the review database is out of reach."""
    from malaria.serving.reviews import read_reviews

    try:
        rows = pd.DataFrame(read_reviews(settings.review_database_url()))  # read only: the service migrates
    except Exception as exc:  # noqa: BLE001 - any driver's error: report drift without the live figure
        get_run_logger().warning("review database not readable (%s): no live quality figure", exc)
        return None
    if hours and len(rows):
        rows = rows[
            pd.to_datetime(rows["created_at"], utc=True) >= pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=hours)
        ]
    quality = live_quality(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    quality.to_csv(out_dir / "live_quality.csv", index=False)
    return quality


def notify(alerts: list[str], block: str | None) -> None:
    """Log each alert; with ``block`` (TYPE/NAME of a Prefect notification block), send them through it."""
    logger = get_run_logger()
    for alert in alerts:
        logger.error("ALERT: %s", alert)
    if alerts and block:
        from prefect.blocks.core import Block

        notifier: Any = Block.load(block)  # a sync call here: Prefect types it as maybe a coroutine
        notifier.notify("\n".join(alerts), subject="malaria-bento monitoring")


def start_retraining(deployment: str) -> str:
    """Schedule a run of the training deployment (it runs where the deployments are served); its id."""
    from prefect.deployments import run_deployment

    run: Any = run_deployment(deployment, timeout=0, tags=["alert"])  # timeout 0: do not wait for it
    get_run_logger().warning("alert: started %s (flow run %s); the champion gate decides", deployment, run.id)
    return str(run.id)


@flow(name="drift", log_prints=True)
def drift_flow(
    hours: float | None = 24.0,
    log_dir: Path | None = None,
    reference_path: Path | None = None,
    out_dir: Path = Path("reports/drift"),
    min_predictions: int = 50,
    settings: Settings | None = None,
) -> DriftResult:
    """Compare recent predictions with the training images; the result says whether drift was found.

    Without ``reference_path`` the reference is the champion's, and only the champion's predictions
    are compared with it: another version's probabilities are another model's. ``settings``: the
    caller's (the CLI passes its own); a deployment's run reads the environment.
    """
    settings = settings or get_settings()
    version = None if reference_path else champion_version(settings)
    reference = load_reference(settings, reference_path, version)
    current = load_window(log_dir or settings.prediction_log_dir, hours, version)
    result = report_task(reference, current, out_dir, min_predictions)
    quality = live_quality_task(settings, hours, out_dir)
    if quality is not None:
        accuracy, reviews = window_accuracy(quality, version)
        result.live_accuracy, result.live_reviews = accuracy, reviews
        if accuracy is not None and reviews >= settings.live_min_reviews and accuracy < settings.live_min_accuracy:
            result.alerts.append(
                f"live accuracy {accuracy:.3f} on {reviews} reviewed audit cells is below {settings.live_min_accuracy}"
            )
    if result.drift_detected:
        result.alerts.append(result.summary())
    notify(result.alerts, settings.alert_block)
    if result.alerts and settings.retrain_deployment:
        result.retraining = start_retraining(settings.retrain_deployment)
    table = quality.to_markdown(index=False) if quality is not None and len(quality) else "no reviewed cells"
    create_markdown_artifact(
        key="drift-summary",
        markdown=f"# Drift report\n\n{result.summary()}\n\nHTML: `{result.html}`\n\n"
        f"## Reviewed cells (live quality)\n\n{table}\n",
        description="Evidently data drift of image features and predicted probability; accuracy on reviewed cells",
    )
    get_run_logger().info(result.summary())
    return result


if __name__ == "__main__":
    drift_flow()
