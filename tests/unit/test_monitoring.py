"""Monitoring features: the per-image statistics logged by the service and compared by the drift flow."""

from __future__ import annotations

import numpy as np
import pandas as pd

from malaria.monitoring import FEATURE_COLUMNS, image_features_batch


def test_features_equal_numpy_statistics_per_image_and_channel():
    rng = np.random.default_rng(0)
    batch = rng.random((5, 64, 64, 3), dtype=np.float32) * np.array([1.0, 0.6, 0.3], dtype=np.float32)
    sizes = [(100 + i, 120 - i) for i in range(5)]
    features = image_features_batch(batch, sizes)
    assert [tuple(f) for f in features] == [FEATURE_COLUMNS] * 5
    means, stds = batch.mean(axis=(1, 2)), batch.std(axis=(1, 2))
    for f, mean, std, (width, height) in zip(features, means, stds, sizes, strict=True):
        assert (f["width"], f["height"]) == (width, height)
        np.testing.assert_allclose([f["mean_r"], f["mean_g"], f["mean_b"]], mean, atol=1e-6)
        np.testing.assert_allclose([f["std_r"], f["std_g"], f["std_b"]], std, atol=1e-5)
        assert abs(f["brightness"] - (0.299 * mean[0] + 0.587 * mean[1] + 0.114 * mean[2])) < 1e-6


def test_a_flat_image_has_zero_spread():
    [f] = image_features_batch(np.full((1, 8, 8, 3), 0.5, dtype=np.float32), [(8, 8)])
    assert f["std_r"] == f["std_g"] == f["std_b"] == 0.0
    assert f["mean_r"] == 0.5 and abs(f["brightness"] - 0.5) < 1e-9


def test_prediction_window_reads_the_days_and_versions_asked_for(tmp_path):
    import json
    from datetime import UTC, datetime, timedelta

    from malaria.monitoring import load_prediction_window

    now = datetime.now(UTC)

    def write(name: str, rows: list[dict]) -> None:
        (tmp_path / name).write_text("".join(json.dumps(row) + "\n" for row in rows))

    old_day = (now - timedelta(days=3)).strftime("%Y-%m-%d")
    # A recent time in an old day's file: only the file's date can leave it out.
    write(f"predictions-{old_day}-1.jsonl", [{"time": now.isoformat(), "model_version": "1"}])
    write(
        f"predictions-{now:%Y-%m-%d}-1.jsonl",
        [
            {"time": now.isoformat(), "model_version": "1"},
            {"time": now.isoformat(), "model_version": "2"},
            {"time": (now - timedelta(hours=5)).isoformat(), "model_version": "2"},
        ],
    )
    with (tmp_path / f"predictions-{now:%Y-%m-%d}-1.jsonl").open("a") as handle:
        handle.write('{"time": "half a line from a failed wri')  # skipped, not a crash
    assert len(load_prediction_window(tmp_path)) == 4
    assert len(load_prediction_window(tmp_path, since=now - timedelta(days=4))) == 4
    assert len(load_prediction_window(tmp_path, since=now - timedelta(hours=1))) == 2
    recent_v2 = load_prediction_window(tmp_path, since=now - timedelta(hours=1), model_version="2")
    assert list(recent_v2["model_version"]) == ["2"]


def test_live_quality_is_accuracy_on_audit_reviews_per_day_and_version_beside_referred_agreement():
    import pandas as pd

    from malaria.monitoring import live_quality, window_accuracy

    def rows(day, version, reason, pairs):
        return [
            {"created_at": f"{day} 10:00", "model_version": version, "reason": reason, "label": t, "model_label": m}
            for t, m in pairs
        ]

    right, wrong = ("Uninfected", "Uninfected"), ("Parasitized", "Uninfected")
    reviews = pd.DataFrame(
        rows("2026-11-29", "3", "audit", [right] * 9 + [wrong])
        + rows("2026-11-30", "3", "audit", [right] * 3 + [wrong])
        + rows("2026-11-30", "3", "refer", [right, wrong])
        + rows("2026-11-30", "3", "audit", [("unsure", "Uninfected")] * 5)
        + rows("2026-11-30", "2", "audit", [wrong] * 2)
    )
    quality = live_quality(reviews).set_index(["day", "model_version"])
    assert quality.loc[("2026-11-29", "3"), "audit_accuracy"] == 0.9
    assert quality.loc[("2026-11-30", "3"), "audit_reviews"] == 4  # unsure is not a label to score
    assert quality.loc[("2026-11-30", "3"), "audit_accuracy"] == 0.75
    assert quality.loc[("2026-11-30", "3"), "refer_agreement"] == 0.5
    assert window_accuracy(quality.reset_index(), "3") == (12 / 14, 14)
    assert window_accuracy(quality.reset_index(), None) == (12 / 16, 16)


def test_prediction_drift_of_a_confident_model_is_a_distance_that_ties_at_0_and_1_do_not_fool(tmp_path):
    from malaria.monitoring import DRIFT_FEATURES, drift_report

    rng = np.random.default_rng(0)

    def window(n: int, parasitized_share: float) -> pd.DataFrame:
        frame = pd.DataFrame(rng.normal(0.4, 0.05, (n, len(DRIFT_FEATURES))), columns=DRIFT_FEATURES)
        confident = rng.permutation(n) < round(n * parasitized_share)  # answers at 0 or 1 once rounded, as logged
        frame["probability_parasitized"] = np.where(confident, 1.0, 0.0)
        frame.loc[frame.index[:3], "probability_parasitized"] = [0.2, 0.5, 0.93]  # and a few in between
        return frame

    reference = window(200, 0.5)
    reference["probability_parasitized"] = np.clip(reference["probability_parasitized"], 3e-9, 1 - 3e-9)  # unrounded
    same = drift_report(reference, window(120, 0.5), tmp_path / "same")
    assert not same.prediction_drift and same.prediction_score < 0.1, same.summary()
    shifted = drift_report(reference, window(120, 0.95), tmp_path / "shifted")  # nearly every cell called infected
    assert shifted.prediction_drift and shifted.drift_detected, shifted.summary()
