"""The training pipeline: prepare -> train -> evaluate -> champion gate -> BentoML import -> bento build.

Steps are cached on what they depend on (data listing, split manifest, parameters, code), so an
unchanged step is not redone when the pipeline runs again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import INPUTS

from malaria.config import get_settings

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "malaria"
SERVICE_FILES = (PACKAGE, REPO / "service.py", REPO / "bentofile.yaml", REPO / "requirements")


def fingerprint(*paths: Path) -> str:
    """A content hash of files (folders: every file name, size and modification time; bytecode caches skipped)."""
    digest = hashlib.sha256()
    for path in paths:
        if path.is_dir():
            for item in sorted(path.rglob("*")):
                if item.is_file() and "__pycache__" not in item.parts:
                    stat = item.stat()
                    digest.update(f"{item.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


CACHED: dict[str, Any] = {"cache_policy": INPUTS, "cache_expiration": timedelta(days=30), "persist_result": True}


@task(**CACHED)
def prepare_task(data_fingerprint: str, params: dict, manifest_hash: str) -> str:
    """Validate and split; returns the manifest's content hash (given as input so a lost manifest is redone)."""
    from malaria.data import prepare

    settings = get_settings()
    prepare(settings)
    return fingerprint(settings.splits_path)


@task(**CACHED)
def train_task(manifest_hash: str, params: dict, code_hash: str, force: bool) -> dict:
    """Train and register; the champion gate moves @champion only for an at-least-as-good model."""
    from malaria.train import train

    record = train(get_settings(), force=force)
    return {
        "version": record.version,
        "run_id": record.run_id,
        "champion": record.is_champion,
        "metrics": record.metrics,
    }


@task(**CACHED)
def evaluate_task(version: str, run_id: str, refer_target_accuracy: float, code_hash: str) -> dict:
    """Test metrics, threshold and refer band of a version (keyed by its run: versions repeat across registries)."""
    from malaria.evaluate import evaluate_model

    result = evaluate_model(get_settings(), version)
    return {"metrics": result.metrics, "threshold": result.spec.threshold}


@task(**CACHED)
def import_task(champion_run_id: str, champion_spec: str, bentoml_home: str) -> str:
    """The champion into the BentoML store, again when its spec (threshold, refer band) or the store changed."""
    from malaria.bento import import_model

    return str(import_model(get_settings()).tag)


@task(**CACHED)
def build_task(bento_model_tag: str, code_hash: str) -> str:
    """``bentoml build`` of the service around the imported model; returns the Bento tag."""
    output = subprocess.run(["bentoml", "build", "-o", "tag"], check=True, capture_output=True, text=True)
    return output.stdout.strip().splitlines()[-1].replace("__tag__:", "")


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(force: bool = False, build: bool = True) -> dict:
    """Run the whole model lifecycle; cached steps are skipped when their inputs did not change."""
    from malaria.data import ensure_dataset
    from malaria.registry import RegistryError, get_version

    settings = get_settings()
    params = settings.model_dump(
        mode="json",
        include={
            "seed",
            "train_seed",
            "val_fraction",
            "test_fraction",
            "profile",
            "image_size",
            "width",
            "epochs",
            "learning_rate",
            "weight_decay",
            "batch_size",
            "deterministic",
            "max_train_images",
            "mlflow_tracking_uri",
            "registered_model_name",
        },
    )
    code_hash = fingerprint(PACKAGE)
    manifest_hash = prepare_task(fingerprint(ensure_dataset(settings)), params, fingerprint(settings.splits_path))
    trained = train_task(manifest_hash, params, code_hash, force)
    evaluation = evaluate_task(trained["version"], trained["run_id"], settings.refer_target_accuracy, code_hash)
    try:
        champion = get_version(settings)
    except RegistryError:
        champion = None
    summary: dict[str, Any] = {"trained": trained, "evaluation": evaluation, "champion": champion and champion.version}
    if champion is not None:
        store = os.environ.get("BENTOML_HOME", "~/bentoml")  # BentoML's store location
        summary["bento_model"] = import_task(str(champion.run_id), champion.spec.to_json(), store)
        if build:
            summary["bento"] = build_task(summary["bento_model"], fingerprint(*SERVICE_FILES))
    get_run_logger().info("pipeline finished: %s", summary)
    return summary


if __name__ == "__main__":
    training_pipeline()
