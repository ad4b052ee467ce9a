"""The prediction log: JSON lines, one per prediction, written off the request path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from malaria.config import FilenamePolicy
from malaria.monitoring import image_features_batch
from malaria.serving.schemas import Prediction
from malaria.serving.uploads import PreparedImages

logger = logging.getLogger(__name__)


class PredictionLog:
    """JSON lines, one per prediction, written by a background thread; one file per day and process."""

    def __init__(
        self,
        folder: Path,
        on_dropped: Callable[[int], None] | None = None,
        prefix: str = "predictions",
        filenames: FilenamePolicy = "hashed",
    ):
        self.folder = folder
        self.prefix = prefix
        self.filenames = filenames
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # lines that could not be written (disk full, folder gone, ...)
        self._on_dropped = on_dropped
        self._queue: queue.SimpleQueue[list[dict] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def record(self, predictions: list[Prediction], prepared: PreparedImages, latency_ms: float) -> None:
        """Queue the log lines of one request (returns at once)."""
        now = datetime.now(UTC).isoformat()
        features = image_features_batch(prepared.batch, prepared.sizes)
        self._queue.put(
            [
                {
                    "time": now,
                    "request_id": p.request_id,
                    "model_version": p.model_version,
                    "probability_parasitized": p.probability_parasitized,
                    "label": p.label,
                    "decision": p.decision,
                    "latency_ms": round(latency_ms, 3),
                    "filename": self.logged_name(p.filename),
                    **f,
                }
                for p, f in zip(predictions, features, strict=True)
            ]
        )

    def record_lines(self, lines: list[dict]) -> None:
        """Queue ready-made log lines (returns at once); a ``filename`` is logged by the policy."""
        now = datetime.now(UTC).isoformat()
        self._queue.put(
            [
                {
                    "time": now,
                    **line,
                    **({"filename": self.logged_name(line["filename"])} if "filename" in line else {}),
                }
                for line in lines
            ]
        )

    def logged_name(self, filename: str | None) -> str | None:
        """File names often carry patient identifiers: logged as given, as a short hash, or not at all."""
        if filename is None or self.filenames == "plain":
            return filename
        if self.filenames == "hashed":
            return "sha256:" + hashlib.sha256(filename.encode()).hexdigest()[:16]
        return None

    def _path(self) -> Path:
        return self.folder / f"{self.prefix}-{datetime.now(UTC):%Y-%m-%d}-{os.getpid()}.jsonl"

    def _run(self) -> None:
        handle, path = None, None
        after_failure = False  # a failed write may have left half a line: start the next one on a new line
        while True:
            lines = self._queue.get()
            if lines is None:
                break
            batch = [lines]
            while True:  # drain whatever else is waiting, then write once
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            try:
                if self._path() != path:
                    if handle:
                        handle.close()
                    handle, path = None, self._path()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handle = path.open("a", encoding="utf-8")
                text = "".join(json.dumps(line) + "\n" for group in batch for line in group)
                handle.write("\n" + text if after_failure else text)
                handle.flush()
                after_failure = False
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failed write
                after_failure = True
                self._drop(sum(len(group) for group in batch), path, exc)
                if handle:
                    with contextlib.suppress(Exception):
                        handle.close()
                handle, path = None, None  # reopen on the next write
        if handle:
            handle.close()

    def _drop(self, count: int, path: Path | None, error: Exception) -> None:
        logger.error("prediction log %s: %s: %d lines dropped (%d in all)", path, error, count, self.dropped + count)
        if self._on_dropped is not None:
            self._on_dropped(count)
        self.dropped += count  # last: once it moves, the line is logged and counted

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything queued and stop the writer."""
        self._queue.put(None)
        self._thread.join(timeout)
