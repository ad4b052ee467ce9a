"""The image recipe: the Bento installs only requirements/serving.txt, so the service must import with it.

Building and running the image itself is `make image image-smoke` (run by `.ci/run`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("pandas", "sklearn", "mlflow", "matplotlib", "prefect", "evidently", "dvc", "typer", "locust")

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
    assert {"bentoml", "tensorflow-cpu", "keras", "pillow"} <= names
    assert not names & {"pandas", "scikit-learn", "mlflow", "prefect", "evidently"}


def test_bentofile_ships_the_service_with_the_serving_requirements_and_template():
    recipe = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert recipe["service"] == "service:MalariaClassifier"
    assert recipe["python"]["requirements_txt"] == "./requirements/serving.txt"
    template = ROOT / recipe["docker"]["dockerfile_template"]
    text = template.read_text()
    assert "{% extends bento_base_template %}" in text
    # The CA bundle is a build argument (seen by RUN steps, not kept), never an ENV of the image.
    assert "ARG SSL_CERT_FILE" in text and "ENV SSL_CERT_FILE" not in text
    assert "base_image" not in recipe["docker"], "the default base is python:3.11-slim; BASE_IMAGE overrides"
