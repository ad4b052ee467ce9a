"""Write the GPU build recipe: `bentofile.yaml` plus TensorFlow with CUDA wheels, `MALARIA_GPU=true`, one worker.

``make bento-gpu`` runs ``python deploy/image/gpu_bentofile.py build`` and then
``bentoml build -f build/bentofile.gpu.yaml .``. Everything else is read from ``bentofile.yaml`` and
its requirements file, so the CPU and GPU builds cannot drift apart.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CPU_TENSORFLOW, GPU_TENSORFLOW = "tensorflow-cpu==", "tensorflow[and-cuda]=="
# One process owns the GPU and batches for it (TensorFlow's memory growth is on in the service).
GPU_ENVS = {"MALARIA_GPU": "true", "MALARIA_WORKERS": "1"}
TENSORFLOW_REQUIREMENTS = "requirements/tensorflow.txt"


def write_gpu_recipe(out_dir: Path) -> Path:
    """Write ``serving-gpu.txt`` and ``bentofile.gpu.yaml`` into ``out_dir``; returns the recipe's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    # The default image serves with OpenVINO; the GPU one with TensorFlow, so it adds TensorFlow's requirements.
    cpu_requirements = [
        *(ROOT / recipe["python"]["requirements_txt"]).read_text().splitlines(),
        *(ROOT / TENSORFLOW_REQUIREMENTS).read_text().splitlines(),
    ]
    if not any(line.startswith(CPU_TENSORFLOW) for line in cpu_requirements):
        raise SystemExit(f"no {CPU_TENSORFLOW} pin in {TENSORFLOW_REQUIREMENTS}")
    requirements = out_dir / "serving-gpu.txt"
    requirements.write_text(
        "\n".join(line.replace(CPU_TENSORFLOW, GPU_TENSORFLOW, 1) for line in cpu_requirements) + "\n"
    )
    recipe["python"]["requirements_txt"] = os.path.relpath(requirements, ROOT)  # the build context is ROOT
    recipe["envs"] = [env for env in recipe.get("envs", []) if env["name"] not in GPU_ENVS] + [
        {"name": name, "value": value} for name, value in GPU_ENVS.items()
    ]
    path = out_dir / "bentofile.gpu.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, width=1000))
    return path


if __name__ == "__main__":
    print(write_gpu_recipe(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build"))
