"""Red-cell detection on a thin-smear field: the classical segmentation of NIH's Malaria Screener.

Green channel (stained cells absorb green; the background does not), Otsu threshold, small holes
filled (the pale centre of a red cell), touching cells split by a watershed on the distance
transform, then each object judged against the expected cell diameter: platelets and debris are too
small, a white blood cell carries a nucleus stained far darker than the field's red cells, a clump
the watershed could not split is too large, and cells cut by the image border are flagged ``edge``.
Two touching parts that may be one enlarged cell are offered as a ``Join`` (the analysis decides).
Segmentation runs at a working scale where a cell is ``WORK_DIAMETER_PX`` across, whatever the
camera and magnification, and refuses a working image over ``MAX_WORK_PIXELS``: the cost of a field
is bounded whatever its size and cell size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import regionprops
from skimage.segmentation import watershed

WORK_DIAMETER_PX = 32.0  # cells are segmented at this diameter (80-px cells of a 1280x960 field: 512x384)
MIN_AREA_RATIO = 0.3  # below: platelet, debris, a sliver (area over the expected cell's)
MAX_AREA_RATIO = 2.2  # above: several cells the watershed left whole; cut into round(area) parts
# Two cells left as one object: over PAIR_AREA_RATIO of a cell's area (and up to MAX_AREA_RATIO) and not
# convex (solidity, area over its convex hull's, under PAIR_SOLIDITY), it is cut in two. An enlarged
# P. vivax cell is as large but round. Chosen on the training and validation fields of the shared set
# (``python -m benchmarks.smear_detection``): training-field recall 0.952 -> 0.958, infected cells matched
# 223 -> 226 of 236. In a sweep of the two constants, solidity 0.9 / 0.95 / 0.97 matched 226 / 224 / 218
# infected training cells, and area 1.0 lost validation cells.
PAIR_AREA_RATIO = 1.2
PAIR_SOLIDITY = 0.93
NUCLEUS_RATIO = (
    0.6  # nucleus-dark pixels over the expected cell area: a white cell (infected cells: <= 0.61, 95 % <= 0.33)
)
# A white cell's lobed nucleus can be cut into parts that each hold less than NUCLEUS_RATIO: a part
# holding at least this many cells' area of a nucleus that is white-cell-sized as a whole (one connected
# dark patch over NUCLEUS_RATIO) is a white cell too. Seen on a held-out field (PA171797: a neutrophil
# cut in two parts of 0.36 and 0.41, both called Parasitized).
NUCLEUS_PART_RATIO = 0.2
NUCLEUS_GAP = 0.25  # lobes of one nucleus lie closer than this many diameters
PEAK_SPACING = 0.2  # cell centres at least this many diameters apart (watershed seeds)
PEAK_HEIGHT = 0.2  # a seed lies at least this many diameters inside the foreground
RIDGE_WIDTH = 0.25  # lighter lines narrower than this many diameters separate packed cells
RIDGE_CONTRAST = 0.2  # ... when lighter than their surroundings by this share of the cell contrast
# One enlarged infected cell can come out of the segmentation as two parts (its parasite's dark chromatin
# notches the mask: the watershed or the pair cut splits it). Two touching whole red-cell parts whose union
# is at most JOIN_AREA_RATIO cells (two normal cells make 2) and round (solidity at least JOIN_SOLIDITY) are
# offered as a join; the analysis counts them as one cell when the model calls both Parasitized
# (``malaria.smear.analysis.join_parasitized_parts``). Chosen on the training and validation fields with the
# champion (``python -m benchmarks.smear_joins``: the highest infected-cell sensitivity, then the lowest
# parasitemia MAE): 23 joins on 181 fields, sensitivity 0.9436 -> 0.9511, MAE 0.808 -> 0.738 pp; area 1.8
# lost an infected cell, solidity 0.7 joined the same cells, 0.85 fewer.
JOIN_AREA_RATIO = 1.7
JOIN_SOLIDITY = 0.75
MAX_SPLIT = 8  # an object of more cells than this is a thick area, not a monolayer: a clump, not counted
MIN_CONTRAST = 12.0  # green levels between background and the Otsu threshold: below, nothing is stained
MIN_CELLS = 20  # fewer counted cells: not a usable field
MAX_CELLS = 5000  # more red cells than a 50 Mpx photo of a monolayer holds at 80 px: the cell size is wrong
MAX_WORK_PIXELS = 16_000_000  # the segmentation's working image; the cost of a field is bounded by it
# Edge sharpness: the mean gradient on cell outlines over the cell-to-background contrast, per working
# pixel. On 71 shared fields as taken: 0.20 to 0.33; blurred by a Gaussian of radius 6 full-resolution
# pixels: 0.135 to 0.16 (counts within 15 %); radius 10: 0.10 to 0.12 (counts down by up to 37 %).
MIN_SHARPNESS = 0.12


class FieldTooLargeError(ValueError):
    """The field has too many pixels for its cell size (the working image would exceed MAX_WORK_PIXELS)."""


Kind = Literal["red_cell", "white_cell", "small", "clump"]
KINDS: tuple[Kind, ...] = ("red_cell", "white_cell", "small", "clump")


@dataclass
class Region:
    """One segmented object, in pixels of the full-resolution image."""

    box: tuple[int, int, int, int]  # x, y, width, height
    kind: Kind
    edge: bool
    area_ratio: float
    nucleus_ratio: float
    mask: np.ndarray = field(repr=False)  # bool, the box's shape, full resolution


@dataclass
class Join:
    """Two touching red-cell parts (indices into ``FieldDetection.regions``) that may be one cell, and
    that cell (``region``: the union, ``solidity`` its roundness)."""

    first: int
    second: int
    region: Region
    solidity: float


@dataclass
class FieldDetection:
    """Everything the detector found on one field, and whether the field can be counted."""

    regions: list[Region]
    image_size: tuple[int, int]  # width, height
    sharpness: float
    usable: bool
    reason: str | None = None
    joins: list[Join] = field(default_factory=list)

    @property
    def counted(self) -> list[Region]:
        """Whole red cells: what parasitemia is counted on."""
        return [r for r in self.regions if r.kind == "red_cell" and not r.edge]

    def rejected(self) -> dict[str, int]:
        """Objects that are not counted, by kind (edge red cells under ``edge``)."""
        counts: dict[str, int] = {"edge": 0, **{kind: 0 for kind in KINDS if kind != "red_cell"}}
        for region in self.regions:
            counts["edge" if region.kind == "red_cell" else region.kind] += 1
        counts["edge"] -= len(self.counted)
        return counts


def _nucleus_stain(green: np.ndarray, cells: np.ndarray, background_level: float) -> np.ndarray:
    """Pixels stained far darker than this field's red cells (a nucleus, in whatever colour the stain gives).

    Relative to the field, because one lab's red cells are pale grey and another's deep magenta.
    """
    cell_level = float(np.median(green[cells])) if cells.any() else background_level
    return green < cell_level - max(30.0, 0.6 * (background_level - cell_level))


def _white_cell_nuclei(nucleus: np.ndarray, expected_area: float, diameter: float) -> np.ndarray:
    """The pixels of ``nucleus`` whose patch, lobes within NUCLEUS_GAP diameters of each other joined,
    is larger than a white cell's (NUCLEUS_RATIO), however the segmentation cut it."""
    gap = max(1, int(round(diameter * NUCLEUS_GAP / 2)))
    patches, count = ndi.label(ndi.binary_dilation(nucleus, iterations=gap))
    if not count:
        return np.zeros_like(nucleus)
    sizes = np.bincount(patches[nucleus], minlength=count + 1)
    large = sizes > NUCLEUS_RATIO * expected_area
    large[0] = False
    return large[patches] & nucleus


