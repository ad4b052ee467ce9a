"""The review store: migrated schema, content-addressed crops, retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa

from malaria.serving.reviews import ReviewStore


def review(store: ReviewStore, png: bytes, reviewer: str = "ana") -> tuple[int, str]:
    return store.add(
        png,
        label="Uninfected",
        reviewer=reviewer,
        reason="refer",
        source="field",
        model_label="Parasitized",
        probability_parasitized=0.41,
        model_version="3",
        request_id="req-1",
    )


def test_the_schema_comes_from_the_migrations_and_opening_again_keeps_the_data(tmp_path):
    url = f"sqlite:///{tmp_path / 'nested' / 'reviews.db'}"
    store = ReviewStore(url, keep_days=30)
    review(store, b"crop-1")
    with sa.create_engine(url).connect() as connection:
        assert connection.execute(sa.text("select version_num from alembic_version")).scalar() == "0001"
    assert len(ReviewStore(url, keep_days=30).rows()) == 1


def test_the_same_crop_is_stored_once_and_every_review_is_kept(tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.db'}", keep_days=30)
    first, sha = review(store, b"crop-1", "ana")
    second, same = review(store, b"crop-1", "ben")
    assert first != second and sha == same and len(sha) == 64
    assert [r["reviewer"] for r in store.rows()] == ["ana", "ben"]
    assert store.crop(sha) == b"crop-1"


def test_retention_deletes_old_reviews_and_the_crops_no_review_uses(tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.db'}", keep_days=30)
    _, old = review(store, b"old-crop")
    assert store.purge(datetime.now(UTC) + timedelta(days=10)) == 0
    assert store.purge(datetime.now(UTC) + timedelta(days=31)) == 1
    assert store.rows() == [] and store.crop(old) is None


def test_export_writes_the_nih_layout_without_unsure_or_disputed_cells(tmp_path):
    import csv
    import io
    import subprocess
    import sys

    from PIL import Image

    url = f"sqlite:///{tmp_path / 'reviews.db'}"
    store = ReviewStore(url, keep_days=30)

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (value, 0, 0)).save(buffer, format="PNG")
        return buffer.getvalue()

    agreed = {"png": png(1), "labels": ["Parasitized", "Parasitized"]}
    for case in (agreed, {"png": png(2), "labels": ["Uninfected"]}, {"png": png(3), "labels": ["unsure"]}):
        for i, label in enumerate(case["labels"]):
            store.add(case["png"], label=label, reviewer=f"r{i}", reason="audit", source="crop", model_label=None,
                      probability_parasitized=None, model_version="2", request_id=None)  # fmt: skip
    for label in ("Parasitized", "Uninfected"):  # a disputed cell
        store.add(png(4), label=label, reviewer=label, reason="refer", source="field", model_label=None,
                  probability_parasitized=None, model_version="2", request_id=None)  # fmt: skip

    command = [sys.executable, "-m", "malaria.cli", "feedback", "export", str(tmp_path / "out"), "--db", url]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"crops": 2, "conflicting": 1, "unsure": 1' in result.stdout
    rows = list(csv.DictReader((tmp_path / "out" / "manifest.csv").open()))
    assert sorted(r["label"] for r in rows) == ["Parasitized", "Uninfected"]
    parasitized = next(r for r in rows if r["label"] == "Parasitized")
    assert parasitized["reviewers"] == "r0;r1"
    assert (tmp_path / "out" / parasitized["path"]).read_bytes() == agreed["png"]
    assert sorted(p.parent.name for p in (tmp_path / "out").rglob("*.png")) == ["Parasitized", "Uninfected"]


def test_reading_reviews_migrates_nothing_and_deletes_nothing(tmp_path):
    from malaria.serving.reviews import read_reviews

    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert read_reviews(empty) == [] and not sa.inspect(sa.create_engine(empty)).has_table("alembic_version")
    url = f"sqlite:///{tmp_path / 'reviews.db'}"
    review(ReviewStore(url, keep_days=30), b"crop")
    with sa.create_engine(url).begin() as connection:  # a review from a year ago: past any retention
        connection.execute(sa.text("update reviews set created_at = '2025-01-01 00:00:00'"))
    assert len(read_reviews(url)) == 1 and len(read_reviews(url)) == 1


def exported_feedback(tmp_path, cells: list[tuple[bytes, str]]):
    """The review queue's labels for ``cells`` (png, label), exported as `malaria feedback export` writes them."""
    store = ReviewStore(f"sqlite:///{tmp_path / 'reviews.db'}", keep_days=30)
    for png, label in cells:
        store.add(png, label=label, reviewer="ana", reason="audit", source="field", model_label=None,
                  probability_parasitized=None, model_version="3", request_id=None)  # fmt: skip
    store.export(tmp_path / "feedback")
    return tmp_path / "feedback"


def test_exported_feedback_joins_the_data_split_by_review_day(tmp_path):
    import io

    import pandas as pd
    from PIL import Image

    from malaria.data import FEEDBACK, feedback_source, labels_of

    def png(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), (i % 250, i // 250, 0)).save(buffer, format="PNG")
        return buffer.getvalue()

    folder = exported_feedback(tmp_path, [(png(i), "Parasitized" if i % 3 == 0 else "Uninfected") for i in range(120)])
    one_day = feedback_source(folder, seed=1, val_fraction=0.15, test_fraction=0.15)
    assert len(one_day) == 120 and set(one_day["split"]) == {"train"}  # one day of reviews: nothing held out
    assert set(one_day["source"]) == {FEEDBACK} and (one_day[["width", "height"]] == 20).all().all()

    manifest = pd.read_csv(folder / "manifest.csv")  # the same reviews spread over 12 days
    days = pd.Timestamp("2026-11-01", tz="UTC") + pd.to_timedelta(manifest.index % 12, unit="D")
    manifest.assign(reviewed_at=days.strftime("%Y-%m-%dT%H:%M:%S+00:00")).to_csv(folder / "manifest.csv", index=False)
    split = feedback_source(folder, seed=1, val_fraction=0.15, test_fraction=0.15)
    assert set(split["split"]) == {"train", "val", "test"}
    assert split.groupby("patient")["split"].nunique().max() == 1  # a day's reviews stay in one part
    assert all(labels_of(part).min() == 0 and labels_of(part).max() == 1 for _, part in split.groupby("split"))
