"""BentoML model store: import the MLflow champion with its spec and lineage as metadata."""

from __future__ import annotations

import logging
from pathlib import Path

from malaria.config import Settings
from malaria.registry import get_version, keras_file
from malaria.spec import ModelSpec

logger = logging.getLogger(__name__)


def import_model(settings: Settings, version: str | None = None):
    """Import ``models:/NAME@champion`` (or a version) into the BentoML store; returns the stored model."""
    import bentoml
    import mlflow

    record = get_version(settings, version)
    uri = f"models:/{record.name}@{settings.champion_alias}" if version is None else record.uri
    metadata = {
        "spec": record.spec.model_dump(mode="json", exclude_none=True),  # BentoML metadata takes no None
        "mlflow_model_uri": uri,
        "mlflow_version": record.version,
        "mlflow_run_id": record.run_id,
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "metrics": {k: round(v, 6) for k, v in record.metrics.items() if k.startswith(("val_", "test_"))},
    }
    labels = {
        "registered_model": record.name,
        "mlflow_version": record.version,
        "champion": str(record.is_champion).lower(),
        "image_size": str(record.spec.image_size),
    }
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    stored = bentoml.mlflow.import_model(
        settings.bento_model_name,
        model_uri=uri,
        labels=labels,
        metadata=metadata,
    )
    tag = stored.tag
    logger.info("imported %s (MLflow %s v%s) into the BentoML store as %s", uri, record.name, record.version, tag)
    return bentoml.models.get(tag)


def stored_spec(bento_model) -> ModelSpec:
    """The spec saved with a BentoML model."""
    return ModelSpec.from_metadata(bento_model.info.metadata)


def load_stored_keras(bento_model):
    """The native Keras model inside a stored MLflow model, loaded in Keras' safe mode.

    Reading the ``.keras`` file directly skips the pyfunc wrapper and keeps MLflow out of the
    serving image.
    """
    import keras

    return keras.saving.load_model(keras_file(Path(bento_model.path_of("mlflow_model"))), compile=False, safe_mode=True)
