"""Smear analysis through a real `bentoml serve`: the routes, the CLI and bad input, on generated fields."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from malaria.smear.annotations import match_boxes
from malaria.smear.synthetic import synthetic_field
from tests.helpers import EXACT, Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    # One worker: a probe cannot be answered by another worker while this one analyses a field.
    env = {"MALARIA_SMEAR_CELL_DIAMETER_PX": "40", "MALARIA_MAX_SMEAR_PIXELS": "4000000", "MALARIA_WORKERS": "1"}
    srv = Server(env, tmp_path_factory.mktemp("smear") / "predictions")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def field():
    return synthetic_field(seed=1)


def jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **kwargs)
    return buffer.getvalue()


def analyze(server, data: bytes, route: str = "analyze_smear", name: str = "field.jpg", **form) -> httpx.Response:
    files = {"image": (name, data, "image/jpeg")}
    return httpx.post(f"{server.url}/{route}", files=files, data=form, timeout=120)


def in_process(champion, image: Image.Image, diameter: float) -> np.ndarray:
    """The served model's P(Parasitized) for every red cell of the field, without HTTP: the service's own
    inference call (``load_runtime``, OpenVINO at fp32 as ``Server`` pins it). Keras differs from it by up
    to the conversion gate's 1e-4 on its reference images, and by more on a field's crops (2.7e-4 on a
    CPU with AMX), so Keras is not the reference here."""
    from malaria.bento import load_runtime
    from malaria.preprocess import decode_image
    from malaria.smear.analysis import prepare_field
    from malaria.train import batched_probability

    settings, record, stored = champion
    buffer = io.BytesIO(jpeg(image))
    prepared = prepare_field(decode_image(buffer.getvalue()), record.spec, diameter, lambda: 0.0)
    runtime = load_runtime(stored, settings.model_copy(update=dict(precision=EXACT["MALARIA_PRECISION"])))
    return batched_probability(runtime.predict, prepared.batch, record.spec, 64)


def test_a_field_is_counted_like_in_process(server, field, champion):
    response = analyze(server, jpeg(field.image))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usable"] and body["reason"] is None
    assert body["image_size"] == [640, 480] and body["cell_diameter_px"] == 40
    whole = [c for c in body["cells"] if not c["edge"]]
    assert body["counts"]["cells"] == len(whole) == len(field.cells)
    assert len(match_boxes(field.cells, [tuple(c["box"]) for c in whole])) == len(field.cells)
    expected = in_process(champion, field.image, 40)
    assert [c["probability_parasitized"] for c in body["cells"]] == pytest.approx(list(expected), abs=1e-4)
    spec = champion[1].spec.for_fields()
    parasitized = sum(spec.labels([c["probability_parasitized"]])[0] == "Parasitized" for c in whole)
    assert body["counts"]["parasitized"] == parasitized
    assert body["parasitemia_percent"] == pytest.approx(100 * parasitized / len(whole), abs=1e-3)
    low, high = body["parasitemia_ci95"]
    assert low <= body["parasitemia_percent"] <= high
    assert body["model_version"] == champion[1].version and body["filename"] == "field.jpg"
    assert [o["kind"] for o in body["other_objects"]] == ["white_cell"]
    assert body["timing"]["total_ms"] >= body["timing"]["detect_ms"] > 0


def test_the_cell_size_is_a_per_request_setting(server, field):
    doubled = field.image.resize((1280, 960), Image.Resampling.BICUBIC)
    default = analyze(server, jpeg(doubled)).json()  # the server's 40 px on a field whose cells are 80 px
    given = analyze(server, jpeg(doubled), cell_diameter_px="80").json()
    from_pixel_size = analyze(server, jpeg(doubled), pixel_size_um=str(7.5 / 80)).json()
    assert given["counts"]["cells"] == len(field.cells) == from_pixel_size["counts"]["cells"]
    assert from_pixel_size["cell_diameter_px"] == pytest.approx(80)
    assert default["counts"]["cells"] != len(field.cells)


def test_boxes_are_in_the_upright_frame_of_an_exif_rotated_photo(server, field):
    rotated = field.image.transpose(Image.Transpose.ROTATE_90)  # stored sideways, EXIF says turn it back
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
    body = analyze(server, jpeg(rotated, exif=exif.tobytes())).json()
    assert body["image_size"] == [640, 480]
    whole = [tuple(c["box"]) for c in body["cells"] if not c["edge"]]
    assert len(match_boxes(field.cells, whole)) == len(field.cells)


def test_an_unusable_field_gets_a_reason_and_no_number(server):
    blank = Image.new("RGB", (640, 480), (205, 225, 205))
    body = analyze(server, jpeg(blank)).json()
    assert body["usable"] is False and body["reason"].startswith("no cells found")
    assert body["parasitemia_percent"] is None and body["parasitemia_ci95"] is None
    few = analyze(server, jpeg(synthetic_field(n_free=4, n_pairs=0, seed=3).image)).json()
    assert few["usable"] is False and few["reason"].startswith("too few red cells")


def test_annotate_smear_returns_the_field_as_png(server, field):
    response = analyze(server, jpeg(field.image), route="annotate_smear")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(response.content))
    assert picture.size == (640, 480) and picture.format == "PNG"
    body = analyze(server, jpeg(field.image)).json()
    assert float(response.headers["x-parasitemia-percent"]) == body["parasitemia_percent"]
    blank = analyze(server, jpeg(Image.new("RGB", (640, 480), (205, 225, 205))), route="annotate_smear")
    assert blank.status_code == 200 and "x-parasitemia-percent" not in blank.headers


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buffer, "PNG")  # 9 Mpx over the test server's 4 Mpx smear limit
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "form", "status", "message"),
    [
        (b"not an image at all", {}, 400, "not a recognised image format"),
        (b"", {}, 400, "empty"),
        (None, {}, 413, "pixels"),
        (b"FIELD", {"cell_diameter_px": "2"}, 400, "cell_diameter_px"),
        (b"FIELD", {"cell_diameter_px": "big"}, 400, "cell_diameter_px"),
        (b"FIELD", {"pixel_size_um": "-1"}, 400, "pixel_size_um"),
        (b"FIELD", {"pixel_size_um": "5"}, 400, "pixel_size_um"),  # 7.5 um / 5 = 1.5-px cells
    ],
    ids=[
        "not an image",
        "empty",
        "pixel bomb",
        "diameter too small",
        "diameter not a number",
        "negative pixel size",
        "pixel size too large",
    ],
)
def test_bad_input_is_a_4xx_and_the_server_stays_healthy(server, field, data, form, status, message):
    data = bomb() if data is None else jpeg(field.image) if data == b"FIELD" else data
    response = analyze(server, data, **form)
    assert response.status_code == status, response.text
    assert message in response.text
    assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200
    assert analyze(server, jpeg(field.image)).status_code == 200


def test_a_field_over_the_body_limit_is_refused_before_it_is_read(server):
    from malaria.config import Settings

    limit = Settings().max_smear_bytes
    response = httpx.post(
        f"{server.url}/analyze_smear",
        files={"image": ("huge.jpg", b"\0" * (limit + 2_000_000), "image/jpeg")},
        timeout=120,
    )
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_cli_analyzes_a_slide_and_writes_annotated_fields(server, tmp_path):
    from typer.testing import CliRunner

    from malaria.cli import app

    slide = tmp_path / "slide-7"
    slide.mkdir()
    for seed in (1, 2):
        (slide / f"field{seed}.jpg").write_bytes(jpeg(synthetic_field(seed=seed).image))
    (slide / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["smear", "analyze", str(slide), "--url", server.url, "--out", str(out)])
    assert result.exit_code == 1, result.output  # one rejected file
    assert "broken.jpg: rejected" in result.output and "slide total: " in result.output
    assert "fewer than 1000 red cells" in result.output
    report = json.loads((out / "summary.json").read_text())["slides"]["slide-7"]
    fields = [f for f in report["fields"] if "error" not in f]
    assert report["summary"]["cells"] == sum(f["counts"]["cells"] for f in fields) == 60
    assert report["summary"]["rejected_files"] == 1 and not report["summary"]["enough_cells"]
    assert sorted(Path(f["annotated"]).name for f in fields) == ["field1.jpg.annotated.png", "field2.jpg.annotated.png"]
    assert all(Image.open(f["annotated"]).size == (640, 480) for f in fields)


def test_a_slide_is_summarised_by_the_service_with_the_clis_rule(server):
    from malaria.smear.analysis import wilson_percent
    from malaria.smear.slides import summarise_slide

    fields = [
        {"usable": True, "counts": {"cells": 120, "parasitized": 3, "uninfected": 117, "refer": 2}},
        {"usable": True, "counts": {"cells": 80, "parasitized": 1, "uninfected": 79, "refer": 0}},
        {"usable": False, "counts": {"cells": 4, "parasitized": 4, "uninfected": 0, "refer": 0}},  # not counted
    ]
    answer = httpx.post(f"{server.url}/summarize_slide", json={"fields": fields}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = {k: v for k, v in summarise_slide(fields, 1000).items() if k != "rejected_files"}
    assert body == {**expected, "parasitemia_ci95": list(expected["parasitemia_ci95"])}
    assert (body["cells"], body["parasitized"], body["parasitemia_percent"]) == (200, 4, 2.0)
    assert body["parasitemia_ci95"] == list(wilson_percent(4, 200)) and body["enough_cells"] is False

    def refused(payload) -> str:
        response = httpx.post(f"{server.url}/summarize_slide", json=payload, timeout=30)
        assert response.status_code == 400, response.text
        return response.text

    wrong = [{"usable": True, "counts": {"cells": 10, "parasitized": 12, "uninfected": 0, "refer": 0}}]
    assert "parasitized + uninfected = cells" in refused({"fields": wrong})
    assert "at least 1" in refused({"fields": []})
    assert "at most 1000" in refused({"fields": fields[:1] * 1001})
    negative = [{"usable": True, "counts": {"cells": -1, "parasitized": 0, "uninfected": -1, "refer": 0}}]
    assert "greater than or equal to 0" in refused({"fields": negative})


def test_field_log_has_one_line_per_answered_field(server, field):
    import time

    assert analyze(server, jpeg(field.image)).status_code == 200

    def logged_and_counted() -> tuple[list[dict], float]:
        lines = [json.loads(line) for path in server.log_dir.glob("smear-fields-*.jsonl") for line in path.open()]
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
        counted = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("malaria_smear_fields_total{")
        )
        return lines, counted

    deadline = time.monotonic() + 10
    lines, counted = logged_and_counted()
    while len(lines) != counted and time.monotonic() < deadline:  # the writer thread flushes within ms
        time.sleep(0.2)
        lines, counted = logged_and_counted()
    assert lines and len(lines) == counted
    assert all({"request_id", "model_version", "usable", "cells", "parasitized"} <= set(line) for line in lines)


def test_smear_report_flow_writes_a_slide_report(server, tmp_path, prefect_harness):
    from flows.smear_report import smear_report_flow

    slide = tmp_path / "slide-3"
    slide.mkdir()
    for seed in (4, 5):
        (slide / f"f{seed}.jpg").write_bytes(jpeg(synthetic_field(seed=seed).image))
    (slide / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "report"
    report = smear_report_flow([slide], url=server.url, out_dir=out, min_cells=50)
    summary = report["slides"]["slide-3"]["summary"]
    assert summary["cells"] == 60 and summary["enough_cells"] and summary["rejected_files"] == 1
    markdown = (out / "report.md").read_text()
    assert "## Slide `slide-3`" in markdown and "rejected:" in markdown and "fewer than" not in markdown
    page = (out / "report.html").read_text()
    images = re.findall(r"<img src='([^']+)'", page)
    assert sorted(images) == ["slide-3/f4.jpg.annotated.png", "slide-3/f5.jpg.annotated.png"]
    assert all((out / image).is_file() for image in images)
    low = smear_report_flow([slide], url=server.url, out_dir=tmp_path / "again", min_cells=1000)
    assert not low["slides"]["slide-3"]["summary"]["enough_cells"]
    assert "fewer than 1000 red cells" in (tmp_path / "again" / "report.md").read_text()


def test_a_large_field_does_not_stall_the_event_loop(server):
    """Liveness and cell requests are answered while the worker's thread analyses a 4 Mpx field."""
    import threading
    import time

    big = synthetic_field(2000, 2000, diameter=40, n_free=600, n_pairs=60, seed=9).image
    data = jpeg(big)
    answers: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: answers.append(analyze(server, data)))
    worker.start()
    probes = []
    time.sleep(0.05)
    while worker.is_alive():
        started = time.perf_counter()
        assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200
        probes.append(time.perf_counter() - started)
        time.sleep(0.02)
    worker.join()
    assert answers[0].status_code == 200 and answers[0].json()["counts"]["cells"] > 500
    assert len(probes) >= 3, "the field was analysed too fast to probe during it"
    assert max(probes) < 0.5, probes
