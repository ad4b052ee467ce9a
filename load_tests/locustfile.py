"""Realistic traffic on the service: single images on /predict, lists on /classify and /batch_predict,
and (``HostileUser``, one in ten users) the malformed and oversized requests a public endpoint meets.

Headless, with CSV output:
    locust -f load_tests/locustfile.py --host http://127.0.0.1:3000 --headless -u 32 -r 8 -t 2m \
        --csv reports/locust/run
Web UI: ``locust -f load_tests/locustfile.py --host http://127.0.0.1:3000`` then http://localhost:8089.
Images come from MALARIA_DATA_DIR when set, else they are generated. MALARIA_API_TOKEN is sent when set.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from locust import HttpUser, between, task

from malaria.data import generate_synthetic


def _load_images(limit: int = 200) -> list[tuple[str, bytes]]:
    root = os.environ.get("MALARIA_DATA_DIR")
    if not root:
        root = generate_synthetic(Path(tempfile.mkdtemp()) / "cells", per_class=limit // 2, size=128)
    paths = sorted(Path(root).rglob("*.png"))
    return [(p.name, p.read_bytes()) for p in random.Random(0).sample(paths, min(limit, len(paths)))]


IMAGES = _load_images()
HEADERS = {"Authorization": f"Bearer {os.environ['MALARIA_API_TOKEN']}"} if os.environ.get("MALARIA_API_TOKEN") else {}


def _files(field: str, count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (name, data, "image/png")) for name, data in random.sample(IMAGES, count)]


class LabUser(HttpUser):
    """A lab client: mostly single cells, sometimes a slide's worth at once."""

    weight = 9
    wait_time = between(0.0, 0.05)

    @task(8)
    def predict(self) -> None:
        with self.client.post("/predict", files=_files("image", 1), headers=HEADERS, catch_response=True) as r:
            if r.status_code == 200 and "probability_parasitized" not in r.json():
                r.failure("no probability in the answer")

    @task(1)
    def classify(self) -> None:
        self.client.post("/classify", files=_files("images", 16), headers=HEADERS)

    @task(1)
    def batch_predict(self) -> None:
        with self.client.post("/batch_predict", files=_files("images", 8), headers=HEADERS, catch_response=True) as r:
            if r.status_code == 200 and r.json()["summary"]["total"] != 8:
                r.failure("summary does not count 8 images")


# A hostile request and the status it must get: always a 4xx with a JSON message, never a 5xx.
HOSTILE = {
    "not an image": ({"files": [("image", ("x.png", b"not an image", "image/png"))]}, 400),
    "empty file": ({"files": [("image", ("x.png", b"", "image/png"))]}, 400),
    "text in a file field": ({"data": {"image": "https://example.org/cell.png"}}, 400),
    "wrong field name": ({"files": [("picture", ("x.png", b"\x89PNG\r\n", "image/png"))]}, 400),
    "two files for one": (
        {"files": [("image", ("a.png", b"a", "image/png")), ("image", ("b.png", b"b", "image/png"))]},
        400,
    ),
    "no body": ({}, 400),
}


class HostileUser(HttpUser):
    """Malformed requests beside the lab traffic: each must be answered with its 4xx, quickly."""

    weight = 1  # against LabUser's 9: one user in ten
    wait_time = between(0.0, 0.05)

    @task(6)
    def malformed(self) -> None:
        kind = random.choice(list(HOSTILE))
        request, expected = HOSTILE[kind]
        with self.client.post(
            "/predict", headers=HEADERS, name=f"hostile: {kind}", catch_response=True, **request
        ) as r:
            if r.status_code != expected or "error" not in r.text:
                r.failure(f"{kind}: {r.status_code}, expected {expected} with a message")
            else:
                r.success()

    @task(1)
    def made_up_path(self) -> None:
        path = f"/no-such-route-{random.randrange(10**6)}"
        with self.client.get(path, name="hostile: made-up path", catch_response=True) as r:
            r.success() if r.status_code == 404 else r.failure(f"{path}: {r.status_code}")
