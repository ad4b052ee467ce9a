"""Training: the profile, the settings that override it, capped smoke-run splits, and fitting that repeats itself."""

import json
import subprocess
import sys

import pytest

from malaria.data import generate_synthetic, scan_dataset
from malaria.model import PROFILES, build_model
from malaria.spec import ModelSpec
from malaria.train import load_split, resolve_profile
from tests.conftest import REPO_ROOT as ROOT


def test_settings_override_the_profile(settings_factory):
    settings = settings_factory(width=0.125, epochs=3, image_size=40, learning_rate=1e-3, weight_decay=0.0)
    profile = resolve_profile(settings)
    assert (profile.width, profile.epochs, profile.image_size, profile.learning_rate) == (0.125, 3, 40, 1e-3)
    assert profile.weight_decay == 0.0  # zero is an override, not "unset"

    model = build_model(profile, profile.image_size)
    assert model.input_shape == (None, 40, 40, 3)
    assert model.get_layer("block1_conv1").filters == 8  # 64 * 0.125
    assert model.get_layer("block3_conv1").filters == 32  # 256 * 0.125


def test_without_overrides_the_profile_is_unchanged(settings_factory):
    settings = settings_factory(width=None, epochs=None, image_size=None, learning_rate=None, weight_decay=None)
    assert resolve_profile(settings) == PROFILES["quick"]


def test_a_capped_split_keeps_both_classes_in_equal_numbers(settings_factory, tmp_path):
    root = generate_synthetic(tmp_path / "cells", per_class=10, n_patients=2, size=40, seed=1)
    settings = settings_factory(data_dir=root)
    frame, _ = scan_dataset(root, settings)
    frame["split"] = "train"
    part = load_split(frame, {"nih": root}, "train", ModelSpec(image_size=32), limit=8, seed=0)
    assert part.frame["label"].value_counts().to_dict() == {"Parasitized": 4, "Uninfected": 4}
    assert part.images.shape == (8, 32, 32, 3)
    assert part.labels.sum() == 4  # labels follow the rows that were drawn
    again = load_split(frame, {"nih": root}, "train", ModelSpec(image_size=32), limit=8, seed=0)
    assert part.frame["path"].tolist() == again.frame["path"].tolist()


def test_an_epoch_repeats_infected_smear_crops_and_draws_fresh_uninfected_ones():
    import numpy as np
    import pandas as pd

    from malaria.train import epoch_plan

    # 6 NIH images, 2 infected smear crops, a pool of 10 uninfected smear crops
    frame = pd.DataFrame({"source": ["nih"] * 6 + ["smear"] * 12})
    labels = np.array([1, 0] * 3 + [1, 1] + [0] * 10)
    plan = epoch_plan(frame, labels, epochs=4, seed=3, infected_repeat=2, uninfected_per_epoch=3, smear_weight=2.0)
    assert plan.indices.shape == (4, 6 + 2 * 2 + 3)
    for row in plan.indices:
        counts = np.bincount(row, minlength=18)
        assert (counts[:6] == 1).all() and (counts[6:8] == 2).all()  # every NIH image once, infected twice
        assert counts[8:].sum() == 3 and counts[8:].max() == 1  # three distinct uninfected from the pool
    drawn = [frozenset(row[row >= 8]) for row in plan.indices]
    assert len(set(drawn)) > 1 and len(frozenset().union(*drawn)) > 3  # fresh draws, more of the pool seen
    assert plan.weights.tolist() == [1.0] * 6 + [2.0] * 12
    again = epoch_plan(frame, labels, epochs=4, seed=3, infected_repeat=2, uninfected_per_epoch=3, smear_weight=2.0)
    assert np.array_equal(plan.indices, again.indices)
    whole = epoch_plan(pd.DataFrame(), labels[:6], epochs=2, seed=0)  # no source column: all NIH, each once
    assert sorted(whole.indices[0]) == list(range(6)) and whole.weights.tolist() == [1.0] * 6


