"""The VGG16 classifier and its augmentation pipeline.

``full`` is true VGG16 (``keras.applications.VGG16``, ImageNet weights when they can be loaded) for
GPU machines. ``quick`` keeps the VGG16 block topology (2-2-3-3-3 convolutions, 3x3 kernels, max
pooling) at reduced width with batch norm, which trains to full accuracy on two CPU cores.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

VGG16_BLOCKS = ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512))


@dataclass(frozen=True)
class TrainingProfile:
    """Architecture and schedule of one training profile."""

    name: str
    image_size: int
    width: float
    epochs: int
    learning_rate: float
    weight_decay: float
    pretrained: bool


PROFILES: dict[str, TrainingProfile] = {
    "quick": TrainingProfile(
        "quick", image_size=64, width=0.25, epochs=20, learning_rate=2e-3, weight_decay=1e-4, pretrained=False
    ),
    "full": TrainingProfile(
        "full", image_size=128, width=1.0, epochs=15, learning_rate=1e-4, weight_decay=1e-4, pretrained=True
    ),
}


def build_model(profile: TrainingProfile, image_size: int, seed: int = 0):
    """A compiled-ready Keras model: float32 (size, size, 3) in [0, 1] -> P(Parasitized) (sigmoid)."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    if profile.pretrained:
        features = _vgg16_pretrained(inputs, image_size)
        x = layers.GlobalAveragePooling2D()(features)
        x = layers.Dense(256, activation="relu")(x)
        x = layers.Dropout(0.5)(x)
    else:
        # Per-image, per-channel standardisation: removes the slide's stain and brightness cast.
        x = layers.LayerNormalization(axis=(1, 2), center=False, scale=False, epsilon=1e-3, name="stain_norm")(inputs)
        for block, (n_convs, filters) in enumerate(VGG16_BLOCKS, start=1):
            width = max(8, int(filters * profile.width))
            for conv in range(1, n_convs + 1):
                x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{block}_conv{conv}")(x)
                x = layers.BatchNormalization(momentum=0.9, name=f"block{block}_bn{conv}")(x)
                x = layers.ReLU(name=f"block{block}_relu{conv}")(x)
            x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="p_parasitized")(x)
    return keras.Model(inputs, outputs, name=f"vgg16_{profile.name}")


def _vgg16_pretrained(inputs, image_size: int):
    """keras.applications.VGG16 on [0, 1] input; ImageNet weights if reachable, else random init."""
    import keras
    from keras import layers

    # VGG16's ImageNet weights expect 0-255 input minus the ImageNet channel means.
    x = layers.Rescaling(255.0)(inputs)
    x = layers.Normalization(mean=[123.68, 116.779, 103.939], variance=[1.0, 1.0, 1.0])(x)
    try:
        base = keras.applications.VGG16(include_top=False, weights="imagenet", input_shape=(image_size, image_size, 3))
    except Exception as exc:  # noqa: BLE001 - no cache and no network: train from scratch
        logger.warning("ImageNet weights for VGG16 unavailable (%s); using random initialisation", exc)
        base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    return base(x)


