"""The command line: clear errors instead of tracebacks, and registering an outside Keras model."""

import json

import pytest
from typer.testing import CliRunner

from malaria.cli import app
from malaria.config import get_settings

runner = CliRunner()


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """Point every setting the CLI reads at a temporary folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MALARIA_MLFLOW_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    monkeypatch.delenv("MALARIA_DATA_DIR", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    # An uncaught error would be kept here as itself; the CLI's clear failures are exits.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_missing_data_folder(cli_env, monkeypatch):
    monkeypatch.setenv("MALARIA_DATA_DIR", str(cli_env / "nowhere"))
    get_settings.cache_clear()
    result = invoke("data", "prepare")
    assert result.exit_code == 1 and "MALARIA_DATA_DIR" in result.output


def test_one_class_empty(cli_env, monkeypatch, synthetic_dir):
    import shutil

    root = cli_env / "cells"
    shutil.copytree(synthetic_dir / "Parasitized", root / "Parasitized")
    (root / "Uninfected").mkdir()
    monkeypatch.setenv("MALARIA_DATA_DIR", str(root))
    get_settings.cache_clear()
    result = invoke("data", "prepare")
    assert result.exit_code == 1 and "'Uninfected' has no usable images" in result.output


def test_no_champion_to_import(cli_env):
    result = invoke("import-model")
    assert result.exit_code == 1 and "no @champion" in result.output


def test_corrupt_model_file(cli_env):
    bad = cli_env / "model.h5"
    bad.write_bytes(b"\x89HDF\r\n garbage")
    result = invoke("register", "--model", str(bad), "--labels", "Parasitized,Uninfected")
    assert result.exit_code == 1 and "does not load" in result.output


def test_labels_are_required(cli_env):
    result = invoke("register", "--model", str(cli_env / "absent.keras"))
    assert result.exit_code == 1 and "label order" in result.output


def _keras_directory_loader_style_model(path):
    """A notebook-style model: 1-unit sigmoid trained with Keras' directory loader (P(Uninfected))."""
    import keras

    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.save(path)
    return path


@pytest.mark.slow
def test_register_an_outside_h5_model_with_a_label_sidecar(cli_env):
    model_path = _keras_directory_loader_style_model(cli_env / "notebook_vgg.h5")
    (cli_env / "notebook_vgg.labels.json").write_text(
        json.dumps({"class_names": ["Parasitized", "Uninfected"], "sigmoid_class": "Uninfected"})
    )
    result = invoke("register", "--model", str(model_path))
    assert result.exit_code == 0, result.output
    assert "version 1 (champion)" in result.output
    shown = invoke("champion")
    spec = json.loads(shown.output)["spec"]
    assert spec["image_size"] == 24 and spec["sigmoid_class"] == "Uninfected"


def test_a_model_with_the_wrong_input_is_refused(cli_env):
    import keras

    inputs = keras.Input((10,))
    path = cli_env / "tabular.keras"
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(inputs)).save(path)
    result = invoke("register", "--model", str(path), "--labels", "Parasitized,Uninfected")
    assert result.exit_code == 1 and "HxWx3" in result.output


def test_predict_without_a_service_is_one_clear_line(cli_env, synthetic_dir):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    image = next((synthetic_dir / "Parasitized").glob("*.png"))
    result = invoke("predict", str(image), "--url", f"http://127.0.0.1:{port}", "--wait", "0.5")
    assert result.exit_code == 1
    assert "is it running" in result.stderr and "1 of 1 images not classified" in result.stderr


def test_predict_refuses_an_empty_chunk(cli_env, synthetic_dir):
    result = invoke("predict", str(synthetic_dir), "--chunk", "0")
    assert result.exit_code == 2 and "--chunk" in result.output


def test_labels_without_the_positive_class_are_a_clear_error(cli_env):
    model_path = _keras_directory_loader_style_model(cli_env / "lowercase.keras")
    result = invoke("register", "--model", str(model_path), "--labels", "parasitized,uninfected")
    assert result.exit_code == 1
    assert "do not fit the contract" in result.output and "Parasitized" in result.output
