"""Would a decision threshold chosen on validation beat the calibrated 0.5? For every model in the
BentoML store: accuracy at the thresholds of ``malaria evaluate --objective`` (calibrated 0.5, youden,
sensitivity) and at the validation-accuracy optimum.

``MALARIA_DATA_DIR=... python benchmarks/threshold.py`` (after ``make model``): thresholds are
chosen on validation; the test column is shown for the record.
"""

from __future__ import annotations

import numpy as np

GRID = np.linspace(0.05, 0.95, 181)


def chosen_thresholds(labels: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """The evaluate flow's objectives, and the validation-accuracy optimum (median of ties)."""
    from malaria.evaluate import choose_threshold

    accuracy = np.array([((probability >= t) == (labels == 1)).mean() for t in GRID])
    return {
        **{
            objective: choose_threshold(labels, probability, objective)
            for objective in ("calibrated", "youden", "sensitivity")
        },
        "best val accuracy": float(np.median(GRID[accuracy == accuracy.max()])),
    }


def main() -> None:
    import bentoml

    from malaria.bento import load_stored_keras, stored_spec
    from malaria.config import get_settings
    from malaria.data import read_manifest, source_roots
    from malaria.train import load_split, predict_probability

    settings = get_settings()
    manifest, roots = read_manifest(settings.splits_path), source_roots(settings, allow_download=False)
    splits: dict[int, dict] = {}
    test_accuracy: dict[str, list[float]] = {}
    for stored in bentoml.models.list(settings.bento_model_name):
        spec = stored_spec(stored)
        if spec.image_size not in splits:
            splits[spec.image_size] = {
                split: load_split(manifest, roots, split, spec, None, settings.seed) for split in ("val", "test")
            }
        data, model = splits[spec.image_size], load_stored_keras(stored)
        p = {s: predict_probability(model, d.images, spec) for s, d in data.items()}
        row = []
        for name, t in chosen_thresholds(data["val"].labels, p["val"]).items():
            val, test = (((p[s] >= t) == (data[s].labels == 1)).mean() for s in ("val", "test"))
            row.append(f"{name} ({t:.3f}): val {val:.4f} test {test:.4f}")
            test_accuracy.setdefault(name, []).append(test)
        print(f"{stored.tag}: " + " | ".join(row), flush=True)
    print("mean test accuracy: " + ", ".join(f"{name} {np.mean(v):.4f}" for name, v in test_accuracy.items()))


if __name__ == "__main__":
    main()
