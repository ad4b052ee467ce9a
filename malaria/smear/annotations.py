"""Annotated smear fields (the IML format of the shared set): reading, splitting, and scoring a detector.

Not served: used by evaluation and training. Annotation types other than ``red blood cell`` and
``difficult`` are infected cells (ring, trophozoite, schizont, gametocyte).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNINFECTED_TYPE = "red blood cell"
IGNORED_TYPES = frozenset({"difficult"})  # unsure: left out of scoring
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int
    infected: bool

    @property
    def xywh(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h

    def interior(self, width: int, height: int, margin: int = 2) -> bool:
        """Not touching the image border (such cells are cut, and mostly unboxed)."""
        return (
            self.x > margin
            and self.y > margin
            and self.x + self.w < width - margin
            and self.y + self.h < height - margin
        )


def _xywh(bbox: dict) -> tuple[int, int, int, int]:
    x, y, w, h = (int(float(bbox[k])) for k in "xywh")
    return x, y, w, h


SAME_CELL_IOU = 0.5  # two boxes overlapping this much are one cell boxed twice (the matching's own bar)


def one_box_per_cell(boxes: list[Box]) -> list[Box]:
    """Drop the second box of a cell boxed twice, keeping an infected box over an uninfected one.

    The shared set boxes some cells twice: 25 pairs at IoU >= 0.5 in 17 of the 211 fields, 9 of them
    an infected box over a ``red blood cell`` box of the same cell (seen on training fields: the
    detection went to one box and the other counted as missed, and the uninfected twin labelled the
    infected cell's crop Uninfected). A box naming a parasite is the more specific annotation.
    """
    if len(boxes) < 2:
        return list(boxes)
    order = sorted(range(len(boxes)), key=lambda i: not boxes[i].infected)  # infected first, stable
    arr = np.array([boxes[i].xywh for i in order])
    overlap = iou_matrix(arr, arr)
    kept: list[int] = []
    for position in range(len(order)):
        if all(overlap[position, other] < SAME_CELL_IOU for other in kept):
            kept.append(position)
    return [boxes[order[position]] for position in sorted(kept, key=lambda p: order[p])]


def load_annotations(smear_dir: Path) -> dict[str, list[Box]]:
    """``annotations.json`` of a smear folder -> boxes per image file name: unsure boxes left out, one
    box per cell (``one_box_per_cell``)."""
    fields = json.loads((Path(smear_dir) / "annotations.json").read_text())
    return {
        entry["image_name"]: one_box_per_cell(
            [
                Box(*_xywh(obj["bbox"]), infected=obj["type"] != UNINFECTED_TYPE)
                for obj in entry["objects"]
                if obj["type"] not in IGNORED_TYPES
            ]
        )
        for entry in fields
    }


def capture_number(name: str) -> int:
    """The number in a file name (PA171720.JPG -> 171720): it follows capture order."""
    digits = re.findall(r"\d+", name)
    return int(digits[-1]) if digits else 0


CAPTURE_BLOCK = 10  # fields per capture block, the unit of the split


def capture_blocks(names: list[str], block: int = CAPTURE_BLOCK) -> dict[str, int]:
    """Each field's capture block: contiguous runs of ``block`` fields in file-number order."""
    ordered = sorted(names, key=lambda n: (capture_number(n), n))
    return {name: i // block for i, name in enumerate(ordered)}


def split_fields(
    names: list[str], seed: int, block: int = CAPTURE_BLOCK, fractions: tuple[float, float] = (0.15, 0.15)
) -> dict[str, str]:
    """Split fields by capture run: each capture block wholly in train, val or test.

    There are no patient or slide ids in the shared set; neighbouring captures come from the same
    slide area, so blocks (not single fields) keep near-duplicates on one side.
    """
    blocks = capture_blocks(names, block)
    n_blocks = max(blocks.values(), default=-1) + 1
    order = np.random.default_rng(seed).permutation(n_blocks)
    n_val = max(1, round(fractions[0] * n_blocks)) if n_blocks >= 3 else 0
    n_test = max(1, round(fractions[1] * n_blocks)) if n_blocks >= 3 else 0
    part_of_block = {}
    for rank, index in enumerate(order):
        part_of_block[int(index)] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return {name: part_of_block[b] for name, b in blocks.items()}


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n, 4: x, y, w, h) with every box of ``b`` (m, 4)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    a, b = a.astype(float), b.astype(float)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    y1 = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return inter / np.maximum(union, 1e-9)


def match_boxes(truth: list[tuple[int, int, int, int]], found: list[tuple[int, int, int, int]], min_iou: float = 0.5):
    """One-to-one matching at IoU >= ``min_iou`` that maximises the total IoU: {truth index: found index}."""
    from scipy.optimize import linear_sum_assignment

    iou = iou_matrix(np.array(truth).reshape(-1, 4), np.array(found).reshape(-1, 4))
    if iou.size == 0:
        return {}
    rows, cols = linear_sum_assignment(-iou)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou}
