"""BentoML model store: import the champion with its spec, lineage and gated OpenVINO copy; load what is served."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from malaria.config import Settings
from malaria.registry import get_version, keras_file
from malaria.runtime import (
    CALIBRATION_IMAGES,
    IR_FILES,
    OPENVINO_DIR,
    REFERENCE_FILE,
    LoadedRuntime,
    Reference,
    choose_precision,
    convert_and_gate,
    cpu_capabilities,
    load_reference_batch,
    openvino_predict,
)
from malaria.spec import ModelSpec

logger = logging.getLogger(__name__)
MLFLOW_MODEL_DIR = "mlflow_model"  # the registered version's files, as MLflow stores them


def without_credentials(uri: str) -> str:
    """A tracking URI without the user, password, query or fragment a credential may ride in."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri  # a file path or sqlite:///path
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def import_model(settings: Settings, version: str | None = None, openvino: bool = True):
    """Import ``models:/NAME@champion`` (or a version) into the BentoML store; returns the stored model.

    With ``openvino`` the model is also converted for OpenVINO and gated (``malaria/runtime.py``);
    a conversion that fails its gate raises ``ConversionError`` before anything is stored.
    """
    import bentoml
    import mlflow

    record = get_version(settings, version)
    uri = f"models:/{record.name}@{settings.champion_alias}" if version is None else record.uri
    metadata = {
        "spec": record.spec.model_dump(mode="json", exclude_none=True),  # BentoML metadata takes no None
        "mlflow_model_uri": uri,
        "mlflow_version": record.version,
        "mlflow_run_id": record.run_id,
        "mlflow_tracking_uri": without_credentials(settings.mlflow_tracking_uri),  # the metadata ships in images
        "metrics": {k: round(v, 6) for k, v in record.metrics.items() if k.startswith(("val_", "test_"))},
    }
    labels = {
        "registered_model": record.name,
        "mlflow_version": record.version,
        "champion": str(record.is_champion).lower(),
        "image_size": str(record.spec.image_size),
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                uri, dst_path=f"{tmp}/mlflow", tracking_uri=settings.mlflow_tracking_uri
            )
        )
        converted = Path(tmp) / OPENVINO_DIR
        if openvino:
            metadata["runtime"] = _convert(settings, record.spec, model_dir, converted)
        with bentoml.models.create(
            settings.bento_model_name, labels=labels, metadata=metadata, module=__name__
        ) as stored:
            shutil.copytree(model_dir, stored.path_of(MLFLOW_MODEL_DIR))
            if openvino:
                shutil.copytree(converted, stored.path_of(OPENVINO_DIR))
    logger.info(
        "imported %s (MLflow %s v%s) into the BentoML store as %s", uri, record.name, record.version, stored.tag
    )
    return bentoml.models.get(stored.tag)


def _convert(settings: Settings, spec: ModelSpec, model_dir: Path, out_dir: Path) -> dict:
    """Convert the version's Keras file for OpenVINO and run the gates; the record for the metadata."""
    import keras

    from malaria.model import compiled_predict

    keras_model = keras.saving.load_model(keras_file(model_dir), compile=False, safe_mode=True)
    reference, calibration = gate_reference(settings, spec, model_dir)
    return convert_and_gate(
        compiled_predict(keras_model), keras_model, spec, out_dir, reference, calibration, settings.tf_intra_op_threads
    )


def gate_reference(settings: Settings, spec: ModelSpec, model_dir: Path) -> tuple[Reference, np.ndarray | None]:
    """What the gates run on: the labelled test split (and training images to calibrate int8) where the
    data is here; else the batch saved with the version at training time; else generated images."""
    from malaria.data import SMEAR, DataError, read_manifest, source_roots
    from malaria.train import load_split

    try:
        manifest = read_manifest(settings.splits_path)
        roots = source_roots(settings, allow_download=False)
        test = load_split(manifest, roots, "test", spec, None, settings.seed)
        train = load_split(manifest, roots, "train", spec, CALIBRATION_IMAGES, settings.seed)
    except (DataError, OSError, ValueError, KeyError) as exc:
        logger.info("no evaluation images for the import's gates (%s)", exc)
    else:
        smear = (test.frame["source"] == SMEAR).to_numpy()
        origin = f"the test split ({len(test.labels)} images)"
        return Reference(test.images, origin, labels=test.labels, smear=smear), train.images
    saved = sorted(model_dir.glob(f"artifacts/{REFERENCE_FILE}"))
    if saved:
        return load_reference_batch(saved[0]), None
    logger.warning("no test split and no saved reference batch: the conversion gate runs on generated images")
    images = np.random.default_rng(0).random((32, spec.image_size, spec.image_size, 3), dtype=np.float32)
    return Reference(images, "32 generated images (no test split, no saved batch)"), None


def stored_spec(bento_model) -> ModelSpec:
    """The spec saved with a BentoML model."""
    return ModelSpec.from_metadata(bento_model.info.metadata)


def load_stored_keras(bento_model):
    """The native Keras model inside a stored MLflow model, loaded in Keras' safe mode.

    Reading the ``.keras`` file directly skips the pyfunc wrapper and keeps MLflow out of the
    serving image.
    """
    import keras

    return keras.saving.load_model(
        keras_file(Path(bento_model.path_of(MLFLOW_MODEL_DIR))), compile=False, safe_mode=True
    )


def load_runtime(bento_model, settings: Settings) -> LoadedRuntime:
    """The served inference call for ``MALARIA_RUNTIME`` and ``MALARIA_PRECISION``.

    ``auto``: OpenVINO when the stored model carries its gated conversion, at the gated default
    precision; TensorFlow with a GPU (``MALARIA_GPU``) or for a model imported without a conversion.
    """
    record = bento_model.info.metadata.get("runtime")
    runtime = settings.runtime
    if runtime == "auto":
        runtime = "openvino" if record and not settings.gpu else "tensorflow"
    if runtime == "openvino":
        if not record:
            raise ValueError(
                f"MALARIA_RUNTIME=openvino but {bento_model.tag} has no OpenVINO copy: import it again "
                "with `malaria import-model`"
            )
        chosen = choose_precision(record, settings.precision, cpu_capabilities())
        ir = Path(bento_model.path_of(OPENVINO_DIR)) / IR_FILES[chosen]
        return LoadedRuntime(openvino_predict(ir, chosen, settings.tf_intra_op_threads), "openvino", chosen)
    if settings.precision not in ("auto", "fp32"):
        raise ValueError(f"MALARIA_PRECISION={settings.precision} needs the OpenVINO runtime")
    try:
        configure_tensorflow(settings)
    except ModuleNotFoundError as exc:  # the default image carries OpenVINO only
        raise RuntimeError(
            f"MALARIA_RUNTIME=tensorflow (or a model imported without its OpenVINO copy) needs TensorFlow, "
            f"which this installation lacks ({exc}): import the model with `malaria import-model`, or build "
            "an image with requirements/tensorflow.txt (`make bento-gpu`)"
        ) from exc
    from malaria.model import compiled_predict

    return LoadedRuntime(compiled_predict(load_stored_keras(bento_model)), "tensorflow", "fp32")


def configure_tensorflow(settings: Settings) -> None:
    """Threads and GPU memory growth, before TensorFlow builds anything (imported only for its runtime)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(settings.tf_intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(settings.tf_inter_op_threads)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if settings.gpu and not gpus:
        logger.warning("MALARIA_GPU=true but TensorFlow sees no GPU: running on the CPU (see `make bento-gpu`)")
