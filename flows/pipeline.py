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

from malaria.config import Settings, get_settings

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


# A task's cache key is its inputs but the settings object: the settings a step depends on are given as
# ``params`` (cache_params), so a change elsewhere (a log level, a port) does not redo training.
CACHED: dict[str, Any] = {
    "cache_policy": INPUTS - "settings",
    "cache_expiration": timedelta(days=30),
    "persist_result": True,
}
# Where a stage's results go (the registry), besides what DVC declares for it (`Settings.dvc_params`).
STAGE_TARGETS = {"register": ("mlflow_tracking_uri", "registered_model_name")}


def cache_params(settings: Settings, *stages: str) -> dict[str, Any]:
    """The settings the given pipeline stages depend on: the ones DVC declares for them (one list, in the
    settings class), plus where their results go."""
    names = {name for stage in stages for name in (*Settings.dvc_params(stage), *STAGE_TARGETS.get(stage, ()))}
    return settings.model_dump(mode="json", include=names)


@task(**CACHED)
def prepare_task(settings: Settings, data_fingerprint: str, params: dict, manifest_hash: str) -> str:
    """Validate and split; returns the manifest's content hash (given as input so a lost manifest is redone)."""
    from malaria.data import prepare

    prepare(settings)
    return fingerprint(settings.splits_path)


@task(**CACHED)
def train_task(settings: Settings, manifest_hash: str, params: dict, code_hash: str, force: bool) -> dict:
    """Train and register; the champion gate moves @champion only for an at-least-as-good model."""
    from malaria.train import train

    record = train(settings, force=force)
    return {
        "version": record.version,
        "run_id": record.run_id,
        "champion": record.is_champion,
        "metrics": record.metrics,
    }


@task(**CACHED)
def evaluate_task(settings: Settings, version: str, run_id: str, params: dict, code_hash: str) -> dict:
    """Test metrics, threshold and refer band of a version (keyed by its run: versions repeat across registries)."""
    from malaria.evaluate import evaluate_model

    result = evaluate_model(settings, version)
    return {"metrics": result.metrics, "threshold": result.spec.threshold}


@task(**CACHED)
def import_task(settings: Settings, champion_run_id: str, champion_spec: str, bentoml_home: str) -> str:
    """The champion into the BentoML store, again when its spec (threshold, refer band) or the store changed."""
    from malaria.bento import import_model

    return str(import_model(settings).tag)


@task(**CACHED)
def build_task(bento_model_tag: str, code_hash: str) -> str:
    """``bentoml build`` of the service around the imported model; returns the Bento tag."""
    output = subprocess.run(["bentoml", "build", "-o", "tag"], check=True, capture_output=True, text=True)
    return output.stdout.strip().splitlines()[-1].replace("__tag__:", "")


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(force: bool = False, build: bool = True, settings: Settings | None = None) -> dict:
    """Run the whole model lifecycle; cached steps are skipped when their inputs did not change.

    ``settings``: the caller's; a deployment's run reads the environment.
    """
    from malaria.data import ensure_dataset
    from malaria.registry import RegistryError, get_version

    settings = settings or get_settings()
    params = cache_params(settings, "prepare", "train") | cache_params(settings, "register")
    code_hash = fingerprint(PACKAGE)
    data = fingerprint(ensure_dataset(settings))
    manifest_hash = prepare_task(settings, data, params, fingerprint(settings.splits_path))
    trained = train_task(settings, manifest_hash, params, code_hash, force)
    evaluation = evaluate_task(
        settings, trained["version"], trained["run_id"], cache_params(settings, "evaluate"), code_hash
    )
    try:
        champion = get_version(settings)
    except RegistryError:
        champion = None
    summary: dict[str, Any] = {"trained": trained, "evaluation": evaluation, "champion": champion and champion.version}
    if champion is not None:
        store = os.environ.get("BENTOML_HOME", "~/bentoml")  # BentoML's store location
        summary["bento_model"] = import_task(settings, str(champion.run_id), champion.spec.to_json(), store)
        if build:
            summary["bento"] = build_task(summary["bento_model"], fingerprint(*SERVICE_FILES))
    get_run_logger().info("pipeline finished: %s", summary)
    return summary


if __name__ == "__main__":
    training_pipeline()
