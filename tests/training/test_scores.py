"""Metrics and threshold rules against values worked out by hand."""

import math

import numpy as np
import pytest

from dfmod.training import scores

# Four real and four fake images. At threshold 0.5: the real 0.6 is a false positive, the fake 0.4 a miss.
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]
PROBS = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]


def test_threshold_metrics_match_hand_counts():
    result = scores.threshold_metrics(LABELS, PROBS, 0.5)
    matrix = result["confusion_matrix"]
    assert (matrix["tn"], matrix["fp"], matrix["fn"], matrix["tp"]) == (3, 1, 1, 3)
    assert matrix["matrix"] == [[3, 1], [1, 3]]
    assert result["accuracy"] == pytest.approx(6 / 8)
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(3 / 4)
    assert result["f1"] == pytest.approx(3 / 4)
    assert result["false_positive_rate"] == pytest.approx(1 / 4)


def test_threshold_is_inclusive_like_the_service():
    # prob >= threshold is "fake" (Predictor.label_for): the real image at exactly 0.6 is flagged.
    result = scores.threshold_metrics(LABELS, PROBS, 0.6)
    assert result["confusion_matrix"]["fp"] == 1
    assert result["confusion_matrix"]["tp"] == 3
    assert result["recall"] == pytest.approx(3 / 4)


def test_ranking_metrics_match_hand_values():
    result = scores.ranking_metrics(LABELS, PROBS)
    # 15 of the 16 (fake, real) pairs are ordered correctly: only fake 0.4 < real 0.6.
    assert result["roc_auc"] == pytest.approx(15 / 16)
    # Ranked: F F F R F ...; precision at each fake: 1, 1, 1, 4/5.
    assert result["average_precision"] == pytest.approx((1 + 1 + 1 + 0.8) / 4)
    # At threshold 0.6 one real in four is flagged and one fake in four missed.
    assert result["eer"] == pytest.approx(0.25)
    assert result["eer_threshold"] == pytest.approx(0.6)


def test_equal_error_rate_interpolates_between_roc_points():
    # Thresholds 0.7 -> (FPR 1/3, FNR 1/2) and 0.6 -> (FPR 1/3, FNR 0): the rates cross at 1/3.
    eer, _ = scores.equal_error_rate([0, 0, 0, 1, 1], [0.1, 0.5, 0.7, 0.6, 0.9])
    assert eer == pytest.approx(1 / 3)


def test_loss_is_mean_cross_entropy():
    expected = -np.mean([math.log(1 - p) if y == 0 else math.log(p) for y, p in zip(LABELS, PROBS, strict=True)])
    assert scores.cross_entropy(LABELS, PROBS) == pytest.approx(expected)


def test_f1_rule_picks_the_f1_maximising_threshold():
    # At 0.4 every fake is caught with one false positive: P 4/5, R 1, F1 8/9; no threshold does better.
    threshold, text = scores.choose_threshold(LABELS, PROBS, "f1")
    assert threshold == pytest.approx(0.4)
    assert "F1 0.8889" in text


@pytest.mark.parametrize(("target", "expected"), [(0.0, 0.7), (0.25, 0.4), (0.5, 0.3)])
def test_fpr_rule_picks_the_lowest_threshold_within_target(target, expected):
    threshold, _ = scores.choose_threshold(LABELS, PROBS, "fpr", target)
    assert threshold == pytest.approx(expected)
    assert scores.threshold_metrics(LABELS, PROBS, threshold)["false_positive_rate"] <= target


def test_fpr_rule_when_a_real_image_scores_highest():
    threshold, _ = scores.choose_threshold([0, 1], [0.9, 0.3], "fpr", 0.0)
    assert threshold > 0.9
    assert scores.threshold_metrics([0, 1], [0.9, 0.3], threshold)["false_positive_rate"] == 0


def test_single_class_gives_nulls_not_errors():
    result = scores.summarize([1, 1, 1], [0.2, 0.7, 0.9], 0.5)
    assert result["roc_auc"] is None and result["eer"] is None and result["average_precision"] is None
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["false_positive_rate"] is None
    reals = scores.summarize([0, 0], [0.2, 0.7], 0.5)
    assert reals["recall"] is None
    assert reals["false_positive_rate"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        scores.choose_threshold([1, 1], [0.2, 0.7])
