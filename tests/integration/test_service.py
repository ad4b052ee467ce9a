"""The Bento service as a real `bentoml serve` process on a tiny trained champion."""

from __future__ import annotations

import io
import json
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from malaria.monitoring import load_prediction_window
from tests.helpers import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    srv = Server({}, tmp_path_factory.mktemp("serve") / "predictions")
    srv.successes = 0  # images answered 200: the prediction log must hold exactly as many lines
    srv.count_lock = threading.Lock()  # post_files runs on many threads at once
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def cells(synthetic_dir: Path) -> dict[str, list[Path]]:
    return {label: sorted((synthetic_dir / label).glob("*.png"))[:16] for label in ("Parasitized", "Uninfected")}


@pytest.fixture(scope="module")
def expected(champion):
    """In-process P(Parasitized) of a file: the stored model, the shared preprocessing, no HTTP."""
    from malaria.bento import load_stored_keras
    from malaria.preprocess import preprocess
    from malaria.train import predict_probability

    _, record, stored = champion
    model = load_stored_keras(stored)

    def probability(source: Path | bytes) -> float:
        return float(predict_probability(model, preprocess(source, record.spec)[None], record.spec)[0])

    return probability


def png(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def post_files(server, route: str, field: str, files: list[tuple[str, bytes]], **kwargs) -> httpx.Response:
    response = httpx.post(
        f"{server.url}/{route}", files=[(field, (n, b, "image/png")) for n, b in files], timeout=60, **kwargs
    )
    if response.status_code == 200:
        body = response.json()
        with server.count_lock:
            server.successes += 1 if route == "predict" else len(body if route == "classify" else body["predictions"])
    return response


def error_text(response: httpx.Response) -> str:
    body = response.json()
    body = body[0] if isinstance(body, list) else body
    return body.get("error", "") + json.dumps(body.get("detail", ""))


def test_predict_returns_a_complete_prediction(server, cells, champion, expected):
    path = cells["Parasitized"][0]
    response = post_files(
        server, "predict", "image", [(path.name, path.read_bytes())], headers={"X-Request-ID": "req-123"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["probability_parasitized"] == pytest.approx(expected(path), abs=1e-4)
    spec = champion[1].spec
    assert body["label"] == spec.labels([body["probability_parasitized"]])[0]
    assert body["decision"] == spec.decision(body["probability_parasitized"])
    p = body["probability_parasitized"]
    assert body["confidence"] == pytest.approx(p if body["label"] == "Parasitized" else 1 - p)
    assert body["request_id"] == "req-123" and response.headers["x-request-id"] == "req-123"
    assert body["filename"] == path.name and body["model_version"] == champion[1].version
    assert "x-bentoml-request-id" not in response.headers  # tracing off by default: no span per request
    # The test champion was trained on generated cells: every answer says so.
    assert response.headers["x-model-warning"] == "model trained on synthetic data: a demo, not for real samples"


def test_classify_keeps_order_and_batch_predict_summarises(server, cells, expected):
    paths = cells["Parasitized"][:3] + cells["Uninfected"][:3]
    files = [(p.name, p.read_bytes()) for p in paths]
    served = post_files(server, "classify", "images", files).json()
    assert [r["filename"] for r in served] == [p.name for p in paths]
    assert [r["probability_parasitized"] for r in served] == pytest.approx([expected(p) for p in paths], abs=1e-4)
    body = post_files(server, "batch_predict", "images", files).json()
    labels = [r["label"] for r in served]
    assert body["summary"]["total"] == 6
    assert body["summary"]["counts"] == {
        "Parasitized": labels.count("Parasitized"),
        "Uninfected": labels.count("Uninfected"),
    }
    decisions = [r["decision"] for r in served]
    assert body["summary"]["decisions"] == {d: decisions.count(d) for d in ("parasitized", "uninfected", "refer")}
    assert [r["label"] for r in body["predictions"]] == labels
    assert len({p["request_id"] for p in body["predictions"]}) == 1


def test_model_info_describes_the_served_model(server, champion):
    settings, record, stored = champion
    info = httpx.post(f"{server.url}/model_info", json={}, timeout=10).json()
    assert info["bento_model"] == str(stored.tag)
    assert info["mlflow_version"] == record.version and info["mlflow_run_id"] == record.run_id
    assert info["image_size"] == 32 and info["class_names"] == ["Parasitized", "Uninfected"]
    assert info["threshold"] == record.spec.threshold and "test_roc_auc" in info["metrics"]
    assert info["training_sources"] == ["synthetic"] == record.spec.training_sources


def batch_histogram(server) -> tuple[str, dict[str, float]]:
    """/metrics text and the malaria_batch_size histogram: calls of 1 image, all calls, all images."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text

    def value(pattern: str) -> float:
        found = re.search(pattern, metrics)
        return float(found[1]) if found else 0.0

    return metrics, {
        "ones": value(r'malaria_batch_size_bucket\{[^}]*le="1\.0"[^}]*\} ([0-9.e+]+)'),
        "calls": value(r"malaria_batch_size_count(?:\{[^}]*\})? ([0-9.e+]+)"),
        "images": value(r"malaria_batch_size_sum(?:\{[^}]*\})? ([0-9.e+]+)"),
    }


def predictions_counted(server) -> dict[tuple[str, str], float]:
    """``malaria_predictions_total`` by (label, decision), from /metrics."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    found = re.findall(r"malaria_predictions_total\{([^}]*)\} ([0-9.e+]+)", metrics)
    counted = {}
    for labels, value in found:
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        counted[(pairs["label"], pairs["decision"])] = float(value)
    return counted


def test_paths_no_route_serves_share_one_metrics_label_and_still_reach_the_app(server):
    for path in ("/no-such-1", "/no-such-2/deeper", "/ui/no-such.js"):
        assert httpx.get(f"{server.url}{path}", timeout=10).status_code == 404, path
    assert httpx.get(f"{server.url}/ui/app.js", timeout=10).status_code == 200, "relabelled, the page still answers"
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    labels = set(re.findall(r'bentoml_service_request_total\{[^}]*endpoint="([^"]*)"', metrics))
    assert not labels & {"/no-such-1", "/no-such-2/deeper", "/ui/no-such.js", "/ui/app.js"}
    assert {"(unmatched)", "/ui/", "/predict"} <= labels


def test_the_alert_rules_name_metrics_and_routes_this_service_exports(server, cells):
    """deploy/prometheus/alerts.yml against a live /metrics: a renamed metric would silence an alert."""
    import yaml

    from tests.conftest import REPO_ROOT

    rules = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert post_files(server, "predict", "image", [("a.png", cells["Uninfected"][0].read_bytes())]).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{| )", metrics, re.MULTILINE))
    named = {name for e in expressions for name in re.findall(r"\b((?:bentoml|malaria)_[a-z_]+)\b", e)}
    assert len(named) >= 3 and named <= exported, named - exported
    routes = set(httpx.get(f"{server.url}/docs.json", timeout=10).json()["paths"])
    alerted = {r for e in expressions for group in re.findall(r'endpoint=~"([^"]+)"', e) for r in group.split("|")}
    assert alerted and alerted <= routes, alerted - routes
    codes = set(re.findall(r'http_response_code="(\d+)"', metrics))
    assert "200" in codes  # the label the error-rate rule matches on carries the status code


def test_concurrent_single_image_calls_reach_the_model_in_batches(server, cells):
    images = [p.read_bytes() for p in cells["Parasitized"] + cells["Uninfected"]] * 3

    def one(data: bytes) -> tuple[int, tuple[str, str] | None]:
        response = post_files(server, "predict", "image", [("c.png", data)])
        body = response.json() if response.status_code == 200 else {}
        return response.status_code, (body.get("label"), body.get("decision"))

    counted_before = predictions_counted(server)
    _, before = batch_histogram(server)
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, images))
    assert [code for code, _ in answers] == [200] * len(images)
    metrics, after = batch_histogram(server)
    counted = predictions_counted(server)
    served = Counter(answer for _, answer in answers)
    assert {k: counted.get(k, 0) - counted_before.get(k, 0) for k in counted} == {
        k: served.get(k, 0) for k in counted
    }, "malaria_predictions_total counts exactly what was answered, by label and decision"
    delta = {k: after[k] - before[k] for k in after}
    assert delta["images"] == len(images), "every image goes through the batched model call"
    assert 0 < delta["calls"] < len(images), "fewer model calls than requests: calls were batched"
    assert delta["ones"] < delta["calls"], "every model call had batch size 1: no adaptive batching happened"
    assert "malaria_predictions_total" in metrics and "malaria_probability_parasitized_bucket" in metrics
    assert re.search(r"malaria_prediction_log_dropped_total(?:\{[^}]*\})? 0\.0", metrics), "no log line dropped"