def test_hard_negative_mining_puts_the_highest_scored_uninfected_crops_in_the_draw():
    import numpy as np
    import pandas as pd

    from malaria.train import epoch_plan, hardest_negatives

    frame = pd.DataFrame({"source": ["nih"] * 6 + ["smear"] * 12})
    labels = np.array([1, 0] * 3 + [1, 1] + [0] * 10)
    score = np.full(18, 0.9)  # NIH and infected smear crops score highest: never picked
    score[8:] = np.linspace(0.01, 0.1, 10)
    score[[11, 15]] = [0.4, 0.45]  # uninfected smear crops 15 then 11 are the hardest
    hard = hardest_negatives(frame, labels, lambda pool: score[pool], 2)
    assert hard.tolist() == [15, 11]
    assert hardest_negatives(frame, labels, lambda pool: score[pool], 0).size == 0
    assert hardest_negatives(pd.DataFrame(), labels[:6], lambda pool: score[pool], 2).size == 0  # all NIH
    plan = epoch_plan(frame, labels, 5, 3, infected_repeat=2, uninfected_per_epoch=3, hard_negatives=hard)
    for row in plan.indices:
        counts = np.bincount(row, minlength=18)
        assert counts[15] == counts[11] == 1 and counts[8:].sum() == 3  # both hard ones, one at random
    assert len({frozenset(row[row >= 8]) for row in plan.indices}) > 1
    # Without hard negatives the plan is the one of every earlier model (same draws).
    before = epoch_plan(frame, labels, 5, 3, infected_repeat=2, uninfected_per_epoch=3)
    assert np.array_equal(before.indices, epoch_plan(frame, labels, 5, 3, 2, 3, hard_negatives=None).indices)


def test_hard_negative_mining_needs_a_draw_smaller_than_the_pool():
    import pydantic

    from malaria.config import Settings

    with pytest.raises(pydantic.ValidationError, match="UNINFECTED_PER_EPOCH"):
        Settings(smear_hard_negatives=100, smear_uninfected_per_epoch=None)
    assert Settings(smear_hard_negatives=0, smear_uninfected_per_epoch=None).smear_uninfected_per_epoch is None
    assert Settings(smear_hard_negatives=100, smear_uninfected_per_epoch=400).smear_hard_negatives == 100


def test_the_training_seed_defaults_to_the_split_seed(settings_factory):
    assert settings_factory(seed=7, train_seed=None).training_seed == 7
    assert settings_factory(seed=7, train_seed=3).training_seed == 3


