"""Data: locate or fetch the NIH images, validate them, split by patient, load model inputs."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold
from tqdm import tqdm

from malaria.config import Settings
from malaria.preprocess import IMAGE_SUFFIXES, InvalidImageError, decode_image, preprocess
from malaria.spec import CLASS_NAMES, PARASITIZED, ModelSpec

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_PATIENT = re.compile(r"^C(\d+)", re.IGNORECASE)


class DataError(RuntimeError):
    """The data cannot be used (missing folder, empty class, ...); the message says why."""


NIH, SMEAR, SYNTHETIC = "nih", "smear", "synthetic"  # data sources (a generated cell folder is synthetic)
FEEDBACK = "feedback"  # cells people labelled in the review queue (`malaria feedback export`)
MIN_FEEDBACK_DAYS = 3  # review days needed to hold some out for validation and test
SYNTHETIC_MARKER = "SYNTHETIC.txt"


def patient_id(filename: str) -> str:
    """The slide/patient of an NIH cell crop: the number after the leading ``C`` (``C100P61...`` -> ``C100``).

    Names that do not follow the NIH pattern fall back to the slide prefix before ``_IMG_``.
    """
    match = _PATIENT.match(filename)
    if match:
        return f"C{int(match.group(1))}"
    return Path(filename).name.split("_IMG_")[0]


@dataclass
class ValidationReport:
    """What a scan kept and what it skipped, by reason."""

    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    @property
    def n_skipped(self) -> int:
        return sum(len(names) for names in self.skipped.values())

    def summary(self) -> str:
        parts = [f"{len(names)} {reason}" for reason, names in sorted(self.skipped.items())]
        return f"{self.kept} images kept, {self.n_skipped} skipped" + (f" ({', '.join(parts)})" if parts else "")

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": {k: sorted(v) for k, v in self.skipped.items()}}


def _check_file(path: Path, min_side: int, max_side: int) -> tuple[str | None, tuple[int, int]]:
    """None if the file is a usable image, else the reason it is not."""
    try:
        if path.stat().st_size == 0:
            return "empty", (0, 0)
        with Image.open(path) as image:
            size = image.size
            if min(size) < min_side or max(size) > max_side:
                return "wrong size", size
            decode_image(image)
        return None, size
    except InvalidImageError:
        return "unreadable", (0, 0)
    except Exception:  # noqa: BLE001 - any decoder failure means the file is not a usable image
        return "not an image", (0, 0)


def scan_dataset(root: Path, settings: Settings) -> tuple[pd.DataFrame, ValidationReport]:
    """List and validate every image under ``root/<class>/``; bad files are reported and skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist: set MALARIA_DATA_DIR to a folder with "
            f"{'/ and '.join(CLASS_NAMES)}/ sub-folders, or run `malaria data fetch`"
        )
    candidates: list[tuple[Path, str]] = []
    report = ValidationReport()
    for label in CLASS_NAMES:
        folder = root / label
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
        for path in files:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                candidates.append((path, label))
            elif path.name not in {"Thumbs.db", ".DS_Store"}:
                report.skip("not an image", f"{label}/{path.name}")
    with ThreadPoolExecutor(max_workers=4) as pool:
        checks = list(
            tqdm(
                pool.map(lambda c: _check_file(c[0], settings.min_image_side, settings.max_image_side), candidates),
                total=len(candidates),
                desc="validating images",
                disable=len(candidates) < 2000,
            )
        )
    rows = []
    for (path, label), (problem, (width, height)) in zip(candidates, checks, strict=True):
        if problem:
            report.skip(problem, f"{label}/{path.name}")
            continue
        rows.append(
            {
                "path": path.relative_to(root).as_posix(),
                "label": label,
                "patient": patient_id(path.name),
                "width": width,
                "height": height,
                "source": NIH,
            }
        )
    report.kept = len(rows)
    frame = pd.DataFrame(rows, columns=["path", "label", "patient", "width", "height", "source"])
    for label in CLASS_NAMES:
        if not (frame["label"] == label).any():
            raise DataError(f"class {label!r} has no usable images under {root / label}")
    if report.n_skipped:
        logger.warning("data validation: %s", report.summary())
        for reason, names in report.skipped.items():
            logger.warning("  %s: %s%s", reason, ", ".join(names[:10]), " ..." if len(names) > 10 else "")
    else:
        logger.info("data validation: %s", report.summary())
    return frame, report


