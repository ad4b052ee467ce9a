"""`make image-smoke`: run the image built by `make image`, classify real cells, check the answers, stop.

Checks: `/readyz` within the timeout; `/classify` and `/predict` answer for held-out test cells with
the same labels and probabilities as the same model run in-process with the runtime and precision
the image reports in `/model_info` (the image's model is the one in
the local BentoML store that `make image` packaged), and mostly the true labels; `/model_info` names
that model; SIGTERM stops the server with exit code 0 and leaves no process behind. With buildah,
the server runs with the file-system settings of the Kubernetes Deployment, whose root file system
is read-only: any file it writes outside the Deployment's volumes fails the smoke.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from malaria.bento import load_runtime, stored_spec
from malaria.client import MalariaClient
from malaria.config import get_settings
from malaria.data import ensure_dataset, prepare, read_manifest
from malaria.preprocess import preprocess_batch
from tests.server_process import free_port

CELLS_PER_CLASS = 8
MIN_ACCURACY = 0.75
READY_TIMEOUT_S = 300


def read_image_env(path: Path = Path("dist/image.env")) -> dict[str, str]:
    if not path.is_file():
        sys.exit(f"{path} not found: run `make image` first")
    return dict(line.split("=", 1) for line in path.read_text().split())


DEPLOYMENT = Path("deploy/k8s/deployment.yaml")
FILE_SYSTEM_ENV = ("BENTOML_HOME", "HOME", "PYTHONDONTWRITEBYTECODE", "MALARIA_PREDICTION_LOG_DIR")
RUNTIME_FILES = {"/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/run/.containerenv"}  # written by buildah


def pod_file_system(path: Path = DEPLOYMENT) -> tuple[dict[str, str], list[str]]:
    """The classifier's file-system settings in the Deployment, and the paths it may write (its volumes)."""
    deployment = yaml.safe_load(path.read_text())
    [container] = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "classifier"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e["value"] for e in container["env"] if e["name"] in FILE_SYSTEM_ENV}
    return env, [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]


def held_out_cells(per_class: int) -> tuple[list[Path], list[str]]:
    """The first cells of each class in the patient-held-out test split."""
    settings = get_settings()
    if not settings.splits_path.is_file():
        prepare(settings)
    root = ensure_dataset(settings, allow_download=False)
    manifest = read_manifest(settings.splits_path)
    test = manifest[(manifest["split"] == "test") & (manifest["source"] == "nih")].sort_values("path")
    chosen = test.groupby("label", group_keys=False).head(per_class)
    return [root / p for p in chosen["path"]], list(chosen["label"])


