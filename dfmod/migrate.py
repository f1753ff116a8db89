"""Schema migrations as a command (``dfmod migrate``, the Helm pre-upgrade hook), never at start-up.

Also the readiness rule for the schema (:func:`schema_state`): code runs on a database at its own head or
*ahead* of it (a newer release migrated first, expand/contract keeps old code working), never on one behind.
"""

from __future__ import annotations

import enum
from functools import lru_cache
from importlib import resources

from alembic import command
from alembic.config import Config

from dfmod.settings import Settings


def alembic_config(database_url: str, script_location: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", script_location or str(resources.files("migrations")))
    # ConfigParser interpolation would choke on '%' in URL-encoded passwords.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    if settings.resolved_database_url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings.resolved_database_url), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(alembic_config(settings.resolved_database_url), revision)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from dfmod.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


class SchemaState(str, enum.Enum):
    """Where a database's schema stands relative to the code asking."""

    current = "current"  # at this code's head
    ahead = "ahead"  # migrated by a newer release: a revision this code does not know (or a descendant of head)
    behind = "behind"  # unmigrated, or at an ancestor of head: this code would use columns that are missing


@lru_cache(maxsize=4)
def _script_directory(script_location: str | None = None):
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://", script_location))


def schema_state(revision: str | None, script_location: str | None = None) -> SchemaState:
    """Classify the database revision ``revision`` (None: no ``alembic_version`` row) against the code's head.

    Releases promise expand/contract migrations (docs/operations.md), so a database one release ahead still
    serves the previous code: during a rolling upgrade, or after ``helm rollback``, old pods stay ready.
    """
    if revision is None:
        return SchemaState.behind
    script = _script_directory(script_location)
    head = script.get_current_head()
    if revision == head:
        return SchemaState.current
    try:
        ancestors = {rev.revision for rev in script.iterate_revisions(head, "base")}
    except Exception:  # noqa: BLE001 - alembic raises several types for revisions it cannot resolve
        return SchemaState.ahead
    if revision in ancestors:
        return SchemaState.behind
    # Unknown to this code (written by a newer release) or a known descendant of head: the newer side.
    return SchemaState.ahead
