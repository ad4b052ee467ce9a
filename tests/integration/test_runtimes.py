"""The runtime switch over a real `bentoml serve`: TensorFlow, and OpenVINO at the gated precision."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from malaria.bento import load_stored_keras
from malaria.config import Settings
from malaria.data import load_arrays
from malaria.runtime import cpu_capabilities
from malaria.smear.synthetic import synthetic_field
from malaria.train import predict_probability
from tests.helpers import Server

pytestmark = pytest.mark.slow
BF16_TOLERANCE = 0.05  # bf16 keeps 8 bits of mantissa: up to 0.043 on the NIH champion's 1,715 test cells
EVERY_ANSWER_AUDITED = {"MALARIA_REVIEW_AUDIT_SHARE": "1"}
_defaults = Settings()
# The service's own limits (the other servers of the suite run with small ones, tests/helpers.py).
DEFAULT_LIMITS = {
    f"MALARIA_{name.upper()}": str(getattr(_defaults, name))
    for name in ("max_image_bytes", "max_image_pixels", "max_images_per_request", "max_requests_per_connection")
}


def large_cell() -> bytes:
    """A valid cell image over 1 MB (noise does not compress): past Starlette's in-memory upload size."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "PNG")
    return buffer.getvalue()


def png(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, "PNG")
    return buffer.getvalue()


def served(server: Server, paths: list[Path]) -> tuple[dict, list[float], list[tuple[str | None, str]]]:
    info = httpx.post(f"{server.url}/model_info", timeout=30).json()
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    answers = httpx.post(f"{server.url}/classify", files=files, timeout=60).json()
    return info, [a["probability_parasitized"] for a in answers], [(a["review"], a["decision"]) for a in answers]


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
        ({"MALARIA_PRECISION": "auto", **EVERY_ANSWER_AUDITED, **DEFAULT_LIMITS}, "openvino", expected_precision),
    ):
        (tmp_path / runtime).mkdir()
        server = Server(env, tmp_path / runtime / "predictions")
        try:
            info, probabilities, reviews = served(server, paths)
            if runtime == "openvino":  # every answer goes to the review queue: referred, or the audit sample (share 1)
                assert all(review == ("refer" if decision == "refer" else "audit") for review, decision in reviews)
                field = synthetic_field(seed=1)
                analysis = httpx.post(f"{server.url}/analyze_smear", files={"image": ("f.png", png(field.image))},
                                      data={"cell_diameter_px": "40"}, timeout=120).json()  # fmt: skip
                counted = [(c["review"], c["decision"]) for c in analysis["cells"] if not c["edge"]]
                assert counted and all(review == ("refer" if d == "refer" else "audit") for review, d in counted)
            else:  # the default share (2 %) on 8 answers: the referred ones at least
                assert all(review == "refer" for review, decision in reviews if decision == "refer")
            if runtime == "openvino":  # the default limits: an upload over 1 MB is spooled to disk by Starlette
                big = large_cell()
                answer = httpx.post(f"{server.url}/predict", files={"image": ("big.png", big)}, timeout=60)
                assert len(big) > 1_048_576 and answer.status_code == 200, answer.text
        finally:
            assert server.stop() == 0
        assert (info["runtime"], info["precision"]) == (runtime, precision)
        tolerance = 1e-4 if precision == "fp32" else BF16_TOLERANCE
        np.testing.assert_allclose(probabilities, keras_p, atol=tolerance)
