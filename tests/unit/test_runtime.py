"""The OpenVINO runtime: conversion, its gate, the precision gate and int8, on a small hand-set Keras model."""

from pathlib import Path

import keras
import numpy as np
import pytest

from malaria import runtime
from malaria.bento import gate_reference
from malaria.model import compiled_predict
from malaria.runtime import ConversionError, Reference, choose_precision, convert_and_gate, precision_failures
from malaria.spec import ModelSpec

SPEC = ModelSpec(image_size=16)


def redness_model() -> keras.Model:
    """P(Parasitized) = sigmoid(20 * (mean red - mean blue)): a model with a known right answer."""
    inputs = keras.Input((16, 16, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    dense = keras.layers.Dense(1, activation="sigmoid")
    outputs = dense(pooled)
    dense.set_weights([np.array([[20.0], [0.0], [-20.0]], np.float32), np.zeros(1, np.float32)])
    return keras.Model(inputs, outputs)


def cells(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Reddish (parasitized, 1) and bluish (0) images with noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.uniform(0.2, 0.6, (n, 16, 16, 3)).astype(np.float32)
    images[labels == 1, ..., 0] += 0.3
    images[labels == 0, ..., 2] += 0.3
    return images, labels


def test_conversion_passes_its_gate_and_reduced_precisions_are_judged_against_fp32(tmp_path):
    model = redness_model()
    images, labels = cells(64, seed=0)
    reference = Reference(images, "generated test cells", labels=labels, smear=np.arange(64) < 16)
    calibration, _ = cells(32, seed=1)
    record = convert_and_gate(compiled_predict(model), model, SPEC, tmp_path, reference, calibration)

    assert record["conversion"]["max_abs_difference"] <= runtime.CONVERSION_TOLERANCE
    assert record["conversion"]["images"] == 64
    fp32 = record["precisions"]["fp32"]
    assert fp32["accuracy"] == 1.0 and fp32["smear_sensitivity"] == 1.0 and fp32["smear_specificity"] == 1.0
    for precision in ("bf16", "int8"):  # a wide margin: both keep every answer
        entry = record["precisions"][precision]
        if runtime.CPU_CAPABILITY[precision] in record["cpu_capabilities"]:
            assert entry["passed"] and entry["accuracy"] == 1.0 and entry["images_per_s"] > 0
    assert (tmp_path / runtime.IR_FILES["int8"]).is_file()
    passed = {name for name, entry in record["precisions"].items() if entry["passed"]}
    assert record["default_precision"] in passed
    speeds = {name: record["precisions"][name]["images_per_s"] for name in passed}
    assert speeds[record["default_precision"]] == max(speeds.values())

    int8 = runtime.openvino_predict(tmp_path / runtime.IR_FILES["int8"], "int8", threads=1)
    quantized = SPEC.probability_positive(int8(images))
    assert ((quantized >= 0.5) == (labels == 1)).all()


def test_a_precision_that_loses_accuracy_is_refused_and_its_file_not_kept(tmp_path, monkeypatch):
    monkeypatch.setitem(runtime.PRECISION_GATE, "roc_auc", -1.0)  # no candidate can gain a whole point of AUC
    model = redness_model()
    images, labels = cells(32, seed=0)
    calibration, _ = cells(16, seed=1)
    record = convert_and_gate(
        compiled_predict(model), model, SPEC, tmp_path, Reference(images, "test", labels=labels), calibration
    )
    assert record["default_precision"] == "fp32"
    assert not record["precisions"]["int8"]["passed"]
    assert "roc_auc" in record["precisions"]["int8"]["failed"][0]
    assert not (tmp_path / runtime.IR_FILES["int8"]).exists()


def test_a_conversion_that_does_not_answer_like_keras_is_refused(tmp_path):
    model = redness_model()
    other = redness_model()
    other.layers[-1].set_weights([np.array([[20.0], [5.0], [-20.0]], np.float32), np.zeros(1, np.float32)])
    images, _ = cells(16, seed=0)
    with pytest.raises(ConversionError, match="conversion refused"):  # Keras answers are another model's
        convert_and_gate(compiled_predict(other), model, SPEC, tmp_path, Reference(images, "test"), None)


def test_without_labels_only_fp32_is_served_and_a_saved_batch_must_still_match(tmp_path):
    model = redness_model()
    images, _ = cells(16, seed=0)
    expected = compiled_predict(model)(images)
    record = convert_and_gate(
        compiled_predict(model), model, SPEC, tmp_path / "a", Reference(images, "saved", expected=expected), None
    )
    assert set(record["precisions"]) == {"fp32"} and record["default_precision"] == "fp32"
    with pytest.raises(ConversionError, match="saved outputs"):
        convert_and_gate(
            compiled_predict(model),
            model,
            SPEC,
            tmp_path / "b",
            Reference(images, "saved", expected=expected + 0.1),
            None,
        )


def test_the_gate_allows_the_documented_drops_and_no_more():
    fp32 = {"accuracy": 0.966, "roc_auc": 0.994, "smear_sensitivity": 0.90, "smear_specificity": 0.992}
    assert precision_failures(fp32, {"accuracy": 0.964, "roc_auc": 0.993, "smear_sensitivity": 0.89,
                                     "smear_specificity": 0.991}) == []  # fmt: skip
    failures = precision_failures(fp32, {"accuracy": 0.963, "roc_auc": 0.994, "smear_sensitivity": 0.87,
                                         "smear_specificity": 0.992})  # fmt: skip
    assert [f.split()[0] for f in failures] == ["accuracy", "smear_sensitivity"]


def test_the_served_precision_must_have_passed_and_falls_back_to_fp32_without_the_instructions():
    record = {
        "precisions": {"fp32": {"passed": True}, "bf16": {"passed": True}, "int8": {"passed": False}},
        "default_precision": "bf16",
    }
    assert choose_precision(record, "auto", ["BF16", "FP32", "INT8"]) == "bf16"
    assert choose_precision(record, "auto", ["FP32", "INT8"]) == "fp32"  # a CPU without AVX512-BF16 or AMX
    assert choose_precision(record, "fp32", ["BF16", "FP32"]) == "fp32"
    with pytest.raises(ValueError, match="did not pass the precision gate"):
        choose_precision(record, "int8", ["BF16", "FP32", "INT8"])


def test_without_data_the_gates_use_the_batch_saved_at_training_time(settings_factory, tmp_path):
    settings = settings_factory()
    model_dir = tmp_path / "model"
    (model_dir / "artifacts").mkdir(parents=True)
    images, _ = cells(4, seed=0)
    reference, calibration = gate_reference(settings, SPEC, model_dir)
    assert reference.origin.startswith("32 generated images") and calibration is None
    runtime.reference_batch(images, np.full((4, 1), 0.5, np.float32), model_dir / "artifacts" / runtime.REFERENCE_FILE)
    reference, calibration = gate_reference(settings, SPEC, Path(model_dir))
    assert reference.origin == "the reference batch saved at training time" and calibration is None
    np.testing.assert_array_equal(reference.images, images)
    assert reference.labels is None and reference.expected is not None


@pytest.mark.parametrize(
    ("uri", "kept"),
    [
        ("https://alice:s3cret@mlflow.example.org:5000/path?token=x#y", "https://mlflow.example.org:5000/path"),
        ("http://token@[::1]:5000", "http://[::1]:5000"),
        ("postgresql://mlflow:pw@db/mlflow", "postgresql://db/mlflow"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("http://localhost:5000", "http://localhost:5000"),
    ],
)
def test_the_tracking_uri_copied_into_a_bento_carries_no_credentials(uri, kept):
    from malaria.bento import without_credentials

    assert without_credentials(uri) == kept
