"""Training: split manifest -> VGG16 -> calibrated metrics and plots -> MLflow registry."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from malaria import evaluation
from malaria.config import Settings
from malaria.data import (
    NIH,
    SMEAR,
    cell_source,
    image_paths,
    images_fingerprint,
    labels_of,
    load_arrays,
    prepare,
    read_manifest,
    source_roots,
)
from malaria.model import (
    PROFILES,
    TrainingProfile,
    augmentation_pipeline,
    batched_probability,
    build_model,
    compiled_predict,
    recompute_batch_norm_statistics,
)
from malaria.monitoring import image_features_batch
from malaria.registry import (
    SPLIT_TAG,
    ChampionGate,
    RegisteredVersion,
    TrainingRun,
    load_keras_model,
    log_register_and_gate,
)
from malaria.spec import ModelSpec

logger = logging.getLogger(__name__)
REFERENCE_IMAGES = 32  # validation images saved with their outputs: the conversion gate where no data is


@dataclass
class SplitData:
    frame: pd.DataFrame
    images: np.ndarray
    labels: np.ndarray


def load_split(
    manifest: pd.DataFrame, roots: dict[str, Path], split: str, spec: ModelSpec, limit: int | None, seed: int
) -> SplitData:
    """One split's images (manifest paths are relative to their source's root) through the shared preprocessing."""
    frame = manifest[manifest["split"] == split]
    if limit is not None and len(frame) > limit:  # a smoke run: the same share of each source and class
        groups = frame.groupby(["source", "label"])
        frame = pd.concat(
            [group.sample(min(len(group), limit // groups.ngroups), random_state=seed) for _, group in groups]
        )
    frame = frame.reset_index(drop=True)
    images = load_arrays(image_paths(frame, roots), spec, desc=f"loading {split}")
    return SplitData(frame, images, labels_of(frame))


@dataclass(frozen=True)
class EpochPlan:
    """The training images of every epoch, in order (one row per epoch), and each image's loss weight."""

    indices: np.ndarray
    weights: np.ndarray


def epoch_plan(
    frame: pd.DataFrame,
    labels: np.ndarray,
    epochs: int,
    seed: int,
    infected_repeat: int = 1,
    uninfected_per_epoch: int | None = None,
    smear_weight: float = 1.0,
    hard_negatives: np.ndarray | None = None,
) -> EpochPlan:
    """Each epoch: every image once, shuffled, except the smear source's crops.

    Infected smear crops come ``infected_repeat`` times (the set has about 75 uninfected cells per
    infected one), and ``uninfected_per_epoch`` uninfected smear crops are drawn afresh from the pool
    (None: all of it), so the epochs together see many cells of each training field at the cost of a
    few. Smear crops weigh ``smear_weight`` in the loss. A frame without a source column is all NIH.
    ``hard_negatives`` (pool indices, ``hardest_negatives``) are part of every epoch's draw; the rest
    of it is random.
    """
    rng = np.random.default_rng(seed)
    smear = (frame["source"] == SMEAR).to_numpy() if "source" in frame else np.zeros(len(labels), bool)
    infected = np.flatnonzero(smear & (labels == 1))
    pool = np.flatnonzero(smear & (labels == 0))
    fixed = np.concatenate([np.flatnonzero(~smear), np.repeat(infected, infected_repeat)])
    draw = len(pool) if uninfected_per_epoch is None else min(uninfected_per_epoch, len(pool))
    hard = np.empty(0, np.int64) if hard_negatives is None else np.asarray(hard_negatives, np.int64)[:draw]
    rest = np.setdiff1d(pool, hard)
    indices = np.stack(
        [
            rng.permutation(np.concatenate([fixed, hard, rng.choice(rest, draw - len(hard), replace=False)]))
            for _ in range(epochs)
        ]
    )
    return EpochPlan(indices, np.where(smear, smear_weight, 1.0).astype(np.float32))


def settings_epoch_plan(
    train_data: SplitData, settings: Settings, epochs: int, seed: int, hard_negatives: np.ndarray | None = None
) -> EpochPlan:
    """``epoch_plan`` of the training split with the smear settings (repeat, draw, loss weight)."""
    return epoch_plan(
        train_data.frame,
        train_data.labels,
        epochs,
        seed,
        settings.smear_infected_repeat,
        settings.smear_uninfected_per_epoch,
        settings.smear_loss_weight,
        hard_negatives,
    )


