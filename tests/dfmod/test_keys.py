"""API keys on real Postgres: only hashes are stored, revocation, rotation, and the ``dfmod keys`` commands."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from dfmod.cli import app
from dfmod.db import ApiKey, make_engine, make_session_factory, session_scope
from dfmod.keys import KeyProblem, authenticate, create_key, hash_key, revoke_key, rotate_key

pytestmark = pytest.mark.integration


@pytest.fixture
def factory(clean_postgres):
    engine = make_engine(clean_postgres)
    yield make_session_factory(engine)
    engine.dispose()


def test_only_the_hash_is_stored_and_the_key_authenticates(factory):
    with session_scope(factory) as session:
        created = create_key(session, "alice", ["review", "ingest", "review"])
    assert re.fullmatch(r"dfmod_[A-Za-z0-9_-]{43}", created.plaintext)
    with session_scope(factory) as session:
        stored = session.execute(text("SELECT name, key_hash, prefix, scopes FROM api_keys")).one()
        assert stored.key_hash == hash_key(created.plaintext) and created.plaintext not in str(tuple(stored))
        assert stored.scopes == "ingest,review" and created.plaintext.startswith(stored.prefix)
        assert authenticate(session, created.plaintext).name == "alice"
        tampered = created.plaintext[:-1] + ("A" if created.plaintext[-1] != "A" else "B")
        assert authenticate(session, tampered) is None
        assert authenticate(session, "not-a-dfmod-key") is None


@pytest.mark.parametrize("scopes", [[], ["superuser"], ["review", "root"]])
def test_unknown_or_missing_scopes_are_refused(factory, scopes):
    with session_scope(factory) as session, pytest.raises(KeyProblem):
        create_key(session, "x", scopes)


def test_names_are_unique_among_live_keys_and_revocation_is_final(factory):
    with session_scope(factory) as session:
        first = create_key(session, "bob", ["review"])
    with session_scope(factory) as session, pytest.raises(KeyProblem):
        create_key(session, "bob", ["ingest"])
    with session_scope(factory) as session:
        revoke_key(session, "bob")
        assert authenticate(session, first.plaintext) is None
        second = create_key(session, "bob", ["ingest"])
    with session_scope(factory) as session:
        assert authenticate(session, second.plaintext).scopes == "ingest"
        revoke_key(session, first.key.id)  # revoking a revoked key by id: a no-op, not an error
        with pytest.raises(KeyProblem):
            revoke_key(session, "nobody")


def test_rotation_revokes_the_previous_key(factory):
    with session_scope(factory) as session:
        old = rotate_key(session, "dfmod-up", ["ingest", "review", "admin"])
    with session_scope(factory) as session:
        new = rotate_key(session, "dfmod-up", ["ingest", "review", "admin"])
    with session_scope(factory) as session:
        assert authenticate(session, old.plaintext) is None
        assert authenticate(session, new.plaintext).scopes == "admin,ingest,review"
        assert len(session.scalars(select(ApiKey).where(ApiKey.name == "dfmod-up")).all()) == 2


def test_keys_commands(clean_postgres, monkeypatch):
    monkeypatch.setenv("DFMOD_DATABASE_URL", clean_postgres)
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--name", "dana", "--scope", "review", "--scope", "ingest"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("dfmod_")

    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0 and "dana" in listed.stdout and "ingest,review" in listed.stdout
    assert key not in listed.stdout and key[:12] in listed.stdout  # the prefix, never the key

    duplicate = runner.invoke(app, ["keys", "create", "--name", "dana", "--scope", "review"])
    assert duplicate.exit_code == 1 and "revoke it first" in duplicate.stderr
    bad = runner.invoke(app, ["keys", "create", "--name", "eve", "--scope", "everything"])
    assert bad.exit_code == 1 and "scopes must be" in bad.stderr

    revoked = runner.invoke(app, ["keys", "revoke", "dana"])
    assert revoked.exit_code == 0 and "revoked key 'dana'" in revoked.stdout
    assert "dana" not in runner.invoke(app, ["keys", "list"]).stdout
    assert "revoked" in runner.invoke(app, ["keys", "list", "--all"]).stdout
    assert runner.invoke(app, ["keys", "revoke", "nobody"]).exit_code == 1
    engine = make_engine(clean_postgres)
    with session_scope(make_session_factory(engine)) as session:
        assert authenticate(session, key) is None
    engine.dispose()


def test_keys_commands_refuse_an_unmigrated_database(tmp_path, monkeypatch):
    monkeypatch.setenv("DFMOD_DATABASE_URL", f"sqlite:///{tmp_path}/empty.db")
    result = CliRunner().invoke(app, ["keys", "list"])
    assert result.exit_code == 1 and "dfmod migrate" in result.stderr
