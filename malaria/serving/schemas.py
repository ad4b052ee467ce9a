"""The JSON answers of the API (their field descriptions are the OpenAPI schema's)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from malaria.spec import Decision


class Prediction(BaseModel):
    """One image's answer."""

    label: str = Field(description="Parasitized or Uninfected, by the model's threshold.")
    probability_parasitized: float = Field(description="Calibrated P(Parasitized).")
    confidence: float = Field(description="Probability of the returned label.")
    decision: Decision = Field(description="parasitized, uninfected, or refer (uncertain: a person should look).")
    model_version: str
    request_id: str
    filename: str | None = None


class BatchSummary(BaseModel):
    """Counts over one multi-image request."""

    total: int
    counts: dict[str, int]
    decisions: dict[str, int]


class BatchResult(BaseModel):
    predictions: list[Prediction]
    summary: BatchSummary


class ModelInfo(BaseModel):
    bento_model: str
    registered_model: str | None
    mlflow_version: str | None
    mlflow_run_id: str | None
    metrics: dict[str, float]
    image_size: int
    class_names: list[str]
    positive_class: str
    threshold: float
    refer_band: tuple[float, float]
    temperature: float
    field_threshold: float = Field(description="Threshold for cells of smear fields (rare positives).")
    field_refer_band: tuple[float, float] = Field(description="Refer band for cells of smear fields.")
    training_sources: list[str] = Field(description="nih, smear, synthetic (a demo model: not for real samples).")
