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
from datetime import UTC, datetime, timedelta
from pathlib import Path

from malaria.config import FilenamePolicy
from malaria.monitoring import image_features_batch
from malaria.serving.schemas import Prediction
from malaria.serving.uploads import PreparedImages

logger = logging.getLogger(__name__)
# The writer rests this long after each write, so requests in a burst queue their lines without waking it:
# a wake-up per request held the GIL for 7 % of a worker's time at /predict c=32 (py-spy --gil). A line
# of a lone request is still written at once; in a burst, at most this late.
WRITE_INTERVAL_S = 0.1


class PredictionLog:
    """JSON lines, one per prediction, written by a background thread.

    One file per day and process, a new part when a file reaches ``max_file_bytes``, files older than
    ``keep_days`` deleted at each new day. At most ``max_queued`` requests wait for the writer: beyond
    that (a disk slower than the traffic) lines are dropped and counted, never held in memory without
    bound; so are lines still queued when ``close`` gives up.
    """

    def __init__(
        self,
        folder: Path,
        on_dropped: Callable[[int], None] | None = None,
        prefix: str = "predictions",
        filenames: FilenamePolicy = "hashed",
        max_queued: int = 10_000,
        max_file_bytes: int = 100_000_000,
        keep_days: int = 30,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.folder = folder
        self.clock = clock  # what day it is (the tests move it)
        self.prefix = prefix
        self.filenames = filenames
        self.max_file_bytes, self.keep_days = max_file_bytes, keep_days
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dropped = 0  # lines that could not be written (disk full, folder gone, queue full, ...)
        self._dropped_lock = threading.Lock()
        self._on_dropped = on_dropped
        self._part, self._day = 0, ""
        self._queue: queue.Queue[list[dict] | None] = queue.Queue(maxsize=max_queued)
        self._resting = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def record(self, predictions: list[Prediction], prepared: PreparedImages, latency_ms: float) -> None:
        """Queue the log lines of one request (returns at once)."""
        now = self.clock().isoformat()
        features = image_features_batch(prepared.batch, prepared.sizes)
        self._enqueue(
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
        now = self.clock().isoformat()
        named = [
            {**line, "filename": self.logged_name(line["filename"])} if "filename" in line else line for line in lines
        ]
        self._enqueue([{"time": now, **line} for line in named])

    def _enqueue(self, group: list[dict]) -> None:
        try:
            self._queue.put_nowait(group)
        except queue.Full:
            self._drop(len(group), None, "writer queue full")

    def logged_name(self, filename: str | None) -> str | None:
        """File names often carry patient identifiers: logged as given, as a short hash, or not at all."""
        if filename is None or self.filenames == "plain":
            return filename
        if self.filenames == "hashed":
            return "sha256:" + hashlib.sha256(filename.encode()).hexdigest()[:16]
        return None

    def _path(self) -> Path:
        day = f"{self.clock():%Y-%m-%d}"
        if day != self._day:
            self._day, self._part = day, 0
            self._delete_old_days(day)
        part = f".{self._part}" if self._part else ""
        return self.folder / f"{self.prefix}-{day}-{os.getpid()}{part}.jsonl"

    def _delete_old_days(self, today: str) -> None:
        oldest = (datetime.strptime(today, "%Y-%m-%d") - timedelta(days=self.keep_days)).strftime("%Y-%m-%d")
        for old in self.folder.glob(f"{self.prefix}-*.jsonl"):
            day = old.name[len(self.prefix) + 1 : len(self.prefix) + 11]
            if day < oldest:
                with contextlib.suppress(OSError):
                    old.unlink()

    def _run(self) -> None:
        handle, path = None, None
        after_failure = False  # a failed write may have left half a line: start the next one on a new line
        stopping = False
        while not stopping:
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
                    stopping = True  # write what came before the sentinel, then stop
                    break
                batch.append(more)
            try:
                if self._path() != path:
                    if handle:
                        handle.close()
                    handle, path = None, self._path()
                    path.parent.mkdir(parents=True, exist_ok=True)
                    handle = path.open("a", encoding="utf-8")
                assert handle is not None  # opened above whenever the path changed (None resets the path)
                text = "".join(json.dumps(line) + "\n" for group in batch for line in group)
                handle.write("\n" + text if after_failure else text)
                handle.flush()
                after_failure = False
                if handle.tell() >= self.max_file_bytes:  # the next write opens the next part
                    self._part += 1
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failed write
                after_failure = True
                self._drop(sum(len(group) for group in batch), path, exc)
                if handle:
                    with contextlib.suppress(Exception):
                        handle.close()
                handle, path = None, None  # reopen on the next write
            if not stopping:
                self._resting.wait(WRITE_INTERVAL_S)  # set by close(): no rest on the way out
        if handle:
            handle.close()

    def _drop(self, count: int, path: Path | None, error: Exception | str) -> None:
        with self._dropped_lock:
            total = self.dropped + count
            logger.error("prediction log %s: %s: %d lines dropped (%d in all)", path, error, count, total)
            if self._on_dropped is not None:
                self._on_dropped(count)
            self.dropped = total  # last: once it moves, the line is logged and counted

    def close(self, timeout: float = 10.0) -> None:
        """Flush everything queued and stop the writer; what is still queued after ``timeout`` is counted."""
        self._resting.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)
        if self._thread.is_alive():
            left = 0
            while True:
                try:
                    group = self._queue.get_nowait()
                except queue.Empty:
                    break
                left += len(group or [])
            if left:
                self._drop(left, None, f"still queued {timeout:g} s after shutdown began")
