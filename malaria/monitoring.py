"""Monitoring features: per-image statistics shared by the training reference and the prediction log."""

from __future__ import annotations

import numpy as np

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


def image_features_batch(batch: np.ndarray, sizes: list[tuple[int, int]]) -> list[dict[str, float]]:
    """Features of model inputs (n, h, w, 3) in [0, 1], with each image's original (width, height)."""
    batch = np.asarray(batch, dtype=np.float32)
    means = batch.mean(axis=(1, 2))
    stds = batch.std(axis=(1, 2))
    # ITU-R BT.601 luma: how bright the cell looks to a person.
    brightness = means @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
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
