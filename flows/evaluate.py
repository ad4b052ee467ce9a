"""Evaluate a registered model (default: @champion) on the patient-held-out test split."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from malaria.config import Settings, get_settings
from malaria.evaluate import METRIC_ROWS, EvaluationResult, ThresholdObjective, evaluate_model


@task
def evaluate_task(
    settings: Settings,
    version: str | None,
    out_dir: Path,
    objective: ThresholdObjective,
    target_accuracy: float | None,
) -> EvaluationResult:
    return evaluate_model(settings, version, out_dir, objective=objective, target_accuracy=target_accuracy)


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    version: str | None = None,
    out_dir: Path = Path("reports/evaluation"),
    objective: ThresholdObjective = "calibrated",
    target_accuracy: float | None = None,
    settings: Settings | None = None,
) -> EvaluationResult:
    """Metrics, plots, threshold and refer band of a registered model; logged to MLflow and Prefect.

    ``settings``: the caller's (the CLI passes its own, overrides included); a deployment's run reads
    the environment.
    """
    result = evaluate_task(settings or get_settings(), version, out_dir, objective, target_accuracy)
    create_markdown_artifact(
        key="evaluation-summary",
        markdown=(out_dir / "summary.md").read_text(),
        description=f"evaluation of model version {result.version}",
    )
    create_table_artifact(
        key="evaluation-metrics",
        table=[{"metric": name, "value": round(result.metrics[name], 4)} for name in METRIC_ROWS],
    )
    get_run_logger().info("model v%s on unseen patients:\n%s", result.version, result.table())
    return result


if __name__ == "__main__":
    evaluate_flow()
