"""/readyz through a rolling upgrade, on a real Postgres: pods of the previous release stay ready once the new
release's migration ran (database ahead of their code), and pods of a new release stay unready until it ran
(database behind their code)."""

from __future__ import annotations

import shutil
from importlib import resources

import pytest
from alembic import command
from fastapi.testclient import TestClient

from api.main import create_app
from dfmod import migrate
from dfmod.migrate import SchemaState, schema_state
from dfmod.settings import Settings
from tests.utils.databases import scratch_postgres_database

pytestmark = pytest.mark.integration

# An expand-only revision as the next release would ship it: a new nullable column, old code unaffected.
NEXT_RELEASE_REVISION = '''
import sqlalchemy as sa
from alembic import op

revision = "next_release"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("next_release_note", sa.String(32), nullable=True))


def downgrade() -> None:
    op.drop_column("items", "next_release_note")
'''


@pytest.fixture
def database_url():
    with scratch_postgres_database("dfmod_ready") as url:
        yield url


@pytest.fixture
def next_release_migrations(tmp_path):
    """This code's migrations plus one more revision on top: the script directory of the next release."""
    location = tmp_path / "next-release-migrations"
    shutil.copytree(resources.files("migrations"), location, ignore=shutil.ignore_patterns("__pycache__"))
    head = migrate.head_revision()
    (location / "versions" / "9999_next_release.py").write_text(NEXT_RELEASE_REVISION.format(head=head))
    return str(location)


def _readyz(database_url, redis_url, tmp_path):
    settings = Settings(database_url=database_url, broker_url=redis_url, data_dir=tmp_path / "data",
                        storage_url=str(tmp_path / "objects"))
    with TestClient(create_app(settings)) as client:
        response = client.get("/readyz")
    return response.status_code, response.json()["checks"]["database"]


def test_database_one_migration_ahead_keeps_old_pods_ready(database_url, redis_url, next_release_migrations, tmp_path):
    command.upgrade(migrate.alembic_config(database_url, next_release_migrations), "heads")
    assert migrate.current_revision(database_url) == "next_release"  # the new release really migrated

    status, database = _readyz(database_url, redis_url, tmp_path)
    assert (status, database) == (200, "ok")


def test_database_one_migration_behind_makes_new_pods_unready(database_url, redis_url, tmp_path):
    head = migrate.head_revision()
    previous = migrate._script_directory().get_revision(head).down_revision
    migrate.upgrade(Settings(database_url=database_url), previous)

    status, database = _readyz(database_url, redis_url, tmp_path)
    assert status == 503
    assert database.startswith(f"error: schema at {previous}, code expects {head}")

    migrate.upgrade(Settings(database_url=database_url))  # the hook ran: ready
    assert _readyz(database_url, redis_url, tmp_path) == (200, "ok")


def test_unmigrated_database_is_unready(database_url, redis_url, tmp_path):
    status, database = _readyz(database_url, redis_url, tmp_path)
    assert status == 503 and "dfmod migrate" in database


@pytest.mark.parametrize(
    "revision,state",
    [(None, SchemaState.behind), ("0001", SchemaState.behind), ("future_revision_0009", SchemaState.ahead)],
)
def test_schema_state_rule(revision, state):
    assert schema_state(revision) is state
    assert schema_state(migrate.head_revision()) is SchemaState.current