def small_hole_mask(mask: np.ndarray, expected_area: float) -> np.ndarray:
    """Holes of ``mask`` smaller than half a cell (a red cell's pale centre), not the gaps inside a clump."""
    holes = ndi.binary_fill_holes(mask) & ~mask
    hole_labels, _ = ndi.label(holes)
    hole_sizes = np.bincount(hole_labels.ravel())
    return (hole_sizes < 0.5 * expected_area)[hole_labels] & (hole_labels > 0)


def _split_clumps(labels: np.ndarray, expected_area: float, nucleus: np.ndarray) -> np.ndarray:
    """Cut what the watershed left as one object of several cells into that many parts (k-means on the
    pixel coordinates, k = area over a cell's, or 2 for a non-convex object of one to two cells' area):
    packed cells touch along lines no threshold sees.

    On the 160 training fields of the shared set: boxed-cell recall 0.923 -> 0.953, infected cells
    matched 213 -> 220 of 237 (``MAX_AREA_RATIO`` 2.2 chosen there); the pairs, 0.952 -> 0.958.
    """
    from scipy.cluster.vq import kmeans2

    labels = labels.copy()
    next_label = int(labels.max()) + 1
    for prop in regionprops(labels):
        area_ratio = prop.area / expected_area
        if area_ratio > MAX_AREA_RATIO:
            k = int(round(area_ratio))
        elif area_ratio > PAIR_AREA_RATIO and prop.solidity < PAIR_SOLIDITY:
            k = 2
        else:
            continue
        coords = prop.coords
        if k > MAX_SPLIT or nucleus[coords[:, 0], coords[:, 1]].sum() > NUCLEUS_RATIO * expected_area:
            continue  # a thick area, or a white cell: judged whole
        _, assigned = kmeans2(coords.astype(float), k, minit="++", seed=np.random.default_rng(0))
        for part in range(1, k):
            chosen = coords[assigned == part]
            labels[chosen[:, 0], chosen[:, 1]] = next_label
            next_label += 1
    return labels


