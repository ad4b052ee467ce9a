"""Adaptive batching of in-process model calls across the requests of one worker."""

from __future__ import annotations

import time

import numpy as np

from malaria.serving import compat


class BatchedModel:
    """BentoML's adaptive batching (its ``CorkDispatcher``) in front of an in-process inference call.

    A BentoML batchable API must take a list, so single-image ``/predict`` calls can only be batched
    by a second service (``bentoml.depends``), which costs one HTTP round trip to another process
    per request: on two cores, as much CPU as the model itself. Here the same dispatcher batches
    the calls of all requests of this worker, and the batch runs on a thread, so the event loop
    keeps parsing and decoding requests while TensorFlow computes.
    """

    def __init__(self, predict_fn, *, batching: bool, max_batch_size: int, max_latency_ms: int, observe_batch=None):
        self.predict_fn = predict_fn
        self.observe_batch = observe_batch or (lambda size: None)
        if batching:
            dispatcher = compat.cork_dispatcher(
                max_latency_in_ms=max_latency_ms,
                max_batch_size=max_batch_size,
                fallback=overloaded,
                get_batch_size=len,
            )
            self._call = dispatcher(self._run_batches)  # a sync callback runs on the thread pool
        else:
            self._call = self._run_alone

    def _run_batches(self, batches) -> list[np.ndarray]:
        sizes = [len(batch) for batch in batches]
        outputs = self.predict_fn(np.concatenate(batches) if len(batches) > 1 else batches[0])
        self.observe_batch(sum(sizes))
        return np.split(outputs, np.cumsum(sizes)[:-1])

    async def _run_alone(self, batch: np.ndarray) -> np.ndarray:
        from starlette.concurrency import run_in_threadpool

        outputs = await run_in_threadpool(self.predict_fn, batch)
        self.observe_batch(len(batch))
        return outputs

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed images (n, size, size, 3) -> raw model outputs (n, units)."""
        return await self._call(batch)


def overloaded() -> None:
    from bentoml.exceptions import ServiceUnavailable

    raise ServiceUnavailable("server overloaded: the request could not be scheduled within max_latency_ms")


def monotonic_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
