"""The image recipe: the Bento installs requirements/serving.lock (no TensorFlow); the service imports with it.

Building and running the image itself is `make image image-smoke` (run by `.ci/run`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT as ROOT

# Not in the default image: training's packages, and TensorFlow (the service runs the champion on OpenVINO).
TRAINING_ONLY = (
    *("pandas", "sklearn", "mlflow", "matplotlib", "prefect", "evidently", "dvc", "typer", "locust"),
    *("tensorflow", "keras", "nncf"),
)

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not a serving requirement)")
sys.meta_path.insert(0, Block())
import service
print("ok", service.MalariaClassifier.name)
"""


def test_service_imports_without_training_only_packages():
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER.format(blocked=TRAINING_ONLY)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok MalariaClassifier")


def test_serving_requirements_exclude_training_only_packages():
    names = {
        line.split("==")[0].strip().lower()
        for line in (ROOT / "requirements/serving.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"bentoml", "openvino", "pillow"} <= names
    assert not names & {"pandas", "scikit-learn", "mlflow", "prefect", "evidently", "tensorflow-cpu", "keras"}


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line (names normalised as pip does)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            found[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version.strip()
    return found


@pytest.mark.parametrize(
    ("lock", "sources"),
    [
        ("serving.lock", ["serving.txt"]),
        ("flows.lock", ["serving.txt", "tensorflow.txt", "train.txt"]),
        ("dev.lock", ["serving.txt", "tensorflow.txt", "train.txt"]),
    ],
)
def test_each_lock_keeps_its_sources_pins_and_pins_everything(lock, sources):
    locked = pins(ROOT / "requirements" / lock)
    for source in sources:
        for name, version in pins(ROOT / "requirements" / source).items():
            assert locked.get(name) == version, f"{lock}: {name} {locked.get(name)}, {source} {version}: make lock"
    lines = [line for line in (ROOT / "requirements" / lock).read_text().splitlines() if line[:1].isalnum()]
    assert lines and all("==" in line for line in lines), f"{lock}: every package pinned"


def test_the_locks_agree_where_they_overlap_and_the_service_lock_has_no_training_package():
    dev, flows, serving = (pins(ROOT / "requirements" / name) for name in ("dev.lock", "flows.lock", "serving.lock"))
    for lock in (flows, serving):
        assert {name: dev[name] for name in lock if name in dev} == lock, "one version of a package everywhere"
    assert not serving.keys() & {"tensorflow-cpu", "keras", "pandas", "scikit-learn", "mlflow", "prefect"}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for requirement in extras["dev"] + extras["spark"]:
        name, _, version = requirement.partition("==")
        if version:
            assert dev[re.sub(r"[-_.]+", "-", name).lower()] == version, f"dev.lock: {requirement}: make lock"


def test_bentofile_ships_the_service_with_the_serving_requirements_and_template():
    recipe = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert recipe["service"] == "service:MalariaClassifier"
    assert recipe["python"]["requirements_txt"] == "./requirements/serving.lock"
    assert recipe["python"]["lock_packages"] is False, "the lock is installed as it is, not resolved again"
    template = ROOT / recipe["docker"]["dockerfile_template"]
    text = template.read_text()
    assert "{% extends bento_base_template %}" in text
    # The CA bundle is a build argument (seen by RUN steps, not kept), never an ENV of the image.
    assert "ARG SSL_CERT_FILE" in text and "ENV SSL_CERT_FILE" not in text
    assert "base_image" not in recipe["docker"], "the default base is python:3.11-slim; BASE_IMAGE overrides"


FAKE_BUILDAH = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
  images) printf '%s\\n' \\
      'localhost/malaria-classifier:v2 id2' 'localhost/malaria-classifier:latest id2' \\
      'localhost/malaria-classifier:v1 id1' 'localhost/malaria-flows:v1 fid1' \\
      'localhost/malaria-flows:latest fid2' 'localhost/malaria-base:bookworm bid' \\
      'docker.io/library/python:3.11-slim pid' '<none>:<none> dangling' \\
      'quay.io/someone/malaria-classifier:v0 qid' ;;
  containers) printf '%s\\n' 'c1 localhost/malaria-base:bookworm' 'c2 docker.io/library/debian:12' ;;
  info) echo "$GRAPHROOT" ;;
