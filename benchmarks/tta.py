"""Would test-time augmentation pay? Accuracy of the stored model on validation (and test) when its
probabilities are averaged over flips and transposes of each cell.

``MALARIA_DATA_DIR=... python benchmarks/tta.py`` (after ``make model``): judge on validation; the
test column is shown for the record, not for choosing.
"""

from __future__ import annotations

import numpy as np


def main() -> None:
    import bentoml

    from malaria.bento import load_stored_keras, stored_spec
    from malaria.config import get_settings
    from malaria.data import ensure_dataset, read_manifest
    from malaria.model import compiled_predict
    from malaria.train import load_split

    settings = get_settings()
    stored = bentoml.models.get(f"{settings.bento_model_name}:latest")
    spec = stored_spec(stored)
    predict = compiled_predict(load_stored_keras(stored))
    manifest, root = read_manifest(settings.splits_path), ensure_dataset(settings, allow_download=False)

    def probability(images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images)
        return spec.probability_positive(
            np.concatenate([predict(images[i : i + 256]) for i in range(0, len(images), 256)])
        )

    print(f"{stored.tag}: accuracy at threshold {spec.threshold}")
    for split in ("val", "test"):
        data = load_split(manifest, root, split, spec, None, settings.seed)
        x, y = data.images, data.labels
        flips = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
        views = {"single": [x], "2 (h-flip)": flips[:2], "4 (flips)": flips}
        views["8 (flips, transposes)"] = flips + [v.transpose(0, 2, 1, 3) for v in flips]
        cache: dict[int, np.ndarray] = {}
        row = []
        for name, chosen in views.items():
            p = np.mean([cache.setdefault(id(v), probability(v)) for v in chosen], axis=0)
            row.append(f"{name} {((p >= spec.threshold) == (y == 1)).mean():.4f}")
        print(f"{split}: " + ", ".join(row))


if __name__ == "__main__":
    main()
