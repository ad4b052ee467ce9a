"""The model: batch norm statistics recomputed over a set of images after fitting."""

from dataclasses import replace

import keras
import numpy as np

from malaria.model import PROFILES, build_model, recompute_batch_norm_statistics


def _features(model) -> keras.Model:
    """The model up to its pooled features: after every batch norm layer, before dropout."""
    pooled = next(layer for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D))
    return keras.Model(model.input, pooled.output)


def test_with_one_batch_of_all_images_inference_reproduces_training_mode():
    model = build_model(replace(PROFILES["quick"], width=0.125), 32, seed=0)
    images = np.random.default_rng(0).random((48, 32, 32, 3), dtype=np.float32)
    features = _features(model)
    batch_statistics = features(images, training=True).numpy()
    assert not np.allclose(features(images, training=False).numpy(), batch_statistics, atol=1e-3)

    assert recompute_batch_norm_statistics(model, images, batch_size=len(images), seed=0) == 13

    np.testing.assert_allclose(features(images, training=False).numpy(), batch_statistics, atol=1e-3)


def test_the_statistics_move_from_their_initial_values_and_barely_depend_on_the_pass_order():
    profile = replace(PROFILES["quick"], width=0.125)
    images = np.random.default_rng(1).random((64, 32, 32, 3), dtype=np.float32)
    first_layer_variance = []
    model = build_model(profile, 32, seed=0)
    initial = model.get_weights()  # the same network for both pass orders, whatever else ran in this process
    for seed in (0, 1):
        model.set_weights(initial)
        recompute_batch_norm_statistics(model, images, batch_size=16, seed=seed)
        first_layer_variance.append(model.get_layer("block1_bn1").moving_variance.numpy())
    assert not np.allclose(first_layer_variance[0], 1.0)  # moved from the initial value
    np.testing.assert_allclose(first_layer_variance[0], first_layer_variance[1], rtol=0.05)


def test_a_model_without_batch_norm_is_left_alone():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(inputs)))
    weights = [w.copy() for w in model.get_weights()]
    assert recompute_batch_norm_statistics(model, np.ones((4, 8, 8, 3), np.float32), batch_size=2, seed=0) == 0
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights(), strict=True))


def test_stain_jitter_varies_each_cells_hue_and_saturation_and_adds_nothing_at_zero():
    import tensorflow as tf

    from malaria.model import augmentation_pipeline

    image = np.zeros((32, 32, 3), np.float32)
    yy, xx = np.mgrid[:32, :32]
    image[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = (0.75, 0.45, 0.6)  # a magenta cell on black
    images, labels = np.repeat(image[None], 64, axis=0), np.zeros(64, np.float32)

    def centre_hue_and_saturation(stain_jitter: float) -> np.ndarray:
        x, _ = next(iter(augmentation_pipeline(images, labels, 64, seed=0, stain_jitter=stain_jitter)))
        return tf.image.rgb_to_hsv(x[:, 16, 16, :]).numpy()[:, :2]

    plain, jittered = centre_hue_and_saturation(0.0), centre_hue_and_saturation(0.5)
    spread = lambda hs: np.ptp(hs, axis=0)  # noqa: E731
    # Brightness and contrast jitter alone barely move the hue; the stain jitter moves both.
    assert spread(jittered)[0] > 5 * spread(plain)[0]
    assert spread(jittered)[1] > 2 * spread(plain)[1]
    assert spread(jittered)[0] > 0.02 and spread(jittered)[1] > 0.2
