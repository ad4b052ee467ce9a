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
    from malaria.data import read_manifest, source_roots
    from malaria.train import load_split, predict_probability

    settings = get_settings()
    stored = bentoml.models.get(f"{settings.bento_model_name}:latest")
    spec = stored_spec(stored)
    model = load_stored_keras(stored)
    manifest, roots = read_manifest(settings.splits_path), source_roots(settings, allow_download=False)

    print(f"{stored.tag}: accuracy at threshold {spec.threshold}")
    for split in ("val", "test"):
        data = load_split(manifest, roots, split, spec, None, settings.seed)
        x = data.images
        flips = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
        views = flips + [v.transpose(0, 2, 1, 3) for v in flips]
        p = [predict_probability(model, np.ascontiguousarray(v), spec) for v in views]
        row = [
            f"{name} {((np.mean(p[:n], axis=0) >= spec.threshold) == (data.labels == 1)).mean():.4f}"
            for name, n in (("single", 1), ("2 (h-flip)", 2), ("4 (flips)", 4), ("8 (flips, transposes)", 8))
        ]
        print(f"{split}: " + ", ".join(row))


if __name__ == "__main__":
    main()
