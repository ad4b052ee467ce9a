"""The compiled model call alone (no decode, no HTTP) at several batch sizes, for one TF thread count.

Run by ``bench.py`` in a subprocess per thread count (TensorFlow fixes its thread pools at start):
``python benchmarks/model_only.py --threads 1`` prints ``{"1": img/s, "8": img/s, ...}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

SECONDS = float(os.environ.get("BENCH_MODEL_SECONDS", "3"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch-sizes", default="1,8,64")
    args = parser.parse_args()

    import bentoml
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from malaria.bento import load_stored_keras, stored_spec
    from malaria.config import get_settings
    from malaria.model import compiled_predict

    stored = bentoml.models.get(f"{get_settings().bento_model_name}:latest")
    size = stored_spec(stored).image_size
    predict = compiled_predict(load_stored_keras(stored))
    rates = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        batch = np.random.default_rng(0).random((batch_size, size, size, 3), dtype=np.float32)
        predict(batch)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            predict(batch)
            done += batch_size
        rates[str(batch_size)] = round(done / (time.perf_counter() - start), 1)
    print(json.dumps(rates))


if __name__ == "__main__":
    main()
