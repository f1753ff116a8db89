"""Generated sections of the model card: commands rewrite the text between their markers, nothing else.

A section named ``NAME`` lies between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in the
card; the commands that measure figures (``dfmod evaluate --model-card``, ``dfmod loso --model-card``)
replace it, so the card's figures always come from the last run of the documented command. A missing
section is appended at the end of the card.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"


def replace_section(card: Path, name: str, markdown: str) -> None:
    card = Path(card)
    begin, end = _markers(name)
    text = card.read_text() if card.is_file() else ""
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    tmp = card.with_name(card.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, card)


def section_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
