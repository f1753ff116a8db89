"""Print (or, with --write, refresh) the values table of helm/dfmod/README.md from values.yaml's `# --` comments.

    python scripts/chart_values_table.py --write

tests/helm/test_chart_readme.py fails when the table and values.yaml disagree; this makes them agree.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "dfmod"
HEADER = "| key | default | description |"


def rows(text: str) -> list[tuple[str, str, str]]:
    lines = text.splitlines()
    values = yaml.safe_load(text)

    def walk(node, path=""):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{path}.{key.value}" if path else key.value
                yield dotted, key.start_mark.line
                yield from walk(value, dotted)

    found = []
    for dotted, line in walk(yaml.compose(text)):
        block, above = [], line - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            block.insert(0, lines[above].strip())
            above -= 1
        start = next((n for n, comment in enumerate(block) if comment.startswith("# --")), None)
        if start is None:
            continue
        description = " ".join(c.lstrip("#").strip() for c in block[start:]).removeprefix("--").strip()
        value = values
        for part in dotted.split("."):
            value = value[part]
        default = json.dumps(value, separators=(", ", ": "))
        found.append((dotted, default if len(default) <= 60 else "see values.yaml", description.replace("|", "\\|")))
    return found


def table(text: str) -> str:
    out = [HEADER, "| --- | --- | --- |"]
    out += [f"| `{key}` | `{default}` | {description} |" for key, default, description in rows(text)]
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table at the end of the chart README")
    args = parser.parse_args()
    rendered = table((CHART / "values.yaml").read_text())
    if not args.write:
        print(rendered, end="")
        return 0
    readme = CHART / "README.md"
    text = readme.read_text()
    readme.write_text(text[: text.index(HEADER)] + rendered)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
