"""Metrics for a binary real/fake classifier from labels (1 = fake) and fake probabilities.

The paper's set (loss, accuracy, precision, recall, F1, ROC-AUC) plus average precision and the equal error
rate, computed with scikit-learn. "Positive" is always the fake class and an image counts as fake when its
probability is ``>= threshold``, the rule :meth:`dfmod.detector.Predictor.label_for` applies in the service.

Undefined values (ROC-AUC of a single-class set; recall, precision and F1 of a set with no fakes, ...) are
``None``, never NaN or 0.0, so every result can go straight into JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

THRESHOLD_RULES = ("f1", "fpr")


def _clean(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _arrays(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{y.size} labels but {p.size} probabilities")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake)")
    return y, p


def both_classes(labels) -> bool:
    y = np.asarray(labels)
    return bool((y == 0).any() and (y == 1).any())


def cross_entropy(labels, probs) -> float | None:
    """Mean cross-entropy of the fake probabilities (the training loss, from probabilities)."""
    y, p = _arrays(labels, probs)
    if not y.size:
        return None
    return _clean(log_loss(y, np.clip(p, 0.0, 1.0), labels=[0, 1]))


def equal_error_rate(labels, probs) -> tuple[float | None, float | None]:
    """``(eer, threshold)``: where the false-positive rate equals the false-negative rate on the ROC curve.

    The two rates are interpolated linearly between the ROC points where they cross; the threshold is that of
    the first ROC point at or past the crossing. ``(None, None)`` when a class is missing.
    """
    y, p = _arrays(labels, probs)
    if not both_classes(y):
        return None, None
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    fnr = 1.0 - tpr
    gap = fnr - fpr  # starts at 1 (everything real) and falls to -1 (everything fake)
    i = int(np.argmax(gap <= 0))
    if i == 0 or gap[i] == 0:
        eer = fpr[i]
    else:
        weight = gap[i - 1] / (gap[i - 1] - gap[i])
        eer = fpr[i - 1] + weight * (fpr[i] - fpr[i - 1])
    return _clean(eer), _clean(min(thresholds[i], 1.0))


def ranking_metrics(labels, probs) -> dict[str, float | None]:
    """Threshold-free metrics: ROC-AUC, average precision, EER (None when a class is missing)."""
    y, p = _arrays(labels, probs)
    if not both_classes(y):
        return {"roc_auc": None, "average_precision": None, "eer": None, "eer_threshold": None}
    eer, eer_threshold = equal_error_rate(y, p)
    return {
        "roc_auc": _clean(roc_auc_score(y, p)),
        "average_precision": _clean(average_precision_score(y, p)),
        "eer": eer,
        "eer_threshold": eer_threshold,
    }


def threshold_metrics(labels, probs, threshold: float) -> dict[str, Any]:
    """Metrics of the decisions ``prob >= threshold``: accuracy, precision, recall, F1, rates and the matrix."""
    y, p = _arrays(labels, probs)
    predicted = (p >= threshold).astype(np.int64)
    n = int(y.size)
    matrix = confusion_matrix(y, predicted, labels=[0, 1]) if n else np.zeros((2, 2), dtype=np.int64)
    tn, fp, fn, tp = (int(value) for value in matrix.ravel())
    if n:
        precision, recall, f1, _ = precision_recall_fscore_support(
            y, predicted, average="binary", pos_label=1, zero_division=np.nan
        )
    else:
        precision = recall = f1 = None
    negatives, positives = tn + fp, fn + tp
    if not positives:
        # With no fakes, precision is 0 whenever a real is flagged and undefined otherwise, and F1 and recall
        # are undefined: report them as undefined (null), not as a 0.0 that reads like a failing detector.
        precision = recall = f1 = None
    return {
        "threshold": float(threshold),
        "n": n,
        "accuracy": _clean((tp + tn) / n) if n else None,
        "precision": _clean(precision),
        "recall": _clean(recall),
        "f1": _clean(f1),
        "false_positive_rate": _clean(fp / negatives) if negatives else None,
        "false_negative_rate": _clean(fn / positives) if positives else None,
        "specificity": _clean(tn / negatives) if negatives else None,
        "confusion_matrix": {"labels": ["real", "fake"], "matrix": matrix.astype(int).tolist(),
                             "tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def summarize(labels, probs, threshold: float) -> dict[str, Any]:
    """Everything at ``threshold`` plus the threshold-free metrics and the loss, in one flat-ish dict."""
    y, p = _arrays(labels, probs)
    result = {
        "n": int(y.size),
        "n_real": int((y == 0).sum()),
        "n_fake": int((y == 1).sum()),
        "loss": cross_entropy(y, p),
    }
    result.update(ranking_metrics(y, p))
    result.update(threshold_metrics(y, p, threshold))
    return result


def choose_threshold(labels, probs, rule: str = "f1", target_fpr: float = 0.01) -> tuple[float, str]:
    """The decision threshold for "fake" chosen on validation data, and a sentence stating the rule.

    * ``f1``: the threshold that maximises F1 of the fake class (the lowest such one on ties).
    * ``fpr``: the lowest threshold whose false-positive rate (real images flagged fake) is ``<= target_fpr``;
      moderation wants few real photos flagged.

    Candidates are the observed probabilities, so the threshold reproduces exactly the validation decisions
    it was chosen on under the service's ``prob >= threshold`` rule.
    """
    y, p = _arrays(labels, probs)
    if not both_classes(y):
        raise ValueError("choosing a threshold needs both real and fake images")
    if rule == "f1":
        precision, recall, thresholds = precision_recall_curve(y, p)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        best = int(np.argmax(f1))
        return float(thresholds[best]), f"maximum F1 on validation (F1 {f1[best]:.4f})"
    if rule == "fpr":
        if not 0.0 <= target_fpr < 1.0:
            raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
        fpr, _tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
        allowed = np.flatnonzero((fpr <= target_fpr) & np.isfinite(thresholds))
        if allowed.size:
            index = int(allowed[-1])  # thresholds fall as the index grows: the last allowed one is the lowest
            threshold, achieved = float(thresholds[index]), float(fpr[index])
        else:
            # Even the highest score is a real image: only a threshold above every real score meets the target.
            threshold, achieved = float(np.nextafter(p[y == 0].max(), np.inf)), 0.0
        return threshold, (f"lowest threshold with validation false-positive rate <= {target_fpr:g} "
                           f"(achieved {achieved:.4f})")
    raise ValueError(f"unknown threshold rule {rule!r}; use one of {', '.join(THRESHOLD_RULES)}")
