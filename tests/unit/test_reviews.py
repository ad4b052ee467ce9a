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
