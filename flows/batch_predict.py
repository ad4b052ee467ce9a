"""Classify every image under a folder, through a running service or on Spark; CSV, JSON and a summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import httpx
from bentoml.exceptions import BentoMLException
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from malaria.batch import write_outputs
from malaria.client import MalariaClient, collect_images
from malaria.config import Settings, get_settings

Engine = Literal["service", "spark"]


def _is_transient(task, task_run, state) -> bool:
    """Retry 5xx answers (503 overload or not ready, 504 timeout) and lost connections; never a 4xx or a bug."""
    try:
        state.result()
    except BentoMLException as exc:
        return int(exc.error_code) >= 500
    except (httpx.TransportError, ConnectionError):  # refused, reset, timed out on the way
        return True
    except Exception:  # noqa: BLE001 - anything else is not the network's fault: retrying would repeat it
        return False
    return False


@task(retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=_is_transient)
def classify_chunk(paths: list[Path], url: str, token: str | None) -> list[dict]:
    """One request for the chunk; if the service rejects it (a bad file), one request per file."""
    with MalariaClient(url, token=token) as client:
        return client.classify_files(paths)


@task
def score_on_spark(
    folder: str | Path,
    out_dir: Path,
    settings: Settings,
    master: str | None,
    version: str | None,
    parquet_uri: str | None,
    fields: bool = False,
) -> dict:
    """The registered pipeline over the folder on Spark (no service): the same files, plus Parquet; with
    ``fields``, smear fields: one row per red cell."""
    from malaria.batch import score_fields_with_spark, score_with_spark, spark_session
    from malaria.registry import get_version

    record = get_version(settings, version)
    uri = f"models:/{record.name}@{settings.champion_alias}" if version is None else record.uri
    spark = spark_session(master)
    if fields:
        diameter = settings.smear_cell_diameter_px
        return score_fields_with_spark(
            spark, folder, uri, record.spec.to_json(), record.version, out_dir, diameter, parquet_uri
        )
    return score_with_spark(spark, folder, uri, record.spec.to_json(), record.version, out_dir, parquet_uri)


@flow(
    name="batch-predict",
    task_runner=ThreadPoolTaskRunner(max_workers=4),  # type: ignore[arg-type]  # its generic type is inferred as Never
    log_prints=True,
)
def batch_predict_flow(
    folder: str | Path,
    url: str = "http://localhost:3000",
    token: str | None = None,
    chunk_size: int = 16,
    out_dir: Path = Path("reports/batch"),
    engine: Engine = "service",
    settings: Settings | None = None,
    spark_master: str | None = "local[*]",
    model_version: str | None = None,
    parquet_uri: str | None = None,
    fields: bool = False,
) -> dict:
    """Classify a folder: through the service with bounded concurrency (the task runner's workers), or
    with the registered pipeline on Spark (``engine="spark"``: the champion, or ``model_version``)."""
    if engine == "spark":
        settings = settings or get_settings()
        summary = score_on_spark(folder, out_dir, settings, spark_master, model_version, parquet_uri, fields)
    elif fields:
        raise ValueError("smear fields through the service: `malaria smear analyze` (or engine='spark')")
    else:
        paths = collect_images([Path(folder)])
        chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
        futures = [classify_chunk.submit(chunk, url, token) for chunk in chunks]
        results: list[dict] = []
        with tqdm(total=len(paths), desc="classifying", unit="img") as bar:
            for future in futures:
                part = future.result()
                results += part
                bar.update(len(part))
        summary = write_outputs(results, out_dir)
    create_markdown_artifact(
        key="batch-predict-summary",
        markdown=f"# Batch prediction of `{folder}` ({engine})\n\n```json\n{json.dumps(summary, indent=2)}\n```\n",
    )
    if fields:
        get_run_logger().info("%d fields, %d cells counted", summary["fields"], summary["cells"])
    else:
        get_run_logger().info(
            "%d images: %s; %d unreadable", summary["total"], summary["counts"], len(summary["unreadable"])
        )
    return summary


if __name__ == "__main__":
    # python flows/batch_predict.py DIR                       -> through the service on localhost:3000
    # spark-submit --master URL flows/batch_predict.py DIR spark [fields]  -> on that cluster
    import sys

    source, engine = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "service")
    options: dict[str, Any] = (
        {"engine": engine, "spark_master": None, "fields": "fields" in sys.argv[3:]} if engine == "spark" else {}
    )
    batch_predict_flow(source, **options)