# In a fresh interpreter: op determinism is process-wide and other tests' training turns it on.
REPEATED_FIT = """
import json, sys
from pathlib import Path

import numpy as np
import pandas as pd

from malaria.model import build_model, recompute_batch_norm_statistics
from malaria.spec import ModelSpec
from malaria.train import SplitData, fit_model, resolve_profile
from tests.conftest import make_settings

settings = make_settings(Path(sys.argv[1]), width=0.125, epochs=2, image_size=32, batch_size=16, deterministic=True)
profile = resolve_profile(settings)
rng = np.random.default_rng(0)
labels = (rng.random(96) > 0.5).astype(np.float32)
train_data = SplitData(pd.DataFrame(), rng.random((96, 32, 32, 3), dtype=np.float32), labels)
val_data = SplitData(pd.DataFrame(), train_data.images[:32], labels[:32])
(first, first_history), (second, second_history) = [
    fit_model(profile, ModelSpec(image_size=32), settings, train_data, val_data) for _ in range(2)
]
reseeded = settings.model_copy(update={"train_seed": 8})
other_seed, _ = fit_model(profile, ModelSpec(image_size=32), reseeded, train_data, val_data)
untrained = build_model(profile, 32, seed=settings.seed)
pairs = list(zip(first.get_weights(), second.get_weights(), strict=True))
fitted_weights = first.get_weights()
recompute_batch_norm_statistics(first, train_data.images, settings.batch_size, settings.training_seed)
# With the smear source: a planned epoch (repeated infected crops, a draw of uninfected ones), weighted.
smear_data = SplitData(pd.DataFrame({"source": ["nih"] * 64 + ["smear"] * 32}), train_data.images, labels)
planned = settings.model_copy(
    update={"smear_infected_repeat": 2, "smear_uninfected_per_epoch": 4, "smear_loss_weight": 2.0}
)
unweighted = planned.model_copy(update={"smear_loss_weight": 1.0})
mined = planned.model_copy(update={"smear_hard_negatives": 2})
(plan_a, plan_history), (plan_b, _), (plan_unweighted, _), (mined_a, mined_history), (mined_b, _) = [
    fit_model(profile, ModelSpec(image_size=32), s, smear_data, val_data)
    for s in (planned, planned, unweighted, mined, mined)
]
print(json.dumps({
    "planned_epochs": len(plan_history["loss"]),
    "mined_epochs": len(mined_history["loss"]),
    "mined_same_weights": all(np.array_equal(a, b) for a, b in zip(mined_a.get_weights(), mined_b.get_weights())),
    "mining_used": any(not np.array_equal(a, b) for a, b in zip(plan_a.get_weights(), mined_a.get_weights())),
    "planned_same_weights": all(np.array_equal(a, b) for a, b in zip(plan_a.get_weights(), plan_b.get_weights())),
    "weights_used": any(not np.array_equal(a, b) for a, b in zip(plan_a.get_weights(), plan_unweighted.get_weights())),
    "epochs": len(first_history["loss"]),
    "same_history": first_history == second_history,
    "same_weights": all(np.array_equal(a, b) for a, b in pairs),
    "trained": any(not np.array_equal(a, b) for a, b in zip(first.get_weights(), untrained.get_weights())),
    "train_seed_used": any(not np.array_equal(a, b) for a, b in zip(first.get_weights(), other_seed.get_weights())),
    "batch_norm_recomputed": all(np.allclose(a, b) for a, b in zip(fitted_weights, first.get_weights())),
}))
"""


@pytest.mark.slow  # small trainings: `make test-fast` promises none
def test_deterministic_training_repeats_the_same_weights(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", REPEATED_FIT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    # "trained": the two runs are compared after their weights moved, not as two initialisations.
    assert outcome == {
        "planned_epochs": 2,  # a plan is one pass over all epochs: Keras must not stop after the first
        "planned_same_weights": True,
        "mined_epochs": 2,  # one fit per epoch, the epochs' histories joined
        "mined_same_weights": True,
        "mining_used": True,  # the second epoch's draw holds the mined crops
        "weights_used": True,  # the smear loss weight reaches the loss
        "epochs": 2,
        "same_history": True,
        "same_weights": True,
        "trained": True,
        "train_seed_used": True,
        "batch_norm_recomputed": True,  # recomputing again changes nothing: fit_model already did it
    }


def test_metrics_are_also_given_per_source_when_the_split_mixes_sources():
    import numpy as np
    import pandas as pd

    from malaria.train import SplitData, metrics_by_source

    frame = pd.DataFrame({"source": ["nih"] * 4 + ["smear"] * 4})
    labels = np.array([1, 0, 1, 0, 1, 0, 0, 0], dtype=float)
    probability = np.array([0.9, 0.1, 0.8, 0.2, 0.9, 0.7, 0.1, 0.2])
    data = SplitData(frame, np.zeros((8, 1)), labels)
    metrics = metrics_by_source("test", data, probability, 0.5)
    assert metrics["test_nih_accuracy"] == 1.0 and metrics["test_smear_specificity"] == 2 / 3
    assert metrics["test_accuracy"] == 7 / 8 and metrics["test_smear_sensitivity"] == 1.0
    only_nih = SplitData(frame.iloc[:4], np.zeros((4, 1)), labels[:4])
    assert not any("nih" in key for key in metrics_by_source("", only_nih, probability[:4], 0.5))
