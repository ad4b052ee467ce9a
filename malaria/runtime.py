"""Inference runtimes of the served model: OpenVINO (converted at import, gated) or TensorFlow.

At import (``malaria import-model``) the champion's Keras file is converted to OpenVINO's IR
(``model.export`` to a SavedModel, then ``openvino.convert_model``) and stored beside it. Two gates
decide what may be served:

- the **conversion gate**: fp32 OpenVINO gives the probabilities of Keras within ``5e-4`` on a
  reference batch (the test split where it is present, else the batch saved with the model at
  training time), or the import is refused and the store keeps its previous model;
- the **precision gate**: bf16 (a CPU hint on the same IR) and int8 (NNCF post-training
  quantization, calibrated on training images) are kept only if, on the same labelled test images
  as fp32, accuracy drops by at most 0.002, ROC-AUC by 0.001, and smear-cell specificity by 0.001
  and sensitivity by 0.01. The fastest precision that passed is the default.

Nothing here imports TensorFlow at module level: the OpenVINO serving path runs without it.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from malaria.model import batched_probability
from malaria.spec import ModelSpec

logger = logging.getLogger(__name__)

Runtime = Literal["openvino", "tensorflow"]
Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "int8")
REFERENCE_FILE = "reference_batch.npz"  # saved in the registered version at training time
OPENVINO_DIR = "openvino"  # inside the BentoML model, beside mlflow_model/
IR_FILES: dict[Precision, str] = {"fp32": "model.xml", "bf16": "model.xml", "int8": "model-int8.xml"}
# The CPU plugin's precision hint; an int8 IR keeps its unquantized operations in f32.
INFERENCE_HINT: dict[Precision, str] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
# What the CPU plugin must report in OPTIMIZATION_CAPABILITIES to run a precision natively.
CPU_CAPABILITY: dict[Precision, str] = {"fp32": "FP32", "bf16": "BF16", "int8": "INT8"}
# max |P(OpenVINO fp32) - P(Keras)| on the reference images. Both run float32 with their own kernels,
# which differ by CPU: 8.2e-5 on the NIH champion's 1,715 test cells (AVX-512 Xeon), 1.26e-4 on the
# NIH + smear champion's 4,873 (a Xeon with AMX, which refused it at 1e-4). A wrong conversion (channel
# order, normalisation, a dropped layer) moves probabilities by 1e-2 and more.
CONVERSION_TOLERANCE = 5e-4
# Largest drop against fp32 a reduced precision may cost, on the same test images.
PRECISION_GATE = {"accuracy": 0.002, "roc_auc": 0.001, "smear_specificity": 0.001, "smear_sensitivity": 0.01}
CALIBRATION_IMAGES = 300  # int8 calibration: training images, a seeded sample
SPEED_BATCH = 64  # the adaptive batcher's usual call size under load


class ConversionError(RuntimeError):
    """The converted model does not answer like the trained one: the import is refused."""


@dataclass
class Reference:
    """Images the gates run on, and what is known about them."""

    images: np.ndarray
    origin: str  # where they come from, for the record and the messages
    labels: np.ndarray | None = None  # labelled test images: the precision gate can run
    smear: np.ndarray | None = None  # bool mask of smear-field cells among them
    expected: np.ndarray | None = None  # Keras outputs saved with the images at training time


def export_openvino(keras_model, out_dir: Path) -> Path:
    """Keras -> SavedModel -> OpenVINO IR with fp32 weights in ``out_dir``; returns the ``.xml`` path."""
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as saved_model:
        keras_model.export(saved_model, format="tf_saved_model", verbose=False)
        converted = ov.convert_model(saved_model)
    path = out_dir / IR_FILES["fp32"]
    ov.save_model(converted, path, compress_to_fp16=False)  # fp16 weights alone would break the 1e-4 gate
    return path


def quantize_int8(fp32_ir: Path, calibration: np.ndarray, out: Path) -> Path:
    """Post-training int8 quantization with NNCF, calibrated on preprocessed training images."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(fp32_ir)
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    ov.save_model(quantized, out, compress_to_fp16=False)
    return out


