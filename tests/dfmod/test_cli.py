"""The README's main command: ``dfmod up`` on embedded defaults (no Redis, Postgres or S3) classifies an
upload; and the CLI fails loudly without a model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import pytest

from tests.utils.processes import REPO_ROOT
from dfmod.loopback import free_port, wait_for_port
from tests.utils.images import make_image_bytes


def test_dfmod_up_runs_api_and_worker_on_embedded_defaults(tmp_path, checkpoint_path):
    port = free_port()
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")
    } | {"DFMOD_CHECKPOINT": str(checkpoint_path), "DFMOD_METRICS_PORT": str(free_port()), "DFMOD_TORCH_THREADS": "1"}
    log = open(tmp_path / "up.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dfmod", "up", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    try:
        wait_for_port(port, timeout=90)
        # `dfmod up` prints a key with every scope, as a notebook server prints its token.
        banner = re.search(r"key:\s+(dfmod_\S+)", (tmp_path / "up.log").read_text(errors="replace"))
        assert banner, (tmp_path / "up.log").read_text()[-3000:]
        headers = {"Authorization": f"Bearer {banner.group(1)}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as anonymous:
            assert anonymous.post("/v1/images", files={"file": ("a.jpg", make_image_bytes(), "image/jpeg")}).status_code == 401
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers) as client:
            assert client.get("/v1/whoami").json()["scopes"] == ["admin", "ingest", "review"]
            accepted = client.post("/v1/images", files={"file": ("a.jpg", make_image_bytes(), "image/jpeg")})
            assert accepted.status_code == 202, accepted.text
            item_id = accepted.json()["id"]
            deadline = time.monotonic() + 60
            item = {}
            while time.monotonic() < deadline:
                item = client.get(f"/v1/images/{item_id}").json()
                if item["status"] in ("classified", "failed"):
                    break
                time.sleep(0.3)
            assert item["status"] == "classified", (item, (tmp_path / "up.log").read_text()[-3000:])
            assert item["verdict"]["model_version"] == "test-random-0001"
            assert client.get("/readyz").json()["ready"] is True
        assert (tmp_path / "data" / "dfmod.db").is_file()
        assert list((tmp_path / "data" / "objects" / "uploads").rglob("*.jpg"))
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_worker_without_a_model_says_so_and_exits(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
        "DFMOD_CHECKPOINT": str(tmp_path / "missing.safetensors"), "DFMOD_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "dfmod", "worker"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 1
    assert "model checkpoint not found" in result.stderr


def test_migrate_command_brings_a_fresh_database_to_head(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
        "DFMOD_DATABASE_URL": f"sqlite:///{tmp_path}/m.db",
    }
    result = subprocess.run([sys.executable, "-m", "dfmod", "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from dfmod.migrate import head_revision

    assert f"database at revision {head_revision()}" in result.stdout
