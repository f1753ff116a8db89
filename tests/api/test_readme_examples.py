"""The README's register and S3-event examples, exactly as written there, on ``dfmod up``'s embedded
backends (SQLite, a local folder, the filesystem broker) with the settings the README says to start it with."""

from __future__ import annotations

import json
import os
import re
import shutil

from fastapi.testclient import TestClient

from api.main import create_app
from dfmod import migrate
from dfmod.db import make_engine, make_session_factory, session_scope
from dfmod.keys import create_key
from dfmod.settings import Settings
from tests.utils.images import make_image_bytes
from tests.utils.processes import REPO_ROOT
from tests.utils.records import bearer


def _readme_examples() -> tuple[dict[str, str], dict, dict]:
    readme = (REPO_ROOT / "README.md").read_text()
    start = re.search(r"^(DFMOD_\S+=\S+(?: DFMOD_\S+=\S+)*) \.venv/bin/dfmod up$", readme, re.MULTILINE)
    assert start, "the README shows how to start dfmod up for the register and event examples"
    env = dict(part.split("=", 1) for part in start.group(1).split())
    register = re.search(r"-d '(\{\"bucket\".*?\})' http://127\.0\.0\.1:8000/v1/images:register", readme)
    event = re.search(r"-d '(\{\"Records\".*?\})' \\\s*\n\s*http://127\.0\.0\.1:8000/v1/events/s3", readme, re.DOTALL)
    assert register and event, "the README's register and event examples were not found"
    return env, json.loads(register.group(1)), json.loads(event.group(1))


def test_the_readme_register_and_event_examples_work_on_embedded_defaults(tmp_path, monkeypatch):
    env, register_body, event_body = _readme_examples()
    for name in [name for name in os.environ if name.startswith("DFMOD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings(data_dir=tmp_path / "dfmod-data")
    migrate.upgrade(settings)
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        key = create_key(session, "dfmod-up", ["ingest", "review", "admin"]).plaintext
    engine.dispose()
    # The README's `mkdir` and `cp face.jpg` steps.
    bucket_dir = settings.local_storage_root / register_body["bucket"]
    (bucket_dir / "u/123").mkdir(parents=True)
    (bucket_dir / register_body["key"]).write_bytes(make_image_bytes())
    shutil.copy(bucket_dir / register_body["key"], bucket_dir / "u/123/my photo.jpg")

    with TestClient(create_app(settings)) as client:
        registered = client.post("/v1/images:register", json=register_body, headers=bearer(key))
        assert registered.status_code == 202, registered.text
        events = client.post(
            "/v1/events/s3", json=event_body, headers={"Authorization": f"Bearer {env['DFMOD_S3_EVENT_TOKEN']}"}
        )
        assert events.status_code == 202, events.text
        assert events.json()["records"][0]["key"] == "u/123/my photo.jpg"
        assert events.json()["accepted"] == 1
