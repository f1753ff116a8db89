"""The README's main command: ``dfmod up`` on embedded defaults (no Redis, Postgres or S3) classifies an
upload; and the CLI fails loudly without a model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from dfmod.loopback import free_port, start_child, wait_for_port
from tests.utils.images import make_image_bytes
from tests.utils.processes import REPO_ROOT


def test_dfmod_up_runs_api_and_worker_on_embedded_defaults(tmp_path, checkpoint_path):
    port = free_port()
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")
    } | {"DFMOD_CHECKPOINT": str(checkpoint_path), "DFMOD_METRICS_PORT": str(free_port()), "DFMOD_TORCH_THREADS": "1"}
    log = open(tmp_path / "up.log", "wb")
    process = start_child(
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
            whoami = client.get("/v1/whoami").json()
            assert whoami["scopes"] == ["admin", "ingest", "review"] and whoami["tenant"] == "default"
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
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) == 2, children  # the classify worker and the events worker
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    # SIGTERM stops the workers with the API: nothing is left running.
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive


def test_dfmod_up_restarts_a_crashed_worker_and_its_workers_die_with_it(tmp_path, checkpoint_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
        "DFMOD_CHECKPOINT": str(checkpoint_path), "DFMOD_TORCH_THREADS": "1",
    }
    log = open(tmp_path / "up.log", "wb")
    process = start_child(
        [sys.executable, "-m", "dfmod", "up", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    workers: list = []
    try:
        wait_for_port(port, timeout=90)
        up = psutil.Process(process.pid)
        workers = up.children()
        assert len(workers) == 2
        crashed = workers[0]
        crashed.kill()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            current = [child for child in up.children() if child.is_running()]
            if len(current) == 2 and crashed.pid not in {child.pid for child in current}:
                break
            time.sleep(0.5)
        current = up.children()
        assert len(current) == 2 and crashed.pid not in {c.pid for c in current}, (tmp_path / "up.log").read_text()[-3000:]
        workers = current
        # The worker's metrics bind loopback only.
        listening = {conn.laddr.ip for child in workers for conn in child.net_connections("inet") if conn.status == "LISTEN"}
        assert listening <= {"127.0.0.1"}, listening
        # `dfmod up` killed outright (no chance to clean up): the kernel takes its workers down too.
        process.kill()
        process.wait(timeout=10)
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, alive
    finally:
        if process.poll() is None:
            process.kill()
        for child in workers:
            if child.is_running():
                child.kill()
        log.close()


def test_every_command_finds_the_embedded_data_from_any_directory(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")}
    data = tmp_path / "data"
    migrate = subprocess.run(
        [sys.executable, "-m", "dfmod", "--data-dir", str(data), "migrate"], env=env, capture_output=True, text=True,
        timeout=120, cwd=tmp_path,
    )
    assert migrate.returncode == 0, migrate.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    created = subprocess.run(
        [sys.executable, "-m", "dfmod", "--data-dir", str(data), "keys", "create", "--name", "ops", "--scope", "ingest"],
        env=env, capture_output=True, text=True, timeout=120, cwd=elsewhere,
    )
    assert created.returncode == 0, created.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "dfmod", "keys", "list"], env=env | {"DFMOD_DATA_DIR": str(data)}, capture_output=True,
        text=True, timeout=120, cwd=elsewhere,
    )
    assert listed.returncode == 0 and "ops" in listed.stdout, listed.stderr
    assert not (elsewhere / "dfmod-data").exists()


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


@pytest.mark.parametrize("command", ["api", "worker"])
def test_long_running_commands_spell_the_log_level_option_one_way(command):
    from typer.testing import CliRunner

    from dfmod.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, [command, "--help"], terminal_width=200).output
    assert "--log-level" in help_text and "--loglevel" not in help_text
    refused = runner.invoke(app, [command, "--log-level", "chatty"])
    assert refused.exit_code != 0 and "--log-level" in refused.output


def test_tenants_and_tenant_keys_from_the_command_line(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DFMOD_")} | {
        "DFMOD_DATA_DIR": str(tmp_path / "data"),
    }

    def dfmod(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "dfmod", *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        assert result.returncode == 0, (args, result.stderr)
        return result

    dfmod("migrate")
    created = dfmod("tenants", "create", "--name", "platform-x", "--callback-url", "https://x.example/hook",
                    "--bucket", "x-uploads")
    token = re.search(r"events token:\s+(dfmodev_\S+)", created.stdout)
    secret = re.search(r"callback secret:\s+(whsec_\S+)", created.stdout)
    assert token and secret, created.stdout
    # Embedded: the key that encrypts callback secrets was made beside the database, readable by its owner only.
    assert oct((tmp_path / "data" / "secret.key").stat().st_mode & 0o777) == "0o600"
    assert secret.group(1) not in (tmp_path / "data" / "dfmod.db").read_bytes().decode("latin-1")

    key = dfmod("keys", "create", "--name", "x-ingest", "--scope", "ingest", "--tenant", "platform-x")
    assert "tenants platform-x" in key.stderr and key.stdout.strip().startswith("dfmod_")
    listed = dfmod("tenants", "list").stdout
    assert "platform-x" in listed and "x-uploads" in listed and "default" in listed
    assert token.group(1) not in listed and secret.group(1) not in listed

    rotated = dfmod("tenants", "update", "platform-x", "--rotate-callback-secret", "--overlap", "60", "--add-bucket", "x-2")
    new_secret = re.search(r"callback secret:\s+(whsec_\S+)", rotated.stdout)
    assert new_secret and new_secret.group(1) != secret.group(1)
    assert "x-2" in dfmod("tenants", "list").stdout

    dfmod("tenants", "disable", "platform-x")
    assert "disabled" in dfmod("tenants", "list").stdout
    refused = subprocess.run(
        [sys.executable, "-m", "dfmod", "keys", "create", "--name", "late", "--scope", "ingest", "--tenant", "platform-x"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert refused.returncode == 1 and "disabled" in refused.stderr