def cpu_capabilities() -> list[str]:
    """What OpenVINO's CPU plugin can run natively here (``BF16`` needs AVX512-BF16 or AMX)."""
    import openvino as ov

    return sorted(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def openvino_predict(ir: Path, precision: Precision, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled OpenVINO model as ``batch -> raw outputs``; one infer request per calling thread."""
    import openvino as ov

    config = {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": INFERENCE_HINT[precision],
        "PERFORMANCE_HINT": "LATENCY",
        # OpenVINO pins the thread that runs inference to one core (a worker's batcher thread was held to
        # CPU 0): two workers then queue on one core while the other idles. Unpinned, /classify served
        # 1,123-1,139 images/s against 923-937 pinned, server CPU 171-179 % against 150-157 % (2 cores).
        "ENABLE_CPU_PINNING": False,
    }
    compiled = ov.Core().compile_model(str(ir), "CPU", config)
    local = threading.local()

    def predict(batch: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:  # an infer request is not thread-safe; the batcher's pool may use several threads
            request = local.request = compiled.create_infer_request()
        return np.array(request.infer({0: np.ascontiguousarray(batch, dtype=np.float32)})[0])

    return predict


def figures(reference: Reference, probability: np.ndarray, spec: ModelSpec) -> dict[str, float]:
    """What the precision gate compares: accuracy and ROC-AUC on all images, and smear cells by the field rule."""
    from malaria.evaluation import classification_metrics

    assert reference.labels is not None
    overall = classification_metrics(reference.labels, probability, spec.threshold)
    result = {"accuracy": overall["accuracy"], "roc_auc": overall["roc_auc"]}
    smear = reference.smear
    if smear is not None and smear.any():
        cells = classification_metrics(reference.labels[smear], probability[smear], spec.for_fields().threshold)
        result |= {"smear_sensitivity": cells["sensitivity"], "smear_specificity": cells["specificity"]}
    return {k: round(v, 6) for k, v in result.items()}


def precision_failures(fp32: dict[str, float], candidate: dict[str, float]) -> list[str]:
    """The gate's objections to a reduced precision (empty: it passes)."""
    failures = []
    for metric, allowed in PRECISION_GATE.items():
        if metric in fp32 and round(fp32[metric] - candidate[metric], 6) > allowed:  # figures have 6 decimals
            failures.append(f"{metric} {candidate[metric]:.4f} vs fp32 {fp32[metric]:.4f} (allowed drop {allowed})")
    return failures


def images_per_second(predict_fn, image_size: int, seconds: float = 1.0) -> float:
    """In-process throughput at the batcher's usual call size (one warm-up call, then ``seconds`` of calls)."""
    batch = np.random.default_rng(0).random((SPEED_BATCH, image_size, image_size, 3), dtype=np.float32)
    predict_fn(batch)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or calls < 2:
        predict_fn(batch)
        calls += 1
    return round(calls * SPEED_BATCH / elapsed, 1)


def convert_and_gate(
    keras_predict: Callable[[np.ndarray], np.ndarray],
    keras_model,
    spec: ModelSpec,
    out_dir: Path,
    reference: Reference,
    calibration: np.ndarray | None,
    threads: int = 1,
) -> dict:
    """Convert, run both gates, time what passed; the record stored with the model (``metadata["runtime"]``).

    Raises ``ConversionError`` when fp32 OpenVINO does not answer like Keras.
    """
    import openvino as ov

    ir = export_openvino(keras_model, out_dir)
    keras_p = batched_probability(keras_predict, reference.images, spec)
    if reference.expected is not None:  # the saved batch: Keras here must still answer as at training time
        saved_drift = float(np.abs(keras_p - spec.probability_positive(reference.expected)).max())
        if saved_drift > CONVERSION_TOLERANCE:
            raise ConversionError(
                f"the Keras model answers the reference batch {saved_drift:.2e} away from its saved outputs"
            )
    fp32_predict = openvino_predict(ir, "fp32", threads)
    fp32_p = batched_probability(fp32_predict, reference.images, spec)
    difference = float(np.abs(fp32_p - keras_p).max())
    if not difference <= CONVERSION_TOLERANCE:  # also refuses NaN
        raise ConversionError(
            f"OpenVINO fp32 differs from Keras by {difference:.2e} (allowed {CONVERSION_TOLERANCE:.0e}) on "
            f"{reference.origin}: conversion refused, the store keeps its current model"
        )
    capabilities = cpu_capabilities()
    record: dict = {
        "openvino_version": ov.__version__.split("-")[0],
        "conversion": {
            "max_abs_difference": float(f"{difference:.3g}"),
            "images": len(reference.images),
            "reference": reference.origin,
        },
        "cpu_capabilities": capabilities,
        "precisions": {"fp32": {"passed": True, "images_per_s": images_per_second(fp32_predict, spec.image_size)}},
    }
    if reference.labels is None:
        record["precisions"]["fp32"]["note"] = "reduced precisions not judged: no labelled test images here"
    else:
        baseline = figures(reference, fp32_p, spec)
        record["precisions"]["fp32"] |= baseline
        candidates: list[Precision] = ["bf16"]
        if calibration is not None and len(calibration):
            quantize_int8(ir, calibration, out_dir / IR_FILES["int8"])
            candidates.append("int8")
        for precision in candidates:
            if CPU_CAPABILITY[precision] not in capabilities:
                record["precisions"][precision] = {"passed": False, "failed": [f"this CPU has no {precision}"]}
                continue
            predict = openvino_predict(out_dir / IR_FILES[precision], precision, threads)
            measured = figures(reference, batched_probability(predict, reference.images, spec), spec)
            failures = precision_failures(baseline, measured)
            entry: dict[str, object] = {"passed": not failures, **measured}
            if failures:
                entry["failed"] = failures
                if precision == "int8":  # a refused quantized file is not shipped
                    (out_dir / IR_FILES["int8"]).unlink()
            else:
                entry["images_per_s"] = images_per_second(predict, spec.image_size)
            record["precisions"][precision] = entry
    passed = {name: entry["images_per_s"] for name, entry in record["precisions"].items() if entry["passed"]}
    record["default_precision"] = max(passed, key=passed.__getitem__)
    for name, entry in record["precisions"].items():
        logger.info("openvino %s: %s", name, entry)
    return record


def reference_batch(images: np.ndarray, expected: np.ndarray, path: Path) -> Path:
    """Save a few preprocessed images with the Keras outputs they gave at training time (the gate's fallback)."""
    np.savez_compressed(path, images=images, expected=expected)
    return path


def load_reference_batch(path: Path) -> Reference:
    with np.load(path) as saved:
        return Reference(saved["images"], "the reference batch saved at training time", expected=saved["expected"])


@dataclass
class LoadedRuntime:
    """The inference call the service batches, and what it is."""

    predict: Callable[[np.ndarray], np.ndarray]
    runtime: Runtime
    precision: Precision


def choose_precision(record: dict, wanted: str, capabilities: list[str]) -> Precision:
    """The precision to serve: the one asked for (it must have passed the gate), else the gated default;
    fp32 when this CPU lacks the instructions the choice needs."""
    passed = {name for name, entry in record["precisions"].items() if entry["passed"]}
    choice: Precision = record["default_precision"] if wanted == "auto" else wanted  # type: ignore[assignment]
    if choice not in passed:
        raise ValueError(
            f"MALARIA_PRECISION={wanted}: {choice} did not pass the precision gate at import "
            f"(passed: {', '.join(sorted(passed))})"
        )
    if CPU_CAPABILITY[choice] not in capabilities:
        logger.warning("this CPU lacks %s (OpenVINO reports %s): serving fp32", choice, capabilities)
        return "fp32"
    return choice
