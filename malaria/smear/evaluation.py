"""Scoring field analyses against annotated boxes, and slides made of fields.

Definitions (the same in the docs):
- recall: boxed interior cells matched one-to-one by a detected red cell at IoU >= 0.5;
- sensitivity: boxed infected interior cells matched and labelled Parasitized, over all of them
  (a missed cell counts as not found);
- specificity: boxed uninfected interior cells matched and labelled Uninfected, over those matched;
- parasitemia error: |predicted - boxed| in percentage points, on well-boxed fields only (boxes
  number at least 85 % of the cells the analysis counted), the boxed figure over interior boxes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from malaria.smear.annotations import Box, match_boxes

WELL_BOXED = 0.85


@dataclass
class FieldScore:
    name: str
    usable: bool
    boxed: int
    matched: int
    infected_boxed: int
    infected_called: int
    uninfected_matched: int
    uninfected_called: int
    counted: int
    predicted_parasitemia: float | None
    boxed_parasitemia: float
    well_boxed: bool
    seconds: float


def score_field(name: str, boxes: list[Box], analysis: dict, seconds: float) -> FieldScore:
    """One field's analysis (the ``/analyze_smear`` answer) against its boxes."""
    width, height = analysis["image_size"]
    interior = [b for b in boxes if b.interior(width, height)]
    cells = analysis["cells"]
    matches = match_boxes([b.xywh for b in interior], [tuple(c["box"]) for c in cells])
    parasitized = [cells[matches[i]]["label"] == "Parasitized" if i in matches else None for i in range(len(interior))]
    infected = [b.infected for b in interior]
    counted = analysis["counts"]["cells"]
    return FieldScore(
        name=name,
        usable=analysis["usable"],
        boxed=len(interior),
        matched=len(matches),
        infected_boxed=sum(infected),
        infected_called=sum(1 for inf, p in zip(infected, parasitized, strict=True) if inf and p),
        uninfected_matched=sum(1 for inf, p in zip(infected, parasitized, strict=True) if not inf and p is not None),
        uninfected_called=sum(1 for inf, p in zip(infected, parasitized, strict=True) if not inf and p is False),
        counted=counted,
        predicted_parasitemia=analysis["parasitemia_percent"],
        boxed_parasitemia=100 * sum(infected) / len(interior) if interior else 0.0,
        well_boxed=bool(interior) and counted > 0 and len(interior) >= WELL_BOXED * counted,
        seconds=seconds,
    )


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def summarise_scores(scores: list[FieldScore]) -> dict:
    """The figures the docs report, over all scored fields."""
    errors = [
        abs(s.predicted_parasitemia - s.boxed_parasitemia)
        for s in scores
        if s.well_boxed and s.predicted_parasitemia is not None
    ]
    return {
        "fields": len(scores),
        "unusable_fields": sum(not s.usable for s in scores),
        "boxed_interior_cells": sum(s.boxed for s in scores),
        "recall": _ratio(sum(s.matched for s in scores), sum(s.boxed for s in scores)),
        "infected_boxed": sum(s.infected_boxed for s in scores),
        "sensitivity": _ratio(sum(s.infected_called for s in scores), sum(s.infected_boxed for s in scores)),
        "uninfected_matched": sum(s.uninfected_matched for s in scores),
        "specificity": _ratio(sum(s.uninfected_called for s in scores), sum(s.uninfected_matched for s in scores)),
        "well_boxed_fields": len(errors),
        "parasitemia_mae_pp": round(float(np.mean(errors)), 3) if errors else None,
        "parasitemia_max_error_pp": round(float(np.max(errors)), 3) if errors else None,
        "median_seconds_per_field": round(float(np.median([s.seconds for s in scores])), 3) if scores else None,
    }


def scores_table(scores: list[FieldScore]) -> list[dict]:
    return [asdict(s) for s in scores]
