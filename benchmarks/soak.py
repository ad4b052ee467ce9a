"""`make soak`: Locust at concurrency 32 for SOAK_MINUTES (default 10) against a fresh `bentoml serve`.

The traffic is ``load_tests/locustfile.py``: lab users (cells on /predict, /classify, /batch_predict)
and one user in ten sending malformed requests and made-up paths, each of which must get its 4xx.
Reports into ``benchmarks/soak.json``: Locust's failures (any 5xx, 503 and 504 included, or a wrong
4xx), ``/livez`` probed every second from its own client (slowest answer), the service's RSS (all its
processes) every 30 s (a leak keeps growing in the second half; warm-up levels off), and the
prediction log's lines against the predictions the service counted (``malaria_predictions_total``):
nothing answered may be missing from the log. Locust's CSVs go to ``benchmarks/soak_*.csv``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from bench import OUT, ROOT, bento_server

MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))


def probe_livez(url: str, stop: threading.Event, slowest: list[float]) -> None:
    """GET /livez every second until ``stop``; the slowest answer in ``slowest[0]`` (inf for none)."""
    with httpx.Client(timeout=10) as client:
        while not stop.wait(1.0):
            started = time.perf_counter()
            try:
                ok = client.get(f"{url}/livez").status_code == 200
            except httpx.HTTPError:
                ok = False
            slowest[0] = max(slowest[0], time.perf_counter() - started if ok else float("inf"))


def predictions_counted(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return int(sum(float(v) for v in re.findall(r"malaria_predictions_total\{[^}]*\} ([0-9.e+]+)", text)))


def main() -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="soak-predictions-"))
    server = bento_server(3310, MALARIA_PREDICTION_LOG_DIR=str(log_dir))
    stop, slowest = threading.Event(), [0.0]
    prober = threading.Thread(target=probe_livez, args=(server.url, stop, slowest), daemon=True)
    try:
        time.sleep(2)
        start_rss = server.rss_mb()
        prober.start()
        locust = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(ROOT / "load_tests" / "locustfile.py"),
                "--host",
                server.url,
                "--headless",
                "-u",
                "32",
                "-r",
                "32",
                "-t",
                f"{int(MINUTES * 60)}s",
                "--csv",
                str(OUT / "soak"),
                "--only-summary",
            ],
            cwd=ROOT,
        )
        started, samples = time.monotonic(), [(0.0, start_rss)]
        while locust.poll() is None:
            time.sleep(1)
            if time.monotonic() - started >= 30 * len(samples):
                samples.append((round(time.monotonic() - started), server.rss_mb()))
        end_rss = server.rss_mb()
        stop.set()
        predicted = predictions_counted(server.url)
    finally:
        stop.set()
        if "locust" in locals() and locust.poll() is None:
            locust.terminate()
        server.stop()  # flushes the prediction log
    logged = sum(len(path.read_text().splitlines()) for path in log_dir.glob("predictions-*.jsonl"))
    with (OUT / "soak_stats.csv").open() as handle:
        total = [line.split(",") for line in handle if line.startswith(",Aggregated") or ",Aggregated," in line]
    header = (OUT / "soak_stats.csv").read_text().splitlines()[0].split(",")
    row = dict(zip(header, total[-1], strict=False)) if total else {}
    result = {
        "minutes": MINUTES,
        "users": 32,
        "requests": int(row.get("Request Count", 0)),
        "failures": int(row.get("Failure Count", 0)),
        "rps": float(row.get("Requests/s", 0)),
        "rss_mb_start": round(start_rss, 1),
        "rss_mb_end": round(end_rss, 1),
        "rss_mb_at_half_time": round(samples[len(samples) // 2][1], 1),
        "rss_mb_growth_second_half": round(end_rss - samples[len(samples) // 2][1], 1),
        "rss_mb_samples": [[t, round(mb, 1)] for t, mb in samples],
        "livez_slowest_s": round(slowest[0], 3),
        "predictions_counted": predicted,
        "prediction_log_lines": logged,
        "locust_exit": locust.returncode,
    }
    result["goals_met"] = {
        "no_failures": result["failures"] == 0,
        "livez_within_1s": result["livez_slowest_s"] <= 1.0,
        "rss_growth_second_half_within_50mb": result["rss_mb_growth_second_half"] <= 50,
        "every_prediction_logged": logged == predicted > 0,
    }
    (OUT / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
