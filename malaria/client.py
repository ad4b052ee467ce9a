"""A thin client of the service over BentoML's own HTTP clients."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from malaria.preprocess import IMAGE_SUFFIXES


def collect_images(paths: Iterable[Path | str]) -> list[Path]:
    """Image files among ``paths``, folders searched recursively, in a stable order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return found


class MalariaClient:
    """Synchronous client: ``with MalariaClient(url) as c: c.predict("cell.png")``."""

    def __init__(
        self,
        url: str = "http://localhost:3000",
        token: str | None = None,
        timeout: float = 60,
        server_ready_timeout: float | None = None,
    ):
        import bentoml

        self._client = bentoml.SyncHTTPClient(
            url, token=token, timeout=timeout, server_ready_timeout=server_ready_timeout
        )

    def predict(self, image: Path | str) -> dict:
        """One image -> one prediction."""
        return self._client.predict(image=Path(image))

    def classify(self, images: Sequence[Path | str]) -> list[dict]:
        """Several images -> one prediction each, in order."""
        return self._client.classify(images=[Path(p) for p in images])

    def classify_files(self, images: Sequence[Path | str]) -> list[dict]:
        """Several images -> ``{"path", **prediction}`` each, or ``{"path", "error"}`` for a file the service rejects.

        One request for all; if the service rejects it (a 4xx: some file is not a usable image), one request
        per file, so one bad file costs only its own result. Server errors (5xx) are raised.
        """
        from bentoml.exceptions import BentoMLException

        try:
            return [{"path": str(p), **r} for p, r in zip(images, self.classify(images), strict=True)]
        except BentoMLException as exc:
            if int(exc.error_code) >= 500:
                raise
        results = []
        for path in images:
            try:
                results.append({"path": str(path), **self.predict(path)})
            except BentoMLException as exc:
                if int(exc.error_code) >= 500:
                    raise
                results.append({"path": str(path), "error": str(exc)})
        return results

    def batch_predict(self, images: list[Path | str]) -> dict:
        """Several images -> predictions plus counts per label and decision."""
        return self._client.batch_predict(images=[Path(p) for p in images])

    def model_info(self) -> dict:
        return self._client.model_info()

    def analyze_smear(
        self, image: Path | str, cell_diameter_px: float | None = None, pixel_size_um: float | None = None
    ) -> dict:
        """One smear field -> cells, counts and parasitemia (see ``SmearAnalysis``); the cell size is optional."""
        return self._client.analyze_smear(
            image=Path(image), cell_diameter_px=cell_diameter_px, pixel_size_um=pixel_size_um
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> MalariaClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
