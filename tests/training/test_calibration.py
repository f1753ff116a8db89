"""Temperature scaling, ECE, operating points, the calibrated service probability and ``dfmod calibrate``."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dfmod.detector import (
    ModelMeta,
    ModelNotAvailable,
    Predictor,
    decision_threshold,
    fake_probabilities,
    read_meta,
)
from dfmod.training import calibration


def overconfident(n: int = 4000, seed: int = 0):
    """Labels and margins of a model whose true margins are scaled up 3x (over-confident): T should be ~3."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    true_margin = rng.normal(np.where(labels == 1, 1.0, -1.0), 1.0)
    # Draw labels from the true probabilities, so sigmoid(true_margin) is calibrated by construction.
    labels = (rng.random(n) < calibration.sigmoid(true_margin)).astype(np.int64)
    return labels, 3.0 * true_margin


def test_temperature_recovers_the_overconfidence_and_lowers_ece():
    labels, margins = overconfident()
    temperature, record, points = calibration.calibrate(labels, margins)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert record["ece_after"] < record["ece_before"] / 2 and record["ece_after"] < 0.03
    assert record["nll_after"] < record["nll_before"]
    # Operating points keep their promise on the data they were chosen on.
    assert points["fpr_1"]["false_positive_rate"] <= 0.01
    assert points["fpr_5"]["false_positive_rate"] <= 0.05
    assert points["fpr_1"]["threshold"] >= points["fpr_5"]["threshold"]
    assert points["balanced"]["balanced_accuracy"] >= points["fpr_1"]["balanced_accuracy"]


def test_ece_of_a_perfectly_calibrated_constant_is_zero():
    labels = np.array([1, 0, 0, 0] * 25)
    assert calibration.expected_calibration_error(labels, np.full(100, 0.25)) == pytest.approx(0.0)
    assert calibration.expected_calibration_error(labels, np.full(100, 0.75)) == pytest.approx(0.5)


def test_service_probability_applies_the_temperature_without_saturating():
    logits = torch.tensor([[0.0, 2.0], [3.0, 0.0], [0.0, 80.0]])
    assert fake_probabilities(logits) == pytest.approx(torch.softmax(logits, 1)[:, 1].numpy(), abs=1e-6)
    assert fake_probabilities(logits, 2.0)[:2] == pytest.approx(torch.softmax(logits[:2] / 2, 1)[:, 1].numpy(),
                                                              abs=1e-6)
    assert np.isfinite(fake_probabilities(np.array([[1e4, -1e4]]), 0.5)).all()


def test_operating_point_setting_picks_the_stored_threshold():
    meta = ModelMeta(threshold=0.4, operating_points={"fpr_1": {"threshold": 0.9}, "balanced": {"threshold": 0.5}})
    assert decision_threshold(meta) == 0.4
    assert decision_threshold(meta, "fpr_1") == 0.9
    assert decision_threshold(meta, "fpr_1", override=0.2) == 0.2  # an explicit threshold wins
    with pytest.raises(ModelNotAvailable, match="no operating point 'fpr_9'.*balanced, fpr_1"):
        decision_threshold(meta, "fpr_9")


def test_trained_checkpoint_is_calibrated_and_served_calibrated(trained):
    data, result = trained
    meta = read_meta(result.checkpoint)
    assert meta.temperature > 0 and meta.calibration["n"] == 16
    assert set(meta.operating_points) == {"fpr_1", "fpr_5", "balanced"}
    assert meta.threshold_rule.endswith("(calibrated probability)")
    predictor = Predictor(result.checkpoint, device="cpu", operating_point="fpr_5")
    assert predictor.threshold == pytest.approx(meta.operating_points["fpr_5"]["threshold"])
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    logits = predictor.logits(pixels)
    assert predictor.predict_pixels(pixels) == pytest.approx(
        torch.softmax(torch.from_numpy(logits).double() / meta.temperature, 1)[:, 1].numpy(), abs=1e-6)


def test_calibrate_command_adds_calibration_and_keeps_weights_and_decisions(trained, tmp_path):
    from dfmod.cli import app

    data, result = trained
    plain = tmp_path / "plain.safetensors"
    # An uncalibrated checkpoint, as the shipped one was: same weights, temperature 1.
    from dataclasses import replace

    from safetensors.torch import save_file

    original = read_meta(result.checkpoint)
    save_file(load_file(str(result.checkpoint)), str(plain),
              metadata={"dfmod": replace(original, temperature=1.0, calibration={}, operating_points={},
                                         threshold=0.5).to_json()})
    out = tmp_path / "calibrated.safetensors"
    outcome = CliRunner().invoke(app, ["calibrate", str(plain), str(data), "--out", str(out), "--device", "cpu",
                                       "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    assert "temperature" in outcome.output and "fpr_1" in outcome.output
    meta = read_meta(out)
    assert meta.model_version.startswith(original.model_version + "-cal")
    assert set(meta.operating_points) == {"fpr_1", "fpr_5", "balanced"}
    before, after = load_file(str(plain)), load_file(str(out))
    assert all(torch.equal(before[name], after[name]) for name in before)
    # --threshold-rule keep: the same images are flagged before and after.
    images = np.random.default_rng(1).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    old = Predictor(plain, device="cpu")
    new = Predictor(out, device="cpu")
    assert [old.label_for(p) for p in old.predict_pixels(images)] == [new.label_for(p) for p in new.predict_pixels(images)]
    again = CliRunner().invoke(app, ["calibrate", str(out), str(data), "--out", str(tmp_path / "twice.safetensors")])
    assert again.exit_code == 1 and "calibrated already" in again.output
