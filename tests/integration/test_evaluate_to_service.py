"""What `malaria evaluate` decides (threshold, refer band) reaches the registry, the store and the answers."""

from __future__ import annotations

from pathlib import Path

import httpx
import keras
import pytest

from malaria.bento import import_model
from malaria.evaluate import evaluate_model
from malaria.registry import ChampionGate, TrainingRun, get_version, log_register_and_gate
from tests.helpers import Server

pytestmark = pytest.mark.slow


def test_the_threshold_and_band_chosen_by_evaluate_are_the_ones_served(champion, synthetic_dir, tmp_path):
    settings, record, _ = champion
    # A registry of its own (the champion's network registered again), so the session's champion keeps its spec.
    own = settings.model_copy(update={"registered_model_name": "evaluate-chain", "bento_model_name": "evaluate-chain"})
    network = keras.saving.load_model(settings.artifacts_dir / "model.keras", compile=False)
    log_register_and_gate(network, record.spec, own, TrainingRun(), ChampionGate(force=True))

    result = evaluate_model(own, out_dir=tmp_path / "evaluation", objective="youden", target_accuracy=0.999)
    chosen = result.spec
    assert (chosen.threshold, chosen.refer_band) != (record.spec.threshold, record.spec.refer_band)
    assert get_version(own).spec.threshold == chosen.threshold  # the registry holds it
    stored = import_model(own)
    assert stored.info.metadata["spec"]["threshold"] == chosen.threshold  # the store holds it

    cells = (
        sorted((synthetic_dir / "Parasitized").glob("*.png"))[:4]
        + sorted((synthetic_dir / "Uninfected").glob("*.png"))[:4]
    )
    server = Server({"MALARIA_BENTO_MODEL_NAME": own.bento_model_name}, tmp_path / "predictions")
    try:
        info = httpx.post(f"{server.url}/model_info", timeout=30).json()
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in cells]
        answers = httpx.post(f"{server.url}/classify", files=files, timeout=60).json()
    finally:
        assert server.stop() == 0
    assert info["threshold"] == chosen.threshold and tuple(info["refer_band"]) == chosen.refer_band
    for answer in answers:  # the served decisions follow the evaluated rule, not the trained one
        p = answer["probability_parasitized"]
        assert answer["label"] == chosen.labels([p])[0] and answer["decision"] == chosen.decision(p)
    assert Path(stored.path_of("openvino")).is_dir()
