"""A real `bentoml serve` process for integration tests."""

from __future__ import annotations

from pathlib import Path

from tests.server_process import ServerProcess, bentoml_serve_command, on_a_free_port

LIMITS = {
    "MALARIA_MAX_IMAGES_PER_REQUEST": "8",
    "MALARIA_MAX_IMAGE_BYTES": "300000",
    "MALARIA_MAX_IMAGE_PIXELS": "1000000",
    "MALARIA_MAX_REQUESTS_PER_CONNECTION": "5",
}
# The suite compares served answers with Keras in process (1e-4, 1e-5 for the pyfunc): OpenVINO at fp32.
# Reduced precisions are judged by the import's gate (tests/unit/test_runtime.py) and served in their own test.
EXACT = {"MALARIA_PRECISION": "fp32"}


class Server(ServerProcess):
    """The service with small input limits, its prediction log in ``log_dir``."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.log_dir = log_dir
        self.successes = 0  # images answered 200 (tests that check the prediction log count them)
        full_env = {**LIMITS, **EXACT, "MALARIA_PREDICTION_LOG_DIR": str(log_dir), **env}

        def start(port: int) -> None:
            output = log_dir.parent / f"server-{port}.log"
            ServerProcess.__init__(self, bentoml_serve_command(port), port, full_env, output, 120)

        on_a_free_port(start)
