"""The model contract: class names, input spec, output meaning and decision threshold.

A ``ModelSpec`` is saved with every model (MLflow model metadata, BentoML model metadata) and read
back by every consumer, so no consumer assumes an input size, a label order or a threshold.
"""

from __future__ import annotations

import json
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, Field, model_validator

PARASITIZED = "Parasitized"
UNINFECTED = "Uninfected"
CLASS_NAMES: tuple[str, str] = (PARASITIZED, UNINFECTED)

Decision = Literal["parasitized", "uninfected", "refer"]
DECISIONS: tuple[Decision, ...] = get_args(Decision)
PROBABILITY_DECIMALS = 6  # answers (and so the prediction log) carry probabilities to 6 decimals


def review_flag(decision: str, audit_share: float, rng) -> Literal["refer", "audit"] | None:
    """Which answers the review queue gets: every referred one, and a random ``audit_share`` of the others
    (the unbiased sample the live accuracy is measured on)."""
    if decision == "refer":
        return "refer"
    return "audit" if rng.random() < audit_share else None


def check_refer_band(band: tuple[float, float]) -> tuple[float, float]:
    """A refer band must satisfy 0 <= low <= high <= 1 (low == high: nothing is referred)."""
    low, high = band
    if not 0 <= low <= high <= 1:
        raise ValueError(f"refer_band must satisfy 0 <= low <= high <= 1, got {tuple(band)}")
    return band


class ModelSpec(BaseModel):
    """What a consumer must know to feed a model and read its output."""

    image_size: int = Field(64, ge=8, le=1024, description="Square input side in pixels.")
    scale: float = Field(1.0 / 255.0, description="Multiplier applied to 8-bit RGB values.")
    class_names: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    positive_class: str = PARASITIZED
    output: Literal["sigmoid", "softmax"] = "sigmoid"
    sigmoid_class: str | None = Field(
        PARASITIZED, description="For a one-unit sigmoid: the class whose probability it outputs."
    )
    temperature: float = Field(1.0, gt=0, description="Calibration temperature on the log-odds.")
    threshold: float = Field(0.5, gt=0, lt=1, description="P(positive) at or above which it is positive.")
    refer_band: tuple[float, float] = Field(
        (0.2, 0.8), description="P(positive) in [low, high) is sent to a human ('refer')."
    )
    field_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Threshold for cells of smear fields, where infected cells are rare (chosen on smear "
        "validation cells for a target specificity); None: the crop threshold.",
    )
    field_refer_band: tuple[float, float] | None = Field(
        None, description="Refer band for cells of smear fields; None: the crop band."
    )
    training_sources: list[str] = Field(
        default_factory=list,
        description="Data the model was trained on: nih, smear, feedback, synthetic (a generated demo set); "
        "empty: not recorded.",
    )

    @property
    def synthetic(self) -> bool:
        """Trained on generated data: a demo model that knows nothing about real malaria."""
        return "synthetic" in self.training_sources

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.positive_class not in self.class_names:
            raise ValueError(f"positive_class {self.positive_class!r} not in {self.class_names}")
        if len(self.class_names) != 2:
            raise ValueError("exactly two classes are supported")
        if self.output == "sigmoid" and self.sigmoid_class not in self.class_names:
            raise ValueError("a sigmoid model needs sigmoid_class, one of class_names")
        check_refer_band(self.refer_band)
        if self.field_refer_band is not None:
            check_refer_band(self.field_refer_band)
        return self

    @property
    def negative_class(self) -> str:
        return next(c for c in self.class_names if c != self.positive_class)

    def probability_positive(self, outputs: np.ndarray) -> np.ndarray:
        """Calibrated P(positive class) for a batch of raw model outputs."""
        outputs = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
        if self.output == "sigmoid":
            p = outputs[:, 0]
            if self.sigmoid_class != self.positive_class:
                p = 1.0 - p
        else:
            p = outputs[:, self.class_names.index(self.positive_class)]
        if self.temperature != 1.0:
            p = np.clip(p, 1e-7, 1 - 1e-7)
            p = 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / self.temperature))
        return p

    def labels(self, probability: np.ndarray) -> list[str]:
        """Class name for each P(positive), by the threshold."""
        return [self.positive_class if p >= self.threshold else self.negative_class for p in probability]

    def decision(self, probability: float) -> Decision:
        """'refer' inside the uncertainty band, else the thresholded class in lower case."""
        low, high = self.refer_band
        if low <= probability < high:
            return "refer"
        return "parasitized" if probability >= self.threshold else "uninfected"

    def answer(self, probability: float) -> dict:
        """One image's answer from its P(positive): what ``/predict`` and the MLflow pyfunc both return."""
        p = float(probability)
        label = self.positive_class if p >= self.threshold else self.negative_class
        return {
            "label": label,
            "probability_parasitized": round(p, PROBABILITY_DECIMALS),
            "confidence": round(p if label == self.positive_class else 1 - p, PROBABILITY_DECIMALS),
            "decision": self.decision(p),
        }

    def for_fields(self) -> ModelSpec:
        """The decision rule for cells of smear fields: the field threshold and band where they are set."""
        update: dict[str, object] = {}
        if self.field_threshold is not None:
            update["threshold"] = self.field_threshold
        if self.field_refer_band is not None:
            update["refer_band"] = self.field_refer_band
        return self.model_copy(update=update) if update else self

    def with_refer_band(self, band: tuple[float, float] | None) -> ModelSpec:
        """This spec with another refer band (``None``: unchanged), validated."""
        if band is None:
            return self
        return type(self).model_validate({**self.model_dump(), "refer_band": band})

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_metadata(cls, metadata: dict) -> ModelSpec:
        """Read a spec stored as ``metadata['spec']`` (a dict or a JSON string)."""
        raw = metadata.get("spec") if metadata else None
        if raw is None:
            raise ValueError("model metadata has no 'spec': was it registered by malaria?")
        return cls.model_validate(json.loads(raw) if isinstance(raw, str) else raw)