class BuildahContainer:
    """`buildah run` of the image's entrypoint on the host network; stopped through the server's PID."""

    def __init__(self, image: str, port: int, log: Path):
        self.name = subprocess.run(
            ["buildah", "from", f"localhost/{image}"], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.log = log
        env, self.writable = pod_file_system()
        # The Deployment's volumes, created as its fsGroup would leave them: writable by the server.
        prepare = " && ".join(f"mkdir -p {p} && chmod 1777 {p}" for p in self.writable if p != "/tmp")
        subprocess.run(["buildah", "run", "--user", "0:0", self.name, "--", "sh", "-c", prepare], check=True)
        # `buildah run` does not apply ENTRYPOINT; `exec` makes the printed PID bentoml serve's own.
        command = 'echo "SERVER_PID=$$"; exec /home/bentoml/bento/env/docker/entrypoint.sh'
        options = [
            arg for key, value in {**env, "BENTOML_PORT": str(port)}.items() for arg in ("--env", f"{key}={value}")
        ]
        self.started = time.time()
        with log.open("w") as out:
            self.process = subprocess.Popen(
                ["buildah", "run", *options, self.name, "--", "sh", "-c", command],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            self.server_pid = self._read_pid()
            # `buildah run` chroots into a per-run bind mount of the container's file system.
            self.root = os.readlink(f"/proc/{self.server_pid}/root")
        except BaseException:
            self.process.kill()
            self.process.wait(30)
            subprocess.run(["buildah", "rm", self.name], check=False, capture_output=True)
            raise

    def _read_pid(self) -> int:
        for _ in range(100):
            found = re.search(r"SERVER_PID=(\d+)", self.log.read_text())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"container did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        """SIGTERM to bentoml serve (graceful, like `docker stop`), then wait for `buildah run` to end."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.server_pid, signal.SIGTERM)
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            code = None
        leftovers = self.processes_inside()
        for pid in leftovers:  # clean up, then fail below
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if code is None:
            self.process.kill()
            self.process.wait(30)
        subprocess.run(["buildah", "rm", self.name], check=False, capture_output=True)
        if leftovers:
            raise RuntimeError(f"processes left behind after stop (killed): {leftovers}")
        if code is None:
            raise RuntimeError("the server did not stop within 60 s of SIGTERM")
        return code

    def writes_outside_volumes(self) -> list[str]:
        """Files the server created or changed outside the Deployment's volumes (read-only there).

        Read through ``/proc/<pid>/root``: the run's bind mount (``self.root``) exists only in its own
        mount namespace.
        """
        root = Path(f"/proc/{self.server_pid}/root")
        if not (root / "home" / "bentoml" / "bento").is_dir():
            raise RuntimeError(f"cannot read the container's file system at {root}")
        found = []
        for path in root.rglob("*"):
            inside = "/" + str(path.relative_to(root))
            if inside.startswith(("/proc/", "/sys/", "/dev/")) or inside in RUNTIME_FILES:
                continue
            if any(inside == w or inside.startswith(w.rstrip("/") + "/") for w in self.writable):
                continue
            try:
                if path.is_file() and path.lstat().st_mtime > self.started:
                    found.append(inside)
            except OSError:
                continue
        return found

    def processes_inside(self) -> list[int]:
        """PIDs whose root directory is this run's file system."""
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.readlink(proc / "root") == self.root:
                        found.append(int(proc.name))
                except OSError:
                    continue
        return found


class DockerContainer:
    """`docker run` of the image (where a Docker engine exists)."""

    def __init__(self, image: str, port: int, log: Path):
        self.log = log
        self.id = subprocess.run(
            ["docker", "run", "-d", "-p", f"127.0.0.1:{port}:3000", image],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def stop(self) -> int:
        subprocess.run(["docker", "stop", "-t", "60", self.id], check=True, capture_output=True)
        self.log.write_text(subprocess.run(["docker", "logs", self.id], capture_output=True, text=True).stdout)
        code = int(
            subprocess.run(
                ["docker", "inspect", "-f", "{{.State.ExitCode}}", self.id], capture_output=True, text=True
            ).stdout.strip()
        )
        subprocess.run(["docker", "rm", self.id], check=False, capture_output=True)
        return code


FLOWS_IMPORT_CHECK = (
    "import flows.batch_predict, flows.drift, flows.evaluate, flows.pipeline, evidently, mlflow, prefect; "
    "print(flows.pipeline.training_pipeline.name)"
)


def check_flows_image(image: str, backend: str) -> str | None:
    """The flows image imports every flow and its libraries; returns a failure message or None."""
    if backend == "buildah":
        name = subprocess.run(
            ["buildah", "from", f"localhost/{image}"], check=True, capture_output=True, text=True
        ).stdout.strip()
        try:
            result = subprocess.run(
                ["buildah", "run", name, "--", "python", "-c", FLOWS_IMPORT_CHECK], capture_output=True, text=True
            )
        finally:
            subprocess.run(["buildah", "rm", name], check=False, capture_output=True)
    else:
        result = subprocess.run(
            ["docker", "run", "--rm", image, "python", "-c", FLOWS_IMPORT_CHECK], capture_output=True, text=True
        )
    if result.returncode != 0:
        return f"flows image {image} cannot import the flows:\n{result.stderr[-2000:]}"
    return None


def wait_ready(url: str, container, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        process = getattr(container, "process", None)
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"container exited:\n{container.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"not ready after {timeout:.0f} s:\n{container.log.read_text()[-3000:]}")


def main() -> None:
    import bentoml

    image_env = read_image_env()
    image, backend = image_env["IMAGE"], image_env["BACKEND"]
    bento = bentoml.get(image)
    model_tag = str(bento.info.all_models[0].tag)
    stored = bentoml.models.get(model_tag)
    spec = stored_spec(stored)

    paths, truth = held_out_cells(CELLS_PER_CLASS)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path("dist/image-smoke.log")
    started = time.monotonic()
    container = (BuildahContainer if backend == "buildah" else DockerContainer)(image, port, log)
    try:
        ready_s = wait_ready(url, container, READY_TIMEOUT_S)
        with MalariaClient(url) as client:
            answers = client.classify(paths)
            single = client.predict(paths[0])
            info = client.model_info()
        stray_writes = container.writes_outside_volumes() if isinstance(container, BuildahContainer) else []
    finally:
        exit_code = container.stop()
    stopped_s = time.monotonic() - started
    # In process with the runtime and precision the image says it serves (OpenVINO bf16 by default).
    served_with = get_settings().model_copy(update={"runtime": info["runtime"], "precision": info["precision"]})
    predict = load_runtime(stored, served_with).predict
    expected_p = spec.probability_positive(predict(preprocess_batch(paths, spec)))
    expected_labels = spec.labels(expected_p)

    served_p = np.array([a["probability_parasitized"] for a in answers])
    served_labels = [a["label"] for a in answers]
    accuracy = float(np.mean([label == t for label, t in zip(served_labels, truth, strict=True)]))
    failures = []
    if served_labels != expected_labels:
        failures.append(f"labels differ from in-process: {served_labels} vs {expected_labels}")
    if not np.allclose(served_p, expected_p, atol=1e-4):
        failures.append(f"probabilities differ from in-process by {np.abs(served_p - expected_p).max():.2e}")
    if abs(single["probability_parasitized"] - served_p[0]) > 1e-4:
        failures.append("/predict and /classify disagree on the same cell")
    if accuracy < MIN_ACCURACY:
        failures.append(f"accuracy {accuracy:.2f} on {len(truth)} held-out cells is below {MIN_ACCURACY}")
    if info["bento_model"] != model_tag:
        failures.append(f"/model_info serves {info['bento_model']}, the image packaged {model_tag}")
    if exit_code != 0:
        failures.append(f"server exit code {exit_code} after SIGTERM")
    if stray_writes:
        failures.append(f"writes outside the Deployment's volumes (its root is read-only): {stray_writes[:20]}")
    flows_failure = check_flows_image(image_env["FLOWS_IMAGE"], backend)
    if flows_failure:
        failures.append(flows_failure)
    print(
        f"image {image} ({backend}): ready in {ready_s:.1f} s; {len(answers)} test cells, "
        f"accuracy {accuracy:.3f}, max |served - in-process| {np.abs(served_p - expected_p).max():.1e}; "
        f"model {model_tag}; stopped with exit code {exit_code}, {stopped_s:.0f} s in all; log {log}"
    )
    if failures:
        sys.exit("image-smoke FAILED:\n- " + "\n- ".join(failures))
    print(f"flows image {image_env['FLOWS_IMAGE']} imports every flow; image-smoke passed")


if __name__ == "__main__":
    if not shutil.which("buildah") and not shutil.which("docker"):
        sys.exit("neither buildah nor docker is installed")
    main()
