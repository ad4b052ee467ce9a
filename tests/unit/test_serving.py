"""Serving helpers: in-memory uploads, BatchedModel with a fake model, the prediction log."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import threading
import time

import numpy as np
import pytest
from bentoml.exceptions import ServiceUnavailable
from PIL import Image
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import UploadFile

from malaria.serving.batching import BatchedModel
from malaria.serving.compat import cache_response_media_types, io_descriptor
from malaria.serving.prediction_log import PredictionLog
from malaria.serving.schemas import Prediction
from malaria.serving.uploads import INLINE_DECODE_BYTES, ImageUpload, PreparedImages, decodes_quickly


class FakeModel:
    """Returns each image's first pixel value as its output; records the batch sizes it was given."""

    def __init__(self, fail: bool = False):
        self.batches: list[int] = []
        self.fail = fail

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        if self.fail:
            raise ValueError("model failed")
        return batch[:, 0, 0, :1].copy()


def images(values) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)


def batched(model: FakeModel, **kwargs) -> BatchedModel:
    options = {"batching": True, "max_batch_size": 4, "max_latency_ms": 10_000, **kwargs}
    return BatchedModel(model, **options)


def test_concurrent_calls_are_batched_and_each_gets_its_own_outputs():
    model, seen = FakeModel(), []
    service = batched(model, observe_batch=seen.append)

    async def run():
        return await asyncio.gather(*(service(images([i])) for i in range(60)))

    results = asyncio.run(run())
    assert [float(r[0, 0]) for r in results] == list(range(60))
    assert sum(model.batches) == sum(seen) == 60
    assert max(model.batches) > 1, "no call was batched"
    assert max(model.batches) <= 4, "max_batch_size respected"


def test_a_request_larger_than_the_max_batch_is_split_and_reassembled_in_order():
    model = FakeModel()
    service = batched(model)
    result = asyncio.run(service(images(range(10))))
    assert result[:, 0].tolist() == list(range(10))
    assert max(model.batches) <= 4


def test_a_model_error_reaches_the_caller():
    service = batched(FakeModel(fail=True))
    with pytest.raises(ValueError, match="model failed"):
        asyncio.run(service(images([1.0])))


def test_batching_off_is_one_model_call_per_request():
    model = FakeModel()
    service = BatchedModel(model, batching=False, max_batch_size=4, max_latency_ms=10_000)

    async def run():
        return await asyncio.gather(*(service(images([i, i])) for i in range(5)))

    results = asyncio.run(run())
    assert model.batches == [2] * 5
    assert [r[:, 0].tolist() for r in results] == [[i, i] for i in range(5)]


