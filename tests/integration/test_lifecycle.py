"""The full chain on generated data: train -> MLflow (SQLite) -> champion gate -> BentoML store."""

import json
import re
from pathlib import Path

import bentoml
import mlflow
import numpy as np
import pytest

from malaria.bento import load_stored_keras, stored_spec
from malaria.data import images_fingerprint, read_manifest, source_roots
from malaria.evaluate import other_split_warning
from malaria.registry import (
    SPLIT_TAG,
    VALIDATION_SET_TAG,
    RegistryError,
    champion_version,
    get_version,
    promote_if_better,
)
from malaria.train import load_split, predict_probability, validation_scorer

pytestmark = pytest.mark.slow


def test_training_writes_artifacts_and_learns(champion):
    settings, record, _ = champion
    folder = settings.artifacts_dir
    for name in (
        "model.keras",
        "model_spec.json",
        "history.json",
        "metrics.json",
        "confusion_matrix.png",
        "roc_curve.png",
        "learning_curves.png",
        "reference_features.csv",
    ):
        assert (folder / name).is_file(), name
    history = json.loads((folder / "history.json").read_text())
    assert len(history["loss"]) == settings.epochs
    # Generated parasitized cells carry obvious purple spots: even a 2-epoch model separates them.
    assert record.metrics["test_roc_auc"] > 0.9


def test_run_and_registry_hold_params_metrics_spec_and_signature(champion):
    settings, record, _ = champion
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    run = mlflow.get_run(record.run_id)
    assert run.data.params["image_size"] == "32" and run.data.params["profile"] == "quick"
    assert {"val_accuracy", "test_roc_auc", "test_ece"} <= set(run.data.metrics)
    info = mlflow.models.get_model_info(f"models:/{settings.registered_model_name}@champion")
    assert [column["name"] for column in info.signature.inputs.to_dict()] == ["image", "path"]  # the pipeline
    assert info.metadata["spec"]["image_size"] == 32
    keras = mlflow.models.get_model_info(f"runs:/{record.run_id}/keras")  # the bare network, same run
    assert keras.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 32, 32, 3)
    champion_record = get_version(settings)
    assert champion_record.version == record.version and champion_record.is_champion
    assert champion_record.spec == record.spec


@pytest.fixture
def newer(champion):
    """Another version of the champion's run; the champion alias is put back afterwards, whatever happened."""
    settings, record, _ = champion
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = mlflow.MlflowClient()
    yield client.create_model_version(
        settings.registered_model_name, f"runs:/{record.run_id}/model", run_id=record.run_id
    )
    client.set_registered_model_alias(settings.registered_model_name, settings.champion_alias, record.version)


def test_champion_alias_only_moves_for_a_model_at_least_as_good(champion, newer):
    settings, record, _ = champion
    worse = {settings.gate_metric: record.metrics[settings.gate_metric] - 0.1}
    assert not promote_if_better(settings, newer.version, worse)
    assert champion_version(settings) == record.version
    assert promote_if_better(settings, newer.version, worse, force=True)
    assert champion_version(settings) == str(newer.version)


def test_a_rollback_points_the_champion_at_a_named_version_and_refuses_an_unknown_one(champion, newer):
    from malaria.registry import RegistryError, set_champion

    settings, record, _ = champion
    assert set_champion(settings, str(newer.version)) == record.version  # no gate: an operator's decision
    assert champion_version(settings) == str(newer.version)
    assert set_champion(settings, record.version) == str(newer.version)  # and back
    with pytest.raises(RegistryError, match="no version '999'"):
        set_champion(settings, "999")
    assert champion_version(settings) == record.version


def test_a_champion_validated_on_other_images_is_scored_again_on_the_new_ones(champion, newer):
    """A real-data model must not lose to a champion whose score came from other (e.g. generated) images."""
    settings, record, _ = champion
    champion_set = get_version(settings).tags[VALIDATION_SET_TAG]
    assert champion_set == record.tags[VALIDATION_SET_TAG]
    candidate = {settings.gate_metric: record.metrics[settings.gate_metric] - 0.1}
    rescored = []

    def rescore(version):
        rescored.append(version.version)
        return candidate[settings.gate_metric] - 0.05

    # Same validation images: the recorded scores compare, nothing is rescored.
    assert not promote_if_better(settings, newer.version, candidate, False, champion_set, rescore)
    assert rescored == [] and champion_version(settings) == record.version

    # A champion that cannot be scored there (or has no score: one class) keeps its recorded score.
    def unloadable(version):
        raise OSError("artifacts gone")

    for rescore_failing in (unloadable, lambda version: float("nan")):
        assert not promote_if_better(settings, newer.version, candidate, False, "other-images", rescore_failing)
        assert champion_version(settings) == record.version
    # Other validation images: the champion is scored on the candidate's, and loses there.
    assert promote_if_better(settings, newer.version, candidate, False, "other-images", rescore)
    assert rescored == [record.version] and champion_version(settings) == str(newer.version)


