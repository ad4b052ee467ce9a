"""Classification metrics (scikit-learn), calibration, and the plots a person reads."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from malaria.spec import ModelSpec  # noqa: E402


def expected_calibration_error(y_true: np.ndarray, probability: np.ndarray, n_bins: int = 10) -> float:
    """Weighted mean |accuracy - confidence| over equal-width probability bins."""
    bins = np.minimum((probability * n_bins).astype(int), n_bins - 1)
    error = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            error += in_bin.mean() * abs(y_true[in_bin].mean() - probability[in_bin].mean())
    return float(error)


def classification_metrics(y_true: np.ndarray, probability: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, sensitivity, specificity, F1, ROC-AUC, PR-AUC, ECE, log loss."""
    y_true = np.asarray(y_true).astype(int)
    probability = np.asarray(probability, dtype=np.float64)
    predicted = (probability >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y_true, predicted, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(skm.accuracy_score(y_true, predicted)),
        "precision": float(skm.precision_score(y_true, predicted, zero_division=0)),
        "sensitivity": float(skm.recall_score(y_true, predicted, zero_division=0)),
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
        "f1": float(skm.f1_score(y_true, predicted, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, probability)) if both_classes else float("nan"),
        "pr_auc": float(skm.average_precision_score(y_true, probability)) if both_classes else float("nan"),
        "ece": expected_calibration_error(y_true, probability),
        "log_loss": float(skm.log_loss(y_true, np.clip(probability, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def fit_temperature(y_true: np.ndarray, raw_probability: np.ndarray) -> float:
    """Temperature on the log-odds that minimises validation log loss (temperature scaling)."""
    from scipy.optimize import minimize_scalar

    p = np.clip(raw_probability.astype(np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p / (1 - p))

    def loss(temperature: float) -> float:
        return skm.log_loss(y_true, 1 / (1 + np.exp(-logits / temperature)), labels=[0, 1])

    return float(minimize_scalar(loss, bounds=(0.05, 20.0), method="bounded").x)


def plot_confusion_matrix(y_true: np.ndarray, probability: np.ndarray, spec: ModelSpec, path: Path) -> Path:
    predicted = (probability >= spec.threshold).astype(int)
    names = [spec.negative_class, spec.positive_class]
    display = skm.ConfusionMatrixDisplay.from_predictions(
        y_true.astype(int), predicted, labels=[0, 1], display_labels=names, cmap="Blues", colorbar=False
    )
    display.ax_.set_title(f"Confusion matrix (threshold {spec.threshold:.2f})")
    return _save(display.figure_, path)


def roc_points(y_true: np.ndarray, probability: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-positive rate, true-positive rate and thresholds of the ROC curve (scikit-learn)."""
    return skm.roc_curve(y_true, probability)


def plot_roc(y_true: np.ndarray, probability: np.ndarray, path: Path) -> Path:
    display = skm.RocCurveDisplay.from_predictions(y_true, probability, name="model")
    display.ax_.plot([0, 1], [0, 1], "k--", lw=0.8)
    display.ax_.set_title("ROC curve")
    return _save(display.figure_, path)


def plot_precision_recall(y_true: np.ndarray, probability: np.ndarray, path: Path) -> Path:
    display = skm.PrecisionRecallDisplay.from_predictions(y_true, probability, name="model")
    display.ax_.set_title("Precision-recall curve")
    return _save(display.figure_, path)


def plot_reliability(y_true: np.ndarray, probability: np.ndarray, path: Path) -> Path:
    from sklearn.calibration import CalibrationDisplay

    display = CalibrationDisplay.from_predictions(y_true, probability, n_bins=10, name="model")
    display.ax_.set_title(f"Reliability (ECE {expected_calibration_error(y_true, probability):.3f})")
    return _save(display.figure_, path)


def plot_probability_histogram(y_true: np.ndarray, probability: np.ndarray, spec: ModelSpec, path: Path) -> Path:
    figure, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 41).tolist()
    ax.hist(probability[y_true == 1], bins=bins, alpha=0.6, label=spec.positive_class)
    ax.hist(probability[y_true == 0], bins=bins, alpha=0.6, label=spec.negative_class)
    ax.axvline(spec.threshold, color="k", ls="--", lw=1, label="threshold")
    ax.axvspan(*spec.refer_band, color="orange", alpha=0.15, label="refer band")
    ax.set(xlabel=f"P({spec.positive_class})", ylabel="cells", yscale="log", title="Predicted probabilities")
    ax.legend()
    return _save(figure, path)


def plot_learning_curves(history: dict[str, list[float]], path: Path) -> Path:
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix in ("", "val_"):
            if prefix + metric in history:
                ax.plot(
                    range(1, len(history[prefix + metric]) + 1),
                    history[prefix + metric],
                    marker="o",
                    label=prefix + metric,
                )
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
