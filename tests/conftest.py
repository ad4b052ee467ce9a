"""Shared fixtures: generated data, isolated MLflow/BentoML stores, one tiny trained champion."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Stores must be isolated before bentoml or mlflow are imported anywhere.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="malaria-tests-"))
os.environ["BENTOML_HOME"] = str(_SESSION_DIR / "bentoml")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# No MALARIA_* setting of the calling shell leaks into the tests (or the servers they start); the
# real-data folders are kept for the real-data tests only.
REAL_DATA_DIR = os.environ.get("MALARIA_DATA_DIR") or None
REAL_SMEAR_DIR = os.environ.get("MALARIA_SMEAR_DIR") or None
# Set by `.ci/run` where ../shared holds the data: a real-data test whose folder is missing then fails
# instead of skipping (a CI that silently lost its data would otherwise pass).
EXPECTED_REAL_DATA = set(filter(None, os.environ.get("MALARIA_EXPECT_REAL_DATA", "").split(",")))


def need_real_data(kind: str, available: bool, variable: str) -> None:
    """Skip a real-data test where the data is not promised; fail it where it is (``MALARIA_EXPECT_REAL_DATA``)."""
    if available:
        return
    if kind in EXPECTED_REAL_DATA:
        pytest.fail(f"MALARIA_EXPECT_REAL_DATA includes {kind}, but {variable} does not point at the data")
    pytest.skip(f"{variable} not set: no real {kind} here")


for _name in [name for name in os.environ if name.startswith("MALARIA_")]:
    del os.environ[_name]

import pytest  # noqa: E402

from malaria.config import Settings  # noqa: E402
from malaria.data import generate_synthetic  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_settings(root: Path, **overrides) -> Settings:
    """Settings whose every path lives under ``root``."""
    values = {
        "data_dir": None,
        "smear_dir": None,
        "workspace_data_dir": root / "data",
        "artifacts_dir": root / "training_artifacts",
        "mlflow_tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
        "mlflow_artifact_root": root / "mlartifacts",
        "log_dir": None,
        "prediction_log_dir": root / "predictions",
        "profile": "quick",
        "image_size": 32,
        "epochs": 4,
        "batch_size": 16,
        # The tiny models of the tests learn one generated stain; the jitter for other stains only slows them.
        "stain_jitter": 0.0,
        "seed": 7,
    }
    values.update(overrides)
    return Settings.model_construct(**{**Settings().model_dump(), **values})


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def synthetic_dir(session_dir: Path) -> Path:
    """A small NIH-layout set of generated cells: 20 patients, 120 images per class."""
    return generate_synthetic(session_dir / "synthetic", per_class=120, n_patients=20, size=48, seed=3)


@pytest.fixture
def settings_factory(tmp_path: Path):
    def factory(**overrides) -> Settings:
        return make_settings(tmp_path, **overrides)

    return factory


@pytest.fixture(scope="session")
def champion(session_dir: Path, synthetic_dir: Path):
    """Train a tiny model on generated data, register it as champion, import it into BentoML."""
    from malaria.bento import import_model
    from malaria.train import train

    settings = make_settings(session_dir / "registry", data_dir=synthetic_dir)
    record = train(settings)
    stored = import_model(settings)
    return settings, record, stored


ENV_FIELDS = (
    "data_dir",
    "workspace_data_dir",
    "artifacts_dir",
    "mlflow_artifact_root",
    "prediction_log_dir",
    "image_size",
    "epochs",
    "batch_size",
    "seed",
    "profile",
    "registered_model_name",
    "bento_model_name",
)


@pytest.fixture
def settings_env(monkeypatch, tmp_path):
    """Make ``get_settings()`` (what flows and the CLI read) return these settings, through the environment."""
    from malaria.config import get_settings

    def apply(settings: Settings) -> Settings:
        for field in ENV_FIELDS:
            value = getattr(settings, field)
            if value is not None:
                monkeypatch.setenv(f"MALARIA_{field.upper()}", str(value))
        monkeypatch.setenv("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
        monkeypatch.setenv("MALARIA_LOG_DIR", str(tmp_path / "logs"))
        get_settings.cache_clear()
        return get_settings()

    yield apply
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's local test server (temporary SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
