"""Where a model's smear misses come from: detection or classification, per split and capture block.

    MALARIA_SMEAR_DIR=../shared/data/smears python -m benchmarks.smear_misses \
        [--version N] [--with NAME:VERSION ...] [--recolour S:H]

In process (no service; two Parasitized parts joined as the service joins them), for the validation
and test fields of the smear split: infected boxed cells
that no detected cell matches (IoU >= 0.5: lost before the model sees them), the matched ones the
field rule calls Uninfected, and the matched uninfected cells called Parasitized, per capture block.
For each undetected infected cell: the detected object that overlaps its box most (kind, area in
expected cell areas, edge flag, IoU); the quartiles of the false positives' probabilities; and the
uninfected cells with and without a stain speck (``malaria.smear.crops.speckled``) and the false
positives among each; how many false positives and infected cells the field's refer band sends to a
person (``referred``: what the review queue can settle); the operating points: infected cells
called and false positives at field thresholds from 0.5 to 0.95 (is there a threshold that meets
both goals?). ``--with`` averages the probabilities of further registered models with the first
one's (would an ensemble of training seeds be better?). ``--recolour`` shifts every field's colours
before detection, to see how a model holds up on a stain the shared fields do not have.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from skimage.color import hsv2rgb, rgb2hsv

from malaria.config import Settings, get_settings
from malaria.preprocess import decode_image
from malaria.registry import RegisteredVersion, load_keras_model
from malaria.smear.analysis import join_parasitized_parts, prepare_field
from malaria.smear.annotations import (
    SAME_CELL_IOU,
    UNINFECTED_TYPE,
    Box,
    capture_blocks,
    iou_matrix,
    load_annotations,
    match_boxes,
    split_fields,
)
from malaria.smear.crops import speckled
from malaria.spec import ModelSpec
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


def recolour_setting(text: str) -> tuple[float, float]:
    """``SATURATION:HUE`` as two floats."""
    saturation, _, hue = text.partition(":")
    return float(saturation), float(hue or 0)


def recolour(image: Image.Image, saturation: float, hue: float) -> Image.Image:
    """The field with its saturation scaled and its hue turned (HSV): another stain."""
    hsv = rgb2hsv(np.asarray(image))
    hsv[..., 0] = np.mod(hsv[..., 0] + hue, 1.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 1.0)
    return Image.fromarray((hsv2rgb(hsv) * 255).round().astype(np.uint8))


class FieldsAndModel(NamedTuple):
    smear_dir: Path
    annotations: dict[str, list[Box]]
    parts: dict[str, str]  # field -> train / val / test
    model: Any
    record: RegisteredVersion
    spec: ModelSpec  # the rule the model's fields use


def fields_and_model(settings: Settings, version: str | None) -> FieldsAndModel:
    """The annotated fields of ``MALARIA_SMEAR_DIR`` and their split, and a registered version (default:
    champion) with its Keras model and field rule."""
    if settings.smear_dir is None:
        raise SystemExit("set MALARIA_SMEAR_DIR to the annotated smear fields")
    model, record = load_keras_model(settings, version)
    annotations = load_annotations(settings.smear_dir)
    parts = split_fields(sorted(annotations), settings.seed)
    return FieldsAndModel(settings.smear_dir, annotations, parts, model, record, record.spec.for_fields())


OPERATING_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def operating_points(infected: list[float], uninfected: list[float]) -> list[dict]:
    """Infected cells called and false positives at each of ``OPERATING_THRESHOLDS`` (an undetected
    infected cell has probability 0: it is never called)."""
    infected_p, uninfected_p = np.array(infected), np.array(uninfected)
    return [
        {
            "threshold": threshold,
            "infected_called": int((infected_p >= threshold).sum()),
            "sensitivity": round(float((infected_p >= threshold).mean()), 3) if len(infected_p) else None,
            "false_positives": int((uninfected_p >= threshold).sum()),
            "specificity": round(float((uninfected_p < threshold).mean()), 4) if len(uninfected_p) else None,
        }
        for threshold in OPERATING_THRESHOLDS
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--version", default=None, help="registered version (default: champion)")
    parser.add_argument(
        "--recolour",
        type=recolour_setting,
        default=None,
        metavar="SATURATION:HUE",
        help="scale every field's saturation by SATURATION and turn its hue by HUE (a fraction of the colour "
        "circle) before detection: a stain the shared fields do not have, e.g. 0.6:0.03",
    )
    parser.add_argument(
        "--with",
        dest="others",
        action="append",
        default=[],
        metavar="NAME:VERSION",
        help="a further registered model whose probabilities are averaged in (repeatable)",
    )
    arguments = parser.parse_args()
    settings = get_settings()
    smear_dir, annotations, parts, model, record, spec = fields_and_model(settings, arguments.version)
    members = [(model, record.spec)]
    for other in arguments.others:
        name, _, other_version = other.partition(":")
        other_model, other_record = load_keras_model(
            settings.model_copy(update={"registered_model_name": name}), other_version or None
        )
        members.append((other_model, other_record.spec))
    blocks = capture_blocks(sorted(annotations))
    report: dict = {
        "version": record.version,
        "averaged_with": arguments.others,
        "field_threshold": spec.threshold,
        "recolour": arguments.recolour,
        "cells_boxed_twice": boxed_twice(smear_dir / "annotations.json"),
    }
    for part in ("val", "test"):
        infected, not_detected, called, uninfected = 0, 0, 0, 0
        false_positive: Counter[str] = Counter()
        matched_by_block: Counter[str] = Counter()
        lost: list[dict] = []
        false_positive_probability: list[float] = []
        infected_probability: list[float] = []
        uninfected_probability: list[float] = []
        speck_counts: Counter[str] = Counter()
        referred: Counter[str] = Counter()
        for name in sorted(n for n in annotations if parts[n] == part):
            rgb = decode_image((smear_dir / "images" / name).read_bytes(), max_pixels=None)
            if arguments.recolour is not None:
                rgb = recolour(rgb, *arguments.recolour)
            field = prepare_field(rgb, spec, settings.smear_cell_diameter_px, time.perf_counter)
            probability = (
                np.mean([predict_probability(m, field.batch, member_spec) for m, member_spec in members], axis=0)
                if field.red_cells
                else np.empty(0)
            )
            cells, probability, _ = join_parasitized_parts(field.detection, probability, spec.threshold)  # as served
            width, height = field.detection.image_size
            boxes = [b for b in annotations[name] if b.interior(width, height)]
            matches = match_boxes([b.xywh for b in boxes], [c.box for c in cells])
            specks = speckled(field.rgb, field.detection.regions, cells, settings.smear_cell_diameter_px)
            for i, box in enumerate(boxes):
                positive = bool(i in matches and probability[matches[i]] >= spec.threshold)
                refer = bool(i in matches and spec.decision(float(probability[matches[i]])) == "refer")
                if i in matches:
                    referred["matched_cells"] += 1
                    referred["matched_cells_referred"] += int(refer)
                if box.infected:
                    infected += 1
                    infected_probability.append(float(probability[matches[i]]) if i in matches else 0.0)
                    not_detected += int(i not in matches)
                    called += int(positive)
                    referred["infected_called_referred"] += int(positive and refer)
                    if i not in matches:
                        lost.append(nearest_object(name, box.xywh, field.detection.regions))
                elif i in matches:
                    uninfected += 1
                    uninfected_probability.append(float(probability[matches[i]]))
                    kind = "speckled" if specks[matches[i]] else "plain"
                    speck_counts[f"{kind}_cells"] += 1
                    speck_counts[f"{kind}_false_positives"] += int(positive)
                    matched_by_block[f"block {blocks[name]:02d}"] += 1
                    false_positive[f"block {blocks[name]:02d}"] += int(positive)
                    referred["false_positives_referred"] += int(positive and refer)
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
            "uninfected_by_speck": dict(sorted(speck_counts.items())),
            "referred": {"refer_band": list(spec.refer_band), **dict(sorted(referred.items()))},
            "operating_points": operating_points(infected_probability, uninfected_probability),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