def hardest_negatives(
    frame: pd.DataFrame, labels: np.ndarray, score: Callable[[np.ndarray], np.ndarray], count: int
) -> np.ndarray:
    """The ``count`` uninfected smear crops that ``score`` (indices -> P(Parasitized)) rates highest.

    Hard-negative mining's pick, highest first.
    """
    if "source" not in frame or count <= 0:
        return np.empty(0, np.int64)
    pool = np.flatnonzero((frame["source"] == SMEAR).to_numpy() & (labels == 0))
    return pool[np.argsort(-score(pool), kind="stable")[:count]]


def metrics_by_source(prefix: str, data: SplitData, probability: np.ndarray, threshold: float) -> dict[str, float]:
    """``{prefix}_{metric}`` over all images, and ``{prefix}_{source}_{metric}`` per source when there are several.

    An empty prefix gives ``{metric}`` and ``{source}_{metric}``.
    """

    def name(*parts: str) -> str:
        return "_".join(p for p in parts if p)

    overall = evaluation.classification_metrics(data.labels, probability, threshold)
    metrics = {name(prefix, k): v for k, v in overall.items()}
    sources = data.frame["source"].to_numpy()
    if len(set(sources)) > 1:
        for source in sorted(set(sources)):
            mask = sources == source
            per_source = evaluation.classification_metrics(data.labels[mask], probability[mask], threshold)
            metrics |= {name(prefix, source, k): v for k, v in per_source.items()}
    return metrics


def predict_probability(model, images: np.ndarray, spec: ModelSpec, batch_size: int = 256) -> np.ndarray:
    """Calibrated P(positive) for preprocessed images, with the serving inference call."""
    return batched_probability(compiled_predict(model), images, spec, batch_size)


def validation_scorer(
    settings: Settings, roots: dict[str, Path], val_data: SplitData
) -> Callable[[RegisteredVersion], float]:
    """The gate metric of a registered version on ``val_data``: how a champion validated elsewhere is compared."""

    def score(version: RegisteredVersion) -> float:
        model, _ = load_keras_model(settings, version.version)
        images = val_data.images
        if images.shape[1] != version.spec.image_size:
            images = load_arrays(image_paths(val_data.frame, roots), version.spec, desc="loading val")
        probabilities = predict_probability(model, images, version.spec)
        metrics = evaluation.classification_metrics(val_data.labels, probabilities, version.spec.threshold)
        return metrics[settings.gate_metric.removeprefix("val_")]

    return score


def epoch_logger(epochs: int):
    """A Keras callback that logs one line per epoch with the metrics and an ETA."""
    import keras

    class EpochLogger(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            elapsed = time.monotonic() - self.start
            eta = elapsed / (epoch + 1) * (epochs - epoch - 1)
            shown = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items() if k != "learning_rate")
            logger.info("epoch %d/%d %s (%.0fs, ETA %.0fs)", epoch + 1, epochs, shown, elapsed, eta)

    return EpochLogger()


def resolve_profile(settings: Settings) -> TrainingProfile:
    """The configured profile with the settings' overrides (image size, width, epochs, optimiser)."""
    profile = PROFILES[settings.profile]
    return replace(
        profile,
        image_size=settings.image_size or profile.image_size,
        width=settings.width or profile.width,
        epochs=settings.epochs or profile.epochs,
        learning_rate=settings.learning_rate or profile.learning_rate,
        weight_decay=profile.weight_decay if settings.weight_decay is None else settings.weight_decay,
    )


