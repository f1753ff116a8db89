"""Migrations on Postgres and SQLite: revision 0002 upgrades a database holding classified items (and
backfills their review columns), matches the models exactly, and downgrades cleanly."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from dfmod import migrate
from dfmod.db import Base, make_engine
from dfmod.settings import Settings
from tests.utils.databases import scratch_postgres_database


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/m.db"
        return
    with scratch_postgres_database("dfmod_mig") as url:
        yield url


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


def _insert_0002_rows(url: str) -> None:
    """A deployment as today's schema leaves it: items with verdicts and reviews, and keys of each kind."""
    engine = create_engine(url)
    now = "2026-01-01 00:00:00+00:00"
    with engine.begin() as connection:
        for item_id, status, score in (("i-1", "classified", 0.9), ("i-2", "queued", None)):
            connection.execute(
                text(
                    "INSERT INTO items (id, bucket, key, version, source, ingest, status, attempts, created_at,"
                    " updated_at, score, decision) VALUES (:id, 'b', :id, '', 'platform-x', 'upload', :status, 1,"
                    " :now, :now, :score, :decision)"
                ),
                {"id": item_id, "status": status, "now": now, "score": score,
                 "decision": "confirmed_fake" if score else None},
            )
        connection.execute(
            text(
                "INSERT INTO verdicts (item_id, label, fake_probability, threshold, model_version, created_at)"
                " VALUES ('i-1', 'fake', 0.9, 0.6, 'm1', :now)"
            ),
            {"now": now},
        )
        connection.execute(
            text(
                "INSERT INTO reviews (item_id, decision, reviewer, key_id, created_at)"
                " VALUES ('i-1', 'confirmed_fake', 'alice', 'k-review', :now)"
            ),
            {"now": now},
        )
        for key_id, scopes in (("k-ingest", "ingest"), ("k-review", "review"), ("k-all", "admin,ingest,review"),
                               ("k-admin", "admin")):
            connection.execute(
                text(
                    "INSERT INTO api_keys (id, name, key_hash, prefix, scopes, created_at)"
                    " VALUES (:id, :id, :hash, 'dfmod_abc', :scopes, :now)"
                ),
                {"id": key_id, "hash": key_id.ljust(64, "0"), "scopes": scopes, "now": now},
            )
    engine.dispose()


def test_0003_moves_a_deployment_onto_the_default_tenant_and_downgrades(empty_database):
    from dfmod.db import DEFAULT_TENANT_ID

    settings = Settings(database_url=empty_database)
    migrate.upgrade(settings, "0002")
    _insert_0002_rows(empty_database)
    migrate.upgrade(settings, "0003")

    engine = create_engine(empty_database)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id, name FROM tenants")).all() == [(DEFAULT_TENANT_ID, "default")]
        items = dict(connection.execute(text("SELECT id, tenant_id FROM items")).all())
        assert items == {"i-1": DEFAULT_TENANT_ID, "i-2": DEFAULT_TENANT_ID}
        # Nothing else moved: verdicts, reviews and the review columns are as they were.
        assert connection.execute(text("SELECT item_id, fake_probability FROM verdicts")).all() == [("i-1", 0.9)]
        assert connection.execute(text("SELECT item_id, reviewer FROM reviews")).all() == [("i-1", "alice")]
        assert connection.execute(text("SELECT decision FROM items WHERE id = 'i-1'")).scalar() == "confirmed_fake"
        # Keys that ingest join the default tenant (and review it); the others stay global.
        keys = dict(connection.execute(text("SELECT id, tenant_id FROM api_keys")).all())
        assert keys == {"k-ingest": DEFAULT_TENANT_ID, "k-all": DEFAULT_TENANT_ID, "k-review": None, "k-admin": None}
        links = set(connection.execute(text("SELECT key_id, tenant_id FROM api_key_tenants")).all())
        assert links == {("k-ingest", DEFAULT_TENANT_ID), ("k-all", DEFAULT_TENANT_ID)}
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert [d for d in diff if not _added_after_0003(d)] == []
    engine.dispose()
    # An item of an unknown tenant is refused by the database itself (SQLite: with dfmod's foreign-key pragma).
    engine = make_engine(empty_database)
    with engine.connect() as connection:
        with pytest.raises(IntegrityError, match="(?i)foreign key"):
            with connection.begin():
                connection.execute(
                    text(
                        "INSERT INTO items (id, tenant_id, bucket, key, version, source, ingest, status, attempts,"
                        " created_at, updated_at) VALUES ('i-3', 'nope', 'b', 'k3', '', 's', 'upload', 'queued', 0,"
                        " '2026-01-01 00:00:00+00:00', '2026-01-01 00:00:00+00:00')"
                    )
                )
    engine.dispose()

    migrate.downgrade(settings, "0002")
    engine = create_engine(empty_database)
    with engine.connect() as connection:
        assert "tenant_id" not in set(connection.execute(text("SELECT * FROM items")).keys())
        assert "tenant_id" not in set(connection.execute(text("SELECT * FROM api_keys")).keys())
        assert connection.execute(text("SELECT COUNT(*) FROM items")).scalar() == 2
        assert connection.execute(text("SELECT COUNT(*) FROM verdicts")).scalar() == 1
        assert connection.execute(text("SELECT COUNT(*) FROM reviews")).scalar() == 1
        assert connection.execute(text("SELECT COUNT(*) FROM api_keys")).scalar() == 4
    engine.dispose()
    migrate.upgrade(settings)
    assert migrate.current_revision(empty_database) == migrate.head_revision()


def _added_after_0003(difference) -> bool:
    """A table the models declare that a later revision creates (0004: verdict_faces)."""
    return difference[0] == "add_table" and difference[1].name in {"verdict_faces"}


def test_0004_adds_the_face_table_matching_the_models_and_downgrades(empty_database):
    settings = Settings(database_url=empty_database)
    migrate.upgrade(settings, "0002")
    _insert_0002_rows(empty_database)
    migrate.upgrade(settings, "0004")
    assert migrate.current_revision(empty_database) == "0004"
    engine = make_engine(empty_database)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        connection.rollback()  # end the inspection's implicit transaction
        row = {"x0": 1, "y0": 2, "x1": 30, "y1": 40, "s": 0.99, "p": 0.7}
        insert = text("INSERT INTO verdict_faces (item_id, model_version, face_index, x0, y0, x1, y1, detector_score,"
                      " fake_probability) VALUES (:item, 'm', 0, :x0, :y0, :x1, :y1, :s, :p)")
        with connection.begin():
            connection.execute(insert, {"item": "i-1", **row})
        with pytest.raises(IntegrityError):  # one row per (item, model version, face)
            with connection.begin():
                connection.execute(insert, {"item": "i-1", **row})
        with pytest.raises(IntegrityError, match="(?i)foreign key"):  # faces belong to an item
            with connection.begin():
                connection.execute(insert, {"item": "nope", **row})
    engine.dispose()
    migrate.downgrade(settings, "0003")
    engine = create_engine(empty_database)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT COUNT(*) FROM items")).scalar() == 2
        with pytest.raises(Exception, match="(?i)verdict_faces"):
            connection.execute(text("SELECT * FROM verdict_faces"))
    engine.dispose()
    migrate.upgrade(settings)
    assert migrate.current_revision(empty_database) == migrate.head_revision() == "0004"
