"""The runtime switch over a real `bentoml serve`: TensorFlow, and OpenVINO at the gated precision."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from malaria.bento import load_stored_keras
from malaria.data import load_arrays
from malaria.runtime import cpu_capabilities
from malaria.train import predict_probability
from tests.helpers import Server

pytestmark = pytest.mark.slow
BF16_TOLERANCE = 0.02  # bf16 keeps 8 bits of mantissa: measured up to 5e-3 on the NIH champion


def served(server: Server, paths: list[Path]) -> tuple[dict, list[float]]:
    info = httpx.post(f"{server.url}/model_info", timeout=30).json()
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    answers = httpx.post(f"{server.url}/classify", files=files, timeout=60).json()
    return info, [a["probability_parasitized"] for a in answers]


def test_each_runtime_serves_the_champion_and_says_which(champion, synthetic_dir, tmp_path):
    settings, record, stored = champion
    paths = (
        sorted((synthetic_dir / "Parasitized").glob("*.png"))[:4]
        + sorted((synthetic_dir / "Uninfected").glob("*.png"))[:4]
    )
    keras_p = predict_probability(load_stored_keras(stored), load_arrays(paths, record.spec), record.spec)
    gated = stored.info.metadata["runtime"]
    expected_precision = gated["default_precision"]
    if expected_precision == "bf16" and "BF16" not in cpu_capabilities():
        expected_precision = "fp32"

    for env, runtime, precision in (
        ({"MALARIA_RUNTIME": "tensorflow"}, "tensorflow", "fp32"),
        ({"MALARIA_PRECISION": "auto"}, "openvino", expected_precision),
    ):
        (tmp_path / runtime).mkdir()
        server = Server(env, tmp_path / runtime / "predictions")
        try:
            info, probabilities = served(server, paths)
        finally:
            assert server.stop() == 0
        assert (info["runtime"], info["precision"]) == (runtime, precision)
        tolerance = 1e-4 if precision == "fp32" else BF16_TOLERANCE if precision == "bf16" else 0.05
        np.testing.assert_allclose(probabilities, keras_p, atol=tolerance)
