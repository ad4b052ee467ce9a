"""Smear analysis code on generated fields with known cells: detection, crops, counts, interval, scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from malaria.smear.analysis import (
    PreparedField,
    SmearTiming,
    cell_at,
    prepare_field,
    summarise_field,
    wilson_percent,
)
from malaria.smear.annotations import capture_number, load_annotations, match_boxes, split_fields
from malaria.smear.crops import sample_uninfected, speckled
from malaria.smear.detect import cell_crop, detect_cells
from malaria.smear.evaluation import score_field, summarise_scores
from malaria.smear.render import COLOURS, annotate
from malaria.smear.synthetic import synthetic_field
from malaria.spec import ModelSpec


@pytest.fixture(scope="module")
def field():
    return synthetic_field(seed=1)


@pytest.fixture(scope="module")
def detection(field):
    return detect_cells(np.asarray(field.image), cell_diameter_px=40)


def test_every_interior_cell_is_found_once(field, detection):
    counted = [r.box for r in detection.counted]
    assert len(counted) == len(field.cells) == 30
    assert len(match_boxes(field.cells, counted)) == len(field.cells)


def test_touching_cells_are_split(field):
    pairs_only = synthetic_field(n_free=0, n_pairs=6, white_cell=False, edge_cells=0, platelets=0, seed=4)
    found = detect_cells(np.asarray(pairs_only.image), 40)
    assert len(found.counted) == 12
    assert len(match_boxes(pairs_only.cells, [r.box for r in found.counted])) == 12


def test_cells_cut_by_the_border_are_flagged_and_not_counted(field, detection):
    edge = [r for r in detection.regions if r.kind == "red_cell" and r.edge]
    assert len(edge) == field.edge_cells == 2
    for region in edge:
        x, y, w, h = region.box
        assert x == 0 or y + h == field.image.height


def test_a_white_cell_is_rejected_not_counted(field, detection):
    white = [r for r in detection.regions if r.kind == "white_cell"]
    assert len(white) == 1
    assert match_boxes(field.white_cells, [white[0].box], min_iou=0.3) == {0: 0}
    assert not match_boxes(field.white_cells, [r.box for r in detection.counted], min_iou=0.3)


def test_a_white_cell_whose_nucleus_is_cut_into_lobes_is_rejected_lobe_by_lobe(monkeypatch):
    from malaria.smear import detect
    from malaria.smear.synthetic import BACKGROUND, NUCLEUS

    base = synthetic_field(n_free=24, n_pairs=0, white_cell=False, edge_cells=0, platelets=0, seed=5)
    rgb = np.asarray(base.image).copy()
    yy, xx = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
    diameter = 40
    lobe = np.sqrt(0.42) * diameter / 2  # each lobe 0.42 of a cell's area: under NUCLEUS_RATIO alone
    # Two lobes 0.15 diameters apart, on a clear patch of the field (found by trying spots).
    for cx in range(60, rgb.shape[1] - 100, 10):
        for cy in range(40, rgb.shape[0] - 40, 10):
            patch = rgb[cy - 30 : cy + 30, cx - 30 : cx + 90]
            if np.abs(patch.astype(int) - BACKGROUND).max() < 25:
                break
        else:
            continue
        break
    for centre in (cx, cx + 2 * lobe + 0.15 * diameter):
        disk = (xx - centre) ** 2 + (yy - cy) ** 2 < lobe**2
        rgb[disk] = NUCLEUS
    lobes = (cx - lobe, cy - lobe, 4 * lobe + 0.15 * diameter, 2 * lobe)

    def counted_near_lobes(result) -> int:
        return sum(bool(match_boxes([lobes], [r.box], min_iou=0.1)) for r in result.counted)

    with monkeypatch.context() as patched:
        patched.setattr(detect, "NUCLEUS_PART_RATIO", float("inf"))  # the rule off: each lobe passes as a cell
        assert counted_near_lobes(detect_cells(rgb, diameter)) == 2
    result = detect_cells(rgb, diameter)
    assert counted_near_lobes(result) == 0
    assert sum(r.kind == "white_cell" for r in result.regions) == 2
    assert len(result.counted) == 24  # every real cell still counted, the infected ones too


@pytest.fixture(scope="module")
def split_enlarged_cell():
    """A field of 22 free cells and 2 touching pairs, and beside them an enlarged cell (1.56 cells' area,
    like a P. vivax-infected one) crossed by a lighter line that the segmentation cuts it along."""
    from malaria.smear.synthetic import BACKGROUND, CELL

    base = synthetic_field(n_free=22, n_pairs=2, white_cell=False, edge_cells=0, platelets=0, seed=3)
    rgb = np.empty((480, 760, 3))
    rgb[:] = BACKGROUND
    rgb += np.random.default_rng(0).normal(0, 3, rgb.shape)
    rgb[:, :640] = np.asarray(base.image)
    yy, xx = np.mgrid[0:480, 0:760]
    disk = (xx - 700) ** 2 + (yy - 240) ** 2 < 25**2
    rgb[disk] = CELL
    rgb[disk & (np.abs(xx - 700) < 2)] = (205, 178, 182)  # lighter than the cell, still stained
    return np.clip(rgb, 0, 255).astype(np.uint8), (675, 215, 50, 50), base


def test_an_enlarged_cell_cut_in_two_is_offered_as_one_join(split_enlarged_cell):
    rgb, enlarged, base = split_enlarged_cell
    found = detect_cells(rgb, 40)
    halves = [r for r in found.counted if match_boxes([enlarged], [r.box], min_iou=0.3)]
    assert len(halves) == 2 and len(found.counted) == 22 + 4 + 2  # the segmentation cut it in two
    assert len(found.joins) == 1  # the touching pairs (2 cells' area) are not offered
    join = found.joins[0]
    assert {found.regions[join.first].box, found.regions[join.second].box} == {r.box for r in halves}
    assert match_boxes([enlarged], [join.region.box], min_iou=0.8) == {0: 0}
    assert join.region.area_ratio == pytest.approx(1.56, abs=0.1) and join.solidity > 0.95
    union = np.zeros(rgb.shape[:2], bool)
    for region in halves:
        x, y, w, h = region.box
        union[y : y + h, x : x + w] |= region.mask
    assert join.region.mask.sum() == pytest.approx(union.sum(), rel=0.03)  # the two parts' masks (rescaled)


def test_both_halves_called_parasitized_count_as_one_cell(split_enlarged_cell):
    rgb, enlarged, base = split_enlarged_cell
    spec = ModelSpec(image_size=32, threshold=0.5, refer_band=(0.4, 0.6))
    red = [r for r in detect_cells(rgb, 40).regions if r.kind == "red_cell"]
    in_enlarged = [bool(match_boxes([enlarged], [r.box], min_iou=0.3)) for r in red]
    in_pairs = [bool(match_boxes(base.cells[:4], [r.box])) for r in red]  # the two touching pairs come first

    def summary(half_probabilities, pair_probability=0.1):
        halves = iter(half_probabilities)
        return _summary(
            Image.fromarray(rgb),
            spec,
            lambda i: next(halves) if in_enlarged[i] else pair_probability if in_pairs[i] else 0.1,
        )[1]

    joined = summary([0.7, 0.95])
    assert (
        joined.counts.cells == 27
        and joined.counts.parasitized == 1
        and joined.parasitemia_percent == pytest.approx(100 / 27, abs=1e-3)
    )
    (cell,) = [c for c in joined.cells if c.joined]
    assert match_boxes([enlarged], [cell.box], min_iou=0.8) == {0: 0}
    assert cell.label == "Parasitized" and cell.probability_parasitized == pytest.approx(0.95)
    assert cell_at(rgb, cell.box, 40).shape[:2] == (cell.box[3], cell.box[2])  # the review queue cuts the whole cell
    one_half = summary([0.7, 0.3])  # one half called: already counted once, nothing joined
    assert (
        one_half.counts.cells == 28 and one_half.counts.parasitized == 1 and not any(c.joined for c in one_half.cells)
    )
    pairs = summary([0.1, 0.1], pair_probability=0.9)  # two touching cells both called stay two cells
    assert pairs.counts.cells == 28 and pairs.counts.parasitized == 4


def test_each_part_is_joined_at_most_once_the_roundest_join_first_and_no_cell_is_lost():
    """Three parts A, B, C in a row, each touching pair offered as a join: B can go with A or C, not both."""
    from malaria.smear.analysis import join_parasitized_parts
    from malaria.smear.detect import FieldDetection, Join, Region

    def region(x: int, width: int = 10, kind="red_cell") -> Region:
        return Region((x, 0, width, 10), kind, False, width / 20, 0.0, np.ones((10, width), bool))

    a, white, b, c = region(0), region(40, kind="white_cell"), region(10), region(20)
    ab, bc = Join(0, 2, region(0, 20), 0.9), Join(2, 3, region(10, 20), 0.95)  # indices into the regions

    def joined(probability, joins):
        detection = FieldDetection([a, white, b, c], (60, 10), 0.3, True, joins=joins)
        cells, p, flags = join_parasitized_parts(detection, np.array(probability), threshold=0.5)
        return [(cell.box[0], cell.box[2]) for cell in cells], p.tolist(), flags

    for joins in ([ab, bc], [bc, ab]):  # B-C is the rounder: made first, whatever the order given
        assert joined([0.9, 0.5, 0.7], joins) == ([(0, 10), (10, 20)], [0.9, 0.7], [False, True])
        assert joined([0.9, 0.8, 0.3], joins) == ([(0, 20), (20, 10)], [0.9, 0.3], [True, False])
        assert joined([0.9, 0.49, 0.9], joins) == ([(0, 10), (10, 10), (20, 10)], [0.9, 0.49, 0.9], [False] * 3)
    rounder_ab = Join(0, 2, region(0, 20), 0.97)  # now A-B goes first, and B is the first part of B-C
    assert joined([0.9, 0.8, 0.7], [bc, rounder_ab]) == ([(0, 20), (20, 10)], [0.9, 0.7], [True, False])
    unusable = FieldDetection([a, white, b, c], (60, 10), 0.3, False, "too blurred", joins=[ab])
    assert join_parasitized_parts(unusable, np.empty(0), 0.5)[0] == []


def test_a_field_at_another_magnification_gives_the_same_cells(field, detection):
    doubled = field.image.resize((field.image.width * 2, field.image.height * 2), Image.Resampling.BICUBIC)
    found = detect_cells(np.asarray(doubled), cell_diameter_px=80)
    assert len(found.counted) == len(detection.counted)
    halved = [(x // 2, y // 2, w // 2, h // 2) for x, y, w, h in (r.box for r in found.counted)]
    assert len(match_boxes(field.cells, halved)) == len(field.cells)


def test_the_wrong_cell_size_is_not_a_silent_count(field):
    """Told cells are 4x larger than they are, the detector does not count the field's cells."""
    wrong = detect_cells(np.asarray(field.image), cell_diameter_px=160)
    assert len(wrong.counted) < len(field.cells) / 2


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (Image.new("RGB", (640, 480), (205, 225, 205)), "no cells found"),
        (Image.new("RGB", (640, 480), (120, 40, 120)), "no cells found"),
        (synthetic_field(n_free=5, n_pairs=0, seed=2).image, "too few red cells"),
        (synthetic_field(seed=1).image.filter(ImageFilter.GaussianBlur(6)), "too blurred"),
    ],
    ids=["blank", "all stain", "few cells", "blurred"],
)
def test_a_field_that_cannot_be_counted_says_why(image, reason):
    found = detect_cells(np.asarray(image), 40)
    assert not found.usable
    assert found.reason.startswith(reason)


