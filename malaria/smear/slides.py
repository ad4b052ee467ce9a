"""Slides made of fields: a folder is one slide; each field analysed by the service, summed per slide."""

from __future__ import annotations

import json
import os
from pathlib import Path

from malaria.client import collect_images

LOOSE_FILES = "files"  # the slide name of field images given one by one


def collect_slides(paths: list[Path]) -> dict[str, list[Path]]:
    """Slide name -> its field images, in a stable order. A folder is a slide; loose files form one."""
    slides: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        if path.is_dir():
            images = collect_images([path])
            name = path.resolve().name or "slide"
            while name in slides:  # two folders of the same name: both kept
                name += "+"
            slides[name] = images
        elif path.is_file():
            slides.setdefault(LOOSE_FILES, []).append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return slides


def summarise_slide(fields: list[dict], min_cells: int) -> dict:
    """Counts and parasitemia over the usable fields of one slide; flagged when counted on too few cells."""
    from malaria.smear.analysis import wilson_percent

    usable = [f for f in fields if f.get("usable")]
    cells = sum(f["counts"]["cells"] for f in usable)
    parasitized = sum(f["counts"]["parasitized"] for f in usable)
    return {
        "fields": len(fields),
        "usable_fields": len(usable),
        "rejected_files": sum("error" in f for f in fields),
        "cells": cells,
        "parasitized": parasitized,
        "refer": sum(f["counts"]["refer"] for f in usable),
        "parasitemia_percent": round(100 * parasitized / cells, 3) if cells else None,
        "parasitemia_ci95": wilson_percent(parasitized, cells) if cells else None,
        "enough_cells": cells >= min_cells,
        "min_cells": min_cells,
    }


def annotated_name(path: Path, images: list[Path]) -> str:
    """The annotated picture's file name, unique within its slide: the path below the slide's common
    folder, sub-folders joined by ``__``, suffix kept (``a/f1.jpg`` -> ``a__f1.jpg.annotated.png``)."""
    common = Path(os.path.commonpath([str(p.parent) for p in images]))
    return "__".join(path.relative_to(common).parts) + ".annotated.png"


def analyze_field(client, path: Path, target: Path | None, cell_diameter_px: float | None = None) -> dict:
    """One field through the service (``client``: a ``MalariaClient``) -> ``{"path", **analysis}``, its annotated
    picture written to ``target`` (``"annotated"``). A field the service rejects (4xx) is ``{"path", "error"}``."""
    from bentoml.exceptions import BentoMLException

    from malaria.preprocess import decode_image
    from malaria.smear.analysis import SmearAnalysis
    from malaria.smear.render import annotate

    try:
        analysis = client.analyze_smear(path, cell_diameter_px=cell_diameter_px)
    except BentoMLException as exc:
        if int(exc.error_code) >= 500:
            raise
        return {"path": str(path), "error": str(exc)}
    analysis = analysis if isinstance(analysis, dict) else analysis.model_dump()
    row = {"path": str(path), **analysis}
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        field_image = decode_image(path.read_bytes(), max_pixels=None)
        annotate(field_image, SmearAnalysis.model_validate(analysis)).save(target)
        row["annotated"] = str(target)
    return row


def analyze_slides(
    slides: dict[str, list[Path]], client, out: Path | None, min_cells: int, cell_diameter_px: float | None = None
) -> dict:
    """Analyse every field with the service; write annotated fields and ``summary.json`` under ``out``."""
    report: dict = {"slides": {}}
    for slide, images in slides.items():
        fields = [
            analyze_field(client, path, out / slide / annotated_name(path, images) if out else None, cell_diameter_px)
            for path in images
        ]
        report["slides"][slide] = {"summary": summarise_slide(fields, min_cells), "fields": fields}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(report, indent=2))
    return report
