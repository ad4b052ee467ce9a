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
import sys
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
    """``predictions.csv``, ``predictions.json`` and ``summary.json`` of one batch; returns the summary.

    The service's ``review`` flag (which answers the lab page's review queue takes) is left out: both
    engines write the same columns.
    """
    results = [{k: v for k, v in row.items() if k != "review"} for row in results]
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(results).to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2))
    summary = summarise_predictions(results)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def spark_session(master: str | None = "local[*]", app_name: str = "malaria-batch-predict"):
    """A Spark session for scoring: Arrow on, small Arrow batches, files packed into one task per core.

    ``master=None`` keeps the one ``spark-submit --master`` (or ``spark-defaults.conf``) gives.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # workers run this environment's Python
    from pyspark.sql import SparkSession

    builder = SparkSession.builder if master is None else SparkSession.builder.master(master)
    return (
        builder.appName(app_name)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(ARROW_BATCH_ROWS))
        # binaryFile makes one task per small file by default (1,136 tasks for 1,136 crops): with no
        # open cost per file, Spark packs them into about one split per core.
        .config("spark.sql.files.openCostInBytes", "1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )


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


def image_files(spark, source: str | Path):
    """Spark's binaryFile rows (``path``, ``content``, ...) of the images under ``source``, recursively."""
    from pyspark.sql import functions as F

    suffixes = "|".join(s.lstrip(".") for s in sorted(IMAGE_SUFFIXES))
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .load(str(source) if is_uri(source) else str(Path(source).resolve()))
        .where(F.lower(F.col("path")).rlike(rf"\.({suffixes})$"))
    )


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
    files = image_files(spark, source)
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
            answered = {k: row[k] for k in ANSWER_COLUMNS}
            name = Path(row["path"]).name
            results.append({"path": row["path"], **answered, "request_id": request_id, "filename": name})
    summary = write_outputs(results, out_dir)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    logger.info("spark: %d images in %.1f s (%s)", summary["total"], summary["seconds"], summary["counts"])
    return summary


# --- smear fields on Spark: one row per detected red cell ----------------------------------------

CELL_COLUMNS = [
    ("path", "string"),
    ("cell", "int"),
    ("x", "int"),
    ("y", "int"),
    ("width", "int"),
    ("height", "int"),
    ("label", "string"),
    ("probability_parasitized", "double"),
    ("decision", "string"),
    ("edge", "boolean"),
    ("joined", "boolean"),
    ("usable", "boolean"),
    ("reason", "string"),
    ("model_version", "string"),
    # the field's own figures, as /analyze_smear counts them (repeated on each of its cells)
    ("field_cells", "int"),
    ("field_parasitized", "int"),
    ("parasitemia_percent", "double"),
    ("parasitemia_ci95_low", "double"),
    ("parasitemia_ci95_high", "double"),
]
FIELD_COLUMNS = {  # fields.csv: one row per field, from its cells' rows
    "path": "path",
    "usable": "usable",
    "reason": "reason",
    "field_cells": "cells",
    "field_parasitized": "parasitized",
    "parasitemia_percent": "parasitemia_percent",
    "parasitemia_ci95_low": "parasitemia_ci95_low",
    "parasitemia_ci95_high": "parasitemia_ci95_high",
}
PANDAS_TYPES = {name: {"int": "Int32", "boolean": "boolean", "double": "float64"}.get(kind, "object")
                for name, kind in CELL_COLUMNS}  # fmt: skip
_PIPELINES: dict = {}  # per Python worker: the loaded pipeline, reused by every task the worker runs


def _load_pipeline(model_uri: str, spec_json: str, model_version: str):
    key = (model_uri, spec_json, model_version)
    if key not in _PIPELINES:
        import mlflow

        config = {"spec": spec_json, "model_version": model_version}
        _PIPELINES[key] = mlflow.pyfunc.load_model(model_uri, model_config=config).unwrap_python_model()
    return _PIPELINES[key]


