"""Prefect flows on generated data, with Prefect's test harness and real MLflow / BentoML / bentoml serve."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from malaria.config import get_settings
from malaria.data import generate_synthetic, load_arrays
from malaria.registry import get_version, load_keras_model
from malaria.train import predict_probability
from tests.conftest import make_settings
from tests.helpers import Server

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


@pytest.fixture(scope="module")
def champion(tmp_path_factory, synthetic_dir):
    """A champion of its own (registry and BentoML name), so flows that change it leave other tests alone."""
    from malaria.bento import import_model
    from malaria.train import train

    settings = make_settings(
        tmp_path_factory.mktemp("flows"),
        data_dir=synthetic_dir,
        registered_model_name="flow-classifier",
        bento_model_name="flow-classifier",
    )
    record = train(settings)
    return settings, record, import_model(settings)


def test_evaluate_flow_matches_scikit_learn_and_saves_the_threshold(champion, settings_env, tmp_path):
    from flows.evaluate import evaluate_flow
    from malaria.data import read_manifest

    settings = settings_env(champion[0])
    result = evaluate_flow(out_dir=tmp_path / "evaluation")

    model, record = load_keras_model(settings)
    manifest = read_manifest(settings.splits_path)
    test = manifest[manifest["split"] == "test"]
    y = (test["label"] == "Parasitized").to_numpy().astype(int)
    p = predict_probability(model, load_arrays([settings.data_dir / f for f in test["path"]], record.spec), record.spec)
    predicted = (p >= result.spec.threshold).astype(int)
    assert result.metrics["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert result.metrics["sensitivity"] == pytest.approx(skm.recall_score(y, predicted))
    assert result.metrics["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - predicted))
    assert result.metrics["f1"] == pytest.approx(skm.f1_score(y, predicted))
    assert result.metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert result.metrics["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))

    for plot in ("confusion_matrix", "roc_curve", "precision_recall", "reliability", "probability_histogram"):
        # Data drawn, not an empty figure with a title: coloured pixels (lines, bars, cells) in the plot.
        pixels = np.asarray(Image.open(tmp_path / "evaluation" / f"{plot}.png").convert("RGB")).astype(int)
        coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 60
        assert coloured.mean() > 0.001, plot  # an empty figure: 0.0; real curves here: 0.0036 and up
    assert "| accuracy |" in (tmp_path / "evaluation" / "summary.md").read_text()
    assert record.spec.threshold == result.spec.threshold and record.spec.refer_band == result.spec.refer_band
    runs = mlflow.search_runs(experiment_names=[settings.experiment_name], filter_string="tags.kind = 'evaluation'")
    assert runs["metrics.eval_accuracy"].iloc[0] == pytest.approx(result.metrics["accuracy"])


def _write_prediction_log(
    folder: Path, images_dir: Path, champion, transform=None, model_version: str | None = None
) -> int:
    """Log lines written by the service's own ``PredictionLog``, for images from ``images_dir`` (optionally
    transformed) and the champion's answers to them."""
    from malaria.serving.prediction_log import PredictionLog
    from malaria.serving.uploads import PreparedImages, make_predictions

    settings, record, _ = champion
    paths = sorted(images_dir.rglob("*.png"))
    model, _ = load_keras_model(settings)
    batch = load_arrays(paths, record.spec)
    if transform is not None:
        batch = transform(batch)
    probability = predict_probability(model, batch, record.spec)
    names = [p.name for p in paths]
    predictions = make_predictions(probability, record.spec, model_version or record.version, "drift-test", names)
    log = PredictionLog(folder)
    log.record(predictions, PreparedImages(batch, [Image.open(p).size for p in paths], names), latency_ms=5.0)
    log.close()
    assert log.dropped == 0
    return len(paths)


@pytest.fixture(scope="module")
def fresh_cells(tmp_path_factory) -> Path:
    """New cells from the same generator (other seed and patients) as the training data."""
    return generate_synthetic(tmp_path_factory.mktemp("fresh"), per_class=60, n_patients=10, size=48, seed=99)


