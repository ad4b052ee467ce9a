"""The model contract: label mapping, calibration, decisions."""

import numpy as np
import pytest
from pydantic import ValidationError

from malaria.spec import PARASITIZED, UNINFECTED, ModelSpec


def test_sigmoid_of_the_positive_class_is_returned_as_is():
    spec = ModelSpec(sigmoid_class=PARASITIZED)
    assert spec.probability_positive(np.array([[0.9], [0.2]])) == pytest.approx([0.9, 0.2])


def test_sigmoid_of_the_other_class_is_flipped():
    # Keras' directory loader sorts classes: Parasitized=0, so its sigmoid is P(Uninfected).
    spec = ModelSpec(sigmoid_class=UNINFECTED)
    assert spec.probability_positive(np.array([[0.9], [0.2]])) == pytest.approx([0.1, 0.8])


def test_softmax_reads_the_positive_column_by_class_order():
    spec = ModelSpec(output="softmax", class_names=[UNINFECTED, PARASITIZED], sigmoid_class=None)
    assert spec.probability_positive(np.array([[0.7, 0.3]])) == pytest.approx([0.3])


def test_temperature_softens_without_moving_the_midpoint():
    spec = ModelSpec(temperature=2.0)
    p = spec.probability_positive(np.array([[0.5], [0.99], [0.01]]))
    assert p[0] == pytest.approx(0.5)
    assert 0.5 < p[1] < 0.99 and 0.01 < p[2] < 0.5


def test_labels_and_decisions_follow_threshold_and_band():
    spec = ModelSpec(threshold=0.5, refer_band=(0.3, 0.7))
    assert spec.labels(np.array([0.2, 0.5, 0.9])) == [UNINFECTED, PARASITIZED, PARASITIZED]
    assert [spec.decision(p) for p in (0.1, 0.4, 0.69, 0.7, 0.95)] == [
        "uninfected",
        "refer",
        "refer",
        "parasitized",
        "parasitized",
    ]
    assert spec.with_refer_band((0.0, 0.0)).decision(0.4) == "uninfected"
    assert spec.with_refer_band(None) is spec


def test_an_answer_at_exactly_the_threshold_is_positive_everywhere():
    """The one rule, at its boundary: ``answer`` (what /predict and the pyfunc return), ``labels`` and ``decision``."""
    spec = ModelSpec(threshold=0.62, refer_band=(0.62, 0.62))  # an empty band: the threshold alone decides
    at = spec.answer(0.62)
    assert (at["label"], at["decision"], at["confidence"]) == (PARASITIZED, "parasitized", 0.62)
    assert spec.labels(np.array([0.62, 0.619999])) == [PARASITIZED, UNINFECTED]
    below = spec.answer(0.619999)
    assert (below["label"], below["decision"], below["confidence"]) == (UNINFECTED, "uninfected", 0.380001)


def test_a_refer_band_upside_down_is_refused_in_settings_and_spec(monkeypatch):
    from pydantic import ValidationError

    from malaria.config import Settings

    monkeypatch.setenv("MALARIA_REFER_BAND", "[0.7, 0.3]")
    with pytest.raises(ValidationError, match="0 <= low <= high <= 1"):
        Settings()
    monkeypatch.setenv("MALARIA_REFER_BAND", "[0.3, 0.7]")
    assert Settings().refer_band == (0.3, 0.7)
    with pytest.raises(ValidationError, match="0 <= low <= high <= 1"):
        ModelSpec().with_refer_band((0.7, 0.3))


def test_spec_round_trips_through_metadata():
    spec = ModelSpec(image_size=96, threshold=0.4, temperature=1.3)
    assert ModelSpec.from_metadata({"spec": spec.model_dump(mode="json")}) == spec
    assert ModelSpec.from_metadata({"spec": spec.to_json()}) == spec


@pytest.mark.parametrize(
    "bad",
    [
        {"positive_class": "Other"},
        {"class_names": ["A", "B", "C"], "positive_class": "A", "sigmoid_class": "A"},
        {"refer_band": (0.8, 0.2)},
        {"threshold": 1.5},
    ],
)
def test_inconsistent_specs_are_rejected(bad):
    with pytest.raises(ValidationError):
        ModelSpec(**bad)


def test_missing_spec_is_a_clear_error():
    with pytest.raises(ValueError, match="no 'spec'"):
        ModelSpec.from_metadata({})


def test_cells_of_smear_fields_follow_the_field_rule_where_it_is_set():
    spec = ModelSpec(threshold=0.5, refer_band=(0.2, 0.8), field_threshold=0.9, field_refer_band=(0.85, 0.95))
    fields = spec.for_fields()
    assert spec.labels([0.7]) == ["Parasitized"] and fields.labels([0.7]) == ["Uninfected"]
    assert (
        fields.decision(0.7) == "uninfected"
        and fields.decision(0.9) == "refer"
        and fields.decision(0.97) == "parasitized"
    )
    assert ModelSpec().for_fields() == ModelSpec()  # no field rule: the crop rule
    with pytest.raises(ValueError):
        ModelSpec(field_refer_band=(0.9, 0.1))