class SlowModel(FakeModel):
    def __call__(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return super().__call__(batch)


def test_calls_that_cannot_be_scheduled_within_the_latency_budget_get_a_503_and_the_rest_answers():
    model = SlowModel()
    service = batched(model, max_batch_size=2, max_latency_ms=20)  # 50 ms a call: a queue of 30 cannot fit

    async def run():
        return await asyncio.gather(*(service(images([i])) for i in range(30)), return_exceptions=True)

    results = asyncio.run(run())
    refused = [r for r in results if isinstance(r, ServiceUnavailable)]
    answered = [(i, r) for i, r in enumerate(results) if isinstance(r, np.ndarray)]
    assert refused and all(r.error_code == 503 and "overloaded" in str(r) for r in refused)
    assert answered and all(float(r[0, 0]) == i for i, r in answered)  # the others got their own answers
    assert len(refused) + len(answered) == 30


def test_an_upload_is_read_from_the_parsed_form_with_the_clients_file_name():
    body = b"\x89PNG..."
    upload = ImageUpload.validate(UploadFile(io.BytesIO(body), size=len(body), filename="slide 3/cell 1.png"))
    assert (upload.read(), upload.size) == (body, len(body))
    assert upload.read() == body  # each read starts at the beginning
    assert upload.filename == upload.name == "cell 1.png"
    unnamed = ImageUpload.validate(b"raw")
    assert (unnamed.read(), unnamed.size, unnamed.filename) == (b"raw", 3, None)


def test_an_upload_without_a_declared_size_is_measured():
    upload = ImageUpload.validate(UploadFile(io.BytesIO(b"12345"), filename="c.png"))
    assert upload.size == 5 and upload.read() == b"12345"


def test_text_is_not_an_upload():
    with pytest.raises(ValidationError, match="expected a file upload"):
        TypeAdapter(ImageUpload).validate_python("https://example.org/cell.png")


def test_bentoml_treats_an_upload_field_as_a_multipart_file():
    def predict(self, image: ImageUpload, extra: list[ImageUpload]) -> str:
        return ""

    spec = io_descriptor().from_input(predict, skip_self=True)
    assert spec.mime_type() == "multipart/form-data"
    assert spec.multipart_fields == ["image", "extra"]
    schema = spec.model_json_schema()["properties"]
    # BentoML's clients send a field as a file when the schema says ``type: file``.
    assert schema["image"]["type"] == "file"
    assert schema["extra"]["items"]["type"] == "file"


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_only_one_small_image_is_decoded_where_the_request_is_handled():
    crop, bomb = png(128, 128), png(4000, 4000)
    assert len(bomb) < INLINE_DECODE_BYTES, "a small file that inflates to 16 MP"
    assert decodes_quickly([ImageUpload.validate(crop)])
    assert not decodes_quickly([ImageUpload.validate(crop)] * 2), "several images go to a thread"
    assert not decodes_quickly([ImageUpload.validate(bomb)]), "the header's pixels decide, not the bytes"
    assert not decodes_quickly([ImageUpload.validate(b"not an image")])
    icon = io.BytesIO()
    Image.new("RGB", (64, 64)).save(icon, "ICO")  # a format Pillow decodes while opening: not even peeked at
    assert not decodes_quickly([ImageUpload.validate(icon.getvalue())])
    assert not decodes_quickly([ImageUpload.validate(crop + bytes(INLINE_DECODE_BYTES))])
    upload = ImageUpload.validate(crop)
    decodes_quickly([upload])
    assert upload.read() == crop, "peeking at the header leaves the upload whole"


def test_a_list_answers_media_type_is_derived_once(monkeypatch):
    cache_response_media_types()

    def classify(self, image: ImageUpload) -> list[Prediction]:
        return []

    output = io_descriptor().from_output(classify)
    derived = []
    schema = output.model_json_schema
    monkeypatch.setattr(output, "model_json_schema", lambda *a, **k: derived.append(1) or schema(*a, **k))
    assert [output.mime_type() for _ in range(3)] == ["application/json"] * 3
    assert len(derived) == 1


def test_prediction_log_writes_a_burst_in_one_go_and_a_lone_line_at_once(tmp_path):
    log = PredictionLog(tmp_path)
    prepared = PreparedImages(np.full((1, 8, 8, 3), 0.5, np.float32), [(8, 8)], [None])
    answer = {"label": "Uninfected", "probability_parasitized": 0.1, "confidence": 0.9, "decision": "uninfected"}

    def lines() -> list[str]:
        return [line for path in tmp_path.glob("*.jsonl") for line in path.read_text().splitlines()]

    log.record([Prediction(**answer, model_version="1", request_id="lone")], prepared, 1.0)
    deadline = time.monotonic() + 5
    while not lines() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(lines()) == 1, "a lone request's line is written without waiting for close()"
    for i in range(500):
        log.record([Prediction(**answer, model_version="1", request_id=f"burst-{i}")], prepared, 1.0)
    log.close()
    assert len(lines()) == 501 and log.dropped == 0


def test_prediction_log_survives_a_failed_write_and_counts_what_it_dropped(tmp_path):
    folder = tmp_path / "log"
    reported: list[int] = []
    log = PredictionLog(folder, on_dropped=reported.append)
    prepared = PreparedImages(np.full((1, 8, 8, 3), 0.5, np.float32), [(8, 8)], ["cell.png"])

    def prediction(request_id: str) -> Prediction:
        return Prediction(
            label="Parasitized",
            probability_parasitized=0.9,
            confidence=0.9,
            decision="parasitized",
            model_version="1",
            request_id=request_id,
        )

    folder.rmdir()
    folder.write_text("a file where the log folder was: every write fails")
    log.record([prediction("lost")], prepared, 1.0)
    deadline = time.monotonic() + 10
    while log.dropped == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.dropped == 1 and reported == [1]
    folder.unlink()
    log.record([prediction("kept")], prepared, 1.0)
    log.close()
    text = "".join(path.read_text() for path in folder.glob("*.jsonl"))
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert [line["request_id"] for line in lines] == ["kept"]
    assert lines[0]["width"] == 8 and log.dropped == 1


def test_no_upload_is_a_client_error():
    from bentoml.exceptions import InvalidArgument

    from malaria.config import Settings
    from malaria.serving.uploads import prepare_uploads
    from malaria.spec import ModelSpec

    with pytest.raises(InvalidArgument, match="no image received"):
        prepare_uploads([], ModelSpec(), Settings())


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("cell 1.png", "cell 1.png"),
        ("slide 3/cell 1.png", "cell 1.png"),
        ("C:\\\\slides\\\\cell.png", "cell.png"),
        ("evil\nINFO forged log line.png", "evilINFO forged log line.png"),
        ("bell\x07\x1b[31m.png", "bell[31m.png"),
        ("lone\ud800surrogate.png", "lonesurrogate.png"),
        ("x" * 1000 + ".png", "x" * 255),
        ("\n\t", None),
        (None, None),
    ],
)
def test_client_file_names_are_made_safe_at_the_boundary(given, kept):
    from malaria.serving.uploads import clean_filename

    assert clean_filename(given) == kept
    upload = ImageUpload.of(io.BytesIO(b"x"), 1, given)
    assert upload.filename == kept
    json.dumps({"filename": upload.filename}).encode()  # always serialisable


