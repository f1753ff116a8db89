"""``dfmod evaluate``: report contents, plots, per-source metrics, unreadable files and CLI errors."""

import csv
import json

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from dfmod.detector import Predictor, read_meta
from dfmod.imaging import ImageLimits, decode_image
from dfmod.training.evaluate import evaluate, report_markdown

from .conftest import make_dataset

TOP_LEVEL = ("n", "threshold", "loss", "accuracy", "precision", "recall", "f1", "roc_auc", "average_precision", "eer")


@pytest.fixture
def eval_folder(tmp_path):
    """Test/ with 6 real and 6 fake 80x80 JPEGs, a large RGBA PNG, a broken file and a manifest beside it."""
    root = make_dataset(tmp_path / "evalset", per_class=6, size=80, splits=("Test",), seed=3)
    test = root / "Test"
    rgba = np.random.default_rng(1).integers(0, 255, size=(200, 300, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(test / "Real" / "portrait.png")
    (test / "Fake" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    rows = [("split", "label", "source", "file")]
    for path in sorted((test / "Real").iterdir()):
        rows.append(("Test", "real", "camera-a" if path.name < "real_test_003.jpg" and path.name.startswith("real") else "camera-b", path.name))
    for path in sorted((test / "Fake").iterdir()):
        rows.append(("Test", "fake", "gan", path.name))
    rows.append(("Train", "fake", "wrong-split", "real_test_000.jpg"))  # same name in another split: ignored
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return test


def test_report_has_metrics_plots_and_per_source(trained, eval_folder, tmp_path):
    _, result = trained
    report_dir = tmp_path / "report"
    report = evaluate(eval_folder, result.checkpoint, report_dir, device="cpu", workers=0, progress=False)

    on_disk = json.loads((report_dir / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in TOP_LEVEL:
        assert key in on_disk, key
    assert on_disk["n"] == 13 and (on_disk["n_real"], on_disk["n_fake"]) == (7, 6)
    assert on_disk["threshold"] == pytest.approx(read_meta(result.checkpoint).threshold)
    for key in TOP_LEVEL[2:]:
        assert 0 <= on_disk[key] <= 1 or key == "loss", key
    assert on_disk["at_0.5"]["confusion_matrix"]["matrix"]
    assert on_disk["model_version"] == result.model_version

    assert on_disk["unreadable"]["count"] == 1
    assert on_disk["unreadable"]["files"][0]["file"] == "Fake/broken.jpg"

    for name in ("confusion_matrix.png", "roc_curve.png"):
        with Image.open(report_dir / name) as image:
            assert image.format == "PNG" and image.width > 200

    per_source = on_disk["per_source"]
    assert set(per_source) == {"camera-a", "camera-b", "gan"}
    assert sum(entry["n"] for entry in per_source.values()) == 13
    assert per_source["camera-a"]["n"] == 3  # the Train row with the same name did not move a file
    assert per_source["gan"]["roc_auc"] is None and per_source["gan"]["eer"] is None
    assert per_source["camera-b"]["recall"] is None and per_source["camera-b"]["false_positive_rate"] is not None
    for real_only in ("camera-a", "camera-b"):  # precision and F1 are undefined without fakes: null, not 0.0
        assert per_source[real_only]["precision"] is None and per_source[real_only]["f1"] is None
        assert per_source[real_only]["at_0.5"]["precision"] is None

    # Calibration beside the ROC: ECE, the reliability bins and plot, and the checkpoint's operating points.
    meta = read_meta(result.checkpoint)
    calibration = on_disk["calibration"]
    assert 0 <= calibration["ece"] <= 1 and calibration["temperature"] == pytest.approx(meta.temperature)
    assert sum(row["count"] for row in calibration["reliability"]) == 13
    assert set(on_disk["operating_points"]) == {"fpr_1", "fpr_5", "balanced"}
    assert on_disk["operating_points"]["fpr_1"]["threshold"] == pytest.approx(meta.operating_points["fpr_1"]["threshold"])
    with Image.open(report_dir / "reliability.png") as image:
        assert image.format == "PNG"
    card = report_markdown(on_disk, "evalset Test")
    assert "| fpr_1 |" in card and "| **all** | 13 |" in card
    camera_b = next(line for line in card.splitlines() if line.startswith("| camera-b |"))
    assert camera_b.split("|")[7:9] == [" n/a ", " n/a "]  # precision and F1 of a real-only source

    # predictions.csv agrees with the report and with the worker's own path (decode -> preprocess -> Predictor).
    with (report_dir / "predictions.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if not row["error"]]
    correct = sum(row["predicted"] == row["label"] for row in rows)
    assert correct / len(rows) == pytest.approx(on_disk["accuracy"])
    predictor = Predictor(result.checkpoint, device="cpu")
    png = eval_folder / "Real" / "portrait.png"
    image = decode_image(png.read_bytes(), ImageLimits(), target=predictor.meta.image_size)
    expected = float(predictor.predict_images([image])[0])
    logged = next(float(row["p_fake"]) for row in rows if row["file"] == "Real/portrait.png")
    assert logged == pytest.approx(expected, abs=1e-5)


def test_without_manifest_there_is_no_per_source(trained, tmp_path):
    data, result = trained
    folder = make_dataset(tmp_path / "plain", per_class=3, splits=("Test",)) / "Test"
    report = evaluate(folder, result.checkpoint, tmp_path / "r", device="cpu", workers=0, progress=False)
    assert report["per_source"] is None and report["manifest"] is None
    assert report["n"] == 6 and report["unreadable"]["count"] == 0


def _app():
    from dfmod.training.commands import evaluate_command, train_command

    app = typer.Typer()
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    return app


def test_cli_prints_a_metrics_table(trained, eval_folder, tmp_path):
    _, result = trained
    outcome = CliRunner().invoke(_app(), ["evaluate", str(eval_folder), "--checkpoint", str(result.checkpoint),
                                          "--report", str(tmp_path / "r"), "--workers", "0", "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    for label in ("accuracy", "precision", "recall", "F1", "ROC-AUC", "EER", "camera-a", "gan"):
        assert label in outcome.output, label
    assert (tmp_path / "r" / "report.json").is_file()


def test_cli_without_a_shipped_model_says_so(monkeypatch, eval_folder, tmp_path):
    import dfmod.detector

    monkeypatch.setattr(dfmod.detector, "default_checkpoint_path", lambda: tmp_path / "absent.safetensors")
    outcome = CliRunner().invoke(_app(), ["evaluate", str(eval_folder), "--report", str(tmp_path / "r")])
    assert outcome.exit_code == 1
    assert "ships no trained model" in outcome.output
    assert "Traceback" not in outcome.output
