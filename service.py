"""BentoML service: malaria cell classification with adaptive batching.

``MalariaClassifier`` checks uploads, decodes and preprocesses them, and sends every request's
images through BentoML's adaptive-batching dispatcher to the Keras model in the same process, so
concurrent single-image ``/predict`` calls are batched together (``malaria_batch_size`` in
``/metrics``) without a round trip to another process.
"""

from __future__ import annotations

import logging
import time

import bentoml
import numpy as np

from malaria.config import get_settings
from malaria.serving import (
    BatchedModel,
    BatchResult,
    ConnectionRecycleMiddleware,
    ImageUpload,
    ModelInfo,
    Prediction,
    PredictionLog,
    RequestGuardMiddleware,
    harden_multipart_parsing,
    make_predictions,
    monotonic_ms,
    new_request_id,
    prepare_uploads,
    summarize,
)
from malaria.spec import ModelSpec

logger = logging.getLogger(__name__)
settings = get_settings()
harden_multipart_parsing()
MODEL = bentoml.models.BentoModel(f"{settings.bento_model_name}:latest")
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
class MalariaClassifier:
    """Thin-smear cell crops in; Parasitized / Uninfected with a calibrated probability out."""

    bento_model = MODEL

    def __init__(self) -> None:
        import tensorflow as tf

        from malaria.bento import load_stored_keras
        from malaria.model import compiled_predict

        tf.config.threading.set_intra_op_parallelism_threads(settings.tf_intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(settings.tf_inter_op_threads)
        gpus = tf.config.list_physical_devices("GPU")
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        if settings.gpu and not gpus:
            logger.warning("MALARIA_GPU=true but TensorFlow sees no GPU: running on the CPU (see `make bento-gpu`)")
        self.metadata = self.bento_model.info.metadata
        self.spec = ModelSpec.from_metadata(self.metadata).with_refer_band(settings.refer_band)
        self.version = str(self.metadata.get("mlflow_version") or self.bento_model.tag.version)
        predict_fn = compiled_predict(load_stored_keras(self.bento_model))
        for size in (1, settings.max_batch_size):  # trace and warm up before /readyz turns green
            predict_fn(np.zeros((size, self.spec.image_size, self.spec.image_size, 3), np.float32))
        self.model = BatchedModel(
            predict_fn,
            batching=settings.batching,
            max_batch_size=settings.max_batch_size,
            max_latency_ms=settings.max_latency_ms,
            observe_batch=batch_size_histogram.observe,
        )
        self.prediction_log = PredictionLog(settings.prediction_log_dir, prediction_log_dropped_total.inc)

    @bentoml.on_shutdown
    def flush_prediction_log(self) -> None:
        self.prediction_log.close()

    async def _run(self, images: list[ImageUpload], ctx: bentoml.Context) -> list[Prediction]:
        started = time.perf_counter()
        request_id = new_request_id(ctx.request.headers)
        ctx.response.headers["X-Request-ID"] = request_id
        prepared = prepare_uploads(images, self.spec, settings)
        outputs = await self.model(prepared.batch)
        probability = self.spec.probability_positive(outputs)
        predictions = make_predictions(probability, self.spec, self.version, request_id, prepared.names)
        for prediction in predictions:
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
        )


FORM_OVERHEAD_BYTES = 1_000_000  # multipart headers and boundaries, generously
MalariaClassifier.add_asgi_middleware(
    RequestGuardMiddleware,
    token=settings.api_token,
    max_body_bytes=settings.max_image_bytes * settings.max_images_per_request + FORM_OVERHEAD_BYTES,
    body_limits={"/predict": settings.max_image_bytes + FORM_OVERHEAD_BYTES},
)
MalariaClassifier.add_asgi_middleware(ConnectionRecycleMiddleware, max_requests=settings.max_requests_per_connection)