esac
"""


def _run_with_fake_buildah(
    tmp_path: Path, script: str, cwd: Path = ROOT, **env: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "buildah"
    fake.write_text(FAKE_BUILDAH)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.touch()
    environment = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "GRAPHROOT": str(tmp_path),
        "IMAGE_BACKEND": "buildah",
        **env,
    }
    result = subprocess.run([str(ROOT / script)], cwd=cwd, env=environment, capture_output=True, text=True, timeout=60)
    return result, calls.read_text().splitlines()


def test_image_prune_keeps_latest_and_removes_older_builds_and_failed_build_containers(tmp_path):
    result, calls = _run_with_fake_buildah(tmp_path, "deploy/image/prune.sh")
    assert result.returncode == 0, result.stderr
    removed = sorted(call.removeprefix("rmi ") for call in calls if call.startswith("rmi ") and "--prune" not in call)
    # v2 shares its image with :latest, so removing the tag would free nothing; other repositories stay,
    # and dangling images go through `rmi --prune`, not by name.
    assert removed == ["localhost/malaria-classifier:v1", "localhost/malaria-flows:v1"]
    assert "rm c1" in calls and "rm c2" not in calls
    assert "rmi --prune" in calls
    assert "pruned 2 image tags" in result.stdout


def test_image_prune_without_keep_latest_removes_every_malaria_build(tmp_path):
    result, calls = _run_with_fake_buildah(tmp_path, "deploy/image/prune.sh", KEEP_LATEST="0")
    assert result.returncode == 0, result.stderr
    removed = {call.removeprefix("rmi ") for call in calls if call.startswith("rmi ") and "--prune" not in call}
    assert len(removed) == 5
    assert all(name.startswith(("localhost/malaria-classifier:", "localhost/malaria-flows:")) for name in removed)


def test_image_build_refuses_to_start_without_enough_disk(tmp_path):
    result, calls = _run_with_fake_buildah(
        tmp_path, "deploy/image/build.sh", IMAGE_MIN_FREE_GIB="100000000", BENTOML="/nonexistent/bentoml"
    )
    assert result.returncode == 2
    assert "needs 100000000 GiB" in result.stderr and "make image-prune" in result.stderr
    assert not any(call.startswith(("build", "push")) for call in calls)


def test_image_prune_keeps_only_the_current_archive(tmp_path):
    work = tmp_path / "work"
    (work / "dist").mkdir(parents=True)
    for version in ("old", "new"):
        (work / "dist" / f"malaria-classifier-{version}.oci.tar").write_bytes(b"layer")
    (work / "dist" / "image.env").write_text("ARCHIVE=dist/malaria-classifier-new.oci.tar\n")
    result, _ = _run_with_fake_buildah(tmp_path, "deploy/image/prune.sh", cwd=work)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (work / "dist").glob("*.oci.tar")) == ["malaria-classifier-new.oci.tar"]


@pytest.mark.slow
def test_make_image_refuses_a_synthetic_model_without_the_override(champion, tmp_path):
    """The test champion was trained on generated cells: packaging it must be asked for explicitly."""
    import os

    result, calls = _run_with_fake_buildah(
        tmp_path,
        "deploy/image/build.sh",
        BENTOML=str(Path(sys.executable).with_name("bentoml")),
        BENTOML_HOME=os.environ["BENTOML_HOME"],
        HOME=os.environ.get("HOME", str(tmp_path)),
        IMAGE_MIN_FREE_GIB="0",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "trained on synthetic data" in result.stderr and "MALARIA_IMAGE_ALLOW_SYNTHETIC=true" in result.stderr
    assert not any(call.startswith(("build", "push")) for call in calls)