def fit_model(
    profile: TrainingProfile, spec: ModelSpec, settings: Settings, train_data: SplitData, val_data: SplitData
):
    """Build the profile's model and fit it (AdamW, warm-up then cosine decay); returns it and its history.

    Batch norm's statistics are then recomputed over the unaugmented training images.
    """
    import keras

    if settings.deterministic:
        import tensorflow as tf

        # Kernels and tf.data (including the random augmentation) then run in a fixed order, so the
        # same data, seed, machine and thread count give the same weights.
        tf.config.experimental.enable_op_determinism()
    epochs, learning_rate = profile.epochs, profile.learning_rate
    plan = None
    if "source" in train_data.frame and (train_data.frame["source"] == SMEAR).any():
        plan = settings_epoch_plan(train_data, settings, epochs, settings.training_seed)
    # Without the smear source every image is used once per epoch and tf.data reshuffles them, as in
    # every earlier run of the NIH-only default: the released model stays the one its docs measured.
    epoch_size = len(train_data.labels) if plan is None else plan.indices.shape[1]
    steps_per_epoch = int(np.ceil(epoch_size / settings.batch_size))
    logger.info("training images per epoch: %d (%d in the pool)", epoch_size, len(train_data.labels))
    model = build_model(profile, spec.image_size, seed=settings.training_seed)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate / 10,
        decay_steps=max(1, epochs * steps_per_epoch),
        warmup_target=learning_rate,
        warmup_steps=max(1, epochs * steps_per_epoch // 20),
        alpha=0.01,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=profile.weight_decay),
        loss="binary_crossentropy",
        metrics=["accuracy", keras.metrics.AUC(name="auc")],
    )

    mining = None
    if plan is not None and settings.smear_hard_negatives:
        mining = HardNegativeMining(model, train_data, settings, spec, plan.indices[0], epochs)
    try:
        fit = model.fit(
            augmentation_pipeline(
                train_data.images,
                train_data.labels,
                settings.batch_size,
                settings.training_seed,
                settings.deterministic,
                None if plan is None else (plan.indices if mining is None else mining.rows, plan.weights),
                settings.stain_jitter,
            ),
            validation_data=(val_data.images, val_data.labels),
            validation_batch_size=256,
            epochs=epochs,
            # A plan is one pass over all epochs: Keras keeps the iterator across epochs when given the steps.
            steps_per_epoch=None if plan is None else steps_per_epoch,
            shuffle=False,  # the pipeline reshuffles every epoch; Keras cannot shuffle a tf.data.Dataset
            verbose=0,
            callbacks=[epoch_logger(epochs), *([] if mining is None else [mining.callback()])],
        )
    finally:
        if mining is not None:
            mining.close()
    seen = train_data.images if plan is None else train_data.images[np.unique(plan.indices[0])]
    updated = recompute_batch_norm_statistics(model, seen, settings.batch_size, settings.training_seed)
    if updated:
        logger.info("batch norm statistics of %d layers recomputed over the training images", updated)
    history = {k: [float(v) for v in values] for k, values in fit.history.items() if k != "learning_rate"}
    return model, history