@pytest.mark.parametrize("policy", ["hashed", "plain", "omit"])
def test_prediction_log_keeps_file_names_out_unless_asked(tmp_path, policy):
    log = PredictionLog(tmp_path, filenames=policy)
    log.record_lines([{"request_id": "r", "filename": "C12P3_patient_Jane_Doe.png"}, {"request_id": "s"}])
    log.close()
    lines = [json.loads(line) for line in next(tmp_path.glob("predictions-*.jsonl")).read_text().splitlines()]
    expected = {
        "hashed": "sha256:" + hashlib.sha256(b"C12P3_patient_Jane_Doe.png").hexdigest()[:16],
        "plain": "C12P3_patient_Jane_Doe.png",
        "omit": None,
    }[policy]
    assert lines[0]["filename"] == expected and "filename" not in lines[1]


def test_prediction_log_memory_is_bounded_and_overflow_is_counted(tmp_path, monkeypatch):
    reported: list[int] = []
    log = PredictionLog(tmp_path, on_dropped=reported.append, max_queued=3)
    gate = threading.Event()
    real_write = log._path

    def slow_path():  # hold the writer so that the queue fills
        gate.wait(10)
        return real_write()

    monkeypatch.setattr(log, "_path", slow_path)
    for i in range(10):
        log.record_lines([{"request_id": str(i)}, {"request_id": f"{i}b"}])
    gate.set()
    log.close()
    written = sum(len(p.read_text().splitlines()) for p in tmp_path.glob("predictions-*.jsonl"))
    assert log.dropped == sum(reported) > 0
    assert written + log.dropped == 20  # every line is either written or counted


