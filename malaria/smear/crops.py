"""Training crops cut from annotated smear fields: the detector's own crops, labelled by the box they match.

Cells are cut exactly as ``/analyze_smear`` cuts them (detector mask on black), so training sees what
serving sees. A detected cell takes the label of the box it matches at IoU >= 0.5; unmatched cells
(unboxed, or a detection that is not a boxed cell) are not used. Fields split by capture block
(``split_fields``). The uninfected cells (about 75 per infected one) are sampled per field and split;
every infected cell is kept.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from malaria.preprocess import decode_image
from malaria.smear.annotations import capture_blocks, load_annotations, match_boxes, split_fields
from malaria.smear.detect import cell_crop, detect_cells
from malaria.spec import PARASITIZED, UNINFECTED

logger = logging.getLogger(__name__)

CROPS_VERSION = 1  # bump when the detector or the cutting changes: cached crops are then cut again
COLUMNS = ["path", "label", "patient", "width", "height", "source", "split"]


def crop_key(smear_dir: Path, cell_diameter_px: float, seed: int, uninfected_per_field: dict[str, int]) -> str:
    """What the cut crops depend on: the annotations, the detector's and this module's code, the sampling."""
    digest = hashlib.sha256((Path(smear_dir) / "annotations.json").read_bytes())
    for module in (detect_cells, cell_crop, decode_image, load_annotations, cut_smear_crops):
        digest.update(Path(inspect.getfile(module)).read_bytes())
    digest.update(json.dumps([CROPS_VERSION, cell_diameter_px, seed, uninfected_per_field], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cut_smear_crops(
    smear_dir: Path,
    out_dir: Path,
    cell_diameter_px: float,
    seed: int,
    uninfected_per_field: dict[str, int],
) -> pd.DataFrame:
    """Cut (or reuse) the labelled crops of every annotated field; manifest rows, paths relative to ``out_dir``."""
    smear_dir, out_dir = Path(smear_dir), Path(out_dir)
    key = crop_key(smear_dir, cell_diameter_px, seed, uninfected_per_field)
    stamp = out_dir / "crops.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        cached = pd.read_csv(out_dir / "crops.csv")
        if all((out_dir / p).is_file() for p in cached["path"]):
            return cached
    annotations = load_annotations(smear_dir)
    parts = split_fields(sorted(annotations), seed)
    blocks = capture_blocks(sorted(annotations))
    rng = np.random.default_rng(seed)
    for label in (PARASITIZED, UNINFECTED):
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        for old in (out_dir / label).glob("*.png"):
            old.unlink()
    rows = []
    for name in sorted(annotations):
        path = smear_dir / "images" / name
        if not path.is_file():
            logger.warning("smear crops: %s is annotated but missing; skipped", path)
            continue
        rgb = np.asarray(decode_image(path.read_bytes(), max_pixels=None))  # as served: EXIF-upright RGB
        detection = detect_cells(rgb, cell_diameter_px)
        cells = [r for r in detection.regions if r.kind == "red_cell" and not r.edge]
        boxes = annotations[name]
        matches = match_boxes([b.xywh for b in boxes], [c.box for c in cells])
        infected = [(cells[c], True) for b, c in matches.items() if boxes[b].infected]
        uninfected = [(cells[c], False) for b, c in matches.items() if not boxes[b].infected]
        keep = uninfected_per_field[parts[name]]
        if len(uninfected) > keep:
            uninfected = [uninfected[i] for i in sorted(rng.choice(len(uninfected), keep, replace=False))]
        block = f"smear-block-{blocks[name]:02d}"
        for i, (region, is_infected) in enumerate(infected + uninfected):
            label = PARASITIZED if is_infected else UNINFECTED
            relative = f"{label}/{Path(name).stem}_cell{i:03d}.png"
            Image.fromarray(cell_crop(rgb, region)).save(out_dir / relative)
            rows.append([relative, label, block, region.box[2], region.box[3], "smear", parts[name]])
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.to_csv(out_dir / "crops.csv", index=False)
    stamp.write_text(json.dumps({"key": key, "crops": len(frame)}))
    logger.info("smear crops: %s", frame.groupby(["split", "label"]).size().to_dict())
    return frame