def augmentation_pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    deterministic: bool = False,
    plan: tuple[np.ndarray | Callable[[], Iterator[np.ndarray]], np.ndarray] | None = None,
    stain_jitter: float = 0.0,
):
    """An augmented ``tf.data`` pipeline of training batches: flips, rotations, brightness and contrast
    jitter, and with ``stain_jitter`` > 0 saturation (1 +/- it) and hue (+/- it / 8) jitter.

    Without ``plan``: every image once per epoch, reshuffled each epoch, as ``(x, y)`` batches. With
    ``plan = (epoch_indices, weights)`` (``malaria.train.epoch_plan``): each row of ``epoch_indices``
    is one epoch's images, batched within it and gathered by index, as ``(x, y, weight)``; one pass
    over it covers every epoch. ``epoch_indices`` may instead be a generator function of the rows,
    made while training (``malaria.train.HardNegativeMining``). ``deterministic`` augments one batch
    at a time, in order, so the random draws repeat.
    """
    import tensorflow as tf
    from keras import layers

    # Cells are centred and round: any rotation or flip is a valid view, a shift may crop a parasite.
    rotation = layers.RandomRotation(0.5, fill_mode="constant", fill_value=0.0, seed=seed)

    def augment(x, y, *weight):
        x = tf.image.random_flip_left_right(x)
        x = tf.image.random_flip_up_down(x)
        x = rotation(x, training=True)
        # Brightness and contrast are drawn once per batch (tf.image.random_* on a batch), as for every
        # model measured so far; the stain jitter below is drawn per image.
        x = tf.image.random_brightness(x, 0.08)
        x = tf.image.random_contrast(x, 0.85, 1.15)
        if stain_jitter > 0:  # at 0 no random draw is added: earlier models train again as they were
            x = jitter_stain(x, stain_jitter)
        return tf.clip_by_value(x, 0.0, 1.0), y, *weight

    def jitter_stain(x, amount: float):
        # Per image: tf.image.random_saturation and random_hue draw one factor for the whole batch,
        # which the batch norm of a training step would largely normalise away.
        hsv = tf.image.rgb_to_hsv(x)
        shape = (tf.shape(x)[0], 1, 1)
        hue = tf.math.floormod(hsv[..., 0] + tf.random.uniform(shape, -amount / 8, amount / 8), 1.0)
        saturation = tf.clip_by_value(hsv[..., 1] * tf.random.uniform(shape, 1 - amount, 1 + amount), 0.0, 1.0)
        return tf.image.hsv_to_rgb(tf.stack([hue, saturation, hsv[..., 2]], axis=-1))

    parallel = None if deterministic else tf.data.AUTOTUNE
    if plan is None:
        batches = (
            tf.data.Dataset.from_tensor_slices((images, labels))
            .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size)
        )
    else:
        epoch_indices, weights = plan
        images_t, labels_t, weights_t = (tf.constant(a) for a in (images, labels, weights))
        if callable(epoch_indices):
            rows = tf.data.Dataset.from_generator(
                lambda: (row.astype(np.int64) for row in epoch_indices()),
                output_signature=tf.TensorSpec([None], tf.int64),
            )
        else:
            rows = tf.data.Dataset.from_tensor_slices(epoch_indices.astype(np.int64))
        batches = rows.flat_map(lambda row: tf.data.Dataset.from_tensor_slices(row).batch(batch_size)).map(
            lambda i: (tf.gather(images_t, i), tf.gather(labels_t, i), tf.gather(weights_t, i)),
            num_parallel_calls=parallel,
        )
    return batches.map(augment, num_parallel_calls=parallel).prefetch(tf.data.AUTOTUNE)


def recompute_batch_norm_statistics(model, images: np.ndarray, batch_size: int, seed: int) -> int:
    """Set batch norm's moving averages to population statistics over ``images`` ("precise BN").

    The moving averages kept while fitting (momentum 0.9) follow the last few augmented batches, so
    they are noisy and describe augmented cells, while served cells are not augmented. Each layer gets
    the mean of its per-batch means and variances over shuffled batches of ``images``, with the
    network in training mode as when fitting (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).
    Returns how many batch norm layers were updated.
    """
    import keras
    import tensorflow as tf

    layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers or not len(images):
        return 0
    inputs_of_layers = keras.Model(model.input, [layer.input for layer in layers])

    @tf.function
    def batch_moments(batch):
        return [tf.nn.moments(x, axes=list(range(x.shape.rank - 1))) for x in inputs_of_layers(batch, training=True)]

    order = np.random.default_rng(seed).permutation(len(images))
    n_batches = max(1, len(images) // batch_size)
    means = [np.zeros(layer.input.shape[-1]) for layer in layers]
    variances = [np.zeros(layer.input.shape[-1]) for layer in layers]
    for start in range(0, n_batches * batch_size, batch_size):
        for i, (mean, variance) in enumerate(batch_moments(tf.constant(images[order[start : start + batch_size]]))):
            means[i] += mean.numpy() / n_batches
            variances[i] += variance.numpy() / n_batches
    for layer, mean, variance in zip(layers, means, variances, strict=True):
        layer.moving_mean.assign(mean)
        layer.moving_variance.assign(variance)
    return len(layers)


def compiled_predict(model):
    """The fastest CPU inference call: a traced ``tf.function`` over ``model(x, training=False)``."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def predict(batch):
        return model(batch, training=False)

    return lambda batch: predict(tf.convert_to_tensor(batch, dtype=tf.float32)).numpy()


def batched_probability(predict_fn, images: np.ndarray, spec, batch_size: int = 256) -> np.ndarray:
    """Calibrated P(positive) of preprocessed images, ``predict_fn`` called on chunks of ``batch_size``."""
    outputs = [predict_fn(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return spec.probability_positive(np.concatenate(outputs) if outputs else np.empty((0, 1)))
