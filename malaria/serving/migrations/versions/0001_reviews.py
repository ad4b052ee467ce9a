"""The review queue: reviewed cells and their crops.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "crops",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("png", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("model_label", sa.String(32)),
        sa.Column("probability_parasitized", sa.Float),
        sa.Column("model_version", sa.String(64), index=True),
        sa.Column("request_id", sa.String(128)),
        sa.Column("crop_sha256", sa.String(64), sa.ForeignKey("crops.sha256"), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reviews")
    op.drop_table("crops")