def test_rescoring_a_version_on_its_own_validation_images_gives_its_recorded_score(champion):
    settings, record, _ = champion
    manifest = read_manifest(settings.splits_path)
    val = load_split(manifest, source_roots(settings), "val", record.spec, settings.max_train_images, settings.seed)
    assert images_fingerprint(val.frame) == record.tags[VALIDATION_SET_TAG]
    score = validation_scorer(settings, source_roots(settings), val)(get_version(settings, record.version))
    assert score == pytest.approx(record.metrics[settings.gate_metric], abs=1e-6)


def test_evaluating_on_another_split_is_flagged(champion):
    """Test patients of a new split may be training patients of the model: evaluation says so."""
    settings, record, _ = champion
    manifest = read_manifest(settings.splits_path)
    assert record.tags[SPLIT_TAG] == images_fingerprint(manifest)
    assert other_split_warning(get_version(settings, record.version), manifest) is None
    swapped = manifest.assign(split=manifest["split"].map({"train": "test", "test": "train", "val": "val"}))
    assert "trained on another split" in other_split_warning(record, swapped)


def test_imported_bento_model_carries_spec_and_lineage(champion):
    settings, record, stored = champion
    assert bentoml.models.get(f"{settings.bento_model_name}:latest").tag == stored.tag
    assert stored_spec(stored) == record.spec
    meta = stored.info.metadata
    assert meta["mlflow_version"] == record.version and meta["mlflow_run_id"] == record.run_id
    assert meta["metrics"]["test_roc_auc"] == pytest.approx(record.metrics["test_roc_auc"], abs=1e-6)
    assert stored.info.labels["registered_model"] == settings.registered_model_name


def test_stored_model_predicts_like_the_trained_one(champion, synthetic_dir):
    settings, record, stored = champion
    from malaria.data import load_arrays

    paths = sorted(str(p) for p in (synthetic_dir / "Parasitized").glob("*.png"))[:8]
    images = load_arrays(paths, record.spec)
    served = predict_probability(load_stored_keras(stored), images, record.spec)
    import keras

    trained = predict_probability(keras.saving.load_model(settings.artifacts_dir / "model.keras"), images, record.spec)
    np.testing.assert_allclose(served, trained, atol=1e-5)


def test_import_converts_for_openvino_gated_on_the_test_split(champion):
    settings, record, stored = champion
    converted = stored.info.metadata["runtime"]
    test_images = int((read_manifest(settings.splits_path)["split"] == "test").sum())
    assert converted["conversion"]["reference"] == f"the test split ({test_images} images)"
    assert converted["conversion"]["max_abs_difference"] <= 1e-4
    fp32 = converted["precisions"]["fp32"]
    assert fp32["passed"] and fp32["accuracy"] == pytest.approx(record.metrics["test_accuracy"], abs=1e-4)
    assert converted["default_precision"] in {name for name, e in converted["precisions"].items() if e["passed"]}
    assert (Path(stored.path_of("openvino")) / "model.xml").is_file()
    saved = np.load(Path(stored.path_of("mlflow_model")) / "artifacts" / "reference_batch.npz")
    assert saved["images"].shape == (32, record.spec.image_size, record.spec.image_size, 3)


def test_a_conversion_failing_its_gate_is_refused_and_the_store_keeps_its_model(champion, monkeypatch):
    from malaria import runtime
    from malaria.bento import import_model

    settings, _, stored = champion
    before = {str(model.tag) for model in bentoml.models.list(settings.bento_model_name)}
    monkeypatch.setattr(runtime, "CONVERSION_TOLERANCE", -1.0)  # no conversion can be that close
    with pytest.raises(runtime.ConversionError, match="conversion refused, the store keeps its current model"):
        import_model(settings)
    assert {str(model.tag) for model in bentoml.models.list(settings.bento_model_name)} == before
    assert bentoml.models.get(f"{settings.bento_model_name}:latest").tag == stored.tag


def test_no_champion_is_a_clear_error(settings_factory):
    settings = settings_factory(registered_model_name="nothing-here")
    with pytest.raises(RegistryError, match="no @champion"):
        get_version(settings)


