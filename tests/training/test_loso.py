"""Leave-one-source-out runs (tiny), their table, and generated model-card sections."""

import json

import pytest
from typer.testing import CliRunner

from dfmod.training.modelcard import replace_section

from .conftest import make_dataset
from .test_mixing import write_manifest


@pytest.fixture
def sourced(tmp_path):
    root = make_dataset(tmp_path / "gans", per_class=6, size=48, seed=5)
    write_manifest(root, lambda split, label, name: (
        "cam" if label == "real" else ("gan-a" if int(name[-7:-4]) % 2 else "gan-b")))
    return root


@pytest.mark.slow
def test_loso_trains_without_each_group_and_scores_it(sourced, tmp_path):
    from dfmod.cli import app

    out = tmp_path / "loso"
    card = tmp_path / "card.md"
    card.write_text("# Card\n\nintro\n\n<!-- generated:loso -->\nold table\n<!-- /generated:loso -->\n\nafter\n")
    args = ["loso", str(sourced), "--out", str(out), "--holdout", "gan-a", "--epochs", "1", "--epoch-size", "8",
            "--batch-size", "4", "--image-size", "48", "--workers", "0", "--device", "cpu", "--no-progress",
            "--model-card", str(card)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "loso.json").read_text())
    (row,) = report["holdouts"]
    assert row["held_out"] == ["gan-a"] and row["n"] == 3 and row["n_fake"] == 3  # Test fakes 1, 3, 5
    assert "6 Test images of the other label" in row["roc_auc_against"]
    assert 0 <= row["roc_auc"] <= 1 and row["false_positive_rate"] is None
    # The run never saw gan-a: not in training, not in validation.
    from dfmod.detector import read_meta

    meta = read_meta(out / "without-gan-a" / "ckpt.safetensors")
    assert meta.extra["exclude_sources"] == ["gan-a"]
    assert "gan-a" not in json.dumps(meta.extra["train_groups"])
    text = card.read_text()
    assert "| gan-a | 3 |" in text and "old table" not in text and text.endswith("after\n")
    # Run again: the run resumes from its state instead of training again.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "loso.json").read_text())["holdouts"][0]["model_version"] == row["model_version"]


def test_loso_refuses_an_init_that_saw_the_held_out_source(sourced, tmp_path, trained):
    from dfmod.cli import app

    _, result = trained  # trained on a root named "tinyset"
    renamed = sourced.rename(sourced.parent / "tinyset")
    outcome = CliRunner().invoke(app, ["loso", str(renamed), "--out", str(tmp_path / "l"), "--holdout", "gan-a",
                                       "--init", str(result.checkpoint), "--device", "cpu", "--no-progress"])
    assert outcome.exit_code == 1 and "must not start from it" in outcome.output
    unknown = CliRunner().invoke(app, ["loso", str(renamed), "--out", str(tmp_path / "l"), "--holdout", "nope"])
    assert unknown.exit_code == 1 and "unknown source" in unknown.output


def test_model_card_sections_are_replaced_or_appended(tmp_path):
    card = tmp_path / "card.md"
    card.write_text("# Model\n")
    replace_section(card, "a", "first")
    replace_section(card, "b", "second")
    replace_section(card, "a", "third $1 \\g<0>")  # replacement text is literal
    text = card.read_text()
    assert text.count("<!-- generated:a -->") == 1 and "third $1 \\g<0>" in text and "first" not in text
    assert text.index("generated:a") < text.index("generated:b")
