"""MLflow tracking and registry: log runs, register versions, guard the ``champion`` alias."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from malaria.config import Settings
from malaria.spec import ModelSpec

logger = logging.getLogger(__name__)

KERAS_MODEL_NAME = "keras"  # the bare Keras flavour, logged beside the registered pipeline in every run

SPEC_TAG = "malaria.spec"
VALIDATION_SET_TAG = "malaria.validation_set"  # which images the version's validation metrics were measured on
SPLIT_TAG = "malaria.split"  # which images were in which split when the version was trained


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (no champion, unusable model, ...)."""


@dataclass
class RegisteredVersion:
    """One registered model version and what consumers need from it."""

    name: str
    version: str
    run_id: str | None
    spec: ModelSpec
    metrics: dict[str, float]
    is_champion: bool
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def client(settings: Settings):
    """An MLflow client on the configured store; creates the experiment if needed.

    With a local store (SQLite, files) its artifacts go to ``mlflow_artifact_root``; with a tracking
    server, to the server's artifact store, so that every client of the server can read them.
    """
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if mlflow.get_experiment_by_name(settings.experiment_name) is None:
        if settings.mlflow_tracking_uri.startswith(("http://", "https://")):
            mlflow.create_experiment(settings.experiment_name)
        else:
            root = settings.mlflow_artifact_root.resolve()
            root.mkdir(parents=True, exist_ok=True)
            mlflow.create_experiment(settings.experiment_name, artifact_location=root.as_uri())
    mlflow.set_experiment(settings.experiment_name)
    return mlflow.MlflowClient()


def _signature(spec: ModelSpec):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.image_size, spec.image_size, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1 if spec.output == "sigmoid" else 2))]),
    )


def _example_png(spec: ModelSpec) -> bytes:
    """A black cell-sized PNG: the pipeline's logged input example."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (spec.image_size, spec.image_size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _without_nan(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow and the champion gate take no NaN (a metric undefined on a one-class split)."""
    return {k: v for k, v in metrics.items() if v == v}


@dataclass
class TrainingRun:
    """What a run logs beside its model (parameters, final metrics, per-epoch history, artifacts, run
    tags), and the tags its registered version gets (e.g. which images it was split on)."""

    params: dict = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[float]] = field(default_factory=dict)
    artifacts_dir: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)
    version_tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ChampionGate:
    """How a new version is judged against ``champion``: on which validation images, and how to score a
    champion validated on other images on these (``force`` moves the alias regardless)."""

    validation_set: str | None = None
    rescore_champion: Callable[[RegisteredVersion], float] | None = None
    force: bool = False


def log_run(
    model, spec: ModelSpec, settings: Settings, run: TrainingRun, reference_images: np.ndarray | None = None
) -> tuple[str, str]:
    """Log one MLflow run: params, metrics, history, artifacts, the spec, the bare Keras model and the
    pipeline model; returns the run id and the pipeline's model URI (not registered yet).

    ``reference_images`` (preprocessed) are saved with their outputs for the import's conversion gate.
    """
    import mlflow

    from malaria.pyfunc import log_pipeline

    client(settings)  # the tracking store and experiment
    metrics = _without_nan(run.metrics)
    with mlflow.start_run(tags=run.tags or None) as active:
        if run.params:
            mlflow.log_params(run.params)
        for key, values in run.history.items():
            for step, value in enumerate(values):
                mlflow.log_metric(
                    key.replace("val_", "epoch_val_") if key.startswith("val_") else f"epoch_{key}",
                    float(value),
                    step=step,
                )
        if metrics:
            mlflow.log_metrics(metrics)
        if run.artifacts_dir is not None and run.artifacts_dir.is_dir():
            mlflow.log_artifacts(str(run.artifacts_dir), artifact_path="training_artifacts")
        mlflow.log_dict(spec.model_dump(mode="json"), "model_spec.json")
        # The Keras flavour for whoever wants the bare network (tensors in, raw sigmoid out); the
        # registered version is the pipeline, which answers like the service (malaria/pyfunc.py).
        mlflow.keras.log_model(model, name=KERAS_MODEL_NAME, signature=_signature(spec))
        info = log_pipeline(model, spec, None, _example_png(spec), reference_images=reference_images)
    return active.info.run_id, info.model_uri