def test_drift_is_not_flagged_for_the_same_distribution(champion, settings_env, fresh_cells, tmp_path):
    from flows.drift import drift_flow

    settings_env(champion[0])
    n = _write_prediction_log(tmp_path / "log", fresh_cells, champion)
    result = drift_flow(hours=None, log_dir=tmp_path / "log", out_dir=tmp_path / "reports")
    assert result.n_current == n and not result.drift_detected, result.summary()
    assert result.html.is_file() and json.loads(result.json.read_text())["metrics"]


def test_drift_is_flagged_for_darker_bluer_images(champion, settings_env, fresh_cells, tmp_path):
    from flows.drift import drift_flow

    settings_env(champion[0])

    def darker_bluer(batch: np.ndarray) -> np.ndarray:
        shifted = batch * np.array([0.55, 0.6, 1.0], dtype=np.float32)
        shifted[..., 2] += 0.15
        return np.clip(shifted, 0, 1)

    _write_prediction_log(tmp_path / "log", fresh_cells, champion, darker_bluer)
    result = drift_flow(hours=None, log_dir=tmp_path / "log", out_dir=tmp_path / "reports")
    assert result.drift_detected, result.summary()
    assert {"mean_r", "mean_g", "brightness"} <= set(result.drifted_columns)


def test_drift_compares_only_the_champions_predictions_with_its_reference(
    champion, settings_env, fresh_cells, tmp_path
):
    from flows.drift import drift_flow

    settings_env(champion[0])
    n = _write_prediction_log(tmp_path / "log", fresh_cells, champion)

    def darker_bluer(batch: np.ndarray) -> np.ndarray:
        return np.clip(batch * np.array([0.55, 0.6, 1.0], dtype=np.float32) + [0, 0, 0.15], 0, 1)

    _write_prediction_log(tmp_path / "log", fresh_cells, champion, darker_bluer, model_version="999")
    result = drift_flow(hours=None, log_dir=tmp_path / "log", out_dir=tmp_path / "reports")
    assert result.n_current == n and not result.drift_detected, result.summary()


def test_drift_with_too_few_predictions_says_so(champion, settings_env, tmp_path):
    from flows.drift import drift_flow
    from malaria.monitoring import NotEnoughPredictions

    settings_env(champion[0])
    with pytest.raises(NotEnoughPredictions, match="at least 50"):
        drift_flow(hours=None, log_dir=tmp_path / "empty-log", out_dir=tmp_path / "reports")


def test_batch_predict_flow_against_a_real_service(champion, fresh_cells, tmp_path):
    settings = champion[0]
    from flows.batch_predict import batch_predict_flow

    folder = tmp_path / "to-classify"
    folder.mkdir()
    originals = sorted(fresh_cells.rglob("*.png"))[:30]
    for path in originals:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    server = Server({"MALARIA_BENTO_MODEL_NAME": settings.bento_model_name}, tmp_path / "predictions")
    try:
        summary = batch_predict_flow(folder, url=server.url, chunk_size=8, out_dir=tmp_path / "out")
    finally:
        server.stop()
    assert summary["total"] == 31 and summary["classified"] == 30
    assert [u["path"] for u in summary["unreadable"]] == [str(folder / "broken.png")]
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert sorted(table["path"]) == sorted(str(p) for p in folder.iterdir())
    assert sum(summary["counts"].values()) == 30


