"""Serving helpers kept out of ``service.py``: input checks, predictions, the prediction log, auth."""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import os
import posixpath
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path, PurePosixPath
from typing import BinaryIO, get_args

import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import BaseModel, Field
from pydantic_core import PydanticCustomError, core_schema
from starlette.datastructures import UploadFile

from malaria.config import Settings
from malaria.monitoring import image_features_batch
from malaria.preprocess import ImageTooLargeError, InvalidImageError, decode_image, to_model_input
from malaria.spec import DECISIONS, Decision, ModelSpec

logger = logging.getLogger(__name__)


class PayloadTooLarge(BentoMLException):
    """413: an upload over the byte, pixel or count limit."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Prediction(BaseModel):
    """One image's answer."""

    label: str = Field(description="Parasitized or Uninfected, by the model's threshold.")
    probability_parasitized: float = Field(description="Calibrated P(Parasitized).")
    confidence: float = Field(description="Probability of the returned label.")
    decision: Decision = Field(description="parasitized, uninfected, or refer (uncertain: a person should look).")
    model_version: str
    request_id: str
    filename: str | None = None


class BatchSummary(BaseModel):
    """Counts over one multi-image request."""

    total: int
    counts: dict[str, int]
    decisions: dict[str, int]


class BatchResult(BaseModel):
    predictions: list[Prediction]
    summary: BatchSummary


class ModelInfo(BaseModel):
    bento_model: str
    registered_model: str | None
    mlflow_version: str | None
    mlflow_run_id: str | None
    metrics: dict[str, float]
    image_size: int
    class_names: list[str]
    positive_class: str
    threshold: float
    refer_band: tuple[float, float]
    temperature: float


class ImageUpload(PurePosixPath):
    """One uploaded file as Starlette parsed it (in memory up to 1 MB, spooled to disk above), with
    the client's file name (``filename``, without any folder part) and ``size`` in bytes.

    BentoML writes every ``Path`` upload to a temporary file that the handler then reads back; that
    cost about a tenth of the CPU per single-image request. A ``PurePath`` subclass is still a file
    field to BentoML (multipart parsing, ``type: file`` in the schema its clients read), and its
    bytes are read one image at a time, after the size check.
    """

    filename: str | None
    size: int
    _source: BinaryIO

    @classmethod
    def of(cls, source: BinaryIO, size: int, filename: str | None = None) -> ImageUpload:
        name = posixpath.basename(filename or "") or None
        upload = cls(name or "upload")
        upload.filename, upload.size, upload._source = name, size, source
        return upload

    def read(self) -> bytes:
        self._source.seek(0)
        return self._source.read()

    @classmethod
    def validate(cls, value) -> ImageUpload:
        if isinstance(value, cls):
            return value
        if isinstance(value, UploadFile):
            size = value.size if value.size is not None else value.file.seek(0, os.SEEK_END)
            return cls.of(value.file, size, value.filename)
        if isinstance(value, bytes):
            return cls.of(io.BytesIO(value), len(value))
        raise PydanticCustomError("file_type", "expected a file upload (multipart/form-data)")

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler) -> dict:
        # What BentoML's own file fields publish (its clients look for ``type: file``).
        if handler.mode == "validation":
            return {"type": "file", "format": "binary"}
        return {"type": "string", "format": "binary"}


class PreparedImages:
    """Validated uploads: model inputs, original sizes and names."""

    def __init__(self, batch: np.ndarray, sizes: list[tuple[int, int]], names: list[str | None]):
        self.batch, self.sizes, self.names = batch, sizes, names


def prepare_uploads(uploads: list[ImageUpload], spec: ModelSpec, settings: Settings) -> PreparedImages:
    """Check limits and run the shared preprocessing; bad input raises a 4xx BentoML error."""
    if not uploads:
        raise InvalidArgument("no image received: send at least one file")
    if len(uploads) > settings.max_images_per_request:
        raise PayloadTooLarge(f"{len(uploads)} images in one request; the limit is {settings.max_images_per_request}")
    batch = np.empty((len(uploads), spec.image_size, spec.image_size, 3), dtype=np.float32)
    sizes = []
    for i, upload in enumerate(uploads):
        label = f"image {upload.filename or i + 1}"
        if upload.size == 0:
            raise InvalidArgument(f"{label}: empty file")
        if upload.size > settings.max_image_bytes:
            raise PayloadTooLarge(f"{label}: {upload.size} bytes; the limit is {settings.max_image_bytes} bytes")
        try:
            image = decode_image(upload.read(), max_pixels=settings.max_image_pixels)
        except ImageTooLargeError as exc:
            raise PayloadTooLarge(f"{label}: {exc}") from exc
        except InvalidImageError as exc:
            raise InvalidArgument(f"{label}: {exc}") from exc
        sizes.append(image.size)
        batch[i] = to_model_input(image, spec)
    return PreparedImages(batch, sizes, [upload.filename for upload in uploads])


def make_predictions(
    probability: np.ndarray,
    spec: ModelSpec,
    model_version: str,
    request_id: str,
    names: list[str | None],
) -> list[Prediction]:
    labels = spec.labels(probability)
    return [
        Prediction(
            label=label,
            probability_parasitized=round(float(p), 6),
            confidence=round(float(p if label == spec.positive_class else 1 - p), 6),
            decision=spec.decision(float(p)),
            model_version=model_version,
            request_id=request_id,
            filename=name,
        )
        for p, label, name in zip(probability, labels, names, strict=True)
    ]


def summarize(predictions: list[Prediction], spec: ModelSpec) -> BatchSummary:
    counts = {name: 0 for name in spec.class_names}
    decisions = dict.fromkeys(DECISIONS, 0)
    for prediction in predictions:
        counts[prediction.label] += 1
        decisions[prediction.decision] += 1
    return BatchSummary(total=len(predictions), counts=counts, decisions=decisions)


def new_request_id(headers) -> str:
    """The caller's X-Request-ID when it is sane, else a fresh UUID."""
    given = headers.get("x-request-id", "") if headers is not None else ""
    return given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex


class PredictionLog:
    """JSON lines, one per prediction, written by a background thread; one file per day and process."""

    def __init__(self, folder: Path, on_dropped: Callable[[int], None] | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # lines that could not be written (disk full, folder gone, ...)
        self._on_dropped = on_dropped
        self._queue: queue.SimpleQueue[list[dict] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def record(self, predictions: list[Prediction], prepared: PreparedImages, latency_ms: float) -> None:
        """Queue the log lines of one request (returns at once)."""
        now = datetime.now(UTC).isoformat()
        features = image_features_batch(prepared.batch, prepared.sizes)
        self._queue.put(
            [
                {
                    "time": now,
                    "request_id": p.request_id,
                    "model_version": p.model_version,
                    "probability_parasitized": p.probability_parasitized,
                    "label": p.label,
                    "decision": p.decision,
                    "latency_ms": round(latency_ms, 3),
                    "filename": p.filename,
                    **f,
                }
                for p, f in zip(predictions, features, strict=True)
            ]
        )

    def _path(self) -> Path:
        return self.folder / f"predictions-{datetime.now(UTC):%Y-%m-%d}-{os.getpid()}.jsonl"

    def _run(self) -> None:
        handle, path = None, None
        after_failure = False  # a failed write may have left half a line: start the next one on a new line
        while True:
            lines = self._queue.get()
            if lines is None:
                break
            batch = [lines]
            while True:  # drain whatever else is waiting, then write once
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            try:
                if self._path() != path:
                    if handle:
                        handle.close()
                    handle, path = None, self._path()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handle = path.open("a", encoding="utf-8")
                text = "".join(json.dumps(line) + "\n" for group in batch for line in group)
                handle.write("\n" + text if after_failure else text)
                handle.flush()
                after_failure = False
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failed write
                after_failure = True
                self._drop(sum(len(group) for group in batch), path, exc)
                if handle:
                    with contextlib.suppress(Exception):
                        handle.close()
                handle, path = None, None  # reopen on the next write
        if handle:
            handle.close()

    def _drop(self, count: int, path: Path | None, error: Exception) -> None:
        logger.error("prediction log %s: %s: %d lines dropped (%d in all)", path, error, count, self.dropped + count)
        if self._on_dropped is not None:
            self._on_dropped(count)
        self.dropped += count  # last: once it moves, the line is logged and counted

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything queued and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)


def harden_multipart_parsing() -> None:
    """Answer 400, not 500, to a multipart file sent under a field name the endpoint does not take,
    and to text sent in a file field.

    BentoML 1.4 JSON-decodes every unknown form part as text, and a binary part raises
    ``UnicodeDecodeError`` there, which its error handler turns into a 500. Text in a file field is
    taken as a URL that the server downloads (or fails to: a 500).
    """
    from _bentoml_impl import serde

    base = serde.ALL_SERDE["multipart/form-data"]
    if getattr(base, "hardened", False):
        return

    class HardenedMultipartSerde(base):
        hardened = True

        async def parse_request(self, request, cls):
            form = await request.form()  # Starlette caches it: the base class reads the same form
            for field in cls.multipart_fields:
                values = form.getlist(field)
                if any(not isinstance(value, UploadFile) for value in values):
                    # BentoML would fetch a URL given as text on the server, or fail with a 500.
                    raise InvalidArgument(f"field {field!r} takes files, not text")
                if len(values) > 1 and not _takes_a_list(cls.model_fields[field].annotation):
                    # BentoML would answer for the first file only.
                    raise InvalidArgument(f"field {field!r} takes one file, got {len(values)}")
            try:
                return await super().parse_request(request, cls)
            except UnicodeDecodeError as exc:
                fields = ", ".join(name for name in cls.model_fields if not name.startswith("_"))
                raise InvalidArgument(f"unexpected file field; this endpoint takes: {fields}") from exc

    for media_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        serde.ALL_SERDE[media_type] = HardenedMultipartSerde


def _takes_a_list(annotation) -> bool:
    """Whether BentoML's multipart parser keeps every file of a field, by its own test of the annotation."""
    from _bentoml_sdk.typing_utils import is_list_type, is_union_type

    if is_union_type(annotation):
        annotation = get_args(annotation)[0]
    return is_list_type(annotation)


OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})


