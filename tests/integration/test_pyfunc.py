"""The registered MLflow model answers like the Bento: in-process pyfunc and `mlflow models serve`."""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.helpers import Server
from tests.server_process import ServerProcess, free_port

pytestmark = pytest.mark.slow

MAX_PROBABILITY_DIFFERENCE = 1e-5  # the bound between the Bento and the pyfunc


@pytest.fixture(scope="module")
def images(synthetic_dir: Path) -> list[Path]:
    return [p for label in ("Parasitized", "Uninfected") for p in sorted((synthetic_dir / label).glob("*.png"))[:4]]


@pytest.fixture(scope="module")
def served(champion, images, tmp_path_factory) -> list[dict]:
    """The running service's answers (POST /classify) for ``images``."""
    server = Server({}, tmp_path_factory.mktemp("pyfunc-serve") / "predictions")
    try:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in images]
        response = httpx.post(f"{server.url}/classify", files=files, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def tracking(champion, monkeypatch):
    """The champion's registry for MLflow's global client (another test may have pointed it elsewhere)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion[0].mlflow_tracking_uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(champion[0].mlflow_tracking_uri)
    yield
    mlflow.set_tracking_uri(previous)


def champion_uri(settings) -> str:
    return f"models:/{settings.registered_model_name}@{settings.champion_alias}"


def assert_same_answers(answers: pd.DataFrame, served: list[dict]) -> None:
    assert len(answers) == len(served)
    difference = np.abs(answers["probability_parasitized"].to_numpy() - [s["probability_parasitized"] for s in served])
    assert difference.max() <= MAX_PROBABILITY_DIFFERENCE
    assert list(answers["label"]) == [s["label"] for s in served]
    assert list(answers["decision"]) == [s["decision"] for s in served]
    assert set(answers["model_version"]) == {s["model_version"] for s in served}


def test_registered_version_is_the_pipeline_with_the_keras_model_beside_it(champion):
    import mlflow

    settings, record, _ = champion
    info = mlflow.models.get_model_info(champion_uri(settings))
    assert "python_function" in info.flavors and "keras" not in info.flavors
    assert info.metadata["spec"]["image_size"] == record.spec.image_size
    keras_model = mlflow.keras.load_model(f"runs:/{record.run_id}/keras")  # the bare network, same run
    assert keras_model.input_shape[1:] == (record.spec.image_size, record.spec.image_size, 3)


def test_pyfunc_answers_like_the_service_from_bytes_and_paths(champion, images, served):
    import mlflow

    settings, record, _ = champion
    model = mlflow.pyfunc.load_model(champion_uri(settings))
    from_bytes = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    from_paths = model.predict(pd.DataFrame({"path": [str(p) for p in images]}))
    assert_same_answers(from_bytes, served)
    assert_same_answers(from_paths, served)
    assert from_bytes["model_version"].iloc[0] == record.version  # the spec and version of the registry


def test_pyfunc_reports_a_broken_file_as_a_row(champion, images, tmp_path):
    import mlflow

    settings, _, _ = champion
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    model = mlflow.pyfunc.load_model(champion_uri(settings))
    answers = model.predict(pd.DataFrame({"path": [str(images[0]), str(broken), str(tmp_path / "missing.png")]}))
    assert answers["error"].isna().tolist() == [True, False, False]
    assert "not a recognised image format" in answers["error"][1]
    assert "cannot read" in answers["error"][2]
    assert answers["label"][0] in ("Parasitized", "Uninfected") and pd.isna(answers["label"][1])


def test_mlflow_models_serve_answers_like_the_service(champion, images, served, tmp_path):
    settings, _, _ = champion
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion_uri(settings)]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    # MLflow starts `uvicorn` by name: the venv's bin must be on PATH even when the venv is not activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {"MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri, "PATH": path}
    server = ServerProcess(command, port, env, tmp_path / "mlflow-serve.log", 180, ready_path="/ping")
    try:
        encoded = [base64.b64encode(p.read_bytes()).decode() for p in images]
        for columns, rows in ((["image"], [[e] for e in encoded]), (["path"], [[str(p)] for p in images])):
            body = {"dataframe_split": {"columns": columns, "data": rows}}
            response = httpx.post(f"{server.url}/invocations", json=body, timeout=60)
            assert response.status_code == 200, response.text
            assert_same_answers(pd.DataFrame(response.json()["predictions"]), served)
    finally:
        server.stop()