def _touching_pairs(labels: np.ndarray) -> list[tuple[int, int]]:
    """Pairs of labels whose pixels touch side by side (4-neighbours: parts meeting only at a corner are
    not one cell), each once, smaller label first."""
    pairs = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.stack([np.minimum(a[touch], b[touch]), np.maximum(a[touch], b[touch])], axis=1))
    return [(int(x), int(y)) for x, y in np.unique(np.concatenate(pairs), axis=0)]


def _joins(
    labels: np.ndarray,
    regions: list[Region],
    props: dict[int, Any],
    index_of_label: dict[int, int],
    expected_area: float,
    make_region: Callable[..., Region],
) -> list[Join]:
    """The touching pairs of whole red cells whose union is cell-sized and round (``JOIN_*``); ``props``
    are the labels' ``regionprops`` as the regions were made from them."""
    joins = []
    for a, b in _touching_pairs(labels):
        i, j = index_of_label.get(a), index_of_label.get(b)
        if i is None or j is None:
            continue
        first, second = regions[i], regions[j]
        if first.kind != "red_cell" or second.kind != "red_cell" or first.edge or second.edge:
            continue
        if (props[a].area + props[b].area) / expected_area > JOIN_AREA_RATIO:
            continue
        (ay0, ax0, ay1, ax1), (by0, bx0, by1, bx1) = props[a].bbox, props[b].bbox
        y0, x0 = min(ay0, by0), min(ax0, bx0)
        window = labels[y0 : max(ay1, by1), x0 : max(ax1, bx1)]
        union = regionprops(np.isin(window, (a, b)).astype(np.uint8))[0]
        if union.solidity >= JOIN_SOLIDITY:
            joins.append(Join(i, j, make_region(union, "red_cell", False, (y0, x0)), round(float(union.solidity), 3)))
    return joins