def test_keep_alive_connections_are_recycled_after_max_requests(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        answers = [client.get("/readyz") for _ in range(12)]
    assert [r.status_code for r in answers] == [200] * 12
    closing = [i for i, r in enumerate(answers) if r.headers.get("connection") == "close"]
    assert closing == [4, 9], "every 5th response on a connection closes it (MALARIA_MAX_REQUESTS_PER_CONNECTION=5)"


def odd_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (50, 50, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    sixteen = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    return {
        "grayscale": png(base.convert("L")),
        "rgba": png(base.convert("RGBA")),
        "palette": png(base.convert("P")),
        "16-bit": png(sixteen),
        "cmyk-jpeg": png(base.convert("CMYK"), "JPEG"),
        "exif-rotated": png(base, "JPEG", exif=exif.tobytes()),
        "non-square": png(base.resize((80, 30))),
        "very-small": png(base.resize((4, 4))),
    }


@pytest.mark.parametrize("kind", list(odd_images()))
def test_odd_but_valid_images_are_accepted(server, kind, expected):
    data = odd_images()[kind]
    response = post_files(server, "predict", "image", [(f"{kind}.png", data)])
    assert response.status_code == 200, response.text
    assert response.json()["probability_parasitized"] == pytest.approx(expected(data), abs=1e-4)


def bad_requests(cells) -> dict[str, tuple[str, dict, int, str]]:
    good = cells["Parasitized"][0].read_bytes()
    bomb = png(Image.new("L", (2000, 2000)))
    big = png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (400, 400, 3), dtype=np.uint8)))
    return {
        "not an image": (
            "predict",
            {"files": {"image": ("a.png", b"hello world", "image/png")}},
            400,
            "not a recognised image",
        ),
        "truncated": (
            "predict",
            {"files": {"image": ("t.png", good[: len(good) // 2], "image/png")}},
            400,
            "truncated",
        ),
        "empty": ("predict", {"files": {"image": ("e.png", b"", "image/png")}}, 400, "empty"),
        "over byte limit": ("predict", {"files": {"image": ("b.png", big, "image/png")}}, 413, "bytes"),
        "decompression bomb": (
            "predict",
            {"files": {"image": ("bomb.png", bomb, "image/png")}},
            413,
            "pixels",
        ),
        "too many images": (
            "classify",
            {"files": [("images", ("x.png", good, "image/png"))] * 9},
            413,
            "limit",
        ),
        "no images": ("classify", {"files": {"other": ("x.png", good, "image/png")}}, 400, "images"),
        "missing field": (
            "predict",
            {"files": {"picture": ("x.png", good, "image/png")}},
            400,
            "unexpected file field; this endpoint takes: image",
        ),
        "json instead of file": ("predict", {"json": {"image": "x"}}, 400, "file upload"),
        "url in a file field": ("predict", {"data": {"image": "http://127.0.0.1:9/cell.png"}}, 400, "takes files"),
        "text in a file field": ("predict", {"files": {"image": (None, b"x")}}, 400, "takes files"),
        "chunked upload": (
            "classify",
            {"content": iter([b"--x\r\n"]), "headers": {"content-type": "multipart/form-data; boundary=x"}},
            411,
            "content-length",
        ),
        "body over /predict's limit": (
            "predict",
            {"files": {"image": ("huge.png", bytes(1_400_000), "image/png")}},  # one file's limit + 1 MB of form
            413,
            "request body",
        ),
        "many files for one": (
            "predict",
            {"files": [("image", ("a.png", good, "image/png"))] * 5},
            413,
            "over this endpoint's limit (1 files",
        ),
        "many text parts": (
            "predict",
            {"files": {"image": ("a.png", good, "image/png")}, "data": {f"t{i}": "1" for i in range(40)}},
            413,
            "too many fields",
        ),
        "long text part": (
            "analyze_smear",
            {"files": {"image": ("a.png", good, "image/png")}, "data": {"cell_diameter_px": "1" * 100_000}},
            413,
            "exceeded maximum size",
        ),
        "form without a boundary": (
            "predict",
            {"content": b"--x--\r\n", "headers": {"content-type": "multipart/form-data"}},
            400,
            "malformed form",
        ),
        "body over a JSON route's limit": (
            "summarize_slide",
            {"content": b'{"fields": [' + b" " * 1_100_000 + b"]}", "headers": {"content-type": "application/json"}},
            413,
            "1000000-byte limit",
        ),
        "two files for one": (
            "predict",
            {"files": [("image", ("a.png", good, "image/png")), ("image", ("b.png", good, "image/png"))]},
            400,
            "takes one file, got 2",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "not an image",
        "truncated",
        "empty",
        "over byte limit",
        "decompression bomb",
        "too many images",
        "no images",
        "missing field",
        "json instead of file",
        "url in a file field",
        "text in a file field",
        "two files for one",
        "many files for one",
        "many text parts",
        "long text part",
        "form without a boundary",
        "body over a JSON route's limit",
        "chunked upload",
        "body over /predict's limit",
    ],
)
def test_bad_input_gets_a_clear_4xx_and_the_server_stays_healthy(server, cells, case):
    route, kwargs, status, message = bad_requests(cells)[case]
    response = httpx.post(f"{server.url}/{route}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert message.lower() in error_text(response).lower()
    assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200
    assert post_files(server, "predict", "image", [("ok.png", cells["Uninfected"][0].read_bytes())]).status_code == 200


def test_python_client_and_cli(server, cells, expected):
    from typer.testing import CliRunner

    from malaria.cli import app
    from malaria.client import MalariaClient

    with MalariaClient(server.url) as client:
        one = client.predict(cells["Parasitized"][1])
        many = client.classify(cells["Uninfected"][:3])
        assert client.model_info()["image_size"] == 32
    assert one["probability_parasitized"] == pytest.approx(expected(cells["Parasitized"][1]), abs=1e-4)
    assert [m["filename"] for m in many] == [p.name for p in cells["Uninfected"][:3]]
    folder = cells["Uninfected"][0].parent
    result = CliRunner().invoke(app, ["predict", str(cells["Parasitized"][2]), "--url", server.url, "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)[0]
    assert printed["path"] == str(cells["Parasitized"][2])
    assert printed["probability_parasitized"] == pytest.approx(expected(cells["Parasitized"][2]), abs=1e-4)
    table = CliRunner().invoke(app, ["predict", str(folder), "--url", server.url, "--chunk", "8"])
    assert table.exit_code == 0, table.output
    rows = [line for line in table.output.splitlines() if line.startswith(str(folder))]
    assert len(rows) == len(list(folder.glob("*.png"))) and "P(parasitized)" in table.output
    answered = [one, *many, printed, *rows]  # every answer counted from what came back, not by hand
    with server.count_lock:
        server.successes += len(answered)


def test_cli_predict_reports_a_rejected_file_and_classifies_the_rest(server, cells, expected, tmp_path):
    from typer.testing import CliRunner

    from malaria.cli import app

    good = cells["Parasitized"][3:5] + cells["Uninfected"][3:4]
    for path in good:
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--url", server.url, "--json"])
    assert result.exit_code == 1 and "1 of 4 files rejected" in result.stderr
    printed = {Path(r["path"]).name: r for r in json.loads(result.stdout)}
    assert set(printed) == {p.name for p in good} | {"broken.png"}
    assert "image" in printed["broken.png"]["error"] and "label" not in printed["broken.png"]
    for path in good:
        assert printed[path.name]["probability_parasitized"] == pytest.approx(expected(path), abs=1e-4)
    with server.count_lock:
        server.successes += sum("label" in answer for answer in printed.values())


def test_prediction_log_has_one_line_per_successful_prediction(server):
    import os

    assert server.stop() == 0  # SIGTERM: a graceful exit, the log flushed on shutdown
    with pytest.raises(ProcessLookupError):  # and no worker of its process group is left behind
        os.killpg(server.process.pid, 0)
    assert "path=/predict" not in server.output.read_text()  # the access log is off by default
    rows = load_prediction_window(server.log_dir)
    assert len(rows) == server.successes
    assert rows["request_id"].notna().all() and rows["probability_parasitized"].between(0, 1).all()
    for key in (
        "time",
        "request_id",
        "model_version",
        "probability_parasitized",
        "label",
        "decision",
        "latency_ms",
        "width",
        "height",
        "mean_r",
        "std_b",
        "brightness",
    ):
        assert key in rows.columns, key


@pytest.fixture(scope="module")
def secured(champion, tmp_path_factory):
    env = {
        "MALARIA_API_TOKEN": "s3cret",
        "MALARIA_METRICS_TOKEN": "scrape",
        "MALARIA_ACCESS_LOG": "true",
        "MALARIA_TRACING": "true",
        "MALARIA_REFER_BAND": "[0.0, 1.0]",  # every image with P(Parasitized) < 1 is referred
    }
    srv = Server(env, tmp_path_factory.mktemp("secured") / "predictions")
    yield srv
    srv.stop()


def test_bearer_token_is_required_when_configured(secured, cells):
    files = {"image": ("c.png", cells["Parasitized"][0].read_bytes(), "image/png")}
    assert httpx.post(f"{secured.url}/predict", files=files, timeout=30).status_code == 401
    wrong = httpx.post(f"{secured.url}/predict", files=files, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    ok = httpx.post(f"{secured.url}/predict", files=files, headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert ok.status_code == 200
    assert ok.headers["x-bentoml-request-id"]  # MALARIA_TRACING=true: BentoML's span id per request
    assert httpx.get(f"{secured.url}/readyz", timeout=5).status_code == 200
    from malaria.client import MalariaClient

    with MalariaClient(secured.url, token="s3cret") as client:
        answer = client.predict(cells["Uninfected"][0])  # P below 1: inside [0, 1)
        assert answer["request_id"] and answer["decision"] == "refer"  # MALARIA_REFER_BAND overrides the model's
        assert client.model_info()["refer_band"] == [0.0, 1.0]
    assert "path=/predict" in secured.output.read_text()  # MALARIA_ACCESS_LOG=true: one line per request


def test_every_api_route_needs_the_token_and_only_probes_metrics_and_the_page_are_open(secured):
    """Routes read from the service's own OpenAPI document, so a route added later is covered too."""
    token = {"Authorization": "Bearer s3cret"}
    # The Swagger page at / loads without the token and declares it, so it can send it (Authorize).
    spec = httpx.get(f"{secured.url}/docs.json", timeout=10).json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "MALARIA_API_TOKEN",
    }
    assert spec["security"] == [{"bearerAuth": []}]
    page = httpx.get(f"{secured.url}/", timeout=10)
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assert httpx.get(f"{secured.url}/static_content/swagger-ui-bundle.js", timeout=10).status_code == 200
    assert httpx.post(f"{secured.url}/docs.json", timeout=10).status_code == 401  # GET and HEAD only
    posted = sorted(path for path, methods in spec["paths"].items() if "post" in methods)
    assert {"/predict", "/classify", "/analyze_smear", "/explain", "/review", "/model_info"} <= set(posted)
    for path in posted:
        response = httpx.post(f"{secured.url}{path}", files={"image": ("x.png", b"x", "image/png")}, timeout=10)
        assert response.status_code == 401, path
    for path in ("/healthz", "/livez", "/readyz", "/ui/", "/ui/app.js"):
        assert httpx.get(f"{secured.url}{path}", timeout=10).status_code == 200, path
    # MALARIA_METRICS_TOKEN: /metrics for the scraper's token only.
    assert httpx.get(f"{secured.url}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{secured.url}/metrics", headers=token, timeout=10).status_code == 401
    scraper = {"Authorization": "Bearer scrape"}
    assert "bentoml_service_request_total" in httpx.get(f"{secured.url}/metrics", headers=scraper, timeout=10).text
    assert httpx.post(f"{secured.url}/ui/", timeout=10).status_code == 401  # open to GET and HEAD only
