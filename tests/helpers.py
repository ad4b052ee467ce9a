"""A real `bentoml serve` process for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import REPO_ROOT

LIMITS = {
    "MALARIA_MAX_IMAGES_PER_REQUEST": "8",
    "MALARIA_MAX_IMAGE_BYTES": "300000",
    "MALARIA_MAX_IMAGE_PIXELS": "1000000",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A `bentoml serve` process from the repo root, stopped with SIGTERM like in production."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = log_dir
        self.output = log_dir.parent / f"server-{self.port}.log"
        full_env = {**os.environ, **LIMITS, "MALARIA_PREDICTION_LOG_DIR": str(log_dir), **env}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                "service:MalariaClassifier",
                "--port",
                str(self.port),
                "--host",
                "127.0.0.1",
            ],
            cwd=REPO_ROOT,
            env=full_env,
            stdout=self.output.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.output.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in 120 s:\n{self.output.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode
