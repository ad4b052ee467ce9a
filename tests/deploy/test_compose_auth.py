"""The compose stack's MLflow and Prefect refuse callers without a password, run for real.

No container engine runs here, so each server is started as a local process with the settings
compose.yaml gives its container (MLflow's auth config file, Prefect's auth string, the flows'
client credentials), and asked the questions a stranger on the network would ask.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

SECRETS = {"MLFLOW_ADMIN_PASSWORD": "a-long-mlflow-password", "MLFLOW_SECRET_KEY": "k" * 32}
SECRETS["PREFECT_ADMIN_PASSWORD"] = "a-long-prefect-password"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, the last failing like compose does."""

    def one(match: re.Match) -> str:
        name, kind, rest = match.group(1), match.group(2), match.group(3)
        if name in variables:
            return variables[name]
        if kind == ":?":
            raise KeyError(f"{name} is required: {rest}")
        return rest or ""

    return re.sub(r"\$\{(\w+)(?:(:[?-])([^}]*))?\}", one, value)


def environment(service: dict, variables: dict[str, str]) -> dict[str, str]:
    return {key: interpolate(str(value), variables) for key, value in service.get("environment", {}).items()}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} not up in {timeout} s:\n{log.read_text()[-3000:]}")


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, env={**os.environ, **env}, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_every_secret_compose_needs_is_required_not_defaulted(compose):
    for name in ("mlflow", "prefect", "flows"):
        with pytest.raises(KeyError, match="is required"):
            environment(compose["services"][name], {})


def test_mlflow_answers_only_the_admin_with_compose_auth_config(compose, tmp_path):
    service = compose["services"]["mlflow"]
    command = " ".join(service["command"])
    assert "--app-name basic-auth" in command
    env = environment(service, SECRETS)
    [mount] = [c for c in service["configs"] if c["source"] == "mlflow-auth"]
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == mount["target"]
    ini = compose["configs"]["mlflow-auth"]["content"]
    database = re.search(r"database_uri = sqlite:///(\S+)", ini).group(1)
    assert any(volume.split(":")[1] == str(Path(database).parent) for volume in service["volumes"]), "on a volume"
    config = tmp_path / "basic_auth.ini"
    config.write_text(ini.replace(database, str(tmp_path / "auth.db")))
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
    port = free_port()
    log = tmp_path / "mlflow.log"
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    process = start(
        [mlflow, "server", "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env,
        log,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/health", process, log)  # the healthcheck's route stays open
        search = f"{url}/api/2.0/mlflow/registered-models/search"
        assert httpx.get(search, timeout=10).status_code == 401
        assert httpx.get(search, auth=("admin", "wrong"), timeout=10).status_code == 401
        flows = environment(compose["services"]["flows"], SECRETS)
        admin = (flows["MLFLOW_TRACKING_USERNAME"], flows["MLFLOW_TRACKING_PASSWORD"])
        assert httpx.get(search, auth=admin, timeout=10).status_code == 200  # the flows' credentials work
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_prefect_answers_only_with_the_auth_string_the_flows_are_given(compose, tmp_path):
    service = compose["services"]["prefect"]
    env = environment(service, SECRETS)
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_UI_ENABLED="false")
    port = free_port()
    log = tmp_path / "prefect.log"
    prefect = str(Path(sys.executable).with_name("prefect"))
    process = start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        url = f"http://127.0.0.1:{port}/api"
        wait_for(f"{url}/health", process, log, timeout=180)  # compose's healthcheck, without a password
        assert httpx.post(f"{url}/flows/filter", json={}, timeout=10).status_code == 401
        assert httpx.post(f"{url}/flows/filter", json={}, auth=("admin", "wrong"), timeout=10).status_code == 401
        user, password = environment(compose["services"]["flows"], SECRETS)["PREFECT_API_AUTH_STRING"].split(":", 1)
        assert httpx.post(f"{url}/flows/filter", json={}, auth=(user, password), timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
