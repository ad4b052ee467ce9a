"""The review queue's labels: what people say about the cells the model refers (and any they pick).

A real database through SQLAlchemy, its schema made by Alembic migrations (``migrations/``, run at
start-up): SQLite for one replica, PostgreSQL by URL above one. Each review keeps who, when, the
request and model version, the model's answer, and the cell's crop, content-addressed (SHA-256 of a
PNG re-encoded from pixels: no EXIF, no client file name), so reviewed cells can be trained on.
Reviews older than the retention setting are deleted at start-up with the crops no review uses.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
REVIEW_LABELS = ("Parasitized", "Uninfected", "unsure")
REVIEW_REASONS = ("refer", "clicked", "audit")  # why the cell was in the queue

# Query handles for the tables the migrations create (the migrations are the schema's source).
metadata = sa.MetaData()
crops = sa.Table(
    "crops",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("png", sa.LargeBinary),
    sa.Column("created_at", sa.DateTime(timezone=True)),
)
reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("reviewer", sa.String(128)),
    sa.Column("label", sa.String(16)),
    sa.Column("reason", sa.String(16)),
    sa.Column("source", sa.String(16)),
    sa.Column("model_label", sa.String(32)),
    sa.Column("probability_parasitized", sa.Float),
    sa.Column("model_version", sa.String(64)),
    sa.Column("request_id", sa.String(128)),
    sa.Column("crop_sha256", sa.String(64)),
)


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema (Alembic ``upgrade head``)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if not url.startswith("sqlite:///"):
        command.upgrade(config, "head")  # PostgreSQL: env.py holds an advisory lock while it migrates
        return
    database = Path(url.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:  # the workers of one replica start together
        fcntl.flock(lock, fcntl.LOCK_EX)
        command.upgrade(config, "head")


def _all_reviews(connection) -> list[dict]:
    return [dict(row._mapping) for row in connection.execute(sa.select(reviews).order_by(reviews.c.id))]


def read_reviews(url: str) -> list[dict]:
    """Every review (without crops), read only: no migration, no retention; none if the table is not there yet."""
    engine = sa.create_engine(url)
    try:
        if not sa.inspect(engine).has_table("reviews"):
            return []
        with engine.connect() as connection:
            return _all_reviews(connection)
    finally:
        engine.dispose()


class ReviewStore:
    """Reviewed cells in the database at ``url`` (migrated on open); reviews kept ``keep_days`` days."""

    def __init__(self, url: str, keep_days: int):
        upgrade(url)
        self.engine = sa.create_engine(url, pool_pre_ping=True)
        self.keep_days = keep_days
        purged = self.purge()
        if purged:
            logger.info("review retention: %d reviews older than %d days deleted", purged, keep_days)

    def add(
        self,
        png: bytes,
        *,
        label: str,
        reviewer: str,
        reason: str,
        source: str,
        model_label: str | None,
        probability_parasitized: float | None,
        model_version: str | None,
        request_id: str | None,
    ) -> tuple[int, str]:
        """Store one review and its crop; returns (review id, crop SHA-256)."""
        sha256 = hashlib.sha256(png).hexdigest()
        now = datetime.now(UTC)
        with self.engine.begin() as connection:
            try:
                with connection.begin_nested():  # the same cell reviewed twice shares its crop
                    connection.execute(crops.insert().values(sha256=sha256, png=png, created_at=now))
            except IntegrityError:
                pass
            inserted = connection.execute(
                reviews.insert().values(
                    created_at=now,
                    reviewer=reviewer,
                    label=label,
                    reason=reason,
                    source=source,
                    model_label=model_label,
                    probability_parasitized=probability_parasitized,
                    model_version=model_version,
                    request_id=request_id,
                    crop_sha256=sha256,
                )
            )
            key = inserted.inserted_primary_key
            assert key is not None, "an INSERT returns its key"
            return int(key[0]), sha256

    def purge(self, now: datetime | None = None) -> int:
        """Delete reviews older than the retention, then crops no review uses; returns reviews deleted."""
        cutoff = (now or datetime.now(UTC)) - timedelta(days=self.keep_days)
        with self.engine.begin() as connection:
            deleted = connection.execute(reviews.delete().where(reviews.c.created_at < cutoff)).rowcount
            used = sa.select(reviews.c.crop_sha256)
            connection.execute(crops.delete().where(crops.c.sha256.not_in(used)))
        return int(deleted or 0)

    def rows(self) -> list[dict]:
        """Every review, oldest first (without the crop bytes)."""
        with self.engine.connect() as connection:
            return _all_reviews(connection)

    def export(self, out_dir: Path) -> dict:
        """Reviewed crops in the NIH folder layout (``Parasitized/``, ``Uninfected/``) with ``manifest.csv``.

        One file per crop, named by its SHA-256. ``unsure`` is not a label to train on; a crop whose
        reviewers disagree is left out (and counted) until someone settles it.
        """
        import csv

        by_crop: dict[str, list[dict]] = {}
        for row in self.rows():
            by_crop.setdefault(row["crop_sha256"], []).append(row)
        written, conflicting, unsure = 0, 0, 0
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "manifest.csv").open("w", newline="") as handle:
            fields = ["path", "label", "reviewers", "reason", "model_label", "model_version", "reviewed_at"]
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for sha256, rows in sorted(by_crop.items()):
                labels = {r["label"] for r in rows} - {"unsure"}
                if not labels:
                    unsure += 1
                    continue
                if len(labels) > 1:
                    conflicting += 1
                    continue
                label = labels.pop()
                path = Path(label) / f"{sha256}.png"
                (out_dir / label).mkdir(exist_ok=True)
                (out_dir / path).write_bytes(self.crop(sha256) or b"")
                last = rows[-1]
                writer.writerow(
                    {
                        "path": str(path),
                        "label": label,
                        "reviewers": ";".join(sorted({r["reviewer"] for r in rows})),
                        "reason": last["reason"],
                        "model_label": last["model_label"],
                        "model_version": last["model_version"],
                        "reviewed_at": last["created_at"].isoformat(),
                    }
                )
                written += 1
        return {"crops": written, "conflicting": conflicting, "unsure": unsure}

    def crop(self, sha256: str) -> bytes | None:
        with self.engine.connect() as connection:
            return connection.execute(sa.select(crops.c.png).where(crops.c.sha256 == sha256)).scalar()
