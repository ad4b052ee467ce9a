"""Batch scoring of a folder: the outputs both engines write, and the Spark engine.

Two engines, one set of files (``predictions.csv``, ``predictions.json``, ``summary.json``, plus
``predictions.parquet`` from Spark):

- ``service``: every image through a running Bento (``flows/batch_predict.py``), for an archive the
  service can take in minutes;
- ``spark``: the registered pipeline (``malaria/pyfunc.py``) inside Spark, through
  ``mlflow.pyfunc.spark_udf``, for an archive of millions: no HTTP, one Python worker per core, the
  model loaded once per worker. Locally on ``local[*]``; on a cluster with ``--master`` (docs/batch.md).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import pandas as pd

from malaria.preprocess import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

ANSWER_COLUMNS = ("label", "probability_parasitized", "confidence", "decision", "model_version")
# Arrow batches handed to the pipeline: 256 cells of 64x64 are 12 MB of model input.
ARROW_BATCH_ROWS = 256


def summarise_predictions(results: list[dict]) -> dict:
    """Counts per label and decision over the classified rows; the unreadable files with their reason."""
    frame = pd.DataFrame(results)
    failed = frame[frame["error"].notna()] if "error" in frame else frame.iloc[0:0]
    ok = frame[frame["error"].isna()] if "error" in frame else frame
    return {
        "total": len(frame),
        "classified": len(ok),
        "unreadable": [{"path": r["path"], "error": r["error"]} for r in failed.to_dict("records")],
        "counts": {str(k): int(v) for k, v in ok["label"].value_counts().items()} if len(ok) else {},
        "decisions": {str(k): int(v) for k, v in ok["decision"].value_counts().items()} if len(ok) else {},
    }


def write_outputs(results: list[dict], out_dir: Path) -> dict:
    """``predictions.csv``, ``predictions.json`` and ``summary.json`` of one batch; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(results).to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2))
    summary = summarise_predictions(results)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def spark_session(master: str = "local[*]", app_name: str = "malaria-batch-predict"):
    """A Spark session for scoring: Arrow on, small Arrow batches, files packed into one task per core."""
    os.environ.setdefault("PYSPARK_PYTHON", _python())
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(ARROW_BATCH_ROWS))
        # binaryFile makes one task per small file by default (1,136 tasks for 1,136 crops): with no
        # open cost per file, Spark packs them into about one split per core.
        .config("spark.sql.files.openCostInBytes", "1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )


def _python() -> str:
    import sys

    return sys.executable


def is_uri(location: str | Path) -> bool:
    """``s3a://bucket/cells``, ``hdfs://...``: a location Spark reads, not a local path."""
    return "://" in str(location)


def _row_path(spark_path: str, source: str | Path) -> str:
    """Spark's ``file:/abs/path`` back to the path ``collect_images`` gives for the same file (URIs stay)."""
    if is_uri(source) or not spark_path.startswith("file:"):
        return spark_path
    folder = Path(source)
    absolute = Path(spark_path.removeprefix("file://").removeprefix("file:"))
    try:
        return str(folder / absolute.relative_to(folder.resolve()))
    except ValueError:
        return str(absolute)


def score_with_spark(
    spark,
    source: str | Path,
    model_uri: str,
    spec_json: str,
    model_version: str,
    out_dir: Path,
    parquet_uri: str | None = None,
) -> dict:
    """Score every image under ``source`` (a folder or a URI Spark reads) with the pipeline in Spark.

    Writes the scored rows as Parquet (``parquet_uri``, default ``out_dir/predictions.parquet``; on a
    cluster, storage every executor writes to), then the batch files in ``out_dir`` on the driver.
    ``spec_json`` and ``model_version`` come from the registry on the driver (``model_config``), so the
    executors need the model's files only, never the tracking server.
    """
    import mlflow
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    started = time.perf_counter()
    result_type = StructType(
        [
            StructField("label", StringType()),
            StructField("probability_parasitized", DoubleType()),
            StructField("confidence", DoubleType()),
            StructField("decision", StringType()),
            StructField("model_version", StringType()),
            StructField("error", StringType()),
        ]
    )
    predict = mlflow.pyfunc.spark_udf(
        spark,
        model_uri,
        result_type=result_type,
        env_manager="local",
        model_config={"spec": spec_json, "model_version": model_version},
    )
    suffixes = "|".join(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES))
    files = (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(str(source) if is_uri(source) else str(Path(source).resolve()))
        .where(F.lower(F.col("path")).rlike(rf"\.({suffixes})$"))
    )
    request_id = f"spark-{uuid.uuid4().hex[:12]}"  # one id per job, where the service gives one per request
    answers = files.select("path", predict(F.struct(F.col("content").alias("image"))).alias("answer"))
    # spark_udf casts a string column that mixes values and None with numpy's str (None becomes "None",
    # NaN "nan"): the answer's columns are null again where the row is an error, and the error where not.
    error = F.when(F.col("answer.error") != "None", F.col("answer.error"))
    answer = [F.when(error.isNull(), F.col(f"answer.{c}")).alias(c) for c in ANSWER_COLUMNS]
    scored = answers.select("path", *answer, error.alias("error"))
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet_uri = parquet_uri or str((out_dir / "predictions.parquet").resolve())
    scored.write.mode("overwrite").parquet(parquet_uri)  # the model runs once; the driver reads the result
    frame = spark.read.parquet(parquet_uri).toPandas()
    frame["path"] = [_row_path(p, source) for p in frame["path"]]
    frame = frame.sort_values("path", kind="stable").reset_index(drop=True)
    results = []
    for row in frame.astype(object).where(frame.notna(), None).to_dict("records"):
        if row["error"] is not None:  # an unreadable file: the same row as the service engine gives
            results.append({"path": row["path"], "error": row["error"]})
        else:
            answer = {k: row[k] for k in ANSWER_COLUMNS}
            name = Path(row["path"]).name
            results.append({"path": row["path"], **answer, "request_id": request_id, "filename": name})
    summary = write_outputs(results, out_dir)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    logger.info("spark: %d images in %.1f s (%s)", summary["total"], summary["seconds"], summary["counts"])
    return summary
