"""All settings in one place, read from the environment (prefix ``MALARIA_``) and ``.env``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from malaria.spec import check_refer_band

Profile = Literal["quick", "full"]


class Settings(BaseSettings):
    """Every tunable of the project.

    Field ``foo`` is read from ``MALARIA_FOO``, else ``.env``, else ``params.yaml`` (the DVC-tracked
    experiment parameters), else the default here.
    """

    model_config = SettingsConfigDict(env_prefix="MALARIA_", env_file=".env", yaml_file="params.yaml", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, dotenv_settings, YamlConfigSettingsSource(settings_cls)

    # Data
    data_dir: Path | None = Field(default=None, description="Folder in the NIH layout (Parasitized/, Uninfected/).")
    workspace_data_dir: Path = Field(default=Path("data"), description="DVC-tracked data folder.")
    nih_archive_url: str = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
    nih_archive_sha256: str | None = Field(
        default=None, description="Expected SHA-256 of the NIH archive; unset = trust on first download."
    )
    synthetic_per_class: int = 400
    allow_synthetic: bool = Field(
        default=True, description="Fall back to a generated data set when no real one is found (false for releases)."
    )
    min_image_side: int = 16
    max_image_side: int = 2048

    # Split and training
    seed: int = Field(default=42, description="Seed of the patient split, and of training unless train_seed is set.")
    train_seed: int | None = Field(
        default=None, description="Seed of initialisation, shuffling and augmentation; unset = seed (same split)."
    )
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    profile: Profile = "quick"
    image_size: int | None = Field(default=None, description="Override the profile's input size.")
    epochs: int | None = Field(default=None, description="Override the profile's epoch count.")
    width: float | None = Field(default=None, gt=0, description="Override the profile's width (1.0 = VGG16's filters).")
    batch_size: int = 64
    learning_rate: float | None = None
    weight_decay: float | None = Field(default=None, ge=0, description="Override the profile's AdamW weight decay.")
    deterministic: bool = Field(
        default=True,
        description="Deterministic TensorFlow kernels and input pipeline: same data, seed, machine and threads "
        "give the same model. Process-wide: false cannot undo an earlier deterministic training in the process.",
    )
    max_train_images: int | None = Field(default=None, description="Cap per split, for smoke runs.")
    artifacts_dir: Path = Path("training_artifacts")

    # Registry
    mlflow_tracking_uri: str = Field(
        default="sqlite:///mlflow.db",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "MALARIA_MLFLOW_TRACKING_URI"),
    )
    mlflow_artifact_root: Path = Path("mlartifacts")
    experiment_name: str = "malaria"
    registered_model_name: str = "malaria-classifier"
    champion_alias: str = "champion"
    gate_metric: str = "val_roc_auc"
    bento_model_name: str = "malaria-classifier"

    # Serving
    gpu: bool = False
    # Tuned for 2 CPUs (`make bench`): one worker per core, each with its own model and batcher,
    # beat one worker with two TensorFlow threads (HTTP handling is per-process Python work).
    workers: int = 2
    tf_intra_op_threads: int = 1
    tf_inter_op_threads: int = 1
    batching: bool = Field(default=True, description="Adaptive batching of model calls (off: one call per request).")
    max_batch_size: int = 64
    max_latency_ms: int = 5000
    traffic_timeout_s: int = 60
    max_requests_per_connection: int = Field(
        default=16, description="Close a keep-alive connection after this many requests (0: never)."
    )
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_images_per_request: int = 64

    # Smear fields
    smear_dir: Path | None = Field(
        default=None, description="Annotated smear fields (images/ and annotations.json, IML format); unset = none."
    )
    smear_cell_diameter_px: float = Field(
        default=80.0,
        ge=8,
        le=1000,
        description="Expected red-cell diameter in pixels when a request gives none (80: a 1280x960 field at 100x).",
    )
    max_smear_bytes: int = Field(
        default=25 * 1024 * 1024, description="Largest field image file accepted by the smear routes."
    )
    max_smear_pixels: int = Field(
        default=50_000_000, description="Largest field image, in pixels, accepted by the smear routes (a phone photo)."
    )
    smear_uninfected_per_field: dict[str, int] = Field(
        default={"train": 10, "val": 40, "test": 10_000},
        description="Uninfected smear crops kept per field, by split (every infected one is kept; about 75 "
        "uninfected cells per infected one in the shared set).",
    )
    smear_infected_repeat: int = Field(
        default=4, ge=1, description="Times each infected smear crop is repeated in a training epoch."
    )
    smear_min_slide_cells: int = Field(
        default=1000,
        ge=1,
        description="A slide counted on fewer red cells is flagged (WHO thin-film counting: infected cells per "
        "1,000 or more red cells).",
    )
    refer_target_accuracy: float = Field(
        default=0.985,
        gt=0.5,
        le=1.0,
        description="`malaria evaluate` picks the narrowest refer band outside which validation accuracy reaches this.",
    )
    refer_band: tuple[float, float] | None = Field(
        default=None, description="Override the model's uncertainty band (low, high) for 'refer'."
    )

    @field_validator("refer_band")
    @classmethod
    def _valid_refer_band(cls, band: tuple[float, float] | None) -> tuple[float, float] | None:
        return band if band is None else check_refer_band(band)

    access_log: bool = Field(
        default=False,
        description="BentoML's per-request access log line. Off by default: at 400 requests/s it cost about 5 % "
        "of a worker's CPU, and the prediction log and /metrics already record every request.",
    )
    tracing: bool = Field(
        default=False,
        description="BentoML's OpenTelemetry spans on every route (to ship them, also set tracing.exporter_type "
        "and tracing.sample_rate > 0 in BentoML's config). Off by default: unexported spans cost about 10 % of a "
        "worker's CPU.",
    )
    api_token: str | None = Field(default=None, description="Bearer token; auth is on when set.")
    prediction_log_dir: Path = Path("logs/predictions")

    # Logging
    log_level: str = "INFO"
    log_dir: Path = Path("logs")

    @property
    def training_seed(self) -> int:
        """The seed of initialisation, shuffling and augmentation."""
        return self.seed if self.train_seed is None else self.train_seed

    def nih_data_dir(self) -> Path:
        """Where the NIH-layout images live: MALARIA_DATA_DIR, else the DVC-tracked copy."""
        return self.data_dir or self.workspace_data_dir / "cell_images"

    @property
    def splits_path(self) -> Path:
        return self.workspace_data_dir / "splits.csv"

    @property
    def smear_crops_dir(self) -> Path:
        """Crops cut from the annotated smear fields (never committed: the fields have no licence to share)."""
        return self.workspace_data_dir / "smear_crops"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings``)."""
    return Settings()