def test_the_work_per_field_is_bounded():
    """Tiny cells on a big image would mean segmenting it at full resolution: refused before any work."""
    from malaria.smear.detect import FieldTooLargeError

    with pytest.raises(FieldTooLargeError, match="too much to segment"):
        detect_cells(np.zeros((4100, 4100, 3), np.uint8), cell_diameter_px=8)


def test_crops_are_the_cell_on_black(field, detection):
    rgb = np.asarray(field.image)
    for region in detection.counted:
        x, y, w, h = region.box
        crop = cell_crop(rgb, region)
        assert crop.shape[:2] == (h, w)
        cx, cy = w // 2, h // 2
        assert (crop[cy, cx] == rgb[y + cy, x + cx]).all()  # the cell's own centre pixel, unchanged
        assert (crop[0, 0] == 0).all() and (crop[-1, -1] == 0).all()  # corners of a round cell: black
        inside = crop[region.mask].astype(int)
        assert (np.abs(inside - np.array([200, 140, 150])).sum(axis=1) < 90).mean() > 0.8  # mostly cell pink


def test_speckled_cells_are_the_ones_with_a_dark_spot_inside(field, detection):
    cells = detection.counted
    matches = match_boxes(field.cells, [c.box for c in cells])
    flags = speckled(np.asarray(field.image), detection.regions, cells, cell_diameter_px=40)
    assert len(matches) == len(field.cells) and 0 < flags.sum() < len(cells)
    for box, cell in matches.items():  # the generated parasite is the only dark spot a cell can carry
        assert flags[cell] == field.infected[box]


