"""Shared fixtures for the Helm chart tests.

The chart is rendered with Helm's own template engine (the Helm v4 Go SDK, bundled by PyPI's
``helm-python-sdk`` as a shared library; no helm binary, no cluster, no network). ``Chart.render``
coalesces values, validates them against values.schema.json and renders every template, hooks and
``helm test`` Pods included: the same steps as ``helm template``.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "dfmod"
CI_DIR = CHART_DIR / "ci"
RELEASE = "rel"
NAMESPACE = "dfmod-test"
# Scenarios that must exist under helm/dfmod/ci/ (more may be added; all are rendered and validated).
REQUIRED_SCENARIOS = {"default", "gpu", "keda", "hpa", "existing-secret"}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def scenario_names() -> list[str]:
    return sorted(path.name.removesuffix("-values.yaml") for path in CI_DIR.glob("*-values.yaml"))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge like repeated ``-f``/``--set`` flags: maps merge recursively, anything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class Rendered:
    """The manifests of one render, parsed."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.raw = manifests
        self.notes = ""
        self.docs: list[dict[str, Any]] = []
        self.sources: list[str] = []
        for template, text in sorted(manifests.items()):
            if template.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    self.docs.append(doc)
                    self.sources.append(template)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [doc for doc in self.of_kind(kind) if doc["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}: {self.names()}"
        return found[0]

    def maybe(self, kind: str, name: str) -> dict[str, Any] | None:
        found = [doc for doc in self.of_kind(kind) if doc["metadata"]["name"] == name]
        return found[0] if found else None

    def names(self) -> list[str]:
        return [f"{doc['kind']}/{doc['metadata']['name']}" for doc in self.docs]

    def pod_specs(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(owning document, pod spec) for every workload and bare Pod."""
        for doc in self.docs:
            if doc["kind"] in POD_KINDS:
                yield doc, doc["spec"]["template"]["spec"]
            elif doc["kind"] == "Pod":
                yield doc, doc["spec"]

    def secret_data(self, name: str) -> dict[str, str]:
        secret = self.get("Secret", name)
        return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}


class ChartUnderTest:
    """The chart, how to render it, and small accessors for rendered objects (tests reach them through
    the ``chart`` fixture, so no test imports this module)."""

    chart_dir = CHART_DIR
    ci_dir = CI_DIR
    root = ROOT
    release = RELEASE
    namespace = NAMESPACE
    required_scenarios = REQUIRED_SCENARIOS

    def __init__(self) -> None:
        self.chart = helm.Chart.load(str(CHART_DIR))
        self.fullname = f"{RELEASE}-dfmod"
        self.scenarios = scenario_names()

    @staticmethod
    def container(pod_spec: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        containers = pod_spec["containers"]
        if name is None:
            assert len(containers) == 1, [c["name"] for c in containers]
            return containers[0]
        return next(c for c in containers if c["name"] == name)

    @staticmethod
    def env(ctr: dict[str, Any]) -> dict[str, Any]:
        """Container env as name -> value (plain) or the valueFrom dict."""
        return {item["name"]: item.get("value", item.get("valueFrom")) for item in ctr.get("env", [])}

    @staticmethod
    def hooks(doc: dict[str, Any]) -> dict[str, str]:
        annotations = doc["metadata"].get("annotations") or {}
        return {key: value for key, value in annotations.items() if key.startswith("helm.sh/hook")}

    def scenario(self, name: str) -> dict[str, Any]:
        path = CI_DIR / f"{name}-values.yaml"
        return helm.values_from_yaml(path.read_text())

    def render_values(self, values: dict[str, Any]) -> Rendered:
        return Rendered(self.chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True))

    def render(self, scenario: str | None = "default", overrides: dict[str, Any] | None = None) -> Rendered:
        values = self.scenario(scenario) if scenario else {}
        return self.render_values(deep_merge(values, overrides or {}))


@pytest.fixture(scope="session")
def chart() -> ChartUnderTest:
    return ChartUnderTest()


@pytest.fixture(scope="session")
def rendered(chart: ChartUnderTest) -> dict[str, Rendered]:
    """Every ci/ scenario, rendered once per session."""
    return {name: chart.render(name) for name in scenario_names()}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking a ``scenario`` argument runs once per helm/dfmod/ci/*-values.yaml file."""
    if "scenario" in metafunc.fixturenames:
        metafunc.parametrize("scenario", scenario_names())
