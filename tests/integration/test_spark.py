"""Batch scoring on local Spark gives the service's answers and files; a broken file is a row, not a failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import Server

pytestmark = pytest.mark.slow
pytest.importorskip("pyspark", reason="pyspark is in the dev extra: `make install`")


@pytest.fixture(scope="module")
def archive(synthetic_dir: Path, tmp_path_factory) -> Path:
    """Ten cells in two sub-folders, and one file that is not an image."""
    root = tmp_path_factory.mktemp("archive")
    for label in ("Parasitized", "Uninfected"):
        (root / label).mkdir()
        for path in sorted((synthetic_dir / label).glob("*.png"))[:5]:
            shutil.copy(path, root / label / path.name)
    (root / "Uninfected" / "broken.png").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("not scored: not an image suffix")
    return root


def test_spark_engine_writes_the_service_engines_files_with_its_answers(
    champion, archive, tmp_path, prefect_harness, settings_env
):
    from flows.batch_predict import batch_predict_flow

    settings = settings_env(champion[0])
    server = Server({}, tmp_path / "predictions")
    try:
        by_service = batch_predict_flow(archive, url=server.url, out_dir=tmp_path / "service")
    finally:
        server.stop()
    by_spark = batch_predict_flow(archive, out_dir=tmp_path / "spark", engine="spark", settings=settings)

    for summary in (by_service, by_spark):
        assert summary["total"] == 11 and summary["classified"] == 10
        assert [row["path"] for row in summary["unreadable"]] == [str(archive / "Uninfected" / "broken.png")]
    assert by_spark["counts"] == by_service["counts"] and by_spark["decisions"] == by_service["decisions"]

    service = pd.read_csv(tmp_path / "service" / "predictions.csv")
    spark = pd.read_csv(tmp_path / "spark" / "predictions.csv")
    assert list(spark.columns) == list(service.columns)
    assert list(spark["path"]) == list(service["path"])
    difference = np.abs(spark["probability_parasitized"] - service["probability_parasitized"]).max()
    assert difference <= 1e-5
    for column in ("label", "decision", "model_version", "filename"):
        assert spark[column].fillna("").tolist() == service[column].fillna("").tolist()
    assert spark["error"].notna().sum() == 1

    parquet = pd.read_parquet(tmp_path / "spark" / "predictions.parquet")
    assert len(parquet) == 11 and set(parquet["label"].dropna()) <= {"Parasitized", "Uninfected"}
    saved = json.loads((tmp_path / "spark" / "summary.json").read_text())
    assert saved["counts"] == by_spark["counts"]