def test_sampling_takes_the_speckled_share_then_draws_the_rest_from_all():
    specks = np.zeros(100, bool)
    specks[[3, 17, 42, 77, 90, 95]] = True
    kept = sample_uninfected(100, 10, specks, 0.5, np.random.default_rng(0))
    assert len(kept) == len(set(kept)) == 10 and kept == sorted(kept)
    assert specks[kept].sum() >= 5  # half the sample, plus any speckled cell the uniform draw picks
    few = sample_uninfected(100, 10, specks, 1.0, np.random.default_rng(0))
    assert set(np.flatnonzero(specks)) <= set(few) and len(few) == 10  # fewer speckled than asked: all, then others
    plain = sample_uninfected(100, 10, specks, 0.0, np.random.default_rng(7))
    assert plain == sorted(np.random.default_rng(7).choice(100, 10, replace=False).tolist())  # share 0: uniform
    assert sample_uninfected(6, 10, specks[:6], 0.5, np.random.default_rng(0)) == list(range(6))


def test_wilson_interval_matches_the_textbook_values():
    assert wilson_percent(5, 100) == pytest.approx((2.154, 11.175), abs=1e-3)
    low, high = wilson_percent(0, 30)
    assert low == 0 and high == pytest.approx(11.35, abs=0.01)  # honest about 30 cells: up to 11 %
    assert wilson_percent(0, 3000)[1] < 0.2


