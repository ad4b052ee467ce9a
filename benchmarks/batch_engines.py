"""`make bench-batch`: one archive scored by the service (batch-predict flow) and by Spark, in one run.

Scores every image under ``MALARIA_DATA_DIR`` (the 12,000 shared NIH cells) three ways, one at a time
so that none shares the 2 cores with another:

- ``service``: the batch-predict flow against an already running ``bentoml serve`` (its start not timed);
- ``spark_cold``: ``malaria batch-predict DIR --engine spark`` as a fresh process: Python start, Spark
  session, model load and scoring, the wall time a user waits;
- ``spark_warm``: the same job again in a session that already scored once (workers hold the model).

The Spark engine scores the registered champion and the service serves the BentoML store's newest
model: ``make model`` puts the same version in both. Writes ``benchmarks/batch.json`` and the table in
``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent
TABLE_START, TABLE_END = "<!-- batch-table:start -->", "<!-- batch-table:end -->"


def archive() -> Path:
    """The archive to score: MALARIA_DATA_DIR, else 2,000 generated cells."""
    from malaria.data import generate_synthetic

    root = os.environ.get("MALARIA_DATA_DIR")
    if root:
        return Path(root)
    return generate_synthetic(Path(tempfile.mkdtemp()) / "cells", per_class=1000, size=128)


def by_service(folder: Path, out: Path) -> dict:
    """The batch-predict flow against a running service; the server starts before the clock."""
    from benchmarks.bench import bento_server
    from flows.batch_predict import batch_predict_flow

    server = bento_server(3311)
    try:
        started = time.perf_counter()
        summary = batch_predict_flow(folder, url=server.url, out_dir=out / "service")
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    return {"images": summary["total"], "seconds": round(seconds, 2), "unreadable": len(summary["unreadable"])}


def spark_cold(folder: Path, out: Path) -> dict:
    """The CLI as a new process: everything a user waits for."""
    command = [sys.executable, "-m", "malaria.cli", "batch-predict", str(folder), "--engine", "spark"]
    started = time.perf_counter()
    done = subprocess.run([*command, "--out", str(out / "spark-cold")], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"spark batch-predict failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"images": summary["total"], "seconds": round(seconds, 2), "unreadable": summary["unreadable"]}


def spark_warm(folder: Path, out: Path) -> tuple[dict, dict]:
    """Session start and a first job (workers load the model), then the timed warm job."""
    from malaria.batch import score_with_spark, spark_session
    from malaria.config import get_settings
    from malaria.registry import get_version

    settings = get_settings()
    record = get_version(settings)
    uri = f"models:/{record.name}@{settings.champion_alias}"
    started = time.perf_counter()
    spark = spark_session()
    session_seconds = time.perf_counter() - started
    first = score_with_spark(spark, folder, uri, record.spec.to_json(), record.version, out / "spark-first")
    started = time.perf_counter()
    summary = score_with_spark(spark, folder, uri, record.spec.to_json(), record.version, out / "spark-warm")
    seconds = time.perf_counter() - started
    parallelism = spark.sparkContext.defaultParallelism
    spark.stop()
    setup = {"session_start_s": round(session_seconds, 2), "first_job_s": first["seconds"], "cores": parallelism}
    return {"images": summary["total"], "seconds": round(seconds, 2), "unreadable": len(summary["unreadable"])}, setup


def same_answers(out: Path) -> dict:
    """How the Spark rows compare with the service's on the same files."""
    import pandas as pd

    service = pd.read_csv(out / "service" / "predictions.csv").set_index("path")
    spark = pd.read_csv(out / "spark-warm" / "predictions.csv").set_index("path").loc[service.index]
    ok = service["error"].isna() if "error" in service else slice(None)
    difference = (spark["probability_parasitized"] - service["probability_parasitized"])[ok].abs().max()
    return {
        "max_probability_difference": float(difference),
        "labels_equal": bool((spark["label"][ok] == service["label"][ok]).all()),
        "decisions_equal": bool((spark["decision"][ok] == service["decision"][ok]).all()),
    }


def write_table(results: dict) -> None:
    rows = ["| how | images | seconds | images/s |", "|---|---|---|---|"]
    for name, label in (
        ("service", "batch-predict flow, running service (4 requests of 16 in flight)"),
        ("spark_cold", "Spark, new process (`malaria batch-predict --engine spark`)"),
        ("spark_warm", "Spark, warm session"),
    ):
        run = results[name]
        rows.append(f"| {label} | {run['images']} | {run['seconds']} | {run['images_per_s']} |")
    ratios = results["ratios"]
    rows.append("")
    rows.append(
        f"Warm Spark over service: **{ratios['spark_warm_over_service']}** (goal 0.8); cold Spark over service: "
        f"{ratios['spark_cold_over_service']}. Spark session start {results['spark_setup']['session_start_s']} s, "
        f"first job {results['spark_setup']['first_job_s']} s on {results['spark_setup']['cores']} cores. "
        f"Same answers: max probability difference {results['parity']['max_probability_difference']:.1e}, labels "
        f"equal {results['parity']['labels_equal']}, decisions equal {results['parity']['decisions_equal']}."
    )
    readme = OUT / "README.md"
    text = readme.read_text()
    table = f"{TABLE_START}\n" + "\n".join(rows) + f"\n{TABLE_END}"
    pattern = re.compile(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), re.S)
    readme.write_text(pattern.sub(lambda _: table, text) if pattern.search(text) else f"{text}\n{table}\n")


def main() -> None:
    folder = archive()
    out = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "archive": str(folder)}
    results["service"] = by_service(folder, out)
    print(f"service: {results['service']}", flush=True)
    results["spark_cold"] = spark_cold(folder, out)
    print(f"spark cold: {results['spark_cold']}", flush=True)
    results["spark_warm"], results["spark_setup"] = spark_warm(folder, out)
    print(f"spark warm: {results['spark_warm']} {results['spark_setup']}", flush=True)
    for name in ("service", "spark_cold", "spark_warm"):
        run = results[name]
        run["images_per_s"] = round(run["images"] / run["seconds"], 1)
    results["ratios"] = {
        "spark_warm_over_service": round(results["spark_warm"]["images_per_s"] / results["service"]["images_per_s"], 3),
        "spark_cold_over_service": round(results["spark_cold"]["images_per_s"] / results["service"]["images_per_s"], 3),
    }
    results["parity"] = same_answers(out)
    print(json.dumps(results["ratios"] | results["parity"]), flush=True)
    (OUT / "batch.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results)


if __name__ == "__main__":
    main()
