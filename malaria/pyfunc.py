"""The MLflow pyfunc that answers like the service: image bytes or paths in, ``/predict``'s fields out.

It is what a registered version is (``models:/malaria-classifier@champion``), with the Keras file inside
it, so ``mlflow models serve``, ``mlflow.pyfunc.load_model`` and ``mlflow.pyfunc.spark_udf`` answer like
the Bento: the ONE preprocessing function, the served inference call, and the version's spec as the
registry holds it. Evaluation sets the threshold and refer band *after* registration (as a version
tag), so at load the model looks its spec and version up by its run id; the spec frozen into the model
at training is the fallback where no registry is reachable. ``model_config={"spec": ..., "model_version":
...}`` overrides both (Spark executors get them from the driver and never touch the registry).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from malaria.model import batched_probability, compiled_predict
from malaria.preprocess import InvalidImageError, preprocess
from malaria.spec import ModelSpec

logger = logging.getLogger(__name__)

KERAS_ARTIFACT = "keras_model"
SPEC_ARTIFACT = "spec"
REFERENCE_ARTIFACT = "reference_batch"  # the conversion gate's fallback (malaria/runtime.py)
INPUT_COLUMNS = ("image", "path")  # image bytes, or a path the scoring process can read
OUTPUT_COLUMNS = ["label", "probability_parasitized", "confidence", "decision", "model_version", "error"]
BATCH_SIZE = 64


def _read(source) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | Path):
        path = Path(str(source).removeprefix("file:"))
        try:
            return path.read_bytes()
        except OSError as exc:
            raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    raise InvalidImageError(f"expected image bytes or a path, got {type(source).__name__}")


def score_images(sources: list, predict_fn, spec: ModelSpec, model_version: str, max_pixels: int) -> pd.DataFrame:
    """One row per source, in order: the answer of ``/predict``, or ``error`` for an unreadable image."""
    rows: list[dict] = [{} for _ in sources]
    good: list[int] = []
    batch = np.empty((len(sources), spec.image_size, spec.image_size, 3), dtype=np.float32)
    for i, source in enumerate(sources):
        try:
            batch[len(good)] = preprocess(_read(source), spec, max_pixels=max_pixels)
            good.append(i)
        except InvalidImageError as exc:
            rows[i] = {"error": str(exc)}
    probability = batched_probability(predict_fn, batch[: len(good)], spec, BATCH_SIZE)
    for i, p in zip(good, probability, strict=True):
        rows[i] = {**spec.answer(p), "model_version": model_version, "error": None}
    return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def registry_spec(tracking_uri: str, run_id: str) -> tuple[ModelSpec, str] | None:
    """The spec and version registered from ``run_id`` (the newest, if several), or None."""
    from mlflow import MlflowClient

    from malaria.registry import SPEC_TAG

    versions = MlflowClient(tracking_uri).search_model_versions(f"run_id = '{run_id}'")
    tagged = [v for v in versions if SPEC_TAG in (v.tags or {})]
    if not tagged:
        return None
    newest = max(tagged, key=lambda v: int(v.version))
    return ModelSpec.model_validate_json(newest.tags[SPEC_TAG]), str(newest.version)


class MalariaPipeline(PythonModel):
    """``predict(DataFrame[image: bytes | path: str]) -> DataFrame[label, probability_parasitized, ...]``."""

    def load_context(self, context) -> None:
        import keras
        import mlflow
        import tensorflow as tf
        from mlflow.models import Model

        from malaria.config import Settings

        settings = Settings()  # the service's limits and threads (one TensorFlow thread per Spark task by default)
        self.max_pixels, self.max_field_pixels = settings.max_image_pixels, settings.max_smear_pixels
        threads = settings.tf_intra_op_threads
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already started in this process: keep its threads
            pass
        config = dict(context.model_config or {})
        keras_path = Path(context.artifacts[KERAS_ARTIFACT])
        self.spec = ModelSpec.model_validate_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        run_id = Model.load(keras_path.parent.parent / "MLmodel").run_id
        self.model_version = f"run-{run_id}"
        if config.get("spec"):
            raw = config["spec"]
            self.spec = ModelSpec.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
            self.model_version = str(config.get("model_version", self.model_version))
        elif run_id:
            try:
                found = registry_spec(mlflow.get_tracking_uri(), run_id)
            except Exception as exc:  # noqa: BLE001 - no registry here: the frozen spec answers
                logger.warning("registry not reachable (%s): serving the spec frozen at training", exc)
                found = None
            if found:
                self.spec, self.model_version = found
        self.predict_fn = compiled_predict(keras.saving.load_model(keras_path, compile=False, safe_mode=True))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Score a DataFrame with an ``image`` column (bytes) or a ``path`` column."""
        frame = pd.DataFrame(model_input)
        column = next((c for c in INPUT_COLUMNS if c in frame and frame[c].notna().any()), None)
        if column is None:
            raise ValueError(f"expected a column named one of {INPUT_COLUMNS}, got {list(frame.columns)}")
        return score_images(list(frame[column]), self.predict_fn, self.spec, self.model_version, self.max_pixels)


def signature():
    """Input: ``image`` (bytes) or ``path`` (string); output: the answer's columns."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "probability_parasitized"),
                ColSpec("double", "confidence"),
                ColSpec("string", "decision"),
                ColSpec("string", "model_version"),
                ColSpec("string", "error", required=False),
            ]
        ),
    )


def serving_requirements() -> list[str]:
    """The pipeline's pinned requirements: serving's and TensorFlow's (the repo's files, else the installed
    package's metadata)."""
    from importlib.metadata import requires

    folder = Path(__file__).resolve().parent.parent / "requirements"
    files = [folder / "serving.txt", folder / "tensorflow.txt"]
    if all(path.is_file() for path in files):
        lines = [line.strip() for path in files for line in path.read_text().splitlines()]
        return [line for line in lines if line and not line.startswith("#")]
    return [r for r in requires("malaria-bento") or [] if "extra ==" not in r]


def log_pipeline(
    keras_model,
    spec: ModelSpec,
    registered_model_name: str | None,
    input_example: bytes | None = None,
    reference_images: np.ndarray | None = None,
):
    """Log the pipeline model (Keras file and spec inside) in the active run; returns MLflow's ModelInfo.

    ``reference_images`` (preprocessed) are saved with the outputs Keras gives them now: where no
    evaluation images exist, the import's conversion gate checks the converted model against them.
    """
    import tempfile

    import keras
    import mlflow

    from malaria.runtime import REFERENCE_FILE, reference_batch

    pip = serving_requirements() + [f"mlflow=={mlflow.__version__}", "pandas"]
    with tempfile.TemporaryDirectory() as tmp:
        keras_path = Path(tmp) / "model.keras"
        keras.saving.save_model(keras_model, keras_path)
        spec_path = Path(tmp) / "model_spec.json"
        spec_path.write_text(spec.to_json())
        artifacts = {KERAS_ARTIFACT: str(keras_path), SPEC_ARTIFACT: str(spec_path)}
        if reference_images is not None and len(reference_images):
            expected = compiled_predict(keras_model)(reference_images)
            artifacts[REFERENCE_ARTIFACT] = str(reference_batch(reference_images, expected, Path(tmp) / REFERENCE_FILE))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=MalariaPipeline(),
            artifacts=artifacts,
            signature=signature(),
            input_example=pd.DataFrame({"image": [input_example]}) if input_example else None,
            pip_requirements=pip,
            metadata={"spec": spec.model_dump(mode="json")},
            model_config={"spec": "", "model_version": ""},  # set at load to override the registry lookup
            registered_model_name=registered_model_name,
        )
