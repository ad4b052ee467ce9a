"""`make soak`: Locust at concurrency 32 for SOAK_MINUTES (default 10) against a fresh `bentoml serve`.

Reports failures and the service's RSS (all its processes) sampled every 30 s into
``benchmarks/soak.json``: a leak keeps growing in the second half, warm-up (allocator pools,
TensorFlow's caches, batch shapes seen for the first time) levels off. Locust's CSVs go to
``benchmarks/soak_*.csv``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from bench import OUT, ROOT, bento_server

MINUTES = float(os.environ.get("SOAK_MINUTES", "10"))


def main() -> None:
    server = bento_server(3310)
    try:
        time.sleep(2)
        start_rss = server.rss_mb()
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
    finally:
        if "locust" in locals() and locust.poll() is None:
            locust.terminate()
        server.stop()
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
        "locust_exit": locust.returncode,
    }
    (OUT / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
