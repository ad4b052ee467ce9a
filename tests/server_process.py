"""A server subprocess (``bentoml serve`` or uvicorn) for tests, benchmarks and the image smoke (not shipped)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_a_free_port(start: Callable[[int], T], attempts: int = 3) -> T:
    """``start(port)`` on a port that was free a moment ago; if another process took it in between (the
    server exits saying "address already in use"), again on another port."""
    for attempt in range(attempts):
        try:
            return start(free_port())
        except RuntimeError as exc:
            if "address already in use" not in str(exc).lower() or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def bentoml_serve_command(port: int) -> list[str]:
    """``bentoml serve`` of this repo's service on loopback."""
    return [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service:MalariaClassifier",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
    ]


class ServerProcess:
    """Starts ``command`` from the repo root, waits until ``ready_path`` answers 200, stops with SIGTERM."""

    def __init__(
        self,
        command: list[str],
        port: int,
        env: dict[str, str],
        output: Path,
        ready_timeout: float = 180,
        ready_path: str = "/readyz",
    ):
        self.url = f"http://127.0.0.1:{port}"
        self.output = output
        with output.open("w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{output.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}{ready_path}", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready in {ready_timeout:.0f} s:\n{output.read_text()[-3000:]}")

    def rss_mb(self) -> float:
        """Resident memory of the server and all its children."""
        import psutil

        parent = psutil.Process(self.process.pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 1e6

    def stop(self) -> int:
        """SIGTERM to the whole process group (graceful, as in production); SIGKILL after 30 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode
