"""BentoML service: malaria cell classification with adaptive batching.

``MalariaClassifier`` checks uploads, decodes and preprocesses them, and sends every request's
images through BentoML's adaptive-batching dispatcher to the Keras model in the same process, so
concurrent single-image ``/predict`` calls are batched together (``malaria_batch_size`` in
``/metrics``) without a round trip to another process.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Annotated, Literal

import anyio
import bentoml
import numpy as np
from PIL import Image
from pydantic import BeforeValidator, Field

from malaria.config import get_settings
from malaria.explain import grid, occlusion_batch, occlusion_map
from malaria.preprocess import to_model_input
from malaria.serving import compat
from malaria.serving.batching import BatchedModel, monotonic_ms
from malaria.serving.middleware import BearerAuthMiddleware, BodyLimitMiddleware, ConnectionRecycleMiddleware
from malaria.serving.page import UI_PATH, page_app
from malaria.serving.prediction_log import PredictionLog
from malaria.serving.reviews import ReviewStore
from malaria.serving.schemas import (
    MAX_SLIDE_FIELDS,
    BatchResult,
    Explanation,
    FieldCounts,
    ModelInfo,
    Prediction,
    ReviewStored,
    SlideSummary,
)
from malaria.serving.uploads import (
    ImageUpload,
    PayloadTooLarge,
    decode_cell,
    decode_field,
    decodes_quickly,
    harden_multipart_parsing,
    make_predictions,
    new_request_id,
    prepare_uploads,
    summarize,
)
from malaria.smear.analysis import (
    CellNotFoundError,
    SmearAnalysis,
    SmearTiming,
    cell_at,
    expected_diameter,
    flag_for_review,
    prepare_field,
    summarise_field,
)
from malaria.smear.detect import FieldTooLargeError
from malaria.smear.render import annotated_png
from malaria.smear.slides import summarise_slide
from malaria.spec import ModelSpec, review_flag

logger = logging.getLogger(__name__)
settings = get_settings()
harden_multipart_parsing(settings.max_images_per_request)
compat.cache_response_media_types()
compat.bound_endpoint_labels(mounted=(UI_PATH,))
if settings.api_token:
    compat.document_bearer_auth()  # the Swagger page at / can then send the token
MODEL = bentoml.models.BentoModel(f"{settings.bento_model_name}:latest")
# A field's expected red-cell size, per request: 8 to 1000 px, directly or as 7.5 um over the pixel size.
CellDiameter = Annotated[float, Field(ge=8, le=1000)] | None
PixelSize = Annotated[float, Field(ge=0.0075, le=0.9375)] | None
# A cell of a field, as /analyze_smear answered it: "x,y,width,height" in pixels of the upright field.
CellBox = Annotated[str, Field(pattern=r"^\s*\d{1,6}\s*,\s*\d{1,6}\s*,\s*\d{1,6}\s*,\s*\d{1,6}\s*$")] | None
# BentoML reads a form value that looks like JSON as JSON ("3" arrives as 3): text fields take it back as text.
AsText = BeforeValidator(lambda value: value if value is None else str(value))
ShortText = Annotated[str, AsText, Field(max_length=128)] | None
FIELD_CHUNKS_IN_FLIGHT = 2  # a field's model calls queued at once in the batcher
CPU_THREADS = {"cells": 2, "fields": 1}  # per worker; a worker has one core's share of the CPU
SYNTHETIC_WARNING = "model trained on synthetic data: a demo, not for real samples"
RESOURCES = {"gpu": 1} if settings.gpu else {"cpu": str(settings.workers * settings.tf_intra_op_threads)}

predictions_total = bentoml.metrics.Counter(
    name="malaria_predictions_total",
    documentation="Predictions by label and decision",
    labelnames=["label", "decision"],
)
probability_histogram = bentoml.metrics.Histogram(
    name="malaria_probability_parasitized",
    documentation="Predicted P(Parasitized)",
    buckets=tuple(np.round(np.linspace(0.1, 1.0, 10), 2)),
)
prediction_log_dropped_total = bentoml.metrics.Counter(
    name="malaria_prediction_log_dropped_total",
    documentation="Prediction log lines that could not be written (see the service log)",
)
smear_fields_total = bentoml.metrics.Counter(
    name="malaria_smear_fields_total",
    documentation="Smear fields analysed, by whether they could be counted",
    labelnames=["usable"],
)
smear_cells_total = bentoml.metrics.Counter(
    name="malaria_smear_cells_total",
    documentation="Counted red cells of smear fields, by label and decision",
    labelnames=["label", "decision"],
)
batch_size_histogram = bentoml.metrics.Histogram(
    name="malaria_batch_size",
    documentation="Images per model call (adaptive batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


@bentoml.service(
    resources=RESOURCES,
    workers=settings.workers,
    traffic={"timeout": settings.traffic_timeout_s},
    http={"cors": {"enabled": False}},
    logging={"access": {"enabled": settings.access_log}},
    tracing={} if settings.tracing else {"excluded_urls": [".*"]},
)
@(bentoml.asgi_app(page_app(), path=UI_PATH) if settings.ui else lambda service: service)
class MalariaClassifier:
    """Thin-smear cell crops in; Parasitized / Uninfected with a calibrated probability out."""

    bento_model = MODEL

    def __init__(self) -> None:
        from malaria.bento import load_runtime

        self.metadata = self.bento_model.info.metadata
        self.spec = ModelSpec.from_metadata(self.metadata).with_refer_band(settings.refer_band)
        self.field_spec = self.spec.for_fields()  # cells of smear fields: the field threshold and band
        self.version = str(self.metadata.get("mlflow_version") or self.bento_model.tag.version)
        if self.spec.synthetic:
            logger.warning("%s was trained on SYNTHETIC data: a demo, not for real samples", self.bento_model.tag)
        self.runtime = load_runtime(self.bento_model, settings)
        logger.info("serving %s with %s %s", self.bento_model.tag, self.runtime.runtime, self.runtime.precision)
        predict_fn = self.runtime.predict
        for size in (1, settings.max_batch_size):  # trace and warm up before /readyz turns green
            predict_fn(np.zeros((size, self.spec.image_size, self.spec.image_size, 3), np.float32))
        self.model = BatchedModel(
            predict_fn,
            batching=settings.batching,
            max_batch_size=settings.max_batch_size,
            max_latency_ms=settings.max_latency_ms,
            observe_batch=batch_size_histogram.observe,
        )
        log_dir, dropped = settings.prediction_log_dir, prediction_log_dropped_total.inc
        log_options = {
            "filenames": settings.prediction_log_filenames,
            "max_queued": settings.prediction_log_max_queued,
            "max_file_bytes": settings.prediction_log_max_file_mb * 1_000_000,
            "keep_days": settings.prediction_log_keep_days,
        }
        self.prediction_log = PredictionLog(log_dir, dropped, **log_options)
        self.field_log = PredictionLog(log_dir, dropped, "smear-fields", **log_options)
        self._reviews: ReviewStore | None = None
        try:
            self._review_store()
        except bentoml.exceptions.ServiceUnavailable as exc:  # classification does not wait for the review database
            logger.error("%s: /review answers 503 until it can be opened", exc)
        self.audit_rng = np.random.default_rng()
        self._limiters: dict[str, object] = {}  # created on the event loop, at first use

    def _limiter(self, kind: str):
        """Threads for CPU-bound request work, off the event loop: ``cells`` (decode and preprocess uploads)
        and ``fields`` (one smear field at a time), separate so a field never holds up a cell request."""
        if kind not in self._limiters:
            self._limiters[kind] = anyio.CapacityLimiter(CPU_THREADS[kind])
        return self._limiters[kind]

    @bentoml.on_shutdown
    def flush_prediction_log(self) -> None:
        self.prediction_log.close()
        self.field_log.close()

    def _start_answer(self, ctx: bentoml.Context) -> str:
        """The request id (echoed in X-Request-ID), and a warning header on every answer of a demo model."""
        request_id = new_request_id(ctx.request.headers)
        ctx.response.headers["X-Request-ID"] = request_id
        if self.spec.synthetic:
            ctx.response.headers["X-Model-Warning"] = SYNTHETIC_WARNING
        return request_id

    async def _run(self, images: list[ImageUpload], ctx: bentoml.Context) -> list[Prediction]:
        started = time.perf_counter()
        request_id = self._start_answer(ctx)
        if decodes_quickly(images):
            prepared = prepare_uploads(images, self.spec, settings)
        else:
            prepared = await anyio.to_thread.run_sync(
                prepare_uploads, images, self.spec, settings, limiter=self._limiter("cells")
            )
        outputs = await self.model(prepared.batch)
        probability = self.spec.probability_positive(outputs)
        predictions = make_predictions(probability, self.spec, self.version, request_id, prepared.names)
        for prediction in predictions:
            prediction.review = review_flag(prediction.decision, settings.review_audit_share, self.audit_rng)
            predictions_total.labels(label=prediction.label, decision=prediction.decision).inc()
            probability_histogram.observe(prediction.probability_parasitized)
        self.prediction_log.record(predictions, prepared, monotonic_ms(started))
        return predictions

    @bentoml.api
    async def predict(self, image: ImageUpload, ctx: bentoml.Context) -> Prediction:
        """Classify one cell image (multipart field ``image``)."""
        return (await self._run([image], ctx))[0]

    @bentoml.api
    async def classify(self, images: list[ImageUpload], ctx: bentoml.Context) -> list[Prediction]:
        """Classify several cell images (field ``images``), one prediction each, in order."""
        return await self._run(images, ctx)

    @bentoml.api
    async def batch_predict(self, images: list[ImageUpload], ctx: bentoml.Context) -> BatchResult:
        """Classify several cell images and summarise the counts per label and decision."""
        predictions = await self._run(images, ctx)
        return BatchResult(predictions=predictions, summary=summarize(predictions, self.spec))

    async def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        """P(parasitized) of many model inputs (a field's cells, occluded copies) through the shared batcher."""
        step = settings.max_batch_size  # the batcher's unit: these queue beside other callers' images
        chunks = [batch[i : i + step] for i in range(0, len(batch), step)]
        in_flight = asyncio.Semaphore(FIELD_CHUNKS_IN_FLIGHT)

        async def classify(chunk: np.ndarray) -> np.ndarray:
            async with in_flight:  # a big batch waits here, not in the batcher's queue (whose overflow is a 503)
                return await self.model(chunk)

        outputs = await asyncio.gather(*(classify(chunk) for chunk in chunks))
        return self.spec.probability_positive(np.concatenate(outputs)) if chunks else np.empty(0)

    def _review_store(self) -> ReviewStore:
        """The review database, opened (and migrated) at first need; a 503 while it cannot be."""
        if self._reviews is None:
            try:
                self._reviews = ReviewStore(settings.review_database_url(), settings.review_keep_days)
            except Exception as exc:  # noqa: BLE001 - any driver's error: the database is unavailable
                raise bentoml.exceptions.ServiceUnavailable(f"review database unavailable: {exc}") from exc
        return self._reviews

    def _cell_image(self, upload: ImageUpload, box: str | None, diameter: float) -> tuple[Image.Image, str]:
        """The cell the model sees: an uploaded crop as it is, or a field's cell (``box``) cut as fields are cut."""
        if box is None:
            return decode_cell(upload, settings), "crop"
        field = decode_field(upload, settings)
        x, y, w, h = (int(v) for v in box.split(","))
        try:
            return Image.fromarray(cell_at(np.asarray(field), (x, y, w, h), diameter)), "field"
        except FieldTooLargeError as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except CellNotFoundError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from exc

    async def _analyze_field(
        self, upload: ImageUpload, cell_diameter_px: float | None, pixel_size_um: float | None, ctx: bentoml.Context
    ) -> tuple[Image.Image, SmearAnalysis]:
        started = time.perf_counter()
        request_id = self._start_answer(ctx)
        diameter = expected_diameter(settings.smear_cell_diameter_px, cell_diameter_px, pixel_size_um)

        def prepare():
            image = decode_field(upload, settings)
            try:
                return image, prepare_field(image, self.spec, diameter, time.perf_counter)
            except FieldTooLargeError as exc:
                raise PayloadTooLarge(str(exc)) from exc

        image, field = await anyio.to_thread.run_sync(prepare, limiter=self._limiter("fields"))
        model_started = time.perf_counter()
        probability = await self._probabilities(field.batch)
        timing = SmearTiming(
            detect_ms=round(field.detect_ms, 2),
            crop_ms=round(field.crop_ms, 2),
            model_ms=round(monotonic_ms(model_started), 2),
            total_ms=round(monotonic_ms(started), 2),
        )
        analysis = summarise_field(
            field,
            probability,
            self.field_spec,
            cell_diameter_px=diameter,
            model_version=self.version,
            request_id=request_id,
            timing=timing,
            filename=upload.filename,
        )
        flag_for_review(analysis, settings.review_audit_share, self.audit_rng)
        smear_fields_total.labels(usable=str(analysis.usable).lower()).inc()
        for cell in analysis.cells:
            if not cell.edge:
                smear_cells_total.labels(label=cell.label, decision=cell.decision).inc()
        self.field_log.record_lines(
            [
                {
                    "request_id": request_id,
                    "model_version": self.version,
                    "filename": upload.filename,
                    "usable": analysis.usable,
                    "reason": analysis.reason,
                    "parasitemia_percent": analysis.parasitemia_percent,
                    **analysis.counts.model_dump(),
                    "image_size": analysis.image_size,
                    "cell_diameter_px": analysis.cell_diameter_px,
                    "latency_ms": timing.total_ms,
                }
            ]
        )
        return image, analysis

    @bentoml.api(route="/analyze_smear")
    async def analyze_smear(
        self,
        image: ImageUpload,
        ctx: bentoml.Context,
        cell_diameter_px: CellDiameter = None,
        pixel_size_um: PixelSize = None,
    ) -> SmearAnalysis:
        """Find, classify and count the red cells of one thin-smear field photograph (multipart field ``image``).

        ``cell_diameter_px`` (or ``pixel_size_um``) sets the expected red-cell size of this microscope;
        without either the server's default applies.
        """
        return (await self._analyze_field(image, cell_diameter_px, pixel_size_um, ctx))[1]

    @bentoml.api(route="/annotate_smear")
    async def annotate_smear(
        self,
        image: ImageUpload,
        ctx: bentoml.Context,
        cell_diameter_px: CellDiameter = None,
        pixel_size_um: PixelSize = None,
    ) -> Image.Image:
        """The same analysis drawn on the field: a PNG with each cell boxed in its decision's colour."""
        from starlette.responses import Response

        field_image, analysis = await self._analyze_field(image, cell_diameter_px, pixel_size_um, ctx)
        if analysis.parasitemia_percent is not None:
            ctx.response.headers["X-Parasitemia-Percent"] = str(analysis.parasitemia_percent)
        png = await anyio.to_thread.run_sync(annotated_png, field_image, analysis, limiter=self._limiter("fields"))
        return Response(png, media_type="image/png")  # encoded on the thread, not by BentoML on the event loop

    @bentoml.api(route="/explain")
    async def explain(
        self,
        image: ImageUpload,
        ctx: bentoml.Context,
        box: CellBox = None,
        cell_diameter_px: CellDiameter = None,
    ) -> Explanation:
        """Why the model answered as it did for one cell: an occlusion heatmap (model-agnostic).

        ``image`` is a cell crop; or a field with ``box`` ("x,y,width,height" of a cell ``/analyze_smear``
        answered), whose cell is cut as the field analysis cuts it and judged by the field rule.
        """
        request_id = self._start_answer(ctx)
        spec = self.spec if box is None else self.field_spec
        diameter = expected_diameter(settings.smear_cell_diameter_px, cell_diameter_px, None)
        patch, stride = grid(spec.image_size)

        def prepare():
            cell, _ = self._cell_image(image, box, diameter)
            return occlusion_batch(to_model_input(cell, spec), patch, stride)

        batch, positions = await anyio.to_thread.run_sync(prepare, limiter=self._limiter("fields"))
        probability = await self._probabilities(batch)
        heat = occlusion_map(probability, positions, spec.image_size, patch)
        return Explanation(
            **spec.answer(probability[0]),
            model_version=self.version,
            request_id=request_id,
            method="occlusion",
            patch_px=patch,
            stride_px=stride,
            heatmap=np.round(heat, 4).tolist(),
        )

    @bentoml.api(route="/review")
    async def review(
        self,
        image: ImageUpload,
        label: Literal["Parasitized", "Uninfected", "unsure"],
        reviewer: Annotated[str, AsText, Field(min_length=1, max_length=128, pattern=r"\S")],
        ctx: bentoml.Context,
        reason: Literal["refer", "clicked", "audit"] = "clicked",
        box: CellBox = None,
        cell_diameter_px: CellDiameter = None,
        request_id: ShortText = None,
        model_version: ShortText = None,
        model_label: ShortText = None,
        probability_parasitized: Annotated[float, Field(ge=0, le=1)] | None = None,
    ) -> ReviewStored:
        """Store a person's label for one cell of the review queue: the crop (content-addressed), who, when,
        and the model's answer. ``image`` and ``box`` as for ``/explain``."""
        self._start_answer(ctx)
        diameter = expected_diameter(settings.smear_cell_diameter_px, cell_diameter_px, None)

        def store() -> ReviewStored:
            cell, source = self._cell_image(image, box, diameter)
            buffer = io.BytesIO()
            cell.save(buffer, format="PNG")  # from pixels: no EXIF, no file name
            review_id, sha256 = self._review_store().add(
                buffer.getvalue(),
                label=label,
                reviewer=reviewer.strip(),
                reason=reason,
                source=source,
                model_label=model_label,
                probability_parasitized=probability_parasitized,
                model_version=model_version,
                request_id=request_id,
            )
            return ReviewStored(id=review_id, label=label, source=source, crop_sha256=sha256)

        return await anyio.to_thread.run_sync(store, limiter=self._limiter("fields"))

    @bentoml.api(route="/summarize_slide")
    def summarize_slide(
        self, fields: Annotated[list[FieldCounts], Field(min_length=1, max_length=MAX_SLIDE_FIELDS)]
    ) -> SlideSummary:
        """A slide from its fields as /analyze_smear counted them (JSON ``fields``: ``usable`` and ``counts``
        each): the usable fields pooled, the parasitemia with its Wilson interval, flagged when counted on
        fewer red cells than ``MALARIA_SMEAR_MIN_SLIDE_CELLS``. The lab page and ``malaria smear analyze``
        share this rule."""
        counted = [field.model_dump() for field in fields]
        return SlideSummary(**summarise_slide(counted, settings.smear_min_slide_cells))

    @bentoml.api(route="/model_info")
    def model_info(self) -> ModelInfo:
        """The served model: tag, MLflow version and run, metrics, input size, classes, threshold."""
        return ModelInfo(
            bento_model=str(self.bento_model.tag),
            registered_model=self.bento_model.info.labels.get("registered_model"),
            mlflow_version=self.metadata.get("mlflow_version"),
            mlflow_run_id=self.metadata.get("mlflow_run_id"),
            metrics=self.metadata.get("metrics", {}),
            image_size=self.spec.image_size,
            class_names=self.spec.class_names,
            positive_class=self.spec.positive_class,
            threshold=self.spec.threshold,
            refer_band=self.spec.refer_band,
            temperature=self.spec.temperature,
            training_sources=self.spec.training_sources,
            field_threshold=self.field_spec.threshold,
            field_refer_band=self.field_spec.refer_band,
            runtime=self.runtime.runtime,
            precision=self.runtime.precision,
        )


FORM_OVERHEAD_BYTES = 1_000_000  # multipart headers and boundaries, generously
JSON_BODY_BYTES = 1_000_000  # a route without a file: /summarize_slide's 1,000 fields are about 100 KB
LIST_BODY_BYTES = settings.max_image_bytes * settings.max_images_per_request + FORM_OVERHEAD_BYTES
# Starlette runs the first added outermost: auth answers before any limit is disclosed.
MalariaClassifier.add_asgi_middleware(
    BearerAuthMiddleware, token=settings.api_token, metrics_token=settings.metrics_token
)
MalariaClassifier.add_asgi_middleware(
    BodyLimitMiddleware,
    max_body_bytes=JSON_BODY_BYTES,  # every other route, and any path no route serves
    body_limits={
        "/predict": settings.max_image_bytes + FORM_OVERHEAD_BYTES,
        "/classify": LIST_BODY_BYTES,
        "/batch_predict": LIST_BODY_BYTES,
        "/analyze_smear": settings.max_smear_bytes + FORM_OVERHEAD_BYTES,
        "/annotate_smear": settings.max_smear_bytes + FORM_OVERHEAD_BYTES,
        "/explain": settings.max_smear_bytes + FORM_OVERHEAD_BYTES,
        "/review": settings.max_smear_bytes + FORM_OVERHEAD_BYTES,
    },
)
MalariaClassifier.add_asgi_middleware(ConnectionRecycleMiddleware, max_requests=settings.max_requests_per_connection)
