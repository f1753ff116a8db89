"""``python -m dfmod`` runs the CLI (the embedded stack starts its worker this way)."""

from dfmod.cli import app

app()
