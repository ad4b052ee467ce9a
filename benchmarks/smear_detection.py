"""The detector alone on the annotated fields, per split: what a detector change is chosen on.

    MALARIA_SMEAR_DIR=../shared/data/smears python -m benchmarks.smear_detection [--cell-diameter-px 80]

No model: for the training, validation and test fields of the smear split (by capture block), the
boxed interior cells matched by a detected red cell at IoU >= 0.5 (recall) and the infected ones
among them, and the objects counted as red cells and rejected, by kind. A detector setting is
chosen on the training and validation fields; the test line is read once it is chosen. Infected
cells the detector misses can never be called Parasitized, so the test line's infected count caps
the service's sensitivity.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from malaria.config import get_settings
from malaria.preprocess import decode_image
from malaria.smear.annotations import load_annotations, split_fields
from malaria.smear.detect import detect_cells
from malaria.smear.evaluation import score_field


def main() -> None:
    settings = get_settings()
    parser = argparse.ArgumentParser()
    parser.add_argument("--cell-diameter-px", type=float, default=settings.smear_cell_diameter_px)
    args = parser.parse_args()
    if settings.smear_dir is None:
        raise SystemExit("set MALARIA_SMEAR_DIR to an annotated smear folder")
    smear_dir = Path(settings.smear_dir)
    annotations = load_annotations(smear_dir)
    parts = split_fields(sorted(annotations), seed=settings.seed)
    report = {}
    for part in ("train", "val", "test"):
        scores = []
        objects: Counter[str] = Counter()
        for name in sorted(name for name in annotations if parts[name] == part):
            rgb = np.asarray(decode_image((smear_dir / "images" / name).read_bytes()))
            started = time.perf_counter()
            found = detect_cells(rgb, args.cell_diameter_px)
            seconds = time.perf_counter() - started
            objects.update({"counted": len(found.counted), **found.rejected()})
            # Every detected red cell called Parasitized: the evaluation's infected cells "called" are then
            # the infected cells the detector found.
            cells = [{"box": list(r.box), "label": "Parasitized"} for r in found.regions if r.kind == "red_cell"]
            answer = {
                "image_size": list(found.image_size),
                "cells": cells,
                "usable": found.usable,
                "counts": {"cells": len(found.counted)},
                "parasitemia_percent": None,
            }
            scores.append(score_field(name, annotations[name], answer, seconds))
        boxed = sum(s.boxed for s in scores)
        report[part] = {
            "fields": len(scores),
            "recall": round(sum(s.matched for s in scores) / max(boxed, 1), 4),
            "boxed_cells": boxed,
            "infected_matched": sum(s.infected_called for s in scores),
            "infected": sum(s.infected_boxed for s in scores),
            "objects": dict(sorted(objects.items())),
            "seconds_per_field_median": round(float(np.median([s.seconds for s in scores])), 3) if scores else None,
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
