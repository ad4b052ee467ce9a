"""Training configuration: the profile and the settings that override it."""

from malaria.model import PROFILES, build_model
from malaria.train import resolve_profile


def test_settings_override_the_profile(settings_factory):
    settings = settings_factory(width=0.125, epochs=3, image_size=40, learning_rate=1e-3, weight_decay=0.0)
    profile = resolve_profile(settings)
    assert (profile.width, profile.epochs, profile.image_size, profile.learning_rate) == (0.125, 3, 40, 1e-3)
    assert profile.weight_decay == 0.0  # zero is an override, not "unset"

    model = build_model(profile, profile.image_size)
    assert model.input_shape == (None, 40, 40, 3)
    assert model.get_layer("block1_conv1").filters == 8  # 64 * 0.125
    assert model.get_layer("block3_conv1").filters == 32  # 256 * 0.125


def test_without_overrides_the_profile_is_unchanged(settings_factory):
    settings = settings_factory(width=None, epochs=None, image_size=None, learning_rate=None, weight_decay=None)
    assert resolve_profile(settings) == PROFILES["quick"]
