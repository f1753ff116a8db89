"""The expand/contract promise that /readyz relies on (docs/operations.md, "Upgrade and migrations"): after a
release's migration ran, the previous release's code still works, so every revision may only *expand* the
schema its parent left: no table or column of the parent dropped, and no NOT NULL column without a server
default added to a table the parent had (the old code's INSERTs do not name it)."""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import create_engine, inspect

from dfmod import migrate
from dfmod.settings import Settings


def _revisions() -> list[str]:
    script = migrate._script_directory()
    return [rev.revision for rev in reversed(list(script.walk_revisions("base", "heads")))]


def _schema(url: str) -> dict[str, dict[str, dict]]:
    engine = create_engine(url)
    inspector = inspect(engine)
    schema = {
        table: {column["name"]: column for column in inspector.get_columns(table)}
        for table in inspector.get_table_names() if table != "alembic_version"
    }
    engine.dispose()
    return schema


def _pairs():
    revisions = _revisions()
    for parent, child in itertools.pairwise(revisions):
        yield pytest.param(parent, child, id=f"{parent}->{child}")


@pytest.mark.parametrize("parent,child", list(_pairs()))
def test_each_revision_only_expands_its_parent(parent, child, tmp_path):
    before_url, after_url = f"sqlite:///{tmp_path}/before.db", f"sqlite:///{tmp_path}/after.db"
    migrate.upgrade(Settings(database_url=before_url, data_dir=tmp_path), parent)
    migrate.upgrade(Settings(database_url=after_url, data_dir=tmp_path), child)
    before, after = _schema(before_url), _schema(after_url)
    problems = []
    for table, columns in before.items():
        if table not in after:
            problems.append(f"table {table} dropped")
            continue
        for name in columns.keys() - after[table].keys():
            problems.append(f"column {table}.{name} dropped")
        for name in after[table].keys() - columns.keys():
            column = after[table][name]
            if not column["nullable"] and column.get("default") is None:
                problems.append(f"{table}.{name} added NOT NULL without a server default")
    assert problems == []