def test_pipeline_caches_unchanged_steps(synthetic_dir, settings_env, tmp_path, monkeypatch):
    from flows.pipeline import training_pipeline

    settings = settings_env(
        make_settings(
            tmp_path,
            data_dir=synthetic_dir,
            epochs=2,
            registered_model_name="pipeline-classifier",
            bento_model_name="pipeline-classifier",
        )
    )
    monkeypatch.chdir(tmp_path)  # the evaluation report goes to ./reports/evaluation: here, not the repo's
    first = training_pipeline(build=False)
    assert (tmp_path / "reports" / "evaluation" / "metrics.json").is_file()
    second = training_pipeline(build=False)
    assert first["trained"]["version"] == second["trained"]["version"] == "1"
    assert get_version(settings).version == "1"  # the second run trained nothing new
    assert second["bento_model"] == first["bento_model"]
    # Given settings are the ones used; a setting no step depends on redoes nothing.
    quiet = training_pipeline(build=False, settings=settings.model_copy(update={"log_level": "DEBUG"}))
    assert quiet["trained"]["version"] == "1" and get_version(settings).version == "1"
    monkeypatch.setenv("MALARIA_MAX_TRAIN_IMAGES", "40")  # a smoke-run cap is a different training
    get_settings.cache_clear()
    capped = training_pipeline(build=False)
    assert capped["trained"]["version"] == "2"
    assert "eval.accuracy" in get_version(settings, "2").tags
    # Another registry starts again at version 1: its evaluation is its own, not the cached one of
    # the first registry's version 1.
    other_registry = get_settings().model_copy(update={"registered_model_name": "other-classifier"})
    other = training_pipeline(build=False, settings=other_registry)  # passed in, not in the environment
    assert other["trained"]["version"] == "1"
    assert "eval.accuracy" in get_version(other_registry, "1").tags


@pytest.mark.parametrize(
    ("failure", "attempts"),
    [
        ("ServiceUnavailable", 4),  # overloaded or not ready: 1 + 3 retries
        ("InternalServerError", 4),
        ("ConnectError", 4),  # a lost connection
        ("InvalidArgument", 1),  # the service rejected the input: asking again gives the same answer
        ("KeyError", 1),  # a bug here: retrying would repeat it
    ],
)
def test_batch_predict_retries_server_errors_and_lost_connections_but_not_rejections(
    prefect_harness, monkeypatch, failure, attempts
):
    import httpx
    from bentoml import exceptions
    from prefect import flow

    import flows.batch_predict as batch_predict

    calls = []

    class FailingClient:  # the service's side of the exchange; Prefect's retries run for real
        def __init__(self, url, token=None):
            calls.append(url)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def classify_files(self, paths):
            error = getattr(exceptions, failure, None) or getattr(httpx, failure, None) or KeyError
            raise error(failure)

    monkeypatch.setattr(batch_predict, "MalariaClient", FailingClient)
    chunk = batch_predict.classify_chunk.with_options(retry_delay_seconds=0)

    @flow
    def one_chunk():
        return chunk([Path("cell.png")], "http://service", None, return_state=True)

    state = one_chunk(return_state=True)
    assert state.is_failed()
    assert len(calls) == attempts


def alert_receiver() -> tuple[list[dict], str]:
    """A local HTTP server that keeps the JSON bodies posted to it: (the bodies, its URL)."""
    import http.server
    import threading

    received: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return received, f"http://127.0.0.1:{server.server_port}/alert"


