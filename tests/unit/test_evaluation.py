"""Metrics, calibration, threshold and refer-band choice (pure functions)."""

import numpy as np
import pytest
from sklearn import metrics as skm

from malaria.evaluate import choose_refer_band, choose_threshold
from malaria.evaluation import classification_metrics, expected_calibration_error, fit_temperature


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000)
    p = np.clip(y * 0.7 + rng.normal(0.15, 0.2, len(y)), 0, 1)
    return y, p


def test_metrics_agree_with_scikit_learn(scores):
    y, p = scores
    m = classification_metrics(y, p, threshold=0.4)
    predicted = (p >= 0.4).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, predicted))
    assert m["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - predicted))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["tp"] + m["fn"] == y.sum()


def test_ece_is_zero_for_perfect_calibration_and_large_for_overconfidence():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, len(p)) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.where(p > 0.5, 0.999, 0.001)) > 0.2


def test_temperature_scaling_fixes_overconfident_logits():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, 20_000)
    y = (rng.uniform(0, 1, len(logits)) < 1 / (1 + np.exp(-logits))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * logits))
    assert fit_temperature(y, overconfident) == pytest.approx(3.0, rel=0.1)


def test_threshold_objectives(scores):
    y, p = scores
    assert choose_threshold(y, p) == 0.5
    fpr, tpr, thresholds = skm.roc_curve(y, p)
    assert choose_threshold(y, p, "youden") == pytest.approx(thresholds[np.argmax(tpr - fpr)])
    sensitive = choose_threshold(y, p, "sensitivity", target_sensitivity=0.99)
    assert skm.recall_score(y, p >= sensitive) >= 0.99


def test_refer_band_reaches_the_target_outside_it(scores):
    y, p = scores
    low, high = choose_refer_band(y, p, 0.5, target_accuracy=0.99, max_referred=0.5)
    referred = (p >= low) & (p < high)
    assert low < 0.5 < high and 0 < referred.mean() < 0.5
    assert ((p >= 0.5) == (y == 1))[~referred].mean() >= 0.99


def test_refer_band_never_refers_more_than_allowed(scores):
    y, p = scores
    low, high = choose_refer_band(y, p, 0.5, target_accuracy=1.0, max_referred=0.1)
    assert ((p >= low) & (p < high)).mean() <= 0.101


def test_the_field_threshold_is_the_lowest_reaching_the_target_specificity():
    import numpy as np

    from malaria.evaluate import choose_specific_threshold

    negatives = np.linspace(0.0, 0.99, 1000)  # 1000 uninfected cells
    labels = np.r_[np.zeros(1000), np.ones(10)]
    probability = np.r_[negatives, np.full(10, 0.999)]
    t = choose_specific_threshold(labels, probability, 0.995)
    specificity = (negatives < t).mean()
    assert specificity >= 0.995 and (negatives < t - 0.002).mean() < 0.995  # reached, and not by a margin
    assert (
        choose_specific_threshold(np.r_[np.zeros(100), np.ones(5)], np.r_[np.full(100, 0.1), np.ones(5)], 0.995) == 0.5
    )
