"""Alembic environment of the review database: run by ``malaria.serving.reviews.upgrade`` (no alembic.ini)."""

from alembic import context
from sqlalchemy import engine_from_config, pool, text

config = context.config
engine = engine_from_config({"sqlalchemy.url": config.get_main_option("sqlalchemy.url")}, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":  # replicas starting together migrate one at a time
            connection.execute(text("SELECT pg_advisory_xact_lock(74612026)"))
        context.run_migrations()