def test_prediction_log_rotates_by_size_and_deletes_old_days(tmp_path, monkeypatch):
    monkeypatch.setattr("malaria.serving.prediction_log.WRITE_INTERVAL_S", 0)  # a write per line: a part per 200 B
    old = tmp_path / "predictions-2020-01-01-1.jsonl"
    old.write_text("{}\n")
    keep = tmp_path / "smear-fields-2020-01-01-1.jsonl"  # another log's files are not this log's to delete
    keep.write_text("{}\n")
    log = PredictionLog(tmp_path, max_file_bytes=200, keep_days=30)
    for i in range(12):
        log.record_lines([{"request_id": f"request-{i:04d}", "payload": "x" * 40}])
        time.sleep(0.01)
    log.close()
    parts = sorted(tmp_path.glob("predictions-*.jsonl"))
    assert not old.exists() and keep.exists()
    assert len(parts) >= 3 and all(p.stat().st_size < 200 + 120 for p in parts)
    lines = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    assert sorted(line["request_id"] for line in lines) == [f"request-{i:04d}" for i in range(12)]
    from malaria.monitoring import load_prediction_window

    assert len(load_prediction_window(tmp_path)) == 12  # the drift reader finds every part


def test_prediction_log_starts_a_file_each_day_and_deletes_days_past_keep_days(tmp_path):
    from datetime import UTC, datetime, timedelta

    today = [datetime(2026, 3, 1, 23, 59, tzinfo=UTC)]
    log = PredictionLog(tmp_path, keep_days=7, max_file_bytes=60, clock=lambda: today[0])

    def written(request_id: str) -> bool:
        for path in tmp_path.glob("predictions-*.jsonl"):
            try:
                if request_id in path.read_text():
                    return True
            except FileNotFoundError:  # a past day's file, deleted by the writer since the glob
                continue
        return False

    def write(request_id: str) -> None:
        log.record_lines([{"request_id": request_id}])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not written(request_id):  # one write at a time
            time.sleep(0.01)

    for i in range(3):
        write(f"march-1-{i}")
    today[0] += timedelta(minutes=2)  # past midnight: a new file, parts counted again from 0
    write("march-2")
    pid = os.getpid()
    assert sorted(p.name for p in tmp_path.glob("predictions-*.jsonl")) == [
        f"predictions-2026-03-01-{pid}.1.jsonl",  # each line is over 60 bytes: one part per write
        f"predictions-2026-03-01-{pid}.2.jsonl",
        f"predictions-2026-03-01-{pid}.jsonl",
        f"predictions-2026-03-02-{pid}.jsonl",  # a new day starts again without a part number
    ]
    today[0] += timedelta(days=7)  # March 9: March 1 is past the 7 days kept, March 2 is not
    write("march-9")
    log.close()
    names = sorted(p.name.replace(f"-{os.getpid()}", "") for p in tmp_path.glob("predictions-*.jsonl"))
    assert names == ["predictions-2026-03-02.jsonl", "predictions-2026-03-09.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / f"predictions-2026-03-09-{os.getpid()}.jsonl").open()]
    assert [line["request_id"] for line in lines] == ["march-9"]
    assert lines[0]["time"].startswith("2026-03-09")


def test_a_server_whose_port_was_taken_meanwhile_starts_on_another(tmp_path, monkeypatch):
    import socket
    import sys

    from tests import server_process

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()  # another process got the port between free_port() and the server's bind
    taken_port = taken.getsockname()[1]
    ports = iter([taken_port, server_process.free_port()])
    monkeypatch.setattr(server_process, "free_port", lambda: next(ports))

    def start(port: int) -> server_process.ServerProcess:
        command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        return server_process.ServerProcess(command, port, {}, tmp_path / f"{port}.log", 30, ready_path="/")

    try:
        server = server_process.on_a_free_port(start)
        server.stop()
    finally:
        taken.close()
    assert server.url != f"http://127.0.0.1:{taken_port}"  # it answered /, on the second port
    first_try = (tmp_path / f"{taken_port}.log").read_text()
    assert "address already in use" in first_try.lower()
