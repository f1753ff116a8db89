"""`helm lint` through the SDK, Chart.yaml, values.yaml documentation and values.schema.json."""

from __future__ import annotations

import json
import re
import shutil

import helm_python as helm
import jsonschema
import yaml


def test_required_ci_scenarios_exist(chart):
    assert chart.required_scenarios <= set(chart.scenarios), chart.scenarios


def test_chart_metadata(chart):
    meta = yaml.safe_load((chart.chart_dir / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "dfmod" == chart.chart_dir.name
    assert meta["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+(-[0-9A-Za-z.-]+)?", str(meta["version"])), meta["version"]
    assert isinstance(meta["appVersion"], str) and meta["appVersion"]
    assert meta["kubeVersion"].startswith(">=")
    assert meta["description"]
    # What Helm itself loads must agree with the file.
    assert chart.chart.name == "dfmod"
    assert chart.chart.version == str(meta["version"])


def test_helm_lint_strict_every_scenario(chart, scenario):
    report = helm.lint(str(chart.chart_dir), chart.scenario(scenario), strict=True, namespace=chart.namespace)
    assert report["errors"] == [], report
    serious = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert serious == [], serious


def test_helm_lint_catches_a_broken_chart(chart, tmp_path):
    """The lint above can fail: a copy of the chart with a broken template and one with values the
    schema rejects are both reported. (Lint mode makes `fail`/`required` non-fatal, so missing
    credentials are tested by rendering, in test_helm_values.py.)"""
    broken = tmp_path / "dfmod"
    shutil.copytree(chart.chart_dir, broken)
    service = broken / "templates" / "api-service.yaml"
    service.write_text(service.read_text().replace("{{ .Values.api.service.type }}", "{{ .Values.api.service.type"))
    report = helm.lint(str(broken), chart.scenario("default"), strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"]), report

    bad_values = chart.scenario("default") | {"workers": {"cpu": {"batchSize": "lots"}}}
    report = helm.lint(str(chart.chart_dir), bad_values, strict=True)
    assert "batchSize" in json.dumps(report), report


def test_schema_is_a_valid_draft7_schema(chart):
    schema = json.loads((chart.chart_dir / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert chart.chart.schema == schema  # Helm loaded the same file


def _schema_at(schema: dict, node: dict) -> dict:
    ref = node.get("$ref")
    if ref:
        target = schema
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        return target
    return node


def _our_blocks(schema: dict, node: dict, path: str = ""):
    """Yield (path, schema) of every object block the chart defines itself (has fixed properties)."""
    node = _schema_at(schema, node)
    if node.get("type") == "object" and "properties" in node:
        yield path, node
        for key, child in node["properties"].items():
            yield from _our_blocks(schema, child, f"{path}.{key}" if path else key)


def test_schema_is_strict_for_own_blocks(chart):
    schema = json.loads((chart.chart_dir / "values.schema.json").read_text())
    blocks = dict(_our_blocks(schema, schema))
    for path in ["", "workers", "workers.cpu", "workers.gpu", "api", "keda", "keda.redis", "secrets", "config"]:
        assert path in blocks, path
    loose = [path or "<root>" for path, node in blocks.items() if node.get("additionalProperties") is not False]
    assert loose == []


def test_default_values_and_scenarios_validate_with_jsonschema(chart):
    """Independent of Helm: the defaults, and each scenario merged onto them, satisfy the schema."""
    schema = json.loads((chart.chart_dir / "values.schema.json").read_text())
    defaults = yaml.safe_load((chart.chart_dir / "values.yaml").read_text())
    jsonschema.validate(defaults, schema)
    for name in chart.scenarios:
        jsonschema.validate(chart.chart.merge_values(chart.scenario(name)), schema)


def _key_lines(node: yaml.Node, path: str = ""):
    """Yield (dotted path, 0-based line) of every mapping key in a composed YAML tree."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = f"{path}.{key_node.value}" if path else key_node.value
            yield key_path, key_node.start_mark.line, value_node
            yield from _key_lines(value_node, key_path)


def test_every_own_key_in_values_yaml_has_a_comment_above(chart):
    """prometheus-community style: a comment line right above every key of the chart's own blocks.

    Contents of free-form Kubernetes objects (resources, probes, securityContext, ...) are exempt.
    """
    text = (chart.chart_dir / "values.yaml").read_text()
    lines = text.splitlines()
    schema = json.loads((chart.chart_dir / "values.schema.json").read_text())
    own_blocks = {path for path, _ in _our_blocks(schema, schema)}
    undocumented = []
    checked = 0
    for key_path, line, _ in _key_lines(yaml.compose(text)):
        parent = key_path.rpartition(".")[0]
        if parent not in own_blocks:
            continue
        checked += 1
        above = lines[line - 1].strip() if line > 0 else ""
        if not above.startswith("#"):
            undocumented.append(f"{key_path} (line {line + 1})")
    assert checked > 100
    assert undocumented == []


def test_every_values_key_is_in_the_schema(chart):
    """values.yaml and values.schema.json describe the same keys (no stale schema, no undeclared value)."""
    schema = json.loads((chart.chart_dir / "values.schema.json").read_text())
    own_blocks = dict(_our_blocks(schema, schema))
    defaults = yaml.safe_load((chart.chart_dir / "values.yaml").read_text())

    def walk(values: dict, path: str):
        block = own_blocks[path]
        declared = set(block["properties"]) - {"global"}
        assert set(values) == declared, (path, set(values) ^ declared)
        for key, value in values.items():
            child = f"{path}.{key}" if path else key
            if child in own_blocks and isinstance(value, dict):
                walk(value, child)

    walk(defaults, "")
