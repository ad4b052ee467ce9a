"""Why the model called a cell: occlusion sensitivity, a model-agnostic heatmap.

Masked copies of the cell (a square patch set to black, the crops' background, at every position of
a grid) go to the model in one batch with the cell itself; a pixel's heat is the mean drop in
P(parasitized) over the patches that cover it. It needs only the model's answers, so it works with
any serving runtime (Grad-CAM needs the network's gradients, and the last block of a 64-px VGG16 is
4x4). At 64 px with 8-px patches and a 4-px stride that is 225 masked copies: one batched model call
of about half a second on 2 cores.
"""

from __future__ import annotations

import numpy as np

PATCH_SHARE = 0.125  # the patch is this share of the model input's side (8 px of 64)
STRIDE_SHARE = 0.0625  # patches start every this share (4 px of 64): each pixel is covered by 4 patches


def occlusion_batch(image: np.ndarray, patch: int, stride: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The image followed by one copy per patch position with that patch set to 0; the positions."""
    size = image.shape[0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    positions = [(y, x) for y in starts for x in starts]
    batch = np.repeat(image[None], len(positions) + 1, axis=0)
    for i, (y, x) in enumerate(positions, start=1):
        batch[i, y : y + patch, x : x + patch] = 0.0
    return batch, positions


def occlusion_map(probability: np.ndarray, positions: list[tuple[int, int]], size: int, patch: int) -> np.ndarray:
    """Per-pixel mean drop of P(parasitized) (``probability[0]`` is the intact cell), in [-1, 1]."""
    heat = np.zeros((size, size), np.float64)
    cover = np.zeros((size, size), np.float64)
    for p, (y, x) in zip(probability[1:], positions, strict=True):
        heat[y : y + patch, x : x + patch] += probability[0] - p
        cover[y : y + patch, x : x + patch] += 1.0
    return heat / np.maximum(cover, 1.0)


def grid(size: int) -> tuple[int, int]:
    """Patch and stride in pixels for a model input of ``size``."""
    return max(2, round(size * PATCH_SHARE)), max(1, round(size * STRIDE_SHARE))