def _summary(field_image, spec, probability_of):
    prepared = prepare_field(field_image, spec, 40, iter(range(100)).__next__)
    probability = np.array([probability_of(i) for i in range(len(prepared.batch))])
    timing = SmearTiming(detect_ms=1, crop_ms=1, model_ms=1, total_ms=3)
    return prepared, summarise_field(
        prepared, probability, spec, cell_diameter_px=40, model_version="7", request_id="r", timing=timing
    )


def test_counts_and_parasitemia_over_whole_cells_only(field):
    spec = ModelSpec(image_size=32, threshold=0.5, refer_band=(0.4, 0.6))
    prepared, result = _summary(field.image, spec, lambda i: [0.9, 0.1, 0.55, 0.05][i % 4])
    assert isinstance(prepared, PreparedField) and prepared.batch.shape[1:] == (32, 32, 3)
    counted = [c for c in result.cells if not c.edge]
    assert result.counts.cells == len(counted) == 30 and len(result.cells) == 32
    parasitized = sum(c.probability_parasitized >= 0.5 for c in counted)
    assert result.counts.parasitized == parasitized  # 0.55 is Parasitized by label, and flagged refer
    assert result.counts.refer == sum(c.probability_parasitized == 0.55 for c in counted) > 0
    assert result.parasitemia_percent == pytest.approx(100 * parasitized / 30, abs=1e-3)
    assert result.parasitemia_ci95 == wilson_percent(parasitized, 30)
    assert {o.kind for o in result.other_objects} == {"white_cell"}