class HardNegativeMining:
    """Hard-negative mining while fitting: the epoch plan's rows, each made after the epoch before it.

    Epoch 0's row is given. At the end of each epoch, ``callback()`` scores the uninfected smear pool
    with the model as it is then and adds the next epoch's row (``epoch_plan``), whose draw holds the
    ``smear_hard_negatives`` highest-scored crops (``hardest_negatives``). ``rows`` (the training
    pipeline's generator) waits for a row until it is made, so the pipeline's read-ahead cannot take
    an epoch planned by an older model: a run repeats its weights like any other.
    """

    def __init__(
        self, model, train_data: SplitData, settings: Settings, spec: ModelSpec, first_row: np.ndarray, epochs: int
    ):
        self.train_data, self.settings, self.spec, self.epochs = train_data, settings, spec, epochs
        self.predict = compiled_predict(model)
        self._rows = [first_row]
        self._closed = False
        self._ready = threading.Condition()

    def rows(self) -> Iterator[np.ndarray]:
        """Every epoch's row in order, each as soon as it is made; ends early when closed."""
        for epoch in range(self.epochs):
            with self._ready:
                self._ready.wait_for(lambda: len(self._rows) > epoch or self._closed)  # noqa: B023 - called here
                if len(self._rows) <= epoch:
                    return
                row = self._rows[epoch]
            yield row

    def plan_next(self) -> None:
        """Mine with the model as it is now and add the next epoch's row."""
        epoch = len(self._rows)
        if epoch >= self.epochs:
            return
        images = self.train_data.images
        hard = hardest_negatives(
            self.train_data.frame,
            self.train_data.labels,
            lambda pool: batched_probability(self.predict, images[pool], self.spec),
            self.settings.smear_hard_negatives,
        )
        seed = self.settings.training_seed + epoch
        row = settings_epoch_plan(self.train_data, self.settings, 1, seed, hard).indices[0]
        with self._ready:
            self._rows.append(row)
            self._ready.notify_all()

    def close(self) -> None:
        """Release every waiting reader (the end of training, or its failure)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def callback(self):
        """The Keras callback that plans the next epoch at the end of each one."""
        import keras

        mining = self

        class PlanNextEpoch(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                mining.plan_next()

        return PlanNextEpoch()


def train(settings: Settings, force: bool = False) -> RegisteredVersion:
    """Train the configured profile, write ``training_artifacts/``, log and register in MLflow."""
    started = time.monotonic()
    if not settings.splits_path.is_file():
        prepare(settings)
    manifest = read_manifest(settings.splits_path)
    roots = source_roots(settings)
    profile = resolve_profile(settings)
    sources = sorted({cell_source(roots[NIH]) if s == NIH else s for s in manifest["source"]})
    spec = ModelSpec(image_size=profile.image_size, training_sources=sources)
    limit = settings.max_train_images

    train_data = load_split(manifest, roots, "train", spec, limit, settings.seed)
    val_data = load_split(manifest, roots, "val", spec, limit, settings.seed)
    test_data = load_split(manifest, roots, "test", spec, limit, settings.seed)
    logger.info(
        "images: train %d, val %d, test %d (%d/%d/%d patients)",
        len(train_data.labels),
        len(val_data.labels),
        len(test_data.labels),
        *(d.frame["patient"].nunique() for d in (train_data, val_data, test_data)),
    )

    model, history = fit_model(profile, spec, settings, train_data, val_data)
    train_seconds = time.monotonic() - started

    raw = ModelSpec(**{**spec.model_dump(), "temperature": 1.0})
    val_raw = predict_probability(model, val_data.images, raw)
    spec = spec.model_copy(update={"temperature": evaluation.fit_temperature(val_data.labels, val_raw)})
    val_p = spec.probability_positive(val_raw.reshape(-1, 1))
    test_p = predict_probability(model, test_data.images, spec)
    metrics = {
        **metrics_by_source("val", val_data, val_p, spec.threshold),
        **metrics_by_source("test", test_data, test_p, spec.threshold),
        "train_seconds": train_seconds,
    }
    logger.info(
        "test (unseen patients): accuracy %.4f, ROC-AUC %.4f, ECE %.4f, temperature %.2f",
        metrics["test_accuracy"],
        metrics["test_roc_auc"],
        metrics["test_ece"],
        spec.temperature,
    )

    artifacts = write_artifacts(settings.artifacts_dir, model, spec, history, metrics, test_data, test_p, train_data)
    params = {
        "profile": profile.name,
        "image_size": spec.image_size,
        "width": profile.width,
        "epochs": profile.epochs,
        "batch_size": settings.batch_size,
        "learning_rate": profile.learning_rate,
        "weight_decay": profile.weight_decay,
        "seed": settings.seed,
        "train_seed": settings.training_seed,
        "deterministic": settings.deterministic,
        "train_images": len(train_data.labels),
        "val_images": len(val_data.labels),
        "test_images": len(test_data.labels),
        "data_source": str(roots["nih"]),
        "sources": ",".join(sources),
    }
    record = log_register_and_gate(
        model,
        spec,
        settings,
        TrainingRun(
            params=params,
            metrics=metrics,
            history=history,
            artifacts_dir=artifacts,
            version_tags={SPLIT_TAG: images_fingerprint(manifest)},
        ),
        ChampionGate(
            validation_set=images_fingerprint(val_data.frame),
            rescore_champion=validation_scorer(settings, roots, val_data),
            force=force,
        ),
        reference_images=val_data.images[:REFERENCE_IMAGES],
    )
    (settings.artifacts_dir / "registered.json").write_text(
        json.dumps(
            {"name": record.name, "version": record.version, "run_id": record.run_id, "champion": record.is_champion},
            indent=2,
        )
    )
    logger.info(
        "registered %s version %s%s in %.0fs",
        record.name,
        record.version,
        " (champion)" if record.is_champion else "",
        time.monotonic() - started,
    )
    return record


def write_artifacts(
    folder: Path,
    model,
    spec: ModelSpec,
    history: dict,
    metrics: dict,
    test: SplitData,
    test_probability: np.ndarray,
    train_data: SplitData,
) -> Path:
    """Model, spec, history, metrics, plots and the drift reference features of one training run."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")
    (folder / "model_spec.json").write_text(spec.model_dump_json(indent=2))
    (folder / "history.json").write_text(json.dumps(history, indent=2))
    # The same as data, for `dvc plots show/diff`: one row per epoch, and the test ROC curve.
    pd.DataFrame(history).rename_axis("epoch").reset_index().assign(epoch=lambda f: f["epoch"] + 1).to_csv(
        folder / "history.csv", index=False
    )
    fpr, tpr, _ = evaluation.roc_points(test.labels, test_probability)
    pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(folder / "roc.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    evaluation.plot_confusion_matrix(test.labels, test_probability, spec, folder / "confusion_matrix.png")
    evaluation.plot_roc(test.labels, test_probability, folder / "roc_curve.png")
    evaluation.plot_learning_curves(history, folder / "learning_curves.png")
    frame, images = train_data.frame, train_data.images
    sizes = list(zip(frame["width"], frame["height"], strict=True))
    reference = pd.DataFrame(image_features_batch(images, sizes))
    reference["probability_parasitized"] = predict_probability(model, images, spec)
    reference["label"] = frame["label"].to_numpy()
    reference.to_csv(folder / "reference_features.csv", index=False)
    return folder