def test_the_bento_builds_from_the_lock_without_a_package_index_and_twice_alike(champion):
    """`make bento`: the service, its code and the champion packed into a Bento whose packages are the lock's."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    _, _, stored = champion
    nowhere = "http://127.0.0.1:9/simple"  # any attempt to resolve against an index fails
    env = {**os.environ, "PIP_INDEX_URL": nowhere, "UV_INDEX_URL": nowhere, "UV_DEFAULT_INDEX": nowhere}

    def build() -> bentoml.Bento:
        done = subprocess.run(
            [sys.executable, "-m", "bentoml", "build", "-o", "tag", "."],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return bentoml.get(done.stdout.strip().splitlines()[-1].replace("__tag__:", ""))

    first, second = build(), build()
    assert {str(m.tag) for m in first.info.all_models} == {str(stored.tag)}
    assert (Path(first.path) / "src" / "service.py").is_file()
    assert (Path(first.path) / "src" / "malaria" / "preprocess.py").is_file()

    def packages(bento: bentoml.Bento) -> list[str]:
        text = (Path(bento.path) / "env" / "python" / "requirements.txt").read_text()
        return sorted(line.split()[0] for line in text.splitlines() if line and not line.startswith(("#", " ")))

    locked = packages(first)
    assert locked == packages(second), "two builds, one package set"
    assert len(locked) > 50 and all("==" in line for line in locked), "every package pinned, dependencies too"


def test_against_a_tracking_server_artifacts_go_to_the_server_store(settings_factory, tmp_path):
    """As in compose.yaml: `mlflow server` with an artifact proxy; every client of it must read the artifacts."""
    import sys

    from malaria.registry import client
    from tests.server_process import ServerProcess, free_port

    port, served = free_port(), tmp_path / "served-artifacts"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(served)]
    server = ServerProcess(command, port, {}, tmp_path / "mlflow-server.log", ready_timeout=120, ready_path="/health")
    try:
        settings = settings_factory(mlflow_tracking_uri=server.url, experiment_name="remote")
        client(settings)
        assert mlflow.get_experiment_by_name("remote").artifact_location.startswith("mlflow-artifacts:")
        with mlflow.start_run():
            mlflow.log_dict({"written": "through the server"}, "probe.json")
        assert [p.name for p in served.rglob("probe.json")] == ["probe.json"]
        assert not settings.mlflow_artifact_root.exists()
    finally:
        server.stop()


def test_a_version_scoring_exactly_the_champions_score_is_promoted(champion, newer):
    """The gate's boundary: 'at least as good' moves the alias on a tie (same validation images)."""
    settings, record, _ = champion
    tie = {settings.gate_metric: record.metrics[settings.gate_metric]}
    assert promote_if_better(settings, newer.version, tie, False, record.tags[VALIDATION_SET_TAG])
    assert champion_version(settings) == str(newer.version)


def test_an_outside_model_worse_than_the_champion_is_registered_but_not_promoted(champion, settings_env, tmp_path):
    import keras
    from typer.testing import CliRunner

    from malaria.cli import app

    settings = settings_env(champion[0])
    record = champion[1]
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(pooled)).save(tmp_path / "outside.keras")
    result = CliRunner().invoke(
        app, ["register", "--model", str(tmp_path / "outside.keras"), "--labels", "Parasitized,Uninfected"]
    )
    assert result.exit_code == 0, result.output
    assert "(champion)" not in result.output
    registered = re.search(rf"registered {settings.registered_model_name} version (\d+)", result.output)
    assert registered, result.output
    outside = get_version(settings, registered[1])
    assert outside.metrics[settings.gate_metric] < record.metrics[settings.gate_metric]  # scored on the same split
    assert champion_version(settings) == record.version


def test_reviewed_cells_exported_from_the_queue_train_as_a_source_of_their_own(synthetic_dir, tmp_path):
    """The loop closed: review queue -> `malaria feedback export` -> `malaria train` with MALARIA_FEEDBACK_DIR."""
    from malaria.train import train
    from tests.conftest import make_settings
    from tests.unit.test_reviews import exported_feedback

    cells = [(p.read_bytes(), label) for label in ("Parasitized", "Uninfected")
             for p in sorted((synthetic_dir / label).glob("*.png"))[-30:]]  # fmt: skip
    folder = exported_feedback(tmp_path, cells)
    settings = make_settings(
        tmp_path / "run", data_dir=synthetic_dir, feedback_dir=folder, epochs=2, registered_model_name="with-feedback"
    )
    record = train(settings)
    manifest = read_manifest(settings.splits_path)
    feedback = manifest[manifest["source"] == "feedback"]
    assert len(feedback) == 60 and set(feedback["split"]) == {"train"}  # one day of reviews: all train
    assert record.spec.training_sources == ["feedback", "synthetic"]
    run = mlflow.MlflowClient(settings.mlflow_tracking_uri).get_run(record.run_id)
    assert run.data.params["sources"] == "feedback,synthetic"
