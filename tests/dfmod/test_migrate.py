"""Migrations on Postgres and SQLite: revision 0002 upgrades a database holding classified items (and
backfills their review columns), matches the models exactly, and downgrades cleanly."""

from __future__ import annotations

import uuid

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from dfmod import migrate
from dfmod.db import Base
from dfmod.settings import Settings
from tests.conftest import POSTGRES_ADMIN_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/m.db"
        return
    name = f"dfmod_mig_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _insert_0001_rows(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        for item_id, status in (("i-1", "classified"), ("i-2", "queued")):
            connection.execute(
                text(
                    "INSERT INTO items (id, bucket, key, version, source, ingest, status, attempts, created_at, updated_at)"
                    " VALUES (:id, 'b', :id, '', 'upload', 'upload', :status, 1, :now, :now)"
                ),
                {"id": item_id, "status": status, "now": "2026-01-01 00:00:00+00:00"},
            )
        # Two model versions for i-1: the newer (higher id) must win the backfill.
        for probability, label, version in ((0.2, "real", "m-old"), (0.9, "fake", "m-new")):
            connection.execute(
                text(
                    "INSERT INTO verdicts (item_id, label, fake_probability, threshold, model_version, created_at)"
                    " VALUES ('i-1', :label, :p, 0.6, :version, :now)"
                ),
                {"label": label, "p": probability, "version": version, "now": "2026-01-01 00:00:00+00:00"},
            )
    engine.dispose()


def test_0002_upgrades_backfills_matches_models_and_downgrades(empty_database):
    settings = Settings(database_url=empty_database)
    migrate.upgrade(settings, "0001")
    _insert_0001_rows(empty_database)
    migrate.upgrade(settings)
    assert migrate.current_revision(empty_database) == migrate.head_revision()

    engine = create_engine(empty_database)
    with engine.connect() as connection:
        rows = dict(
            (row.id, row)
            for row in connection.execute(text("SELECT id, score, label, threshold, model_version, decision FROM items"))
        )
        assert (rows["i-1"].score, rows["i-1"].label, rows["i-1"].threshold, rows["i-1"].model_version) == (
            0.9, "fake", 0.6, "m-new",
        )
        assert rows["i-2"].score is None and rows["i-2"].decision is None
        # The migrated schema is exactly what the models declare (columns, types, indexes, constraints).
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
    engine.dispose()

    migrate.downgrade(settings, "0001")
    engine = create_engine(empty_database)
    with engine.connect() as connection:
        columns = set(connection.execute(text("SELECT * FROM items")).keys())
        assert "score" not in columns and "decision" not in columns
        assert connection.execute(text("SELECT COUNT(*) FROM verdicts")).scalar() == 2
    engine.dispose()
    migrate.upgrade(settings)
    assert migrate.current_revision(empty_database) == migrate.head_revision()