def field_cell_rows(path: str, content: bytes, pipeline, cell_diameter_px: float) -> list[dict]:
    """One field image -> one row per red cell, as ``/analyze_smear`` finds and judges them (or one row saying
    why the field cannot be counted)."""
    from malaria.model import batched_probability
    from malaria.preprocess import InvalidImageError, decode_image
    from malaria.smear.analysis import SmearTiming, prepare_field, summarise_field
    from malaria.smear.detect import FieldTooLargeError

    spec, version = pipeline.spec.for_fields(), pipeline.model_version
    try:
        image = decode_image(content, max_pixels=pipeline.max_field_pixels)
        field = prepare_field(image, spec, cell_diameter_px, time.perf_counter)
    except (InvalidImageError, FieldTooLargeError) as exc:
        reason = str(exc)
        return [{"path": path, "usable": False, "reason": reason, "model_version": version, "field_cells": 0}]
    probability = batched_probability(pipeline.predict_fn, field.batch, spec, 64)
    timing = SmearTiming(detect_ms=field.detect_ms, crop_ms=field.crop_ms, model_ms=0.0, total_ms=0.0)
    analysis = summarise_field(
        field, probability, spec, cell_diameter_px=cell_diameter_px, model_version=version, request_id="", timing=timing
    )
    low, high = analysis.parasitemia_ci95 or (None, None)
    common = {
        "path": path,
        "usable": analysis.usable,
        "reason": analysis.reason,
        "model_version": version,
        "field_cells": analysis.counts.cells,
        "field_parasitized": analysis.counts.parasitized,
        "parasitemia_percent": analysis.parasitemia_percent,
        "parasitemia_ci95_low": low,
        "parasitemia_ci95_high": high,
    }
    if not analysis.cells:
        return [common]
    return [
        {
            **common,
            "cell": i,
            **dict(zip(("x", "y", "width", "height"), cell.box, strict=True)),
            "label": cell.label,
            "probability_parasitized": cell.probability_parasitized,
            "decision": cell.decision,
            "edge": cell.edge,
            "joined": cell.joined,
        }
        for i, cell in enumerate(analysis.cells)
    ]


def score_fields_with_spark(
    spark,
    source: str | Path,
    model_uri: str,
    spec_json: str,
    model_version: str,
    out_dir: Path,
    cell_diameter_px: float,
    parquet_uri: str | None = None,
) -> dict:
    """Smear fields under ``source`` on Spark: ``cells.parquet`` and ``cells.csv`` (one row per red cell, as
    ``/analyze_smear`` answers), ``fields.csv`` and ``summary.json``. ``mapInPandas``: a field makes many rows.
    """

    started = time.perf_counter()
    files = image_files(spark, source).select("path", "content")

    def score(batches):
        pipeline = _load_pipeline(model_uri, spec_json, model_version)
        for frame in batches:
            rows = [r for p, c in zip(frame["path"], frame["content"], strict=True) for r in
                    field_cell_rows(p, bytes(c), pipeline, cell_diameter_px)]  # fmt: skip
            frame = pd.DataFrame(rows, columns=[name for name, _ in CELL_COLUMNS])
            yield frame.astype(PANDAS_TYPES)  # nullable: a field that cannot be counted has no cell columns

    schema = ", ".join(f"{name} {kind}" for name, kind in CELL_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    parquet_uri = parquet_uri or str((out_dir / "cells.parquet").resolve())
    files.mapInPandas(score, schema=schema).write.mode("overwrite").parquet(parquet_uri)
    cells = spark.read.parquet(parquet_uri).toPandas()
    cells["path"] = [_row_path(p, source) for p in cells["path"]]
    cells = cells.sort_values(["path", "cell"], kind="stable").reset_index(drop=True)
    cells.to_csv(out_dir / "cells.csv", index=False)
    fields = cells.drop_duplicates("path")[list(FIELD_COLUMNS)].rename(columns=FIELD_COLUMNS)
    fields.to_csv(out_dir / "fields.csv", index=False)
    usable = fields[fields["usable"]]
    summary = {
        "fields": len(fields),
        "unusable": [{"path": r["path"], "reason": r["reason"]} for r in fields[~fields["usable"]].to_dict("records")],
        "cells": int(usable["cells"].sum()),
        "parasitized": int(usable["parasitized"].sum()),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    logger.info("spark: %d fields, %d cells in %.1f s", summary["fields"], summary["cells"], summary["seconds"])
    return summary
