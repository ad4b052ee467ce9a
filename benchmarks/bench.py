"""`make bench`: the model's in-process limit and the served throughput, measured in one run.

Writes ``benchmarks/results.json`` and the table in ``benchmarks/README.md``. Needs a model in the
BentoML store (``make model``). Cell images come from ``MALARIA_DATA_DIR`` when set, else they are
generated. One asyncio client process drives the load (it shares the 2 cores; its CPU is reported).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from tests.server_process import ServerProcess, bentoml_serve_command

ROOT = Path(__file__).resolve().parents[1]
OUT = Path(__file__).resolve().parent
SECONDS = float(os.environ.get("BENCH_SECONDS", "15"))
WARMUP = 3.0
CONCURRENCY = (1, 8, 32, 64)
MULTI_PER_REQUEST = 16
MULTI_CONCURRENCY = 8


def sample_images(n: int = 256) -> list[bytes]:
    """Real cell images when MALARIA_DATA_DIR is set, else generated ones (PNG bytes)."""
    from malaria.data import generate_synthetic

    root: str | Path | None = os.environ.get("MALARIA_DATA_DIR")
    if not root:
        root = generate_synthetic(Path(tempfile.mkdtemp()) / "cells", per_class=n // 2, size=128)
    paths = sorted(Path(root).rglob("*.png"))
    rng = np.random.default_rng(0)
    return [paths[i].read_bytes() for i in rng.choice(len(paths), size=min(n, len(paths)), replace=False)]


def sample_fields(n: int = 12) -> list[bytes]:
    """Smear field images (JPEG bytes): MALARIA_SMEAR_DIR's when set, else generated 1280x960 fields."""
    import io

    from malaria.smear.synthetic import synthetic_field

    root = os.environ.get("MALARIA_SMEAR_DIR")
    if root:
        paths = sorted((Path(root) / "images").glob("*.JPG"))
        return [p.read_bytes() for p in paths[:: max(1, len(paths) // n)][:n]]
    fields = []
    for seed in range(n):
        buffer = io.BytesIO()
        # 50 free cells and 8 pairs: 60 and 10 do not fit some seeds' fields (synthetic_field raised)
        synthetic_field(1280, 960, diameter=80, n_free=50, n_pairs=8, seed=seed).image.save(buffer, "JPEG")
        fields.append(buffer.getvalue())
    return fields


def field_time_shares(url: str, fields: list[bytes]) -> dict:
    """Where a field's time goes (the service's own timing of each stage), sequential requests."""
    import httpx

    totals = {"detect_ms": 0.0, "crop_ms": 0.0, "model_ms": 0.0, "total_ms": 0.0}
    cells = 0
    for data in fields:
        answer = httpx.post(f"{url}/analyze_smear", files={"image": ("f.jpg", data)}, timeout=120).json()
        cells += len(answer["cells"])
        for key in totals:
            totals[key] += answer["timing"][key]
    total = totals.pop("total_ms")
    shares = {f"{key.removesuffix('_ms')}_share": round(value / total, 3) for key, value in totals.items()}
    return {"mean_total_ms": round(total / len(fields), 1), "mean_cells": round(cells / len(fields), 1), **shares}


async def predict_beside_fields(url: str, images: list[bytes], fields: list[bytes]) -> tuple[dict, dict]:
    """/predict at concurrency 8 while one client analyses fields back to back: does a field starve cells?"""
    cells, smears = await asyncio.gather(
        load(url, "predict", "image", images, 8),
        load(url, "analyze_smear", "image", fields, 1),
    )
    return cells, smears


def in_process_limit(images: list[bytes], batch_size: int) -> float:
    """Images/s of decode + preprocessing + the service's inference call (its default runtime), no HTTP.

    The runtime gets every core here: the limit is what the model can do on this machine, whatever
    the service's own split of cores into workers and threads.
    """
    import bentoml

    from malaria.bento import load_runtime, stored_spec
    from malaria.config import get_settings
    from malaria.preprocess import ImageSource, preprocess_batch

    settings = get_settings()
    all_cores = settings.model_copy(update={"tf_intra_op_threads": os.cpu_count() or 1})
    stored = bentoml.models.get(f"{settings.bento_model_name}:latest")
    spec = stored_spec(stored)
    predict = load_runtime(stored, all_cores).predict

    def step(i: int) -> None:
        chosen: list[ImageSource] = [images[(i + k) % len(images)] for k in range(batch_size)]
        spec.probability_positive(predict(preprocess_batch(chosen, spec)))

    step(0)
    done, i, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < SECONDS:
        step(i)
        done += batch_size
        i += batch_size
    return done / (time.perf_counter() - start)


def model_only(
    threads: int, batch_sizes: tuple[int, ...], runtime: str = "tensorflow", precision: str = "fp32"
) -> dict[str, float]:
    """Images/s of the model call alone, by batch size, with ``threads`` threads of one runtime."""
    script = Path(__file__).with_name("model_only.py")
    sizes = ",".join(str(b) for b in batch_sizes)
    command = [sys.executable, str(script), "--threads", str(threads), "--batch-sizes", sizes]
    done = subprocess.run([*command, "--runtime", runtime, "--precision", precision], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"model_only.py failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def runtimes_to_compare(metadata: dict) -> dict[str, tuple[str, str]]:
    """Every runtime and gated precision the stored model can be served with: name -> (runtime, precision)."""
    chosen = {"tensorflow": ("tensorflow", "fp32")}
    for precision, entry in metadata.get("runtime", {}).get("precisions", {}).items():
        if entry["passed"]:
            chosen[f"openvino-{precision}"] = ("openvino", precision)
    return chosen


def bento_server(port: int, **env: str) -> ServerProcess:
    logs = tempfile.mkdtemp(prefix="bench-predictions-")
    return ServerProcess(
        bentoml_serve_command(port), port, {"MALARIA_PREDICTION_LOG_DIR": logs, **env}, OUT / f"server-{port}.log"
    )


def batch_stats(metrics: str) -> tuple[float, float]:
    """(sum, count) of the service's malaria_batch_size histogram (images per model call)."""

    def value(kind: str) -> float:
        found = re.findall(rf"malaria_batch_size_{kind}(?:\{{[^}}]*\}})? ([0-9.e+]+)", metrics)
        return sum(float(v) for v in found)

    return value("sum"), value("count")


async def load(url: str, route: str, field: str, images: list[bytes], concurrency: int, per_request: int = 1) -> dict:
    """Closed-loop load for SECONDS after a warm-up: throughput, latency percentiles, errors, client CPU."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def scrape() -> tuple[float, float]:
            # Its own connection: the load's pool is always busy.
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as side,
                    side.get(f"{url}/metrics") as response,
                ):
                    return batch_stats(await response.text())
            except (aiohttp.ClientError, TimeoutError):
                return 0.0, 0.0

        latencies: list[float] = []
        errors: dict[str, int] = {}
        state = {"measuring": False, "stop": False}

        async def worker(index: int) -> None:
            i = index * 7
            while not state["stop"]:
                form = aiohttp.FormData()
                for k in range(per_request):
                    form.add_field(
                        field, images[(i + k) % len(images)], filename=f"cell{k}.png", content_type="image/png"
                    )
                i += per_request
                start = time.perf_counter()
                try:
                    async with session.post(f"{url}/{route}", data=form) as response:
                        await response.read()
                        status: int | str = response.status
                except aiohttp.ClientError as exc:
                    status = type(exc).__name__
                if state["measuring"]:
                    if status == 200:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors[str(status)] = errors.get(str(status), 0) + 1

        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        await asyncio.sleep(WARMUP)
        before = await scrape()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        state["measuring"], started = True, time.perf_counter()
        await asyncio.sleep(SECONDS)
        state["measuring"], elapsed = False, time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        state["stop"] = True
        await asyncio.gather(*tasks)
        after = await scrape()
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    batches = after[1] - before[1]
    return {
        "route": route,
        "concurrency": concurrency,
        "images_per_request": per_request,
        "images_per_s": round(len(latencies) * per_request / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
        "client_cpu_percent": round(100 * cpu / elapsed, 1),
    }


def sweep(server: ServerProcess, images: list[bytes], name: str) -> list[dict]:
    points = []
    for concurrency in CONCURRENCY:
        point = asyncio.run(load(server.url, "predict", "image", images, concurrency))
        print(f"{name:>10} /predict  c={concurrency:<3} {point}", flush=True)
        points.append({"service": name, **point})
    return points


def main() -> None:
    images = sample_images()
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds_per_point": SECONDS,
        "limit": {},
        "runs": [],
    }
    from malaria.config import get_settings

    settings = get_settings()
    max_batch = settings.max_batch_size
    for batch_size in (1, max_batch):
        results["limit"][f"batch_{batch_size}"] = round(in_process_limit(images, batch_size), 1)
        print(f"limit batch {batch_size}: {results['limit'][f'batch_{batch_size}']} img/s", flush=True)

    import bentoml

    stored = bentoml.models.get(f"{settings.bento_model_name}:latest")
    compared = runtimes_to_compare(stored.info.metadata)
    results["runtimes"] = {}
    for name, (runtime, precision) in compared.items():  # the model call alone, a worker's threads
        rates = model_only(settings.tf_intra_op_threads, (1, max_batch), runtime, precision)
        results["runtimes"][name] = {
            "model_batch_1": rates["1"],
            f"model_batch_{max_batch}": rates[str(max_batch)],
            f"gflop_per_s_batch_{max_batch}": round(rates[str(max_batch)] * rates["gflop_per_image"], 1),
        }
        print(f"model only {name}: {results['runtimes'][name]}", flush=True)

    server = bento_server(3301)
    try:
        served = httpx.post(f"{server.url}/model_info", timeout=30).json()
        default = f"openvino-{served['precision']}" if served["runtime"] == "openvino" else "tensorflow"
        results["default_runtime"] = default
        # What batching can gain per thread: the served runtime's model call at batch 1 vs larger batches.
        results["model_only"] = {
            f"threads_{threads}": model_only(threads, tuple(sorted({1, 8, max_batch})), *compared[default])
            for threads in sorted({1, settings.tf_intra_op_threads, os.cpu_count() or 1})
        }
        print(f"model only ({default}): {results['model_only']}", flush=True)
        results["runs"] += sweep(server, images, "batching")
        multi = asyncio.run(load(server.url, "classify", "images", images, MULTI_CONCURRENCY, MULTI_PER_REQUEST))
        print(f"  batching /classify {multi}", flush=True)
        results["runs"].append({"service": "batching", **multi})
        fields = sample_fields()
        alone = asyncio.run(load(server.url, "analyze_smear", "image", fields, 1))
        results["smear"] = {"fields_per_s": alone["images_per_s"], "field_p50_ms": alone["p50_ms"]}
        results["smear"] |= field_time_shares(server.url, fields)
        beside, during = asyncio.run(predict_beside_fields(server.url, images, fields))
        results["smear"] |= {
            "predict_c8_p99_ms_beside_fields": beside["p99_ms"],
            "predict_c8_images_per_s_beside_fields": beside["images_per_s"],
            "fields_per_s_beside_predict": during["images_per_s"],
            "errors": beside["errors"] + during["errors"] + alone["errors"],
        }
        print(f"  smear {results['smear']}", flush=True)
    finally:
        server.stop()

    for name, (runtime, precision) in compared.items():  # the other runtimes, served the same way
        if name == default:
            continue
        server = bento_server(3305, MALARIA_RUNTIME=runtime, MALARIA_PRECISION=precision)
        try:
            service = f"batching, {name}"
            concurrencies = CONCURRENCY if runtime == "tensorflow" else (32,)
            for concurrency in concurrencies:
                run = asyncio.run(load(server.url, "predict", "image", images, concurrency))
                print(f"{service} /predict c={concurrency} {run}", flush=True)
                results["runs"].append({"service": service, **run})
            multi = asyncio.run(load(server.url, "classify", "images", images, MULTI_CONCURRENCY, MULTI_PER_REQUEST))
            results["runs"].append({"service": service, **multi})
            if runtime == "tensorflow":
                alone = asyncio.run(load(server.url, "analyze_smear", "image", fields, 1))
                results["runtimes"][name]["smear_fields_per_s"] = alone["images_per_s"]
        finally:
            server.stop()

    server = bento_server(3302, MALARIA_BATCHING="false")
    try:
        results["runs"] += sweep(server, images, "no-batching")
    finally:
        server.stop()

    # The lab page is mounted by default: the same service without it, at the ratio's concurrency.
    server = bento_server(3304, MALARIA_UI="false")
    try:
        no_page = asyncio.run(load(server.url, "predict", "image", images, 32))
        print(f"   no page /predict  c=32  {no_page}", flush=True)
        results["runs"].append({"service": "batching, no page", **no_page})
    finally:
        server.stop()

    uvicorn = [sys.executable, "-m", "uvicorn", "benchmarks.fastapi_baseline:app", "--port", "3303"]
    baseline = ServerProcess([*uvicorn, "--log-level", "warning"], 3303, {}, OUT / "server-3303.log")
    try:
        results["runs"] += sweep(baseline, images, "fastapi")
    finally:
        baseline.stop()

    def point(service: str, concurrency: int, route: str = "predict") -> dict:
        return next(
            r
            for r in results["runs"]
            if r["service"] == service and r["concurrency"] == concurrency and r["route"] == route
        )

    results["runtimes"][default]["smear_fields_per_s"] = results["smear"]["fields_per_s"]
    for name in compared:
        service = "batching" if name == default else f"batching, {name}"
        results["runtimes"][name]["served_predict_c32"] = point(service, 32)["images_per_s"]
        results["runtimes"][name]["served_classify"] = point(service, MULTI_CONCURRENCY, "classify")["images_per_s"]
    limit = results["limit"][f"batch_{max_batch}"]
    # The model call alone with a worker's TF threads, batch max over batch 1: what batching can add
    # when every worker is busy either way.
    worker_model = results["model_only"][f"threads_{settings.tf_intra_op_threads}"]
    batched = {c: point("batching", c) for c in CONCURRENCY}
    results["ratios"] = {
        "served_over_limit": round(batched[32]["images_per_s"] / limit, 3),
        "multi_over_limit": round(point("batching", MULTI_CONCURRENCY, "classify")["images_per_s"] / limit, 3),
        "batching_gain": round(batched[32]["images_per_s"] / point("no-batching", 32)["images_per_s"], 3),
        "over_fastapi_baseline": round(batched[32]["images_per_s"] / point("fastapi", 32)["images_per_s"], 3),
        "c64_over_c32": round(batched[64]["images_per_s"] / batched[32]["images_per_s"], 3),
        "page_mounted_over_not": round(batched[32]["images_per_s"] / point("batching, no page", 32)["images_per_s"], 3),
        "p99_over_p50_at_c8": round(batched[8]["p99_ms"] / batched[8]["p50_ms"], 2),
        "model_batching_gain_per_worker": round(worker_model[str(max_batch)] / worker_model["1"], 3),
        "predict_p99_beside_fields_over_alone_c8": round(
            results["smear"]["predict_c8_p99_ms_beside_fields"] / batched[8]["p99_ms"], 2
        ),
        "runtime_speedup": round(
            batched[32]["images_per_s"] / results["runtimes"]["tensorflow"]["served_predict_c32"], 3
        ),
        "runtime_speedup_classify": round(
            point("batching", MULTI_CONCURRENCY, "classify")["images_per_s"]
            / results["runtimes"]["tensorflow"]["served_classify"],
            3,
        ),
        "errors": {f"{r['service']} {r['route']} c={r['concurrency']}": r["errors"] for r in results["runs"]},
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_table(results)
    print(json.dumps(results["ratios"], indent=2))


def write_table(results: dict) -> None:
    lines = [
        "| service | route | concurrency | images/s | p50 ms | p95 ms | p99 ms | errors | mean batch | client CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        route = r["route"] + (f" ({r['images_per_request']}/req)" if r["images_per_request"] > 1 else "")
        lines.append(
            f"| {r['service']} | {route} | {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {r['errors']} | {r['mean_batch'] or ''} | "
            f"{r['client_cpu_percent']} |"
        )
    limit = ", ".join(f"{k.replace('_', ' ')}: {v} img/s" for k, v in results["limit"].items())
    model_only = "; ".join(
        f"{k.replace('_', ' ')}: " + ", ".join(f"batch {b} {v}" for b, v in rates.items() if b.isdigit())
        for k, rates in results.get("model_only", {}).items()
    )
    columns = list(dict.fromkeys(key for figures in results.get("runtimes", {}).values() for key in figures))
    runtimes = "\n".join(
        f"| {name}{' (served by default)' if name == results.get('default_runtime') else ''} | "
        + " | ".join(str(figures.get(key, "")) for key in columns)
        + " |"
        for name, figures in results.get("runtimes", {}).items()
    )
    ratios = "\n".join(f"| {k} | {v} |" for k, v in results["ratios"].items() if k != "errors")
    smear = results.get("smear", {})
    smear_rows = "\n".join(f"| {k} | {v} |" for k, v in smear.items())
    text = (OUT / "README.md").read_text()
    table = (
        f"<!-- results:start -->\nIn-process limit ({limit}).\n\n"
        + (f"Model call alone, images/s ({model_only}).\n\n" if model_only else "")
        + (
            "Runtimes (model call alone with a worker's threads; served: images/s through the service):\n\n"
            f"| runtime | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}\n{runtimes}\n\n"
            if runtimes
            else ""
        )
        + "\n".join(lines)
        + f"\n\n| ratio | value |\n|---|---|\n{ratios}\n"
        + (f"\nSmear fields (`/analyze_smear`):\n\n| smear | value |\n|---|---|\n{smear_rows}\n" if smear else "")
        + "<!-- results:end -->"
    )
    text = re.sub(r"<!-- results:start -->.*<!-- results:end -->", table, text, flags=re.S)
    (OUT / "README.md").write_text(text)


if __name__ == "__main__":
    main()
