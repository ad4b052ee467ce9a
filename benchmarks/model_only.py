"""The model call alone (no decode, no HTTP) at several batch sizes, for one runtime and thread count.

Run by ``bench.py`` in a subprocess per setting (TensorFlow fixes its thread pools at start):
``python benchmarks/model_only.py --threads 1 --runtime openvino --precision bf16`` prints
``{"1": img/s, "8": img/s, ..., "gflop_per_image": g}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

SECONDS = float(os.environ.get("BENCH_MODEL_SECONDS", "3"))


def flops_per_image(keras_model) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers (what the GFLOP/s figures count)."""
    import keras

    total = 0
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, out_channels = layer.output.shape
            kernel_h, kernel_w, in_channels, _ = layer.kernel.shape
            total += 2 * height * width * kernel_h * kernel_w * in_channels * out_channels
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.kernel.shape))
    return float(total)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--runtime", choices=["tensorflow", "openvino"], default="tensorflow")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    args = parser.parse_args()

    import bentoml
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from malaria.bento import load_stored_keras, stored_spec
    from malaria.config import get_settings
    from malaria.model import compiled_predict
    from malaria.runtime import IR_FILES, OPENVINO_DIR, openvino_predict

    stored = bentoml.models.get(f"{get_settings().bento_model_name}:latest")
    size = stored_spec(stored).image_size
    keras_model = load_stored_keras(stored)
    if args.runtime == "openvino":
        ir = Path(stored.path_of(OPENVINO_DIR)) / IR_FILES[args.precision]
        predict = openvino_predict(ir, args.precision, args.threads)
    else:
        predict = compiled_predict(keras_model)
    rates: dict[str, float] = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        batch = np.random.default_rng(0).random((batch_size, size, size, 3), dtype=np.float32)
        predict(batch)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < SECONDS:
            predict(batch)
            done += batch_size
        rates[str(batch_size)] = round(done / (time.perf_counter() - start), 1)
    print(json.dumps({**rates, "gflop_per_image": round(flops_per_image(keras_model) / 1e9, 4)}))


if __name__ == "__main__":
    main()
