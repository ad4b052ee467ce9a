"""Send every image under a folder to a running service; results as CSV and JSON plus a summary."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from bentoml.exceptions import BentoMLException
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm import tqdm

from malaria.client import MalariaClient, collect_images


def _is_transient(task, task_run, state) -> bool:
    """Retry connection failures and 5xx answers (503 overload, 504 timeout), never a 4xx."""
    try:
        state.result()
    except BentoMLException as exc:
        return int(exc.error_code) >= 500
    except Exception:  # noqa: BLE001 - network errors of any client library are transient
        return True
    return False


@task(retries=3, retry_delay_seconds=[1, 4, 10], retry_condition_fn=_is_transient)
def classify_chunk(paths: list[Path], url: str, token: str | None) -> list[dict]:
    """One request for the chunk; if the service rejects it (a bad file), one request per file."""
    with MalariaClient(url, token=token) as client:
        return client.classify_files(paths)


@flow(name="batch-predict", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def batch_predict_flow(
    folder: Path,
    url: str = "http://localhost:3000",
    token: str | None = None,
    chunk_size: int = 16,
    out_dir: Path = Path("reports/batch"),
) -> dict:
    """Classify a folder through the service with bounded concurrency (the task runner's workers)."""
    paths = collect_images([folder])
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    futures = [classify_chunk.submit(chunk, url, token) for chunk in chunks]
    results: list[dict] = []
    with tqdm(total=len(paths), desc="classifying", unit="img") as bar:
        for future in futures:
            part = future.result()
            results += part
            bar.update(len(part))
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(results)
    frame.to_csv(out_dir / "predictions.csv", index=False)
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2))
    failed = [r for r in results if "error" in r]
    ok = frame[frame.get("error").isna()] if "error" in frame else frame
    summary = {
        "total": len(results),
        "classified": len(ok),
        "unreadable": [{"path": r["path"], "error": r["error"]} for r in failed],
        "counts": ok["label"].value_counts().to_dict() if len(ok) else {},
        "decisions": ok["decision"].value_counts().to_dict() if len(ok) else {},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    create_markdown_artifact(
        key="batch-predict-summary",
        markdown=f"# Batch prediction of `{folder}`\n\n```json\n{json.dumps(summary, indent=2)}\n```\n",
    )
    get_run_logger().info("%d images: %s; %d unreadable", len(results), summary["counts"], len(failed))
    return summary


if __name__ == "__main__":
    import sys

    batch_predict_flow(Path(sys.argv[1]))