def register_version(
    settings: Settings,
    model_uri: str,
    run_id: str,
    spec: ModelSpec,
    metrics: dict[str, float],
    version_tags: dict[str, str] | None = None,
) -> RegisteredVersion:
    """Register a logged pipeline model as a new version, its spec and ``version_tags`` as version tags."""
    import mlflow

    name = settings.registered_model_name
    mlflow_client = client(settings)
    version = str(mlflow.register_model(model_uri, name).version)
    tags = {SPEC_TAG: spec.to_json(), **(version_tags or {})}
    for key, tag in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, tag)
    return RegisteredVersion(name, version, run_id, spec, _without_nan(metrics), False, tags)


def log_register_and_gate(
    model,
    spec: ModelSpec,
    settings: Settings,
    run: TrainingRun,
    gate: ChampionGate,
    reference_images: np.ndarray | None = None,
) -> RegisteredVersion:
    """The three steps of a new model: log the run, register the version, promote it if it passes the gate."""
    run_id, model_uri = log_run(model, spec, settings, run, reference_images)
    version_tags = dict(run.version_tags)
    if gate.validation_set is not None:
        version_tags[VALIDATION_SET_TAG] = gate.validation_set
    record = register_version(settings, model_uri, run_id, spec, run.metrics, version_tags)
    record.is_champion = promote_if_better(
        settings, record.version, record.metrics, gate.force, gate.validation_set, gate.rescore_champion
    )
    return record