def detect_cells(rgb: np.ndarray, cell_diameter_px: float) -> FieldDetection:
    """Find and judge every object of a field image (``rgb``: uint8, height x width x 3)."""
    height, width = rgb.shape[:2]
    scale = min(1.0, WORK_DIAMETER_PX / cell_diameter_px)
    work_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if work_size[0] * work_size[1] > MAX_WORK_PIXELS:
        raise FieldTooLargeError(
            f"a {width}x{height} field with {cell_diameter_px:g}-px cells is too much to segment (at most "
            f"{MAX_WORK_PIXELS} pixels once cells are scaled to {WORK_DIAMETER_PX:g} px): check the cell size"
        )
    small = np.asarray(Image.fromarray(rgb).resize(work_size, Image.Resampling.BOX), dtype=np.float32)
    green = ndi.gaussian_filter(small[..., 1], 1.0)
    diameter = cell_diameter_px * scale
    expected_area = np.pi * (diameter / 2) ** 2

    if np.ptp(green) < MIN_CONTRAST:
        return FieldDetection([], (width, height), 0.0, False, "no cells found: the image is one flat colour")
    threshold = float(threshold_otsu(green))
    stained = green < threshold
    background_level = float(np.median(green[~stained]))
    if background_level - threshold < MIN_CONTRAST or stained.mean() > 0.9:
        return FieldDetection([], (width, height), 0.0, False, "no cells found: no stained objects on a background")
    stained = ndi.binary_opening(stained, iterations=1)
    if not stained.any():
        return FieldDetection([], (width, height), 0.0, False, "no cells found: nothing stained is larger than noise")
    foreground = stained | small_hole_mask(stained, expected_area)

    edges = np.hypot(ndi.sobel(green, 0), ndi.sobel(green, 1)) / 8
    boundary = foreground ^ ndi.binary_erosion(foreground)
    contrast = max(background_level - float(np.median(green[foreground])), MIN_CONTRAST)
    sharpness = float(edges[boundary].mean()) / contrast if boundary.any() else 0.0

    # Cells packed edge to edge touch along thin lines lighter than both: cut the mask along them
    # (a white top-hat narrower than a quarter cell) before the distance transform.
    ridges = green - ndi.grey_opening(green, size=max(3, int(diameter * RIDGE_WIDTH)))
    split_mask = foreground & ~(ridges > RIDGE_CONTRAST * contrast)
    split_mask = split_mask | (ndi.binary_fill_holes(split_mask) & small_hole_mask(split_mask, expected_area))
    distance = ndi.distance_transform_edt(split_mask)
    peaks = peak_local_max(
        ndi.gaussian_filter(distance, 1.0),
        min_distance=max(2, int(diameter * PEAK_SPACING)),
        threshold_abs=diameter * PEAK_HEIGHT,
        labels=ndi.label(foreground)[0],
        exclude_border=False,
    )
    markers = np.zeros(distance.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-ndi.distance_transform_edt(foreground) - distance, markers, mask=foreground)

    nucleus = _nucleus_stain(green, foreground, background_level)
    labels = _split_clumps(labels, expected_area, nucleus)
    white_nucleus = _white_cell_nuclei(nucleus & (labels > 0), expected_area, diameter)

    def make_region(prop, kind: Kind, edge: bool, offset: tuple[int, int] = (0, 0)) -> Region:
        """A Region in full-resolution pixels from a working-scale ``regionprops`` entry (of a window at ``offset``)."""
        oy, ox = offset
        y0, x0, y1, x1 = prop.bbox[0] + oy, prop.bbox[1] + ox, prop.bbox[2] + oy, prop.bbox[3] + ox
        bx0, by0 = int(x0 / scale), int(y0 / scale)
        bx1, by1 = min(width, int(np.ceil(x1 / scale))), min(height, int(np.ceil(y1 / scale)))
        mask = Image.fromarray(prop.image).resize((bx1 - bx0, by1 - by0), Image.Resampling.NEAREST)
        return Region(
            (bx0, by0, bx1 - bx0, by1 - by0),
            kind,
            bool(edge),
            round(float(prop.area / expected_area), 3),
            round(float(nucleus[y0:y1, x0:x1][prop.image].sum() / expected_area), 3),
            np.asarray(mask, bool),
        )

    regions: list[Region] = []
    index_of_label: dict[int, int] = {}
    props = {prop.label: prop for prop in regionprops(labels)}
    for prop in props.values():
        y0, x0, y1, x1 = prop.bbox
        area_ratio = prop.area / expected_area
        nucleus_ratio = nucleus[y0:y1, x0:x1][prop.image].sum() / expected_area
        white_part = white_nucleus[y0:y1, x0:x1][prop.image].sum() / expected_area
        edge = x0 <= 0 or y0 <= 0 or x1 >= work_size[0] or y1 >= work_size[1]
        kind: Kind
        if area_ratio < MIN_AREA_RATIO:
            kind = "small"
        elif nucleus_ratio > NUCLEUS_RATIO or white_part >= NUCLEUS_PART_RATIO:
            kind = "white_cell"
        elif area_ratio > MAX_AREA_RATIO:
            kind = "clump"
        else:
            kind = "red_cell"
        index_of_label[prop.label] = len(regions)
        regions.append(make_region(prop, kind, edge))

    detection = FieldDetection(
        regions,
        (width, height),
        round(sharpness, 3),
        True,
        joins=_joins(labels, regions, props, index_of_label, expected_area, make_region),
    )
    if sharpness < MIN_SHARPNESS:
        detection.usable = False
        detection.reason = f"too blurred to count: edge sharpness {sharpness:.3f} < {MIN_SHARPNESS}"
    elif sum(r.kind == "red_cell" for r in regions) > MAX_CELLS:
        detection.usable = False
        detection.reason = f"more than {MAX_CELLS} red cells found: is the cell diameter right?"
    elif len(detection.counted) < MIN_CELLS:
        detection.usable = False
        detection.reason = f"too few red cells to count: {len(detection.counted)} found, at least {MIN_CELLS} needed"
    return detection


def cell_crop(rgb: np.ndarray, region: Region) -> np.ndarray:
    """The cell cut out by its mask on a black background, like the NIH crops (uint8 RGB)."""
    x, y, w, h = region.box
    crop = rgb[y : y + h, x : x + w].copy()
    crop[~region.mask] = 0
    return crop
