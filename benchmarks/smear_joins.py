"""The join of two Parasitized parts into one cell: what its two constants are chosen on.

    MALARIA_SMEAR_DIR=../shared/data/smears python -m benchmarks.smear_joins [--version N]

In process (no service), with a registered model (default: champion): every field of the smear split
is detected once with the loosest constants of the grid, its red cells classified once, then for each
(``JOIN_AREA_RATIO``, ``JOIN_SOLIDITY``) of the grid the analysis is summarised as the service does it
(``summarise_field``, joins over the grid point's bounds only) and scored as ``malaria smear evaluate``
scores it: joins made, recall, sensitivity, specificity and parasitemia MAE on the well-boxed fields,
per split and over training and validation together (where the constants are chosen: the highest
sensitivity, then the lowest MAE). ``joins`` lists every join at the detector's constants, with the box
its union overlaps most (a match at IoU >= 0.5) and those each part overlaps on its own, to look at.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

import malaria.smear.detect as detect
from benchmarks.smear_misses import fields_and_model
from malaria.config import get_settings
from malaria.preprocess import decode_image
from malaria.smear.analysis import PreparedField, SmearTiming, box_iou, prepare_field, summarise_field
from malaria.smear.annotations import Box
from malaria.smear.evaluation import score_field, summarise_scores
from malaria.train import predict_probability

AREA_RATIOS = (1.5, 1.6, 1.7, 1.8, 2.0)
SOLIDITIES = (0.7, 0.75, 0.8, 0.85, 0.9)
NO_TIMING = SmearTiming(detect_ms=0, crop_ms=0, model_ms=0, total_ms=0)


def matched_box(box: tuple[int, int, int, int], boxes: list[Box]) -> dict:
    """The box that ``box`` overlaps most: its kind ('infected', 'uninfected'; None under IoU 0.5) and IoU."""
    best = max(boxes, key=lambda b: box_iou(b.xywh, box), default=None)
    iou = box_iou(best.xywh, box) if best is not None else 0.0
    kind = None if best is None or iou < 0.5 else "infected" if best.infected else "uninfected"
    return {"matches": kind, "iou": round(iou, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default=None, help="registered version (default: champion)")
    arguments = parser.parse_args()
    settings = get_settings()
    smear_dir, annotations, parts, model, record, spec = fields_and_model(settings, arguments.version)
    chosen = (detect.JOIN_AREA_RATIO, detect.JOIN_SOLIDITY)
    detect.JOIN_AREA_RATIO, detect.JOIN_SOLIDITY = max(AREA_RATIOS), min(SOLIDITIES)  # every candidate
    fields = {}
    for name in sorted(annotations):
        rgb = decode_image((smear_dir / "images" / name).read_bytes(), max_pixels=None)
        field = prepare_field(rgb, spec, settings.smear_cell_diameter_px, time.perf_counter)
        probability = predict_probability(model, field.batch, record.spec) if len(field.batch) else np.empty(0)
        fields[name] = (field, probability)

    def scores(area_ratio: float, solidity: float, names: list[str]) -> tuple[list, list]:
        scored, analyses = [], []
        for name in names:
            field, probability = fields[name]
            joins = [j for j in field.detection.joins if j.region.area_ratio <= area_ratio and j.solidity >= solidity]
            bounded = PreparedField(field.rgb, dataclasses.replace(field.detection, joins=joins), field.batch, 0.0, 0.0)
            analysis = summarise_field(
                bounded,
                probability,
                spec,
                cell_diameter_px=settings.smear_cell_diameter_px,
                model_version=record.version,
                request_id=name,
                timing=NO_TIMING,
            )
            analyses.append((name, analysis))
            scored.append(score_field(name, annotations[name], analysis.model_dump(), 0.0))
        return scored, analyses

    groups = {part: [n for n in sorted(fields) if parts[n] == part] for part in ("train", "val", "test")}
    groups["train+val"] = groups["train"] + groups["val"]
    grid = [(0.0, 1.1)] + [(a, s) for a in AREA_RATIOS for s in SOLIDITIES]  # (0, 1.1): no join at all
    report: dict = {"version": record.version, "field_threshold": spec.threshold, "chosen": list(chosen)}
    for group, names in groups.items():
        rows = []
        for area_ratio, solidity in grid:
            scored, analyses = scores(area_ratio, solidity, names)
            summary = summarise_scores(scored)
            rows.append(
                {
                    "area_ratio": area_ratio,
                    "solidity": solidity,
                    "joined": sum(c.joined for _, a in analyses for c in a.cells),
                    **{k: summary[k] for k in ("recall", "sensitivity", "specificity", "parasitemia_mae_pp")},
                }
            )
        report[group] = rows
    joins = []
    for name, analysis in scores(*chosen, sorted(fields))[1]:
        field, probability = fields[name]
        for cell in (c for c in analysis.cells if c.joined):
            join = next(j for j in field.detection.joins if j.region.box == cell.box)
            joins.append(
                {
                    "field": name,
                    "split": parts[name],
                    "area_ratio": join.region.area_ratio,
                    "solidity": join.solidity,
                    "union": matched_box(cell.box, annotations[name]),
                    "parts": [
                        matched_box(field.detection.regions[i].box, annotations[name])
                        for i in (join.first, join.second)
                    ],
                }
            )
    report["joins"] = joins
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
