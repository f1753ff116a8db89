"""Print the project's dependencies from pyproject.toml, for the Dockerfile's cached dependency layers.

The image build installs dependencies from ``pyproject.toml`` alone, before the sources are copied, so a
code change rebuilds only the last layer. torch is split off (``--only torch`` / ``--exclude torch``) so the
CPU image can take it from the CPU wheel index and the CUDA image from PyPI. An image whose dependencies do
not include torch (the base install once the serving backends ship without it) gets an empty torch list and
no torch at all. Standard library only: it runs before anything is installed.

    python requirements.py --extras gpu --only torch
    python requirements.py --extras "" --exclude torch
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

#: Distributions that come from a torch wheel index rather than PyPI's defaults.
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """Base dependencies plus those of ``extras`` (missing extras are skipped), without the project itself."""
    project = pyproject["project"]
    own = requirement_name(project["name"])
    optional = project.get("optional-dependencies", {})
    found = list(project.get("dependencies", []))
    for extra in extras:
        if extra not in optional:
            print(f"requirements.py: no extra {extra!r} in pyproject.toml, skipped", file=sys.stderr)
            continue
        found += optional[extra]
    unique: dict[str, None] = {}
    for requirement in found:
        if requirement_name(requirement) != own:  # self-references such as dfmod[training]
            unique.setdefault(requirement.strip(), None)
    return list(unique)


def select(reqs: list[str], only: str | None = None, exclude: str | None = None) -> list[str]:
    family = {"torch": TORCH_FAMILY}
    if only:
        return [r for r in reqs if requirement_name(r) in family[only]]
    if exclude:
        return [r for r in reqs if requirement_name(r) not in family[exclude]]
    return reqs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--extras", default="", help="Comma-separated extras to include.")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--only", choices=["torch"])
    group.add_argument("--exclude", choices=["torch"])
    args = parser.parse_args(argv)
    pyproject = tomllib.loads(Path(args.pyproject).read_text())
    extras = [extra.strip() for extra in args.extras.split(",") if extra.strip()]
    for requirement in select(requirements(pyproject, extras), args.only, args.exclude):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
