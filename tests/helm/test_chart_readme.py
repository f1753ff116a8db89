"""The chart's README: its values table names every documented key of values.yaml with its current default,
and nothing else; the commands it shows use flags and values the chart has."""

from __future__ import annotations

import json
import re

import yaml


def _documented_keys(text: str) -> dict[str, object]:
    """Dotted key -> default, for every key of values.yaml with a `# --` comment above it."""
    lines = text.splitlines()
    values = yaml.safe_load(text)

    def walk(node, path=""):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{path}.{key.value}" if path else key.value
                yield dotted, key.start_mark.line
                yield from walk(value, dotted)

    documented = {}
    for dotted, line in walk(yaml.compose(text)):
        above = line - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            if lines[above].strip().startswith("# --"):
                value = values
                for part in dotted.split("."):
                    value = value[part]
                documented[dotted] = value
                break
            above -= 1
    return documented


def _table(readme: str) -> dict[str, str]:
    rows = re.findall(r"^\| `([^`]+)` \| `(.*?)` \| .+ \|$", readme[readme.index("## Values"):], re.MULTILINE)
    return dict(rows)


def test_values_table_matches_values_yaml(chart):
    documented = _documented_keys((chart.chart_dir / "values.yaml").read_text())
    table = _table((chart.chart_dir / "README.md").read_text())
    assert len(documented) > 150
    # Out of date? `python scripts/chart_values_table.py --write` regenerates the table.
    assert sorted(set(documented) - set(table)) == []  # a new key needs its row
    assert sorted(set(table) - set(documented)) == []  # a removed key loses its row
    for key, default in documented.items():
        shown = table[key]
        if shown != "see values.yaml":
            assert json.loads(shown) == default, key


def test_readme_examples_use_real_values(chart):
    readme = (chart.chart_dir / "README.md").read_text()
    values = yaml.safe_load((chart.chart_dir / "values.yaml").read_text())
    for dotted in re.findall(r"--set ([a-zA-Z.]+)=", readme):
        node = values
        for part in dotted.split("."):
            assert part in node, dotted
            node = node[part]
    assert f"activeDeadlineSeconds` ({values['migrations']['activeDeadlineSeconds']} s)" in readme
    assert values["workers"]["gpu"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
