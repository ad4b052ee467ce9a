"""Where a model's smear misses come from: detection or classification, per split and capture block.

    MALARIA_SMEAR_DIR=../shared/data/smears python -m benchmarks.smear_misses [--version N]

In process (no service), for the validation and test fields of the smear split: infected boxed cells
that no detected cell matches (IoU >= 0.5: lost before the model sees them), the matched ones the
field rule calls Uninfected, and the matched uninfected cells called Parasitized, per capture block.
For each undetected infected cell: the detected object that overlaps its box most (kind, area in
expected cell areas, edge flag, IoU); and the quartiles of the false positives' probabilities.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import numpy as np

from malaria.config import get_settings
from malaria.preprocess import decode_image
from malaria.registry import load_keras_model
from malaria.smear.analysis import prepare_field
from malaria.smear.annotations import (
    SAME_CELL_IOU,
    UNINFECTED_TYPE,
    capture_blocks,
    iou_matrix,
    load_annotations,
    match_boxes,
    split_fields,
)
from malaria.train import predict_probability


def boxed_twice(annotations_file) -> dict:
    """Pairs of boxes of one field at IoU >= SAME_CELL_IOU in the file as written (``load_annotations``
    keeps one of each), by whether the two boxes are infected."""
    pairs: Counter[str] = Counter()
    fields: set[str] = set()
    for entry in json.loads(annotations_file.read_text()):
        objects = [o for o in entry["objects"] if o["type"] != "difficult"]
        boxes = np.array([[float(o["bbox"][k]) for k in "xywh"] for o in objects]).reshape(-1, 4)
        overlap = np.triu(iou_matrix(boxes, boxes), k=1)
        for i, j in zip(*np.nonzero(overlap >= SAME_CELL_IOU), strict=True):
            infected = sorted(objects[k]["type"] != UNINFECTED_TYPE for k in (i, j))
            pairs[
                {(False, False): "both uninfected", (False, True): "infected and uninfected"}.get(
                    tuple(infected), "both infected"
                )
            ] += 1
            fields.add(entry["image_name"])
    return {"pairs": sum(pairs.values()), "fields": len(fields), **pairs}


def nearest_object(name: str, box: tuple[int, int, int, int], regions: list) -> dict:
    """The detected object overlapping ``box`` most: what became of a cell the matcher did not find."""
    if not regions:
        return {"field": name, "kind": None}
    overlap = iou_matrix(np.array([box], float), np.array([r.box for r in regions], float))[0]
    region = regions[int(np.argmax(overlap))]
    return {
        "field": name,
        "kind": region.kind,
        "area_ratio": region.area_ratio,
        "edge": region.edge,
        "iou": round(float(overlap.max()), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default=None, help="registered version (default: champion)")
    version = parser.parse_args().version
    settings = get_settings()
    if settings.smear_dir is None:
        raise SystemExit("set MALARIA_SMEAR_DIR to the annotated smear fields")
    model, record = load_keras_model(settings, version)
    spec = record.spec.for_fields()
    annotations = load_annotations(settings.smear_dir)
    parts = split_fields(sorted(annotations), settings.seed)
    blocks = capture_blocks(sorted(annotations))
    report: dict = {
        "version": record.version,
        "field_threshold": spec.threshold,
        "cells_boxed_twice": boxed_twice(settings.smear_dir / "annotations.json"),
    }
    for part in ("val", "test"):
        infected, not_detected, called, uninfected = 0, 0, 0, 0
        false_positive: Counter[str] = Counter()
        matched_by_block: Counter[str] = Counter()
        lost: list[dict] = []
        false_positive_probability: list[float] = []
        for name in sorted(n for n in annotations if parts[n] == part):
            rgb = decode_image((settings.smear_dir / "images" / name).read_bytes(), max_pixels=None)
            field = prepare_field(rgb, spec, settings.smear_cell_diameter_px, time.perf_counter)
            cells = field.red_cells
            probability = predict_probability(model, field.batch, spec) if cells else np.empty(0)
            width, height = field.detection.image_size
            boxes = [b for b in annotations[name] if b.interior(width, height)]
            matches = match_boxes([b.xywh for b in boxes], [c.box for c in cells])
            for i, box in enumerate(boxes):
                positive = bool(i in matches and probability[matches[i]] >= spec.threshold)
                if box.infected:
                    infected += 1
                    not_detected += int(i not in matches)
                    called += int(positive)
                    if i not in matches:
                        lost.append(nearest_object(name, box.xywh, field.detection.regions))
                elif i in matches:
                    uninfected += 1
                    matched_by_block[f"block {blocks[name]:02d}"] += 1
                    false_positive[f"block {blocks[name]:02d}"] += int(positive)
                    if positive:
                        false_positive_probability.append(float(probability[matches[i]]))
        report[part] = {
            "infected_boxed": infected,
            "infected_not_detected": not_detected,
            "infected_called": called,
            "sensitivity_ceiling_from_detection": round(1 - not_detected / infected, 3) if infected else None,
            "uninfected_matched": uninfected,
            "false_positives_by_capture_block": dict(sorted(false_positive.items())),
            "specificity_by_capture_block": {
                block: round(1 - false_positive[block] / n, 4) for block, n in sorted(matched_by_block.items())
            },
            "false_positive_probability_quartiles": (
                np.round(np.percentile(false_positive_probability, [0, 25, 50, 75, 100]), 3).tolist()
                if false_positive_probability
                else None
            ),
            "infected_not_detected_as": lost,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
