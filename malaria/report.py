"""The dataset report: counts per class and patient, image sizes, and a montage of sample cells."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from malaria.data import ValidationReport  # noqa: E402
from malaria.spec import CLASS_NAMES  # noqa: E402


def dataset_report(
    frame: pd.DataFrame, root: Path, validation: ValidationReport, out_dir: Path, per_class: int = 8, seed: int = 0
) -> Path:
    """Write ``dataset_report.md`` with ``class_balance.png``, ``image_sizes.png``, ``montage.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_class = frame["label"].value_counts().reindex(CLASS_NAMES, fill_value=0)
    by_patient = (
        frame.groupby(["patient", "label"]).size().unstack(fill_value=0).reindex(columns=CLASS_NAMES, fill_value=0)
    )

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_class.plot.bar(ax=axes[0], color=["#b03a5b", "#3a7bb0"], title="Cells per class", rot=0)
    by_patient.sum(axis=1).sort_values().plot.hist(ax=axes[1], bins=30, title="Cells per patient")
    axes[1].set_xlabel("cells")
    _save(figure, out_dir / "class_balance.png")

    figure, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(frame["width"], frame["height"], s=4, alpha=0.3)
    ax.set(xlabel="width (px)", ylabel="height (px)", title="Image sizes")
    _save(figure, out_dir / "image_sizes.png")

    figure, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(per_class * 1.2, len(CLASS_NAMES) * 1.4))
    for row, label in enumerate(CLASS_NAMES):
        rows = frame[frame["label"] == label]
        sample = rows.sample(min(per_class, len(rows)), random_state=seed)
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(sample):
                with Image.open(root / sample["path"].iloc[col]) as image:
                    ax.imshow(image.convert("RGB"))
        axes[row][0].set_title(label, loc="left", fontsize=10)
    _save(figure, out_dir / "montage.png")

    per_patient = by_patient.sum(axis=1)
    sizes = frame[["width", "height"]].describe().loc[["min", "50%", "max"]].astype(int)
    split_table = ""
    if "split" in frame:
        table = frame.groupby(["split", "label"]).size().unstack(fill_value=0)
        table["patients"] = frame.groupby("split")["patient"].nunique()
        split_table = "\n## Patient-grouped split\n\n" + table.to_markdown() + "\n"
    lines = [
        "# Dataset report",
        "",
        f"{len(frame)} usable images from {frame['patient'].nunique()} patients; {validation.summary()}.",
        "",
        "## Cells per class",
        "",
        by_class.rename("cells").to_frame().to_markdown(),
        "",
        f"Patients with only uninfected cells: {(by_patient[CLASS_NAMES[0]] == 0).sum()}; "
        f"cells per patient: min {per_patient.min()}, median {int(per_patient.median())}, max {per_patient.max()}.",
        "",
        "## Image sizes (pixels)",
        "",
        sizes.to_markdown(),
        split_table,
        "![class balance](class_balance.png)",
        "![image sizes](image_sizes.png)",
        "![sample cells](montage.png)",
        "",
    ]
    if validation.skipped:
        lines += ["## Skipped files", ""]
        lines += [
            f"- {reason}: {len(names)} ({', '.join(sorted(names)[:20])})"
            for reason, names in sorted(validation.skipped.items())
        ]
    path = out_dir / "dataset_report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
