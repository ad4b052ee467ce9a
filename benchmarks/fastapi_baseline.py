"""The design this project replaces: one FastAPI app, `model.predict` per request, under uvicorn.

Run: ``BENTO_MODEL=malaria-classifier:latest uvicorn benchmarks.fastapi_baseline:app --port 3100``
"""

from __future__ import annotations

import os

import bentoml
import numpy as np
from fastapi import FastAPI, UploadFile

from malaria.bento import load_stored_keras, stored_spec
from malaria.preprocess import preprocess

stored = bentoml.models.get(os.environ.get("BENTO_MODEL", "malaria-classifier:latest"))
spec = stored_spec(stored)
model = load_stored_keras(stored)
app = FastAPI()


@app.post("/predict")
async def predict(image: UploadFile) -> dict:
    batch = preprocess(await image.read(), spec)[None]
    probability = float(spec.probability_positive(model.predict(batch, verbose=0))[0])
    return {"label": spec.labels(np.array([probability]))[0], "probability_parasitized": probability}


@app.get("/readyz")
def ready() -> dict:
    return {"ok": True}
