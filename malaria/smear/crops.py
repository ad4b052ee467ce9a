"""Training crops cut from annotated smear fields: the detector's own crops, labelled by the box they match.

Cells are cut exactly as ``/analyze_smear`` cuts them (detector mask on black), so training sees what
serving sees. A detected cell takes the label of the box it matches at IoU >= 0.5; unmatched cells
(unboxed, or a detection that is not a boxed cell) are not used. Fields split by capture block
(``split_fields``). The uninfected cells (about 75 per infected one) are sampled per field and split;
every infected cell is kept. In training fields, a share of the sample is drawn from the uninfected
cells carrying a stain speck (``speckled``): the cells the field rule most often calls Parasitized.
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
from scipy import ndimage as ndi

from malaria.preprocess import decode_image
from malaria.smear.annotations import capture_blocks, load_annotations, match_boxes, split_fields
from malaria.smear.detect import Region, cell_crop, detect_cells
from malaria.spec import PARASITIZED, UNINFECTED

logger = logging.getLogger(__name__)

# A speck: green darker than the field's median red cell by this share of the cell-to-background
# contrast (at least SPECK_MIN_LEVELS), inside the cell's mask eroded by SPECK_INSET diameters (its rim
# and what touches it are the mask's, not the cell's). A cell is speckled from SPECK_MIN_AREA of a
# cell's area of such pixels. On the 30 test fields with MLflow v7, 411 of 3,046 matched uninfected cells
# are speckled and 21 of them are called Parasitized (5.1 %), against 10 of the other 2,635 (0.4 %)
# (``benchmarks.smear_misses``).
SPECK_CONTRAST = 0.3
SPECK_MIN_LEVELS = 15.0
SPECK_INSET = 0.1
SPECK_MIN_AREA = 0.003

CROPS_VERSION = 3  # bump when the detector or the cutting changes: cached crops are then cut again
COLUMNS = ["path", "label", "patient", "width", "height", "source", "split"]


def crop_key(
    smear_dir: Path, cell_diameter_px: float, seed: int, uninfected_per_field: dict[str, int], speckled_share: float
) -> str:
    """What the cut crops depend on: the annotations, the detector's and this module's code, the sampling."""
    digest = hashlib.sha256((Path(smear_dir) / "annotations.json").read_bytes())
    for module in (detect_cells, cell_crop, decode_image, load_annotations, cut_smear_crops):
        digest.update(Path(inspect.getfile(module)).read_bytes())
    sampling = [CROPS_VERSION, cell_diameter_px, seed, uninfected_per_field, speckled_share]
    digest.update(json.dumps(sampling, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def speckled(rgb: np.ndarray, regions: list[Region], cells: list[Region], cell_diameter_px: float) -> np.ndarray:
    """Whether each of ``cells`` carries a stain speck (platelet, precipitate, a dot like a ring form).

    Levels are the field's own (green channel): its median red cell and its background, outside every
    detected object, so a pale grey stain and a deep magenta one are judged alike.
    """
    green = rgb[..., 1]
    objects = np.zeros(green.shape, bool)
    in_cells = np.zeros(green.shape, bool)
    for region in regions:
        x, y, w, h = region.box
        objects[y : y + h, x : x + w] |= region.mask
        if region.kind == "red_cell":
            in_cells[y : y + h, x : x + w] |= region.mask
    if not in_cells.any() or objects.all():
        return np.zeros(len(cells), bool)
    cell_level, background_level = float(np.median(green[in_cells])), float(np.median(green[~objects]))
    dark = green < cell_level - max(SPECK_MIN_LEVELS, SPECK_CONTRAST * (background_level - cell_level))
    inset = max(1, round(SPECK_INSET * cell_diameter_px))
    min_pixels = SPECK_MIN_AREA * np.pi * (cell_diameter_px / 2) ** 2
    flags = []
    for cell in cells:
        x, y, w, h = cell.box
        inner = ndi.binary_erosion(cell.mask, iterations=inset)
        flags.append(int((dark[y : y + h, x : x + w] & inner).sum()) >= min_pixels)
    return np.array(flags, bool)


def sample_uninfected(
    count: int, keep: int, speckled_cells: np.ndarray, speckled_share: float, rng: np.random.Generator
) -> list[int]:
    """Which of ``count`` uninfected cells to keep: ``keep`` of them, ``speckled_share`` of those (as far as
    there are) drawn from the speckled ones, the rest from all the others."""
    if count <= keep:
        return list(range(count))
    speckled_at = np.flatnonzero(speckled_cells)
    n_speckled = min(round(speckled_share * keep), len(speckled_at))
    chosen = rng.choice(speckled_at, n_speckled, replace=False) if n_speckled else np.empty(0, int)
    others = np.setdiff1d(np.arange(count), chosen)
    rest = rng.choice(others, keep - n_speckled, replace=False)
    return sorted(int(i) for i in np.concatenate([chosen, rest]))


def cut_smear_crops(
    smear_dir: Path,
    out_dir: Path,
    cell_diameter_px: float,
    seed: int,
    uninfected_per_field: dict[str, int],
    speckled_share: float = 0.0,
) -> pd.DataFrame:
    """Cut (or reuse) the labelled crops of every annotated field; manifest rows, paths relative to ``out_dir``.

    ``speckled_share`` applies to training fields only: validation and test keep a uniform sample, so
    the thresholds chosen on them and the metrics measured on them see cells as they come.
    """
    smear_dir, out_dir = Path(smear_dir), Path(out_dir)
    key = crop_key(smear_dir, cell_diameter_px, seed, uninfected_per_field, speckled_share)
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
        share = speckled_share if parts[name] == "train" else 0.0
        specks = (
            speckled(rgb, detection.regions, [c for c, _ in uninfected], cell_diameter_px)
            if share
            else np.zeros(len(uninfected), bool)
        )
        kept = sample_uninfected(len(uninfected), uninfected_per_field[parts[name]], specks, share, rng)
        uninfected = [uninfected[i] for i in kept]
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