def champion_version(settings: Settings) -> str | None:
    """The version the champion alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client(settings).get_model_version_by_alias(settings.registered_model_name, settings.champion_alias)
    except MlflowException:
        return None
    return str(mv.version)


def promote_if_better(
    settings: Settings,
    version: str,
    metrics: dict[str, float],
    force: bool = False,
    validation_set: str | None = None,
    rescore_champion: Callable[[RegisteredVersion], float] | None = None,
) -> bool:
    """Point ``champion`` at ``version`` if it is at least as good on validation (or ``force``).

    Scores measured on different images do not compare: a champion validated on other images than
    ``validation_set`` (another data set, split or cap) is scored again with ``rescore_champion``.
    """
    mlflow_client = client(settings)
    current = champion_version(settings)
    new_score = metrics.get(settings.gate_metric)
    if current is not None and not force:
        champion = get_version(settings, current)
        old_score = champion.metrics.get(settings.gate_metric)
        if rescore_champion is not None and champion.tags.get(VALIDATION_SET_TAG) != validation_set:
            gate = settings.gate_metric
            try:
                rescored = rescore_champion(champion)
            except Exception as exc:  # noqa: BLE001 - the new version is registered: report, don't stop
                logger.warning("champion v%s could not be scored on this version's validation set: %s", current, exc)
            else:
                if math.isnan(rescored):
                    logger.warning("champion v%s has no %s on this version's validation images", current, gate)
                else:
                    old_score = rescored
                    logger.info("champion v%s, validated on other images: %s %.4f on these", current, gate, rescored)
        if old_score is not None and (new_score is None or new_score < old_score):
            logger.info(
                "version %s not promoted: %s %.4f < champion v%s %.4f (use --force to override)",
                version,
                settings.gate_metric,
                new_score or float("nan"),
                current,
                old_score,
            )
            return False
    mlflow_client.set_registered_model_alias(settings.registered_model_name, settings.champion_alias, version)
    logger.info("version %s is now @%s (was %s)", version, settings.champion_alias, current or "none")
    return True


def set_champion(settings: Settings, version: str) -> str | None:
    """Point ``champion`` at a registered ``version`` without the gate (a rollback); returns the previous one."""
    from mlflow.exceptions import MlflowException

    previous = champion_version(settings)
    mlflow_client = client(settings)
    try:
        mlflow_client.get_model_version(settings.registered_model_name, version)
    except MlflowException as exc:
        raise RegistryError(f"{settings.registered_model_name} has no version {version!r}") from exc
    mlflow_client.set_registered_model_alias(settings.registered_model_name, settings.champion_alias, version)
    logger.info("@%s moved by hand: version %s -> %s", settings.champion_alias, previous or "none", version)
    return previous


def get_version(settings: Settings, version: str | None = None) -> RegisteredVersion:
    """A registered version (default: the champion) with its spec and run metrics."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow_client = client(settings)
    name = settings.registered_model_name
    try:
        if version is None:
            mv = mlflow_client.get_model_version_by_alias(name, settings.champion_alias)
        else:
            mv = mlflow_client.get_model_version(name, str(version))
    except MlflowException as exc:
        what = f"@{settings.champion_alias}" if version is None else f"version {version}"
        raise RegistryError(
            f"no {what} of {name!r} in {settings.mlflow_tracking_uri}: run `malaria train` "
            "(or `malaria register --model FILE`) first"
        ) from exc
    if SPEC_TAG in mv.tags:
        spec = ModelSpec.model_validate_json(mv.tags[SPEC_TAG])
    else:
        spec = ModelSpec.from_metadata(mlflow.models.get_model_info(f"models:/{name}/{mv.version}").metadata or {})
    metrics = dict(mlflow_client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    aliases = set(getattr(mv, "aliases", []) or [])
    return RegisteredVersion(
        name, str(mv.version), mv.run_id, spec, metrics, settings.champion_alias in aliases, dict(mv.tags)
    )


def update_spec(settings: Settings, version: str, spec: ModelSpec) -> None:
    """Record a revised spec (e.g. a threshold chosen on validation data) for one version."""
    client(settings).set_model_version_tag(settings.registered_model_name, str(version), SPEC_TAG, spec.to_json())


def keras_file(model_dir: Path) -> Path:
    """The ``.keras`` file inside a stored MLflow model: the pipeline's artifact, or a Keras flavour's data."""
    files = sorted(Path(model_dir).glob("artifacts/*.keras")) or sorted(Path(model_dir).glob("data/*.keras"))
    if not files:
        raise RegistryError(f"no .keras file in {model_dir}: was it logged by `malaria train` or `malaria register`?")
    return files[0]


def load_keras_model(settings: Settings, version: str | None = None):
    """The native Keras model of a registered version (default: champion) and its record."""
    import keras
    import mlflow

    record = get_version(settings, version)
    model_dir = Path(mlflow.artifacts.download_artifacts(record.uri, tracking_uri=settings.mlflow_tracking_uri))
    return keras.saving.load_model(keras_file(model_dir), compile=False, safe_mode=True), record


def check_keras_model(path: Path, class_names: list[str], sigmoid_class: str | None):
    """Load a Keras file in safe mode and check its input and output; returns (model, spec)."""
    import keras

    if not path.is_file():
        raise RegistryError(f"model file {path} not found")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure means the file cannot be used
        raise RegistryError(f"{path} does not load as a Keras model in safe mode: {exc}") from exc
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2] or shape[1] is None:
        raise RegistryError(f"model input must be a square HxWx3 image, got {shape}")
    units = model.output_shape[-1]
    if units not in (1, 2):
        raise RegistryError(f"model output must have 1 (sigmoid) or 2 (softmax) units, got {units}")
    from pydantic import ValidationError

    try:
        spec = ModelSpec(
            image_size=int(shape[1]),
            class_names=class_names,
            output="sigmoid" if units == 1 else "softmax",
            sigmoid_class=(sigmoid_class or class_names[0]) if units == 1 else None,
        )
    except ValidationError as exc:
        problems = "; ".join(error["msg"] for error in exc.errors())
        raise RegistryError(
            f"labels {class_names} (sigmoid class {sigmoid_class}) do not fit the contract: {problems}"
        ) from None
    probe = model(np.zeros((2, *shape[1:]), dtype=np.float32), training=False)
    if not np.all(np.isfinite(np.asarray(probe))):
        raise RegistryError("model output on a blank image is not finite")
    return model, spec


def read_label_sidecar(model_path: Path) -> dict | None:
    """Labels next to a model file: ``<model>.labels.json`` with ``class_names`` (and ``sigmoid_class``)."""
    sidecar = model_path.with_suffix(".labels.json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else None


def reference_features(settings: Settings, version: str | None = None):
    """The drift reference (training-image features) saved with a version's training run."""
    import mlflow
    import pandas as pd

    record = get_version(settings, version)
    if record.run_id is None:
        raise RegistryError(f"version {record.version} has no run, so no reference features")
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=record.run_id, artifact_path="training_artifacts/reference_features.csv"
        )
    except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise RegistryError(
            f"version {record.version} has no training_artifacts/reference_features.csv (registered from outside?)"
        ) from exc
    return pd.read_csv(path)