class RequestGuardMiddleware:
    """ASGI middleware run before any body is read.

    Rejects a body without a declared length (411: Starlette would spool a chunked upload of any
    size to disk before any limit applies), a declared body larger than the path's limit in
    ``body_limits`` or else ``max_body_bytes`` (413) and, when a token is configured, any API call
    without ``Authorization: Bearer <token>`` (401). Health and metrics stay open.
    """

    def __init__(self, app, token: str | None, max_body_bytes: int, body_limits: dict[str, int] | None = None):
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.body_limits = body_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await _json_error(send, 401, "missing or invalid bearer token", [(b"www-authenticate", b"Bearer")])
        if b"transfer-encoding" in headers and b"content-length" not in headers:
            return await _json_error(send, 411, "send the request body with a Content-Length (no chunked uploads)")
        declared = headers.get(b"content-length", b"0")
        limit = self.body_limits.get(scope["path"], self.max_body_bytes)
        if declared.isdigit() and int(declared) > limit:
            return await _json_error(send, 413, f"request body of {int(declared)} bytes is over the {limit}-byte limit")
        return await self.app(scope, receive, send)


class ConnectionRecycleMiddleware:
    """Close a keep-alive connection after ``max_requests`` responses (``Connection: close``).

    Workers share one listening socket and a keep-alive connection stays with the worker that
    accepted it, so a few long-lived clients can keep one worker busy while another idles. A closed
    connection is reopened by the client and accepted by whichever worker is free: the per-connection
    form of gunicorn's ``max_requests``. ``max_requests=0`` keeps connections open.
    """

    def __init__(self, app, max_requests: int, max_tracked: int = 10_000):
        self.app = app
        self.max_requests = max_requests
        self.max_tracked = max_tracked
        self.counts: OrderedDict[tuple, int] = OrderedDict()

    async def __call__(self, scope, receive, send):
        client = scope.get("client")
        if scope["type"] != "http" or self.max_requests <= 0 or not client or not client[1]:
            # No TCP peer to count by (e.g. uvicorn replaced it from X-Forwarded-For: port 0).
            return await self.app(scope, receive, send)
        connection = (tuple(scope["client"]), tuple(scope.get("server") or ()))
        served = self.counts.pop(connection, 0) + 1
        if served < self.max_requests:
            self.counts[connection] = served
            if len(self.counts) > self.max_tracked:  # connections the clients closed themselves
                self.counts.popitem(last=False)
            return await self.app(scope, receive, send)

        async def send_and_close(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, send_and_close)


async def _json_error(send, status: int, message: str, extra_headers=()) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BatchedModel:
    """BentoML's adaptive batching (its ``CorkDispatcher``) in front of an in-process inference call.

    A BentoML batchable API must take a list, so single-image ``/predict`` calls can only be batched
    by a second service (``bentoml.depends``), which costs one HTTP round trip to another process
    per request: on two cores, as much CPU as the model itself. Here the same dispatcher batches
    the calls of all requests of this worker, and the batch runs on a thread, so the event loop
    keeps parsing and decoding requests while TensorFlow computes.
    """

    def __init__(self, predict_fn, *, batching: bool, max_batch_size: int, max_latency_ms: int, observe_batch=None):
        self.predict_fn = predict_fn
        self.observe_batch = observe_batch or (lambda size: None)
        if batching:
            # Internal to BentoML 1.4 (the dispatcher its batchable APIs use); bentoml is pinned.
            from bentoml._internal.marshal.dispatcher import CorkDispatcher

            dispatcher = CorkDispatcher(
                max_latency_in_ms=max_latency_ms,
                max_batch_size=max_batch_size,
                fallback=_overloaded,
                get_batch_size=len,
            )
            self._call = dispatcher(self._run_batches)  # a sync callback runs on the thread pool
        else:
            self._call = self._run_alone

    def _run_batches(self, batches) -> list[np.ndarray]:
        sizes = [len(batch) for batch in batches]
        outputs = self.predict_fn(np.concatenate(batches) if len(batches) > 1 else batches[0])
        self.observe_batch(sum(sizes))
        return np.split(outputs, np.cumsum(sizes)[:-1])

    async def _run_alone(self, batch: np.ndarray) -> np.ndarray:
        from starlette.concurrency import run_in_threadpool

        outputs = await run_in_threadpool(self.predict_fn, batch)
        self.observe_batch(len(batch))
        return outputs

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed images (n, size, size, 3) -> raw model outputs (n, units)."""
        return await self._call(batch)


def _overloaded():
    from bentoml.exceptions import ServiceUnavailable

    raise ServiceUnavailable("server overloaded: the request could not be scheduled within max_latency_ms")


def monotonic_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