def split_by_patient(
    frame: pd.DataFrame, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> pd.DataFrame:
    """Assign train/val/test so that each patient sits in one part, with class balance kept close."""
    if frame["patient"].nunique() < 3:
        raise DataError("a patient-grouped split needs at least 3 patients")
    y = (frame["label"] == PARASITIZED).to_numpy()
    groups = frame["patient"].to_numpy()

    def hold_out(index: np.ndarray, fraction: float, salt: int) -> tuple[np.ndarray, np.ndarray]:
        n_splits = max(2, round(1 / fraction))
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + salt)
        rest, held = next(folds.split(index, y[index], groups[index]))
        return index[rest], index[held]

    everything = np.arange(len(frame))
    rest, test = hold_out(everything, test_fraction, 0)
    train, val = hold_out(rest, val_fraction / (1 - test_fraction), 1)
    split = np.empty(len(frame), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    out = frame.copy()
    out["split"] = split
    return out


def write_manifest(frame: pd.DataFrame, path: Path) -> Path:
    """Save the split manifest (one row per image) as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.sort_values(["split", "label", "path"]).to_csv(path, index=False)
    return path


def images_fingerprint(frame: pd.DataFrame) -> str:
    """A short hash of which image files (paths relative to the data folder) manifest rows hold, in which split."""
    rows = sorted(f"{split}:{path}" for split, path in zip(frame["split"], frame["path"], strict=True))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def read_manifest(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"split manifest {path} not found: run `malaria data prepare` first")
    frame = pd.read_csv(path)
    if "source" not in frame:  # manifests written before the smear source: all NIH
        frame["source"] = NIH
    return frame


def source_roots(settings: Settings, allow_download: bool = True) -> dict[str, Path]:
    """The folder each source's manifest paths are relative to."""
    roots = {NIH: ensure_dataset(settings, allow_download), SMEAR: settings.smear_crops_dir}
    if settings.feedback_dir is not None:
        roots[FEEDBACK] = settings.feedback_dir
    return roots


def image_paths(frame: pd.DataFrame, roots: dict[str, Path]) -> list[Path]:
    """Manifest rows -> image files (an absolute path in an old manifest stays as it is)."""
    if missing := set(frame["source"]) - set(roots):
        raise DataError(f"the manifest has {sorted(missing)} images but no folder for them (MALARIA_FEEDBACK_DIR?)")
    return [roots[source] / path for source, path in zip(frame["source"], frame["path"], strict=True)]


def feedback_source(folder: Path, seed: int, val_fraction: float, test_fraction: float) -> pd.DataFrame:
    """Reviewed crops (``malaria feedback export``) as manifest rows, split by review day.

    A day's reviews (a field's cells, one reviewer's session) stay in one part, like a patient; with
    fewer than ``MIN_FEEDBACK_DAYS`` days nothing can be held out honestly, so all of them train.
    """
    exported = pd.read_csv(folder / "manifest.csv")
    sizes = [Image.open(folder / path).size for path in exported["path"]]
    frame = pd.DataFrame(
        {
            "path": exported["path"],
            "label": exported["label"],
            "patient": "review-" + exported["reviewed_at"].str[:10],
            "width": [w for w, _ in sizes],
            "height": [h for _, h in sizes],
            "source": FEEDBACK,
        }
    )
    if frame["patient"].nunique() < MIN_FEEDBACK_DAYS or frame["label"].nunique() < 2:
        logger.warning(
            "feedback: %d reviewed cells over %d day(s): all used for training (no held-out feedback metrics "
            "before %d days of reviews)",
            len(frame),
            frame["patient"].nunique(),
            MIN_FEEDBACK_DAYS,
        )
        return frame.assign(split="train")
    return split_by_patient(frame, seed, val_fraction, test_fraction)


def load_arrays(paths: Iterable[str | Path], spec: ModelSpec, desc: str = "loading") -> np.ndarray:
    """Preprocess image files into one float32 array with the shared preprocessing function."""
    paths = list(paths)
    out = np.empty((len(paths), spec.image_size, spec.image_size, 3), dtype=np.float32)

    def load(i: int) -> None:
        out[i] = preprocess(paths[i], spec)

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(tqdm(pool.map(load, range(len(paths))), total=len(paths), desc=desc, disable=len(paths) < 2000))
    return out


def labels_of(frame: pd.DataFrame) -> np.ndarray:
    """1.0 for Parasitized, 0.0 for Uninfected."""
    return (frame["label"] == PARASITIZED).to_numpy(dtype=np.float32)


# --- Where the data comes from -------------------------------------------------------------------


def generate_synthetic(root: Path, per_class: int = 200, n_patients: int = 20, size: int = 96, seed: int = 0) -> Path:
    """Write a synthetic NIH-layout set: pink cells on black, parasitized ones with purple rings.

    For tests and offline demos only; a model trained on it knows nothing about real malaria.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for label in CLASS_NAMES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            patient = 1 + i % n_patients
            cx, cy = rng.normal(size / 2, size / 20, 2)
            radius = size * rng.uniform(0.32, 0.42)
            cell = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
            image = np.zeros((size, size, 3), dtype=np.float64)
            tint = np.array([200, 140, 150]) + rng.normal(0, 12, 3)
            image[cell] = tint + rng.normal(0, 8, (cell.sum(), 3))
            if label == PARASITIZED:
                for _ in range(rng.integers(1, 3)):
                    px, py = cx + rng.uniform(-0.5, 0.5, 2) * radius
                    spot = (xx - px) ** 2 + (yy - py) ** 2 < (size * rng.uniform(0.05, 0.09)) ** 2
                    image[spot & cell] = np.array([95, 40, 120]) + rng.normal(0, 10, 3)
            name = f"C{patient}P{patient}ThinF_IMG_synthetic_cell_{label[0]}{i}.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / label / name)
    (root / SYNTHETIC_MARKER).write_text("Generated by malaria.data.generate_synthetic: not real cells.\n")
    return root


def cell_source(root: Path) -> str:
    """The source name of an NIH-layout folder: ``synthetic`` when it was generated, else ``nih``."""
    return SYNTHETIC if (Path(root) / SYNTHETIC_MARKER).is_file() else NIH


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_nih(settings: Settings, target: Path) -> Path:
    """Download and unpack the public NIH archive into ``target``; SHA-256 pinned, or recorded on first download."""
    import requests

    target.parent.mkdir(parents=True, exist_ok=True)
    checksum_file = target.parent / "nih_archive.sha256"
    expected = settings.nih_archive_sha256 or (checksum_file.read_text().strip() if checksum_file.is_file() else None)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "cell_images.zip"
        with requests.get(settings.nih_archive_url, stream=True, timeout=30) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with (
                archive.open("wb") as handle,
                tqdm(total=total, unit="B", unit_scale=True, desc="downloading NIH cell images") as bar,
            ):
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)
                    bar.update(len(chunk))
        actual = _sha256(archive)
        if expected and actual != expected:
            raise DataError(f"NIH archive checksum mismatch: expected {expected}, got {actual}")
        if not expected:
            checksum_file.write_text(actual + "\n")
            logger.warning("no pinned checksum; recorded SHA-256 %s in %s", actual, checksum_file)
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(tmp)
        extracted = Path(tmp) / "cell_images"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(extracted), target)
    return target


def ensure_dataset(settings: Settings, allow_download: bool = True) -> Path:
    """The NIH-layout folder to use: MALARIA_DATA_DIR, the DVC copy, a download, or synthetic data."""
    if settings.data_dir is not None:
        if not settings.data_dir.is_dir():
            raise DataError(f"MALARIA_DATA_DIR={settings.data_dir} is not a folder")
        return settings.data_dir
    local = settings.nih_data_dir()
    if local.is_dir() and any(local.iterdir()):
        return local
    if allow_download:
        try:
            return download_nih(settings, local)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - any network failure falls back to synthetic data
            logger.warning("could not download the NIH archive (%s)", exc)
    if not settings.allow_synthetic:
        raise DataError(
            "no real data: set MALARIA_DATA_DIR, `dvc pull` data/cell_images or allow the NIH download "
            "(MALARIA_ALLOW_SYNTHETIC=false forbids the synthetic fallback)"
        )
    synthetic = settings.workspace_data_dir / "synthetic_cell_images"
    logger.warning(
        "\n%s\nNO REAL DATA: generating a SYNTHETIC data set in %s.\n"
        "A model trained on it is for demos and tests ONLY; it cannot detect malaria.\n"
        "Set MALARIA_DATA_DIR to the NIH cell_images folder for a real model.\n%s",
        "!" * 78,
        synthetic,
        "!" * 78,
    )
    if not synthetic.is_dir():
        generate_synthetic(synthetic, per_class=settings.synthetic_per_class, seed=settings.seed)
    return synthetic


def prepare(settings: Settings) -> tuple[pd.DataFrame, ValidationReport]:
    """Locate, validate and split the data; write ``data/splits.csv`` and the validation report.

    With ``smear_dir`` set, crops cut from the annotated smear fields join as a second source, split
    by capture block (``malaria.smear.crops``); with ``feedback_dir``, the review queue's exported
    labels, split by review day.
    """
    root = ensure_dataset(settings)
    frame, report = scan_dataset(root, settings)
    frame = split_by_patient(frame, settings.seed, settings.val_fraction, settings.test_fraction)
    if settings.smear_dir is not None:
        from malaria.smear.crops import cut_smear_crops

        smear = cut_smear_crops(
            settings.smear_dir,
            settings.smear_crops_dir,
            settings.smear_cell_diameter_px,
            settings.seed,
            settings.smear_uninfected_per_field,
            settings.smear_speckled_share,
        )
        frame = pd.concat([frame, smear[frame.columns]], ignore_index=True)
    if settings.feedback_dir is not None:
        feedback = feedback_source(settings.feedback_dir, settings.seed, settings.val_fraction, settings.test_fraction)
        frame = pd.concat([frame, feedback[frame.columns]], ignore_index=True)
    # The manifest names each file's content, so it is the whole input of training: DVC's `train`
    # stage depends on it, whichever folder MALARIA_DATA_DIR (or the smear or feedback source) names.
    frame["sha256"] = [_sha256(path) for path in image_paths(frame, source_roots(settings))]
    write_manifest(frame, settings.splits_path)
    (settings.workspace_data_dir / "validation_report.json").write_text(
        json.dumps({"source": str(root), **report.to_dict()}, indent=2)
    )
    counts = frame.groupby(["source", "split", "label"]).size().unstack(fill_value=0)
    logger.info("split by patient / capture block (seed %d):\n%s", settings.seed, counts.to_string())
    return frame, report
