"""The JSON answers of the API (their field descriptions are the OpenAPI schema's)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

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
    review: Literal["refer", "audit"] | None = Field(
        default=None,
        description="refer: a person should label it; audit: a random share of the other answers "
        "(MALARIA_REVIEW_AUDIT_SHARE), so that the live accuracy is measured without bias; null: neither.",
    )


class BatchSummary(BaseModel):
    """Counts over one multi-image request."""

    total: int
    counts: dict[str, int]
    decisions: dict[str, int]


class BatchResult(BaseModel):
    predictions: list[Prediction]
    summary: BatchSummary


class Explanation(BaseModel):
    """Why the model answered as it did for one cell: an occlusion-sensitivity heatmap."""

    label: str
    probability_parasitized: float
    confidence: float
    decision: Decision
    model_version: str
    request_id: str
    method: str = Field(description="occlusion: masked copies of the cell in one batch (works with any runtime).")
    patch_px: int = Field(description="Side of the square set to black in each copy, in model-input pixels.")
    stride_px: int
    heatmap: list[list[float]] = Field(
        description="Model-input-sized grid (rows of the cell's crop resized to a square): mean drop of "
        "P(parasitized) when that pixel is hidden; positive: the answer leans on it."
    )


class ReviewStored(BaseModel):
    """A stored review."""

    id: int
    label: str
    source: str = Field(description="field (a cell cut from a field by its box) or crop (an uploaded cell crop).")
    crop_sha256: str = Field(description="Content address of the stored crop (PNG re-encoded from pixels).")


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
    runtime: str = Field(description="Inference runtime serving the model: openvino or tensorflow.")
    precision: str = Field(description="Precision served: fp32, or bf16 / int8 where the import's gate passed them.")


MAX_SLIDE_FIELDS = 1000  # fields in one /summarize_slide call (a slide is read in tens to hundreds)


class SmearCountsIn(BaseModel):
    """A field's counts, bounded (a 1280x960 field holds a few hundred cells)."""

    cells: int = Field(ge=0, le=100_000)
    parasitized: int = Field(ge=0, le=100_000)
    uninfected: int = Field(ge=0, le=100_000)
    refer: int = Field(ge=0, le=100_000)


class FieldCounts(BaseModel):
    """One field of a slide as /analyze_smear counted it (its ``usable`` and ``counts``; the rest is ignored)."""

    usable: bool
    counts: SmearCountsIn

    @model_validator(mode="after")
    def _consistent(self) -> FieldCounts:
        c = self.counts
        if c.parasitized + c.uninfected != c.cells or c.refer > c.cells:
            raise ValueError("counts must satisfy parasitized + uninfected = cells and refer <= cells")
        return self


class SlideSummary(BaseModel):
    """A slide: its usable fields' counts pooled, the parasitemia with its Wilson interval, and whether
    enough red cells were counted (``MALARIA_SMEAR_MIN_SLIDE_CELLS``)."""

    fields: int
    usable_fields: int
    cells: int
    parasitized: int
    refer: int
    parasitemia_percent: float | None
    parasitemia_ci95: tuple[float, float] | None
    enough_cells: bool = Field(description="False: counted on fewer red cells than min_cells; read more fields.")
    min_cells: int
