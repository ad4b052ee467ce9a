"""Generated docs stay in step with the code."""

from __future__ import annotations

from malaria.config import SETTINGS_TABLE_END, SETTINGS_TABLE_START, Settings, settings_table
from tests.conftest import REPO_ROOT


def test_every_setting_is_described():
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_the_settings_table_in_the_docs_is_current():
    text = (REPO_ROOT / "docs" / "serving.md").read_text()
    between = text.split(SETTINGS_TABLE_START)[1].split(SETTINGS_TABLE_END)[0].strip()
    assert between == settings_table(), "stale: run `malaria docs settings`"
    assert between.count("\n") == len(Settings.model_fields) + 1  # header, rule, one row per setting


def test_readme_is_the_front_door_and_links_every_doc():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12_000
    for page in sorted((REPO_ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README does not link docs/{page.name}"


def test_model_card_states_sources_per_source_figures_and_a_demo_model():
    from malaria.model_card import render
    from malaria.registry import RegisteredVersion
    from malaria.spec import ModelSpec

    metrics = {"test_accuracy": 0.95, "test_nih_accuracy": 0.966, "test_smear_specificity": 0.991}
    spec = ModelSpec(training_sources=["nih", "smear"], threshold=0.6)
    card = render(RegisteredVersion("m", "3", "run1", spec, metrics, True))
    assert "# Model card: m version 3" in card and "P >= 0.600" in card
    assert "| nih | 0.9660 |" in card and "| smear | - | - | 0.9910 |" in card
    assert "not a diagnosis on its own" in card and "Gametocytes" in card and "synthetic" not in card.lower()
    demo = render(RegisteredVersion("m", "4", "run2", ModelSpec(training_sources=["synthetic"]), {}, True))
    assert "trained on generated data: a demo" in demo