def test_the_drift_flow_reports_live_accuracy_on_reviewed_cells_and_alerts_below_the_setting(
    champion, settings_env, fresh_cells, tmp_path, monkeypatch
):
    import asyncio

    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from flows.deploy import deployments
    from flows.drift import drift_flow
    from malaria.serving.reviews import ReviewStore

    url = f"sqlite:///{tmp_path / 'reviews.db'}"
    monkeypatch.setenv("MALARIA_REVIEW_DB_URL", url)
    monkeypatch.setenv("MALARIA_LIVE_MIN_REVIEWS", "10")
    received, webhook = alert_receiver()  # a real Prefect notification block, posting to a local server
    CustomWebhookNotificationBlock(
        name="lab-alerts", url=webhook, json_data={"text": "{{subject}}: {{body}}"}, allow_private_urls=True
    ).save("lab-alerts", overwrite=True)
    monkeypatch.setenv("MALARIA_ALERT_BLOCK", "custom-webhook/lab-alerts")
    training = next(d for d in deployments() if d.name == "training-pipeline")
    training_id = training.apply()  # registered, as `malaria deploy-flows` serves it (no worker runs it here)
    monkeypatch.setenv("MALARIA_RETRAIN_DEPLOYMENT", "training-pipeline/training-pipeline")
    settings = settings_env(champion[0])
    store = ReviewStore(url, keep_days=30)
    for i in range(12):  # 8 of 12 audit cells right: 0.667, below the default 0.9
        said = "Uninfected" if i < 8 else "Parasitized"
        answer = {"model_label": said, "probability_parasitized": 0.1, "model_version": champion[1].version}
        store.add(f"cell-{i}".encode(), label="Uninfected", reviewer="ana", reason="audit", source="field",
                  request_id=None, **answer)  # fmt: skip
    _write_prediction_log(tmp_path / "log", fresh_cells, champion)
    result = drift_flow(hours=None, log_dir=tmp_path / "log", out_dir=tmp_path / "reports")
    assert not result.drift_detected and result.live_reviews == 12
    assert result.live_accuracy == pytest.approx(8 / 12)
    assert result.alerts == [f"live accuracy 0.667 on 12 reviewed audit cells is below {settings.live_min_accuracy}"]
    assert "live accuracy 0.667 on 12 reviewed audit cells" in result.summary()
    quality = pd.read_csv(tmp_path / "reports" / "live_quality.csv")
    assert quality["audit_reviews"].sum() == 12
    assert received == [{"text": f"malaria-bento monitoring: {result.alerts[0]}"}]  # the lab was told

    async def scheduled():  # and the training pipeline was asked to run
        from prefect import get_client

        async with get_client() as client:
            return await client.read_flow_run(result.retraining)

    run = asyncio.run(scheduled())
    assert run.deployment_id == training_id and "alert" in run.tags


def test_malaria_drift_exit_codes_say_fine_drift_or_low_live_accuracy(
    champion, settings_env, fresh_cells, tmp_path, monkeypatch
):
    """Exit 0: fine; 3: drift; 4: no drift but reviewed audit cells below the live accuracy setting."""
    import subprocess
    import sys

    from malaria.serving.reviews import ReviewStore

    url = f"sqlite:///{tmp_path / 'reviews.db'}"
    monkeypatch.setenv("MALARIA_REVIEW_DB_URL", url)
    monkeypatch.setenv("MALARIA_LIVE_MIN_REVIEWS", "1")
    settings_env(champion[0])
    _write_prediction_log(tmp_path / "same", fresh_cells, champion)
    _write_prediction_log(tmp_path / "dark", fresh_cells, champion, lambda batch: np.clip(batch * 0.5, 0, 1))

    def drift(log: str) -> int:  # the command as a user runs it, in its own process
        args = ["drift", "--hours", "0", "--log-dir", str(tmp_path / log), "--out", str(tmp_path / f"out-{log}")]
        return subprocess.run([sys.executable, "-m", "malaria.cli", *args], capture_output=True).returncode

    assert drift("same") == 0
    assert drift("dark") == 3
    ReviewStore(url, keep_days=30).add(b"cell", label="Parasitized", reviewer="ana", reason="audit", source="crop",
                                       model_label="Uninfected", probability_parasitized=0.1,
                                       model_version=champion[1].version, request_id=None)  # fmt: skip
    assert drift("same") == 4


def test_the_flow_deployments_register_with_their_schedules(prefect_harness):
    import asyncio

    from prefect import get_client

    from flows.deploy import deployments

    built = deployments()
    ids = [deployment.apply() for deployment in built]

    async def read():
        async with get_client() as client:
            return [await client.read_deployment(i) for i in ids]

    registered = {d.name: d for d in asyncio.run(read())}
    assert set(registered) == {"drift-daily", "evaluate-weekly", "training-pipeline", "batch-predict", "smear-report"}
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in registered.items()}
    assert crons["drift-daily"] == ["0 6 * * *"] and crons["evaluate-weekly"] == ["0 7 * * 1"]
    assert crons["training-pipeline"] == crons["batch-predict"] == crons["smear-report"] == []  # on demand
    assert registered["drift-daily"].parameters == {"hours": 24}