def test_an_unusable_field_has_no_parasitemia():
    spec = ModelSpec(image_size=32)
    _, result = _summary(Image.new("RGB", (320, 240), (205, 225, 205)), spec, lambda i: 0.9)
    assert not result.usable and result.parasitemia_percent is None and result.parasitemia_ci95 is None
    assert result.reason.startswith("no cells found") and result.counts.cells == 0


def test_annotated_field_draws_each_cell_in_its_decision_colour(field):
    spec = ModelSpec(image_size=32, threshold=0.5, refer_band=(0.4, 0.6))
    _, result = _summary(field.image, spec, lambda i: [0.9, 0.1, 0.55][i % 3])
    drawn = np.asarray(annotate(field.image, result))
    assert drawn.shape == np.asarray(field.image).shape
    for cell in (c for c in result.cells if not c.edge):
        x, y, w, h = cell.box
        assert tuple(drawn[y + h - 1, x + w // 2]) == COLOURS[cell.decision]  # the box's bottom side


def test_split_keeps_capture_blocks_together():
    names = [f"PA{171690 + i}.JPG" for i in range(95)]
    parts = split_fields(names, seed=42)
    assert parts == split_fields(list(reversed(names)), seed=42)  # input order does not matter
    assert set(parts.values()) == {"train", "val", "test"}
    for start in range(0, 95, 10):
        assert len({parts[n] for n in names[start : start + 10]}) == 1
    assert capture_number("PA171720.JPG") == 171720
    # 10 blocks (the last of 5 fields): 2 held out for test, 2 for val (15 %, at least one each).
    tested = {n for n, p in parts.items() if p == "test"}
    assert len({n for n in tested}) in (15, 20) and len({names.index(n) // 10 for n in tested}) == 2


def test_iml_annotations_are_read_and_scored(tmp_path, field):
    objects = [
        {"type": "red blood cell" if not inf else "ring", "bbox": {k: str(v) for k, v in zip("xywh", box, strict=True)}}
        for box, inf in zip(field.cells, field.infected, strict=True)
    ]
    objects.append({"type": "difficult", "bbox": {"x": "1", "y": "1", "w": "5", "h": "5"}})
    (tmp_path / "annotations.json").write_text(json.dumps([{"image_name": "f1.png", "objects": objects}]))
    boxes = load_annotations(tmp_path)["f1.png"]
    assert len(boxes) == 30 and sum(b.infected for b in boxes) == sum(field.infected)
    spec = ModelSpec(image_size=32)
    # A "model" that calls exactly the boxed infected cells: perfect scores, parasitemia error 0.
    truth = {box: inf for box, inf in zip(field.cells, field.infected, strict=True)}
    prepared = prepare_field(field.image, spec, 40, iter(range(100)).__next__)
    cells = [r for r in prepared.detection.regions if r.kind == "red_cell"]
    matches = match_boxes(list(truth), [r.box for r in cells])
    infected_cells = {m for t, m in matches.items() if list(truth.values())[t]}
    probability = np.array([0.99 if i in infected_cells else 0.01 for i in range(len(cells))])
    timing = SmearTiming(detect_ms=1, crop_ms=1, model_ms=1, total_ms=3)
    analysis = summarise_field(
        prepared, probability, spec, cell_diameter_px=40, model_version="1", request_id="r", timing=timing
    ).model_dump()
    score = score_field("f1.png", boxes, analysis, seconds=0.5)
    summary = summarise_scores([score])
    assert summary["recall"] == 1.0 and summary["sensitivity"] == 1.0 and summary["specificity"] == 1.0
    assert summary["well_boxed_fields"] == 1 and summary["parasitemia_mae_pp"] == 0.0
    # The opposite model: every cell called parasitized.
    analysis["cells"] = [{**c, "label": "Parasitized"} for c in analysis["cells"]]
    worst = summarise_scores([score_field("f1.png", boxes, analysis, seconds=0.5)])
    assert worst["specificity"] == 0.0 and worst["sensitivity"] == 1.0


def test_an_object_of_several_cells_area_is_cut_into_as_many_cells():
    """A blob of three cells' area with no inner line or distance peak to split it (the watershed sees one
    object) is cut into three, each about a cell's area; one of twelve cells' area is a clump."""
    from malaria.smear.synthetic import BACKGROUND, CELL

    def blob(cells: int) -> list:
        canvas = np.empty((400, 400, 3), np.uint8)
        canvas[:] = BACKGROUND
        yy, xx = np.mgrid[0:400, 0:400]
        canvas[(xx - 200) ** 2 + (yy - 200) ** 2 < cells * 20**2] = CELL  # area = cells x a 40-px cell
        return detect_cells(canvas, 40).regions

    three = blob(3)
    assert [r.kind for r in three] == ["red_cell"] * 3
    assert all(0.7 < r.area_ratio < 1.3 for r in three)
    assert [r.kind for r in blob(12)] == ["clump"]


def test_a_cell_boxed_twice_counts_once_and_keeps_its_infected_label():
    from malaria.smear.annotations import Box, one_box_per_cell

    rbc_twin = Box(100, 100, 80, 80, infected=False)
    ring = Box(104, 102, 78, 80, infected=True)  # the same cell, boxed again as infected (IoU 0.9)
    alone = Box(300, 300, 80, 80, infected=False)
    dup_a, dup_b = Box(500, 500, 80, 80, infected=False), Box(502, 500, 80, 80, infected=False)
    neighbour = Box(170, 100, 80, 80, infected=False)  # touching, IoU 0.06: another cell
    kept = one_box_per_cell([rbc_twin, alone, ring, dup_a, dup_b, neighbour])
    assert kept == [alone, ring, dup_a, neighbour]  # file order kept
    assert one_box_per_cell([alone]) == [alone] and one_box_per_cell([]) == []


def test_two_cells_left_as_one_object_are_cut_in_two_and_a_large_round_cell_is_not():
    """The watershed can leave two joined cells whole (on the shared fields, an infected cell and its
    neighbour, matched at IoU 0.43-0.46): an object of 1.2 to 2.2 cells' area that is not convex is cut in
    two; an enlarged P. vivax cell, as large but round, stays one cell."""
    from malaria.smear.detect import _split_clumps

    yy, xx = np.mgrid[0:120, 0:160]
    radius = 20.0  # a 40-px cell
    expected_area = np.pi * radius**2
    disks = [(xx - cx) ** 2 + (yy - 60) ** 2 < radius**2 for cx in (58, 102)]
    joined = (disks[0] | disks[1]).astype(np.int32)
    assert 1.2 < joined.sum() / expected_area < 2.2
    parts = _split_clumps(joined, expected_area, np.zeros(joined.shape, bool))
    assert sorted(np.unique(parts)) == [0, 1, 2]
    boxes = []
    for label in (1, 2):
        ys, xs = np.nonzero(parts == label)
        boxes.append((xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
    disk_boxes = [(cx - 20, 40, 40, 40) for cx in (58, 102)]
    assert len(match_boxes(disk_boxes, boxes, min_iou=0.7)) == 2

    enlarged = ((xx - 80) ** 2 + (yy - 60) ** 2 < 1.6 * radius**2).astype(np.int32)
    kept = _split_clumps(enlarged, expected_area, np.zeros(enlarged.shape, bool))
    assert (kept == enlarged).all()

    # One cell with a bite out of its rim (cut by a neighbour's edge): not convex, but one cell's area.
    bitten = (((xx - 80) ** 2 + (yy - 60) ** 2 < radius**2) & ~((xx - 100) ** 2 + (yy - 60) ** 2 < 12**2)).astype(
        np.int32
    )
    assert (_split_clumps(bitten, expected_area, np.zeros(bitten.shape, bool)) == bitten).all()
