"""Training end to end on tiny synthetic data: outputs, learning, checkpoints, resume, init and fp16 export."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dfmod.detector import IMAGENET_MEAN, IMAGENET_STD, Predictor, load_checkpoint, read_meta, weights_digest
from dfmod.training.calibration import margins_from_probabilities, sigmoid
from dfmod.training.data import Augmentation
from dfmod.training.train import TrainingError, train

from .conftest import make_dataset, tiny_config

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs ``python -m dfmod.training ARGS`` for each ARGS list in argv[1] (JSON), in one interpreter (one torch
# import), with the service-only dependencies made unimportable, as on the GPU training machine.
WITHOUT_SERVICE_DEPS = """
import importlib.abc, json, runpy, sys
FORBIDDEN = {"pydantic_settings", "celery", "sqlalchemy", "fastapi", "boto3"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError("training must not import " + name)
sys.meta_path.insert(0, Block())
for args in json.loads(sys.argv[1]):
    sys.argv = ["dfmod.training", *args]
    try:
        runpy.run_module("dfmod.training", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code:
            raise
"""


def run_module(*commands: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_SERVICE_DEPS, json.dumps(commands)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_one_epoch_end_to_end_via_python_m(tiny_data, tmp_path):
    out = tmp_path / "run" / "ckpt.safetensors"
    report = tmp_path / "report"
    done = run_module(
        ["train", str(tiny_data), "--out", str(out), "--epochs", "1", "--image-size", "64", "--batch-size", "8",
         "--workers", "1", "--limit-per-class", "6", "--device", "cpu"],
        ["evaluate", str(tiny_data / "Test"), "--checkpoint", str(out), "--report", str(report), "--device", "cpu"],
    )
    assert done.returncode == 0, done.stderr
    assert "model version mnv4s-tinyset-" in done.stdout
    for name in ("ckpt.safetensors", "ckpt.state.pt", "ckpt.metrics.csv", "ckpt.metrics.json"):
        assert (out.parent / name).is_file(), name
    with (out.parent / "ckpt.metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1"]
    assert float(rows[0]["train_loss"]) > 0 and 0 <= float(rows[0]["val_roc_auc"]) <= 1
    meta = read_meta(out)
    assert meta.extra["train_images"] == 12 and meta.extra["val_images"] == 12  # --limit-per-class 6
    assert meta.input_size == [3, 64, 64]
    assert json.loads((report / "report.json").read_text())["n"] == 16


@pytest.mark.slow
def test_loss_falls_and_validation_separates_an_easy_set(tmp_path):
    data = make_dataset(tmp_path / "easy", per_class=32, splits=("Train", "Validation"))
    result = train(tiny_config(data, tmp_path / "run" / "ckpt.safetensors", epochs=6, batch_size=16))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0]
    best = result.meta.extra["val_metrics"]
    assert best["roc_auc"] >= 0.95
    assert best["accuracy_at_threshold"] >= 0.9
    assert result.best_epoch == max(result.history, key=lambda r: (r["val_roc_auc"], -r["val_loss"]))["epoch"]


def test_checkpoint_round_trips_with_metadata(trained):
    data, result = trained
    model, meta = load_checkpoint(result.checkpoint)
    assert meta == read_meta(result.checkpoint)
    assert meta.threshold == pytest.approx(result.threshold)
    assert meta.threshold_rule.startswith("f1: maximum F1 on validation")
    assert re.fullmatch(r"mnv4s-tinyset-\d{8}-[0-9a-f]{8}", meta.model_version)
    assert meta.model_version.endswith(weights_digest(load_file(str(result.checkpoint)))[:8])
    assert (meta.mean, meta.std, meta.input_size) == (list(IMAGENET_MEAN), list(IMAGENET_STD), [3, 64, 64])
    assert meta.drop_rate == 0.2
    extra = meta.extra
    assert (extra["epochs_trained"], extra["best_epoch"], extra["dataset"]) == (1, 1, "tinyset")
    assert extra["augmentation"] == Augmentation().as_dict()
    assert extra["val_metrics"]["roc_auc"] == pytest.approx(result.history[0]["val_roc_auc"])
    assert extra["device"] == "cpu" and extra["stored_dtype"] == "float32"
    assert str(data.parent) not in json.dumps(extra)  # no machine paths inside a shipped checkpoint
    # The checkpoint holds exactly the trained weights (after one epoch, best == last).
    last = torch.load(result.state, map_location="cpu", weights_only=True)["model"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, last[name]), name
    assert Predictor(result.checkpoint, device="cpu").threshold == pytest.approx(meta.threshold)


def test_metrics_are_logged_beside_the_checkpoint(trained):
    _, result = trained
    logged = json.loads(result.metrics_json.read_text())
    assert logged["best_epoch"] == 1 and logged["model_version"] == result.model_version
    assert logged["threshold"] == pytest.approx(result.threshold)
    assert logged["temperature"] == pytest.approx(result.meta.temperature)
    assert logged["history"][0]["val_loss"] == pytest.approx(result.history[0]["val_loss"])
    with result.metrics_csv.open() as handle:
        row = next(csv.DictReader(handle))
    # Per-epoch rows hold uncalibrated figures; the checkpoint's threshold is the same cut on the calibrated scale.
    uncalibrated = margins_from_probabilities([float(row["val_threshold"])])
    assert sigmoid(uncalibrated, result.meta.temperature)[0] == pytest.approx(result.threshold)


def test_resume_continues_from_the_saved_epoch(tiny_data, tmp_path):
    straight = train(tiny_config(tiny_data, tmp_path / "a" / "ckpt.safetensors", epochs=2))
    first = train(tiny_config(tiny_data, tmp_path / "b" / "ckpt.safetensors", epochs=1))
    resumed = train(tiny_config(tiny_data, tmp_path / "b" / "ckpt.safetensors", epochs=2, resume=first.state))

    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert resumed.history[0] == first.history[0]  # epoch 1 was not trained again (same timings, same numbers)
    # Model, optimizer and seeds were restored: epoch 2 is the epoch 2 of an uninterrupted run.
    assert resumed.history[1]["train_loss"] == pytest.approx(straight.history[1]["train_loss"], rel=1e-4)
    assert resumed.history[1]["val_loss"] == pytest.approx(straight.history[1]["val_loss"], rel=1e-4)
    assert torch.load(resumed.state, weights_only=True)["epoch"] == 2
    assert read_meta(resumed.checkpoint).extra["epochs_trained"] == 2

    with pytest.raises(TrainingError, match="image_size"):
        train(tiny_config(tiny_data, tmp_path / "c" / "ckpt.safetensors", epochs=3, image_size=32,
                          resume=resumed.state))


def test_init_weights_half_export_and_fpr_rule(tiny_data, tmp_path):
    import timm

    reference = timm.create_model("mobilenetv4_conv_small", num_classes=1000)
    init = tmp_path / "imagenet.pth"
    torch.save(reference.state_dict(), init)
    # A vanishing learning rate keeps the weights at their starting point, so we can see where they came from.
    result = train(tiny_config(tiny_data, tmp_path / "run" / "ckpt.safetensors", init=init, lr=1e-10, half=True,
                               threshold_rule="fpr", target_fpr=0.0))

    stored = load_file(str(result.checkpoint))
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    assert torch.allclose(stored["conv_stem.weight"].float(), reference.state_dict()["conv_stem.weight"], atol=2e-3)
    assert stored["classifier.weight"].shape == (2, 1280)
    assert result.model_version.endswith(weights_digest(stored)[:8])

    model, meta = load_checkpoint(result.checkpoint)
    assert meta.extra["init"] == "imagenet.pth" and meta.extra["stored_dtype"] == "float16"
    assert meta.threshold_rule.startswith("fpr<=0: lowest threshold")
    assert result.history[0]["val_fpr_at_threshold"] == 0
    assert next(model.parameters()).dtype == torch.float32  # loads back as fp32 for inference


def test_bad_options_fail_before_training(tiny_data, tmp_path):
    with pytest.raises(TrainingError, match="--init checkpoint .* does not exist"):
        train(tiny_config(tiny_data, tmp_path / "c.safetensors", init=tmp_path / "missing.pth"))
    with pytest.raises(TrainingError, match="--threshold-rule"):
        train(tiny_config(tiny_data, tmp_path / "c.safetensors", threshold_rule="youden"))
