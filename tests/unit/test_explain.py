"""Occlusion sensitivity: a model-agnostic heatmap that finds what the answer depends on."""

from __future__ import annotations

import numpy as np

from malaria.explain import grid, occlusion_batch, occlusion_map


def test_the_batch_is_the_image_then_one_copy_per_patch_covering_every_pixel():
    image = np.ones((64, 64, 3), np.float32)
    patch, stride = grid(64)
    batch, positions = occlusion_batch(image, patch, stride)
    assert (patch, stride) == (8, 4) and len(positions) == 15 * 15 and len(batch) == 226
    assert np.array_equal(batch[0], image)
    y, x = positions[17]
    assert batch[18][y : y + patch, x : x + patch].max() == 0 and batch[18].sum() == image.sum() - patch * patch * 3
    covered = np.zeros((64, 64), bool)
    for y, x in positions:
        covered[y : y + patch, x : x + patch] = True
    assert covered.all()


def test_the_map_concentrates_where_the_answer_comes_from():
    """A stand-in model whose P(parasitized) is the share of a dark dot left visible: the heat sits on the dot."""
    image = np.full((64, 64, 3), 0.7, np.float32)
    dot = np.zeros((64, 64), bool)
    dot[40:48, 12:20] = True
    image[dot] = 0.2

    def model(batch: np.ndarray) -> np.ndarray:
        dark = (batch[..., 0] > 0.05) & (batch[..., 0] < 0.4)
        return dark[:, dot].mean(axis=1)

    patch, stride = grid(64)
    batch, positions = occlusion_batch(image, patch, stride)
    heat = occlusion_map(model(batch), positions, 64, patch)
    positive = np.clip(heat, 0, None)
    assert positive[dot].sum() / positive.sum() > 0.5 > dot.mean()  # far above a uniform map's share (1.6 %)
    assert np.unravel_index(heat.argmax(), heat.shape)[0] in range(36, 52)
