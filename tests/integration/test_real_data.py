"""Checks on the real NIH images; they run when MALARIA_DATA_DIR points at them (`.ci/run` sets it where the
data is, with MALARIA_EXPECT_REAL_DATA, so that missing data fails there instead of skipping)."""

from pathlib import Path

import pytest

from malaria.data import scan_dataset, split_by_patient
from tests.conftest import REAL_DATA_DIR, make_settings, need_real_data

DATA_DIR = REAL_DATA_DIR
pytestmark = pytest.mark.real_data


@pytest.fixture(autouse=True, scope="module")
def real_cells() -> None:
    need_real_data("cells", bool(DATA_DIR) and Path(DATA_DIR).is_dir(), "MALARIA_DATA_DIR")


@pytest.fixture(scope="module")
def real_split(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("real"), data_dir=Path(DATA_DIR))
    frame, report = scan_dataset(Path(DATA_DIR), settings)
    return settings, split_by_patient(frame, settings.seed), report


def test_every_real_image_is_valid_and_named_by_patient(real_split):
    _, frame, report = real_split
    assert report.n_skipped == 0
    assert len(frame) >= 1000 and frame["patient"].str.fullmatch(r"C\d+").all()
    assert set(frame["label"]) == {"Parasitized", "Uninfected"}


def test_real_split_is_patient_disjoint_and_balanced(real_split):
    _, frame, _ = real_split
    assert frame.groupby("patient")["split"].nunique().max() == 1
    shares = frame.groupby("split").size() / len(frame)
    assert shares["train"] > 0.6 and shares["val"] > 0.08 and shares["test"] > 0.08
    for _, part in frame.groupby("split"):
        assert 0.4 < (part["label"] == "Parasitized").mean() < 0.6


@pytest.mark.slow
def test_a_short_training_run_generalises_to_unseen_patients(real_split, tmp_path):
    """Model behaviour on real cells: a small, short run already separates the classes on new patients."""
    from malaria.train import train

    settings, frame, _ = real_split
    settings = make_settings(
        tmp_path, data_dir=Path(DATA_DIR), image_size=48, epochs=3, batch_size=64, max_train_images=2400
    )
    record = train(settings)
    assert record.metrics["test_roc_auc"] > 0.93
    assert record.metrics["test_accuracy"] > 0.85
