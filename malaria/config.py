"""All settings in one place, read from the environment (prefix ``MALARIA_``) and ``.env``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from malaria.spec import check_refer_band

Profile = Literal["quick", "full"]
FilenamePolicy = Literal["plain", "hashed", "omit"]


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
    nih_archive_url: str = Field(
        default="https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip",
        description="Where `malaria data fetch` downloads the NIH cell images from.",
    )
    nih_archive_sha256: str | None = Field(
        default=None, description="Expected SHA-256 of the NIH archive; unset = trust on first download."
    )
    synthetic_per_class: int = Field(
        default=400, description="Images per class of the generated demo set (when no real data is found)."
    )
    allow_synthetic: bool = Field(
        default=True, description="Fall back to a generated data set when no real one is found (false for releases)."
    )
    min_image_side: int = Field(
        default=16, description="Training images with a side below this many pixels are skipped by validation."
    )
    max_image_side: int = Field(
        default=2048, description="Training images with a side above this many pixels are skipped by validation."
    )

    # Split and training
    seed: int = Field(
        json_schema_extra={"dvc": "prepare"},
        default=42,
        description="Seed of the patient split, and of training unless train_seed is set.",
    )
    train_seed: int | None = Field(
        json_schema_extra={"dvc": "train"},
        default=None,
        description="Seed of initialisation, shuffling and augmentation; unset = seed (same split).",
    )
    val_fraction: float = Field(
        json_schema_extra={"dvc": "prepare"},
        default=0.15,
        description="Share of patients held out for validation (threshold, calibration, the champion gate).",
    )
    test_fraction: float = Field(
        json_schema_extra={"dvc": "prepare"},
        default=0.15,
        description="Share of patients held out for the test metrics.",
    )
    profile: Profile = Field(
        json_schema_extra={"dvc": "train"},
        default="quick",
        description="Training recipe: quick (64 px, quarter-width VGG16, 20 epochs) or full (see malaria/model.py).",
    )
    image_size: int | None = Field(
        json_schema_extra={"dvc": "train"}, default=None, description="Override the profile's input size."
    )
    epochs: int | None = Field(
        json_schema_extra={"dvc": "train"}, default=None, description="Override the profile's epoch count."
    )
    width: float | None = Field(
        json_schema_extra={"dvc": "train"},
        default=None,
        gt=0,
        description="Override the profile's width (1.0 = VGG16's filters).",
    )
    batch_size: int = Field(json_schema_extra={"dvc": "train"}, default=64, description="Training batch size.")
    learning_rate: float | None = Field(
        json_schema_extra={"dvc": "train"}, default=None, description="Override the profile's peak learning rate."
    )
    weight_decay: float | None = Field(
        json_schema_extra={"dvc": "train"}, default=None, ge=0, description="Override the profile's AdamW weight decay."
    )
    deterministic: bool = Field(
        json_schema_extra={"dvc": "train"},
        default=True,
        description="Deterministic TensorFlow kernels and input pipeline: same data, seed, machine and threads "
        "give the same model. Process-wide: false cannot undo an earlier deterministic training in the process.",
    )
    max_train_images: int | None = Field(
        json_schema_extra={"dvc": "train"}, default=None, description="Cap per split, for smoke runs."
    )
    stain_jitter: float = Field(
        json_schema_extra={"dvc": "train"},
        default=0.5,
        ge=0,
        lt=1,
        description="Colour augmentation in training, for other stains: each image's saturation scaled by "
        "1 +/- this and its hue turned by up to an eighth of it (of the colour circle); 0: none "
        "(measured in docs/training.md).",
    )
    artifacts_dir: Path = Field(
        default=Path("training_artifacts"),
        description="Where a training run writes the model, spec, metrics and plots.",
    )

    # Registry
    mlflow_tracking_uri: str = Field(
        default="sqlite:///mlflow.db",
        description="MLflow tracking store (also read from MLFLOW_TRACKING_URI).",
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "MALARIA_MLFLOW_TRACKING_URI"),
    )
    mlflow_artifact_root: Path = Field(
        default=Path("mlartifacts"), description="Artifact folder of a new MLflow experiment on a local tracking store."
    )
    experiment_name: str = Field(default="malaria", description="MLflow experiment of the training runs.")
    registered_model_name: str = Field(default="malaria-classifier", description="MLflow registered model name.")
    champion_alias: str = Field(default="champion", description="MLflow alias of the served version.")
    gate_metric: str = Field(
        default="val_roc_auc", description="Validation metric the champion gate compares (higher is better)."
    )
    bento_model_name: str = Field(
        default="malaria-classifier",
        description="Name of the model in the BentoML store (what the service loads, :latest).",
    )

    # Serving
    gpu: bool = Field(
        default=False,
        description="Serve on a GPU: resources={'gpu': 1} and TensorFlow memory growth; the service warns when "
        "TensorFlow sees none (build with `make bento-gpu`).",
    )
    runtime: Literal["auto", "openvino", "tensorflow"] = Field(
        default="auto",
        description="Inference runtime of the service; auto: OpenVINO when the stored model carries its gated "
        "conversion (`malaria import-model`), TensorFlow on a GPU or for a model imported without one.",
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        default="auto",
        description="OpenVINO precision; auto: the fastest that passed the import's precision gate (fp32 on a "
        "CPU without the instructions it needs). Another value must have passed the gate.",
    )
    # Tuned for 2 CPUs (`make bench`): one worker per core, each with its own model and batcher,
    # beat one worker with two TensorFlow threads (HTTP handling is per-process Python work).
    workers: int = Field(
        default=2,
        description="Service worker processes, each with its own model and batcher (1 with a GPU).",
    )
    tf_intra_op_threads: int = Field(
        default=1, description="Inference threads per worker, TensorFlow's or OpenVINO's (workers x threads = cores)."
    )
    tf_inter_op_threads: int = Field(default=1, description="TensorFlow inter-op threads per worker.")
    batching: bool = Field(default=True, description="Adaptive batching of model calls (off: one call per request).")
    max_batch_size: int = Field(
        default=64,
        description="Largest model call of the adaptive batcher (a smear field's cells go in chunks of this size).",
    )
    max_latency_ms: int = Field(
        default=5000,
        description="Adaptive batching's latency budget; a small one turns load into 503s on 2 CPUs (200 ms did).",
    )
    traffic_timeout_s: int = Field(default=60, description="BentoML's request timeout (504 after it).")
    max_requests_per_connection: int = Field(
        default=16, description="Close a keep-alive connection after this many requests (0: never)."
    )
    # A cell crop is tens of KB (the shared NIH crops: 3.8-20 KB, 128x128 px); a 16-bit TIFF crop of a
    # 50 Mpx phone field at 100x is about 400x400 px, 1 MB. The limits leave four times that.
    max_image_bytes: int = Field(
        default=4 * 1024 * 1024, description="Largest cell image file on /predict, /classify, /batch_predict."
    )
    max_image_pixels: int = Field(
        default=2048 * 2048, description="Largest cell image in pixels (a decompression-bomb guard)."
    )
    max_images_per_request: int = Field(
        default=64, description="Most files in one /classify or /batch_predict request."
    )

    # Smear fields
    smear_dir: Path | None = Field(
        default=None, description="Annotated smear fields (images/ and annotations.json, IML format); unset = none."
    )
    feedback_dir: Path | None = Field(
        default=None,
        description="Reviewed crops from `malaria feedback export` (NIH layout + manifest.csv): a training source, "
        "split by review day; unset = none.",
    )
    smear_cell_diameter_px: float = Field(
        json_schema_extra={"dvc": "prepare"},
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
        json_schema_extra={"dvc": "prepare"},
        default={"train": 40, "val": 40, "test": 10_000},
        description="Uninfected smear crops kept per field, by split (every infected one is kept; about 75 "
        "uninfected cells per infected one in the shared set): the training pool that "
        "smear_uninfected_per_epoch draws from.",
    )
    smear_speckled_share: float = Field(
        json_schema_extra={"dvc": "prepare"},
        default=0.0,
        ge=0,
        le=1,
        description="Share of a training field's uninfected crops drawn from cells with a stain speck (the cells "
        "most often called Parasitized: malaria.smear.crops); validation and test stay uniform samples.",
    )
    smear_infected_repeat: int = Field(
        json_schema_extra={"dvc": "train"},
        default=4,
        ge=1,
        description="Times each infected smear crop is repeated in a training epoch.",
    )
    smear_uninfected_per_epoch: int | None = Field(
        json_schema_extra={"dvc": "train"},
        default=1600,
        ge=0,
        description="Uninfected smear crops drawn afresh each training epoch from the training pool, "
        "smear_hard_negatives of them mined; unset = all of it (docs/training.md).",
    )
    smear_hard_negatives: int = Field(
        json_schema_extra={"dvc": "train"},
        default=400,
        ge=0,
        description="Hard-negative mining: of each epoch's smear_uninfected_per_epoch uninfected smear crops, this "
        "many are the pool's highest-scored under the model after the epoch before (0: all drawn at random).",
    )
    smear_loss_weight: float = Field(
        json_schema_extra={"dvc": "train"},
        default=1.0,
        gt=0,
        description="Loss weight of a smear crop in training.",
    )
    smear_min_slide_cells: int = Field(
        default=1000,
        ge=1,
        description="A slide counted on fewer red cells is flagged (WHO thin-film counting: infected cells per "
        "1,000 or more red cells).",
    )
    refer_target_accuracy: float = Field(
        json_schema_extra={"dvc": "evaluate"},
        default=0.985,
        gt=0.5,
        le=1.0,
        description="`malaria evaluate` picks the narrowest refer band outside which validation accuracy reaches this.",
    )
    smear_target_specificity: float = Field(
        default=0.995,
        json_schema_extra={"dvc": "evaluate"},
        gt=0.5,
        lt=1.0,
        description="`malaria evaluate` sets the field threshold (smear cells) to the lowest one reaching this "
        "specificity on smear validation cells.",
    )
    refer_band: tuple[float, float] | None = Field(
        default=None, description="Override the model's uncertainty band (low, high) for 'refer'."
    )

    @field_validator("data_dir", "smear_dir", "feedback_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if value == "" else value

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
    api_token: str | None = Field(
        default=None,
        description="Bearer token; auth is on when set (empty: off). Surrounding whitespace (a Secret file's "
        "trailing newline) is stripped; a token of only whitespace is an error, not auth off.",
    )

    require_token: bool = Field(
        default=False,
        description="Refuse to start without MALARIA_API_TOKEN (fail closed; the Kubernetes manifests set it). "
        "Off: auth is on only when a token is set.",
    )
    metrics_token: str | None = Field(
        default=None,
        description="Bearer token for /metrics (Prometheus: `authorization: {credentials_file: ...}`); unset: "
        "/metrics is open like the probes. Its counts are the served population's prevalence. Stripped like "
        "api_token.",
    )

    @field_validator("api_token", "metrics_token")
    @classmethod
    def _clean_token(cls, token: str | None) -> str | None:
        if token is None or token == "":
            return None
        if not token.strip():
            raise ValueError("a token of only whitespace: unset it to turn auth off")
        return token.strip()

    @model_validator(mode="after")
    def _token_when_required(self) -> Settings:
        if self.require_token and self.api_token is None:
            raise ValueError(
                "MALARIA_REQUIRE_TOKEN is set but MALARIA_API_TOKEN is not: refusing to serve without auth "
                "(set the token, or MALARIA_REQUIRE_TOKEN=false to serve without it on purpose)"
            )
        return self

    @model_validator(mode="after")
    def _hard_negatives_need_a_draw(self) -> Settings:
        if self.smear_hard_negatives and self.smear_uninfected_per_epoch is None:
            raise ValueError(
                "MALARIA_SMEAR_HARD_NEGATIVES picks among each epoch's drawn uninfected smear crops: set "
                "MALARIA_SMEAR_UNINFECTED_PER_EPOCH (smaller than the pool) too"
            )
        return self

    prediction_log_filenames: FilenamePolicy = Field(
        default="hashed",
        description="Client file names in the prediction log: hashed (sha256, 16 hex digits: the same name gives "
        "the same hash), plain, or omit. File names often carry patient identifiers.",
    )
    prediction_log_max_queued: int = Field(
        default=10_000,
        ge=1,
        description="Requests whose log lines may wait for the writer; beyond, lines are dropped and counted.",
    )
    prediction_log_max_file_mb: int = Field(
        default=100, ge=1, description="A prediction log file is continued in a new part at this size."
    )
    prediction_log_keep_days: int = Field(
        default=30, ge=1, description="Prediction log files older than this many days are deleted."
    )
    prediction_log_dir: Path = Field(
        default=Path("logs/predictions"),
        description="Folder of the JSON-lines prediction log (one file per day and worker).",
    )

    # Review queue (the lab page)
    ui: bool = Field(default=True, description="Serve the lab page at /ui (static files; off: the API only).")
    review_db_url: str | None = Field(
        default=None,
        description="Database of reviewed cells (SQLAlchemy URL); unset: SQLite in the prediction log folder, for "
        "one replica. Above one replica, PostgreSQL: postgresql+psycopg://user:password@host/db.",
    )
    review_keep_days: int = Field(
        default=730, ge=1, description="Reviews (and crops no review uses) older than this are deleted at start-up."
    )
    review_audit_share: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Share of counted, non-referred field cells sent to the review queue at random (review: audit): "
        "the unbiased sample the live accuracy is measured on.",
    )

    live_min_accuracy: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="The drift flow alerts when the accuracy on reviewed audit cells in its window is below this.",
    )
    live_min_reviews: int = Field(
        default=30, ge=1, description="Fewer reviewed audit cells in the window: no verdict on the live accuracy."
    )
    retrain_deployment: str | None = Field(
        default=None,
        description="On an alert, the drift flow starts this Prefect deployment (e.g. training-pipeline/"
        "training-pipeline, served by `malaria deploy-flows`); the champion gate still decides. Unset: alert only.",
    )
    alert_block: str | None = Field(
        default=None,
        description="Prefect notification block the drift flow notifies on drift or low live accuracy, as "
        "TYPE/NAME (e.g. slack-webhook/lab-alerts); unset: the alert is logged and shown in the flow's artifact.",
    )

    # Logging
    log_level: str = Field(default="INFO", description="Log level of the malaria loggers.")
    log_dir: Path = Field(default=Path("logs"), description="Folder of malaria.log (unset: console only).")

    @classmethod
    def dvc_params(cls, stage: str) -> list[str]:
        """The settings a DVC stage reads, from the fields' ``dvc`` tags (train also reads the split seed)."""
        tagged = [
            n
            for n, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("dvc") == stage
        ]
        return (["seed"] if stage == "train" else []) + tagged

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

    def review_database_url(self) -> str:
        """The review database: ``review_db_url``, else SQLite beside the prediction log."""
        return self.review_db_url or f"sqlite:///{(self.prediction_log_dir / 'reviews.db').resolve()}"

    @property
    def smear_crops_dir(self) -> Path:
        """Crops cut from the annotated smear fields (never committed: the fields have no licence to share)."""
        return self.workspace_data_dir / "smear_crops"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings``)."""
    return Settings()


SETTINGS_TABLE_START, SETTINGS_TABLE_END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def _env_name(name: str, field) -> str:
    aliases = getattr(field.validation_alias, "choices", None) or []
    return " or ".join(f"`{a}`" for a in aliases) if aliases else f"`MALARIA_{name.upper()}`"


def _default_text(field) -> str:
    default = field.default_factory() if field.default_factory else field.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, Path):
        return f"`{default.as_posix()}`"
    if isinstance(default, dict):
        return "`" + json.dumps(default) + "`"
    return f"`{default}`"


def settings_table() -> str:
    """The markdown table of every setting, from the fields' descriptions (``malaria docs settings``)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(f"| {_env_name(name, field)} | {_default_text(field)} | {field.description} |")
    return "\n".join(rows)


def write_settings_table(markdown: Path) -> bool:
    """Replace the table between the markers in ``markdown``; True if the file changed."""
    text = markdown.read_text()
    start, end = text.index(SETTINGS_TABLE_START), text.index(SETTINGS_TABLE_END)
    new = text[: start + len(SETTINGS_TABLE_START)] + "\n" + settings_table() + "\n" + text[end:]
    if new != text:
        markdown.write_text(new)
    return new != text
