"""Evaluation of a registered model on the patient-held-out test split, and its decision threshold."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from malaria import evaluation
from malaria.config import Settings
from malaria.data import SMEAR, images_fingerprint, read_manifest, source_roots
from malaria.registry import SPLIT_TAG, RegisteredVersion, client, load_keras_model, update_spec
from malaria.spec import ModelSpec
from malaria.train import load_split, metrics_by_source, predict_probability

logger = logging.getLogger(__name__)

SOURCE_ROWS = ("accuracy", "sensitivity", "specificity", "roc_auc")
METRIC_ROWS = ("accuracy", "precision", "sensitivity", "specificity", "f1", "roc_auc", "pr_auc", "ece")


@dataclass
class EvaluationResult:
    version: str
    spec: ModelSpec
    metrics: dict[str, float]
    referred_fraction: float
    out_dir: Path

    def table(self) -> str:
        """The metrics as a markdown table (reads well in a terminal too)."""
        rows = [f"| {name} | {self.metrics[name]:.4f} |" for name in METRIC_ROWS]
        rows.append(f"| referred to a person | {self.referred_fraction:.2%} |")
        rows.append(f"| accuracy of the cells not referred | {self.metrics['accuracy_decided']:.4f} |")
        for source in ("nih", "smear", "smear_field_rule"):  # per source, when the test split holds several
            rows += [
                f"| {source}: {name} | {self.metrics[f'{source}_{name}']:.4f} |"
                for name in SOURCE_ROWS
                if f"{source}_{name}" in self.metrics
            ]
        return "\n".join(["| metric (test, unseen patients) | value |", "|---|---|", *rows])


ThresholdObjective = Literal["calibrated", "youden", "sensitivity"]


def choose_threshold(
    y_true: np.ndarray,
    probability: np.ndarray,
    objective: ThresholdObjective = "calibrated",
    target_sensitivity: float = 0.95,
) -> float:
    """The decision threshold, chosen on validation data.

    ``calibrated``: 0.5, the accuracy-optimal cut of a probability calibrated on validation data;
    ``youden``: the best balanced accuracy; ``sensitivity``: the highest threshold that still finds
    ``target_sensitivity`` of the parasitized cells.
    """
    if objective == "calibrated":
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, probability)
    best = int(np.argmax(tpr - fpr) if objective == "youden" else np.argmax(tpr >= target_sensitivity))
    return float(np.clip(thresholds[best], 0.01, 0.99))


def choose_refer_band(
    y_true: np.ndarray,
    probability: np.ndarray,
    threshold: float,
    target_accuracy: float,
    max_referred: float = 0.15,
) -> tuple[float, float]:
    """The narrowest band around the threshold outside which validation accuracy reaches the target.

    The band never holds more than ``max_referred`` of the validation cells: if the target needs
    more, the band stops there.
    """
    correct = (probability >= threshold) == (y_true == 1)
    distance = np.abs(probability - threshold)
    order = np.argsort(distance)
    # Referring the k closest cells: accuracy of the rest, for every k allowed.
    correct_sorted = correct[order]
    kept_correct = correct_sorted[::-1].cumsum()[::-1]
    n = len(order)
    width = 0.0
    for k in range(int(max_referred * n) + 1):
        if k == n or kept_correct[k] / (n - k) >= target_accuracy:
            width = float(distance[order[k - 1]]) + 1e-6 if k else 0.0
            break
        width = float(distance[order[k]])
    return (max(0.0, threshold - width), min(1.0, threshold + width))


def choose_specific_threshold(y_true: np.ndarray, probability: np.ndarray, target_specificity: float) -> float:
    """The lowest threshold at which validation specificity reaches the target (never below 0.5)."""
    negatives = np.sort(probability[y_true == 0])
    if len(negatives) == 0:
        return 0.5
    # Above the k-th highest negative, at most floor((1 - target) * n) negatives are called positive.
    allowed = int(np.floor((1 - target_specificity) * len(negatives)))
    cut = negatives[len(negatives) - allowed - 1]
    return float(min(max(0.5, np.nextafter(cut, 1.0)), 0.999))


def other_split_warning(record: RegisteredVersion, manifest: pd.DataFrame) -> str | None:
    """Why ``manifest`` cannot give ``record`` honest test metrics (it was trained on another split), or None."""
    trained_split = record.tags.get(SPLIT_TAG)
    if trained_split is None or trained_split == images_fingerprint(manifest):
        return None
    return (
        f"version {record.version} was trained on another split: its test cells may come from patients it was "
        "trained on, so these metrics may be optimistic (prepare the split it was trained with)"
    )


def evaluate_model(
    settings: Settings,
    version: str | None = None,
    out_dir: Path = Path("reports/evaluation"),
    objective: ThresholdObjective = "calibrated",
    target_accuracy: float | None = None,
    save_spec: bool = True,
) -> EvaluationResult:
    """Metrics and plots of a registered version on the test split; threshold and band from validation."""
    import mlflow

    model, record = load_keras_model(settings, version)
    manifest = read_manifest(settings.splits_path)
    if warning := other_split_warning(record, manifest):
        logger.warning(warning)
    roots = source_roots(settings)
    val = load_split(manifest, roots, "val", record.spec, None, settings.seed)
    test = load_split(manifest, roots, "test", record.spec, None, settings.seed)

    val_p = predict_probability(model, val.images, record.spec)
    target = target_accuracy or settings.refer_target_accuracy
    crops = (val.frame["source"] != SMEAR).to_numpy()  # crop threshold and band: on crops, as served by /predict
    threshold = choose_threshold(val.labels[crops], val_p[crops], objective)
    band = choose_refer_band(val.labels[crops], val_p[crops], threshold, target)
    update: dict = {"threshold": threshold, "refer_band": band, "field_threshold": None, "field_refer_band": None}
    if (~crops).any():  # smear cells: infected ones are rare, so the field rule holds specificity
        field = ~crops
        field_threshold = choose_specific_threshold(val.labels[field], val_p[field], settings.smear_target_specificity)
        update["field_threshold"] = field_threshold
        # The band stays the crops' (None): chosen for an accuracy target, a field's band would be empty,
        # since calling every cell uninfected is already 99 % accurate there; review needs the uncertain cells.
    spec = record.spec.model_copy(update=update)

    test_p = predict_probability(model, test.images, spec)
    metrics = metrics_by_source("", test, test_p, spec.threshold)
    referred_mask = np.array([spec.decision(p) == "refer" for p in test_p])
    referred = float(referred_mask.mean())
    decided = ~referred_mask
    metrics["accuracy_decided"] = float(((test_p[decided] >= spec.threshold) == (test.labels[decided] == 1)).mean())
    smear_test = (test.frame["source"] == SMEAR).to_numpy()
    if spec.field_threshold is not None and smear_test.any():  # smear cells under the rule fields use
        field_metrics = evaluation.classification_metrics(
            test.labels[smear_test], test_p[smear_test], spec.field_threshold
        )
        metrics |= {f"smear_field_rule_{k}": v for k, v in field_metrics.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    evaluation.plot_confusion_matrix(test.labels, test_p, spec, out_dir / "confusion_matrix.png")
    evaluation.plot_roc(test.labels, test_p, out_dir / "roc_curve.png")
    evaluation.plot_precision_recall(test.labels, test_p, out_dir / "precision_recall.png")
    evaluation.plot_reliability(test.labels, test_p, out_dir / "reliability.png")
    evaluation.plot_probability_histogram(test.labels, test_p, spec, out_dir / "probability_histogram.png")
    result = EvaluationResult(record.version, spec, metrics, referred, out_dir)
    (out_dir / "metrics.json").write_text(
        json.dumps(
            {
                **metrics,
                "threshold": threshold,
                "refer_band": list(band),
                "referred_fraction": referred,
                "model_version": record.version,
            },
            indent=2,
        )
    )
    (out_dir / "summary.md").write_text(_summary(record, result))
    _log(settings, record, result, mlflow)
    if save_spec:
        update_spec(settings, record.version, spec)
    return result


def _summary(record: RegisteredVersion, result: EvaluationResult) -> str:
    low, high = result.spec.refer_band
    return (
        f"# Evaluation of {record.name} v{record.version}\n\n{result.table()}\n\n"
        f"Threshold {result.spec.threshold:.3f} (chosen on validation data); cells with "
        f"P(Parasitized) in [{low:.3f}, {high:.3f}) are referred to a person.\n"
    )


def _log(settings: Settings, record: RegisteredVersion, result: EvaluationResult, mlflow) -> None:
    client(settings)
    tags = {"model_name": record.name, "model_version": record.version, "kind": "evaluation"}
    with mlflow.start_run(run_name=f"evaluate-v{record.version}", tags=tags):
        mlflow.log_metrics({f"eval_{k}": v for k, v in result.metrics.items() if v == v})
        mlflow.log_metrics({"eval_threshold": result.spec.threshold, "eval_referred": result.referred_fraction})
        mlflow.log_artifacts(str(result.out_dir), artifact_path="evaluation")
    mlflow_client = client(settings)
    for key in ("accuracy", "roc_auc", "ece"):
        mlflow_client.set_model_version_tag(record.name, record.version, f"eval.{key}", f"{result.metrics[key]:.4f}")
