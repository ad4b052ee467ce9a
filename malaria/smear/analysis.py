"""From a field's detected cells and their probabilities to counts and parasitemia with its interval."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field
from scipy.stats import binomtest

from malaria.preprocess import to_model_input
from malaria.smear.detect import FieldDetection, Kind, Region, cell_crop, detect_cells
from malaria.spec import Decision, ModelSpec, review_flag

RBC_DIAMETER_UM = 7.5  # a normal red cell; turns a pixel size into the expected diameter in pixels


class SmearCell(BaseModel):
    """One red cell of the field."""

    box: tuple[int, int, int, int] = Field(description="x, y, width, height in pixels of the uploaded image (upright).")
    label: str = Field(description="Parasitized or Uninfected, by the model's threshold.")
    probability_parasitized: float
    decision: Decision = Field(description="'refer' flags a cell for a person to look at; the label still counts.")
    edge: bool = Field(description="Cut by the image border: shown, not counted.")
    joined: bool = Field(
        False,
        description="Two touching parts of the segmentation, both called Parasitized, counted as this one cell "
        "(an enlarged infected cell the segmentation cut in two); its probability is the larger of the two.",
    )
    review: Literal["refer", "audit"] | None = Field(
        None,
        description="Why the cell goes to the review queue: the model refers it, or it is in the random audit "
        "sample of non-referred cells (the unbiased live accuracy); None: not queued.",
    )


class OtherObject(BaseModel):
    """An object that is not counted as a red cell."""

    box: tuple[int, int, int, int]
    kind: Kind = Field(description="white_cell, small (platelet, debris) or clump (cells that could not be split).")


class SmearCounts(BaseModel):
    cells: int = Field(description="Whole red cells counted (edge cells excluded).")
    parasitized: int
    uninfected: int
    refer: int = Field(description="Counted cells flagged for review (already in parasitized or uninfected).")


class SmearTiming(BaseModel):
    detect_ms: float
    crop_ms: float
    model_ms: float
    total_ms: float


class SmearAnalysis(BaseModel):
    """The answer for one field image."""

    usable: bool = Field(description="False: the field cannot be counted (see reason); no parasitemia is given.")
    reason: str | None = None
    parasitemia_percent: float | None = Field(description="Cells labelled Parasitized per 100 counted cells.")
    parasitemia_ci95: tuple[float, float] | None = Field(
        description="Wilson 95 % interval of the parasitemia, in percent (wide when few cells are counted)."
    )
    counts: SmearCounts
    cells: list[SmearCell]
    other_objects: list[OtherObject]
    image_size: tuple[int, int] = Field(description="width, height of the uploaded image after EXIF orientation.")
    cell_diameter_px: float = Field(description="The expected red-cell diameter the detector used.")
    model_version: str
    request_id: str
    timing: SmearTiming
    filename: str | None = None


def expected_diameter(default_px: float, cell_diameter_px: float | None, pixel_size_um: float | None) -> float:
    """The request's cell diameter: given in pixels, else from the pixel size, else the server's default."""
    if cell_diameter_px is not None:
        return cell_diameter_px
    if pixel_size_um is not None:
        return RBC_DIAMETER_UM / pixel_size_um
    return default_px


class PreparedField:
    """A decoded field, its detection and the model inputs of its red cells (edge cells included)."""

    def __init__(self, rgb: np.ndarray, detection: FieldDetection, batch: np.ndarray, detect_ms: float, crop_ms: float):
        self.rgb, self.detection, self.batch = rgb, detection, batch
        self.detect_ms, self.crop_ms = detect_ms, crop_ms

    @property
    def red_cells(self):
        return [r for r in self.detection.regions if r.kind == "red_cell"]


def prepare_field(
    image: Image.Image, spec: ModelSpec, cell_diameter_px: float, clock: Callable[[], float]
) -> PreparedField:
    """Detect the cells of a decoded field and cut each into a model input (CPU-bound: run off the event loop)."""
    started = clock()
    rgb = np.asarray(image)
    detection = detect_cells(rgb, cell_diameter_px)
    detected = clock()
    cells = [r for r in detection.regions if r.kind == "red_cell"] if detection.usable else []
    batch = np.empty((len(cells), spec.image_size, spec.image_size, 3), dtype=np.float32)
    for i, region in enumerate(cells):
        batch[i] = to_model_input(Image.fromarray(cell_crop(rgb, region)), spec)
    return PreparedField(rgb, detection, batch, (detected - started) * 1000, (clock() - detected) * 1000)


def flag_for_review(analysis: SmearAnalysis, audit_share: float, rng: np.random.Generator) -> None:
    """Mark the counted cells the review queue gets: every referred one, and ``audit_share`` of the others."""
    for cell in analysis.cells:
        if not cell.edge:
            cell.review = review_flag(cell.decision, audit_share, rng)


class CellNotFoundError(ValueError):
    """No detected red cell matches the given box."""


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
    union = aw * ah + bw * bh - inter
    return inter / union if union else 0.0


def cell_at(rgb: np.ndarray, box: tuple[int, int, int, int], cell_diameter_px: float) -> np.ndarray:
    """The red cell of a field at ``box`` (a box ``/analyze_smear`` answered), cut as the model saw it; a
    joined cell is cut whole, the union of its two parts (the model scored each part: its probability is
    the larger of the two)."""
    detection = detect_cells(rgb, cell_diameter_px)
    cells = [r for r in detection.regions if r.kind == "red_cell"] + [j.region for j in detection.joins]
    best = max(cells, key=lambda r: box_iou(r.box, box), default=None)
    if best is None or box_iou(best.box, box) < 0.5:
        raise CellNotFoundError(f"no red cell found at box {list(box)} (with {cell_diameter_px:g}-px cells)")
    return cell_crop(rgb, best)


def join_parasitized_parts(
    detection: FieldDetection, probability: np.ndarray, threshold: float
) -> tuple[list[Region], np.ndarray, list[bool]]:
    """The field's red cells with each of the detector's joins (``detect.Join``) whose two parts are both
    called Parasitized counted as one cell, its probability the larger; returns cells, probabilities and
    which cells are joined.

    A P. vivax cell is enlarged by its parasite, whose dark chromatin notches the segmentation's mask,
    and it can come out as two parts that the model both calls Parasitized: two counts for one cell.
    Joined only when both parts are called: a cell with one infected half is counted once already. Which
    pairs may be joined is the detector's (``detect.JOIN_AREA_RATIO``, ``detect.JOIN_SOLIDITY``).
    """
    if not detection.usable:  # no cell was cut or classified
        return [], np.empty(0), []
    red = [i for i, r in enumerate(detection.regions) if r.kind == "red_cell"]
    position = {region_index: k for k, region_index in enumerate(red)}
    cells: list[Region] = [detection.regions[i] for i in red]
    p = np.asarray(probability, dtype=float).copy()
    joined = [False] * len(cells)
    used: set[int] = set()  # each part joins at most once
    dropped: set[int] = set()
    for join in sorted(detection.joins, key=lambda j: -j.solidity):  # the roundest union first
        first, second = position[join.first], position[join.second]
        if {first, second} & used or min(p[first], p[second]) < threshold:
            continue
        cells[first], p[first], joined[first] = join.region, max(p[first], p[second]), True
        used |= {first, second}
        dropped.add(second)
    kept = [k for k in range(len(cells)) if k not in dropped]
    return [cells[k] for k in kept], p[kept], [joined[k] for k in kept]


def wilson_percent(positive: int, total: int) -> tuple[float, float]:
    """Wilson score 95 % interval of positive / total, in percent."""
    interval = binomtest(positive, total).proportion_ci(confidence_level=0.95, method="wilson")
    return round(float(100 * interval.low), 3), round(float(100 * interval.high), 3)


def summarise_field(
    field: PreparedField,
    probability: np.ndarray,
    spec: ModelSpec,
    *,
    cell_diameter_px: float,
    model_version: str,
    request_id: str,
    timing: SmearTiming,
    filename: str | None = None,
) -> SmearAnalysis:
    """Counts over the whole red cells (two Parasitized parts of one cell joined); parasitemia only for a
    usable field."""
    detection = field.detection
    cells, probability, joined = join_parasitized_parts(detection, probability, spec.threshold)
    labels = spec.labels(probability)
    smear_cells = [
        SmearCell(
            box=region.box,
            label=label,
            probability_parasitized=round(float(p), 6),
            decision=spec.decision(float(p)),
            edge=region.edge,
            joined=is_joined,
        )
        for region, p, label, is_joined in zip(cells, probability, labels, joined, strict=True)
    ]
    counted = [c for c in smear_cells if not c.edge]
    parasitized = sum(c.label == spec.positive_class for c in counted)
    counts = SmearCounts(
        cells=len(counted),
        parasitized=parasitized,
        uninfected=len(counted) - parasitized,
        refer=sum(c.decision == "refer" for c in counted),
    )
    usable = detection.usable and len(counted) > 0
    return SmearAnalysis(
        usable=usable,
        reason=detection.reason,
        parasitemia_percent=round(100 * parasitized / len(counted), 3) if usable else None,
        parasitemia_ci95=wilson_percent(parasitized, len(counted)) if usable else None,
        counts=counts,
        cells=smear_cells,
        other_objects=[OtherObject(box=r.box, kind=r.kind) for r in detection.regions if r.kind != "red_cell"],
        image_size=detection.image_size,
        cell_diameter_px=round(cell_diameter_px, 3),
        model_version=model_version,
        request_id=request_id,
        timing=timing,
        filename=filename,
    )
