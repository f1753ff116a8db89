"""Calibrated scores: temperature scaling, expected calibration error, reliability plots, operating points.

A detector's softmax output is a ranking, not a probability: trained with cross-entropy it is usually
over-confident, and its thresholds mean nothing to a moderator. Temperature scaling (Guo et al. 2017, "On
Calibration of Modern Neural Networks") divides the logit margin by one scalar ``T`` fitted on validation data
by minimising the negative log-likelihood; the ranking (ROC-AUC) is unchanged, the probabilities become
honest. Operating points are thresholds on that calibrated probability, named by what they promise on
validation: ``fpr_1`` and ``fpr_5`` (at most 1 % / 5 % of real images flagged) and ``balanced`` (the highest
balanced accuracy, Youden's J).

The functions take labels (1 = fake) and either logit margins (``logit_fake - logit_real``) or probabilities;
:func:`margins_from_probabilities` converts the float64 probabilities that training's validation produces.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import roc_curve

from dfmod.training import scores

ECE_BINS = 15
# Fitting log T in this range keeps T in [0.05, 20]: beyond it the model is broken, not miscalibrated.
_LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))
OPERATING_POINTS = {"fpr_1": 0.01, "fpr_5": 0.05, "balanced": None}


def margins_from_probabilities(probs) -> np.ndarray:
    """Logit margins from fake probabilities (float64 softmax output): ``log(p / (1 - p))``, clipped."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-15, 1.0 - 1e-15)
    return np.log(p) - np.log1p(-p)


def sigmoid(margins, temperature: float = 1.0) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(margins, dtype=np.float64) / temperature))


def negative_log_likelihood(labels, margins, temperature: float) -> float:
    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(margins, dtype=np.float64) / temperature
    # log(1 + exp(-z)) for fakes, log(1 + exp(z)) for reals, written with logaddexp so nothing overflows.
    return float(np.mean(np.logaddexp(0.0, np.where(y == 1, -z, z))))


def fit_temperature(labels, margins) -> float:
    """The temperature minimising validation NLL (a bounded 1-D search on log T)."""
    y = np.asarray(labels)
    if not scores.both_classes(y):
        raise ValueError("fitting a temperature needs both real and fake images")
    result = minimize_scalar(lambda log_t: negative_log_likelihood(y, margins, math.exp(log_t)),
                             bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def reliability_bins(labels, probs, bins: int = ECE_BINS) -> list[dict[str, Any]]:
    """Equal-width bins of P(fake): count, mean predicted probability and observed share of fakes per bin."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        rows.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
                     "mean_probability": float(p[mask].mean()) if count else None,
                     "fake_share": float(y[mask].mean()) if count else None})
    return rows


def expected_calibration_error(labels, probs, bins: int = ECE_BINS) -> float | None:
    """ECE of P(fake): the count-weighted mean gap between predicted probability and observed fake share."""
    y = np.asarray(labels)
    if not y.size:
        return None
    total = 0.0
    for row in reliability_bins(y, probs, bins):
        if row["count"]:
            total += row["count"] * abs(row["mean_probability"] - row["fake_share"])
    return total / y.size


def calibration_summary(labels, probs, bins: int = ECE_BINS) -> dict[str, Any]:
    return {"ece": expected_calibration_error(labels, probs, bins), "bins": bins,
            "reliability": reliability_bins(labels, probs, bins)}


def _point_figures(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    at = scores.threshold_metrics(y, p, threshold)
    specificity, recall = at["specificity"], at["recall"]
    balanced = None if specificity is None or recall is None else (specificity + recall) / 2
    return {"threshold": float(threshold), "false_positive_rate": at["false_positive_rate"], "recall": recall,
            "precision": at["precision"], "accuracy": at["accuracy"], "balanced_accuracy": balanced,
            "n": at["n"]}


def operating_points(labels, probs) -> dict[str, dict[str, Any]]:
    """Thresholds on calibrated P(fake) for each named operating point, with their validation figures.

    ``fpr_N``: the lowest threshold whose validation false-positive rate is at most N % (the most fakes caught
    under that promise); ``balanced``: the threshold with the highest balanced accuracy (Youden's J).
    """
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if not scores.both_classes(y):
        raise ValueError("operating points need both real and fake images")
    points: dict[str, dict[str, Any]] = {}
    for name, target in OPERATING_POINTS.items():
        if target is not None:
            threshold, rule = scores.choose_threshold(y, p, "fpr", target)
        else:
            fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
            finite = np.isfinite(thresholds)
            best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
            threshold, rule = float(thresholds[best]), "highest validation balanced accuracy (Youden's J)"
        points[name] = {**_point_figures(y, p, min(threshold, 1.0)), "rule": rule}
    return points


def calibrate(labels, margins) -> tuple[float, dict[str, Any], dict[str, dict[str, Any]]]:
    """Fit the temperature on (validation) margins; returns ``(T, calibration record, operating points)``."""
    y = np.asarray(labels, dtype=np.int64)
    z = np.asarray(margins, dtype=np.float64)
    temperature = fit_temperature(y, z)
    before, after = sigmoid(z), sigmoid(z, temperature)
    record = {
        "method": "temperature scaling (minimum validation NLL)",
        "temperature": temperature,
        "n": int(y.size),
        "ece_before": expected_calibration_error(y, before),
        "ece_after": expected_calibration_error(y, after),
        "nll_before": negative_log_likelihood(y, z, 1.0),
        "nll_after": negative_log_likelihood(y, z, temperature),
        "ece_bins": ECE_BINS,
    }
    return temperature, record, operating_points(y, after)


def plot_reliability(labels, probs, path, title: str = "reliability") -> None:
    """Reliability diagram: observed fake share against mean predicted P(fake) per bin, with the counts."""
    from matplotlib.figure import Figure

    rows = [row for row in reliability_bins(labels, probs) if row["count"]]
    figure = Figure(figsize=(5, 5.6), layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.plot([r["mean_probability"] for r in rows], [r["fake_share"] for r in rows], "o-",
             label=f"model (ECE {expected_calibration_error(labels, probs):.4f})")
    top.set_ylabel("observed share of fakes")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(title)
    bottom.bar([(r["lower"] + r["upper"]) / 2 for r in rows], [r["count"] for r in rows],
               width=1.0 / ECE_BINS * 0.9, color="tab:blue")
    bottom.set_xlabel("predicted P(fake)")
    bottom.set_ylabel("images")
    bottom.set_xlim(0, 1)
    figure.savefig(path, dpi=120)


def checkpoint_probabilities(checkpoint, samples, *, device: str = "cpu", batch_size: int = 64,
                             workers: int = 0, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logit margins)`` of ``checkpoint`` on ``samples``, through the service's preprocessing.

    The uint8 pixels of :func:`dfmod.detector.load_pixels` (the worker's path) go through the fp32 torch
    model (the reference every exported precision is accepted against); the margins are uncalibrated.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from dfmod.detector import FAKE_INDEX, Predictor, load_pixels
    from dfmod.imaging import ImageLimits
    from dfmod.training.data import DatasetError

    predictor = Predictor(checkpoint, device=device, backend="torch", precision="fp32")
    limits = ImageLimits()
    height, width = predictor.meta.input_size[1:]

    def load(sample, out: np.ndarray) -> None:
        try:
            load_pixels(sample.path.read_bytes(), limits, predictor.meta, out=out)
        except Exception as exc:  # re-raised with the file named
            raise DatasetError(f"calibration image {sample.path} cannot be decoded: {exc}") from exc

    labels, margins = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in tqdm(range(0, len(samples), batch_size), desc="calibrate", unit="batch",
                          disable=not progress, leave=False):
            chunk = samples[start:start + batch_size]
            batch = np.empty((len(chunk), height, width, 3), dtype=np.uint8)
            list(pool.map(load, chunk, list(batch)))
            logits = predictor.logits(batch).astype(np.float64)
            margins.append(logits[:, FAKE_INDEX] - logits[:, 1 - FAKE_INDEX])
            labels.append(np.array([sample.label for sample in chunk], dtype=np.int64))
    return np.concatenate(labels), np.concatenate(margins)


def calibrate_checkpoint(checkpoint, data_dirs, out, *, threshold_rule: str = "keep", target_fpr: float = 0.01,
                         device: str = "cpu", batch_size: int = 64, workers: int = 0,
                         limit_per_class: int | None = None, progress: bool = False):
    """Fit a temperature and operating points for an existing checkpoint on the Validation split of
    ``data_dirs`` and write the same weights (same dtype) with the new metadata to ``out``.

    ``threshold_rule`` ``keep`` moves the checkpoint's own threshold onto the calibrated scale, so its
    decisions stay exactly as they were; ``f1``/``fpr`` choose it afresh on the calibrated validation scores.
    The model version gains a ``-cal`` suffix naming the temperature: scores change, so verdicts made with
    the uncalibrated model are not reused for it. Returns the new :class:`~dfmod.detector.ModelMeta`.
    """
    import hashlib
    import os
    from dataclasses import replace
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from dfmod.detector import read_meta
    from dfmod.training.data import VALIDATION_SPLIT, scan_roots

    if threshold_rule not in ("keep", *scores.THRESHOLD_RULES):
        raise ValueError(f"threshold rule must be keep or one of {', '.join(scores.THRESHOLD_RULES)}")
    meta = read_meta(Path(checkpoint))
    if meta.temperature != 1.0:
        raise ValueError(f"{checkpoint} is calibrated already (T={meta.temperature:.4f}); calibrate the "
                         "uncalibrated checkpoint it came from")
    samples = scan_roots([Path(d) for d in data_dirs], (VALIDATION_SPLIT,), limit_per_class=limit_per_class)
    samples = samples[VALIDATION_SPLIT]
    labels, margins = checkpoint_probabilities(checkpoint, samples, device=device, batch_size=batch_size,
                                               workers=workers, progress=progress)
    temperature, record, points = calibrate(labels, margins)
    record["data"] = sorted({sample.domain for sample in samples})
    calibrated = sigmoid(margins, temperature)
    per_root = {}
    for root in record["data"]:
        mask = np.array([sample.domain == root for sample in samples])
        per_root[root] = {"n": int(mask.sum()),
                          "ece_before": expected_calibration_error(labels[mask], sigmoid(margins[mask])),
                          "ece_after": expected_calibration_error(labels[mask], calibrated[mask])}
    record["per_root"] = per_root
    if threshold_rule == "keep":
        old = float(np.clip(meta.threshold, 1e-15, 1 - 1e-15))
        threshold = float(sigmoid(margins_from_probabilities([old]), temperature)[0])
        rule = f"{meta.threshold_rule} (moved onto the calibrated scale: same decisions)"
    else:
        threshold, text = scores.choose_threshold(labels, calibrated, threshold_rule, target_fpr)
        name = threshold_rule if threshold_rule == "f1" else f"fpr<={target_fpr:g}"
        rule = f"{name}: {text} (calibrated probability)"
    tag = hashlib.sha256(f"{temperature:.6f}".encode()).hexdigest()[:6]
    new_meta = replace(meta, temperature=temperature, calibration=record, operating_points=points,
                       threshold=threshold, threshold_rule=rule, model_version=f"{meta.model_version}-cal{tag}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(load_file(str(checkpoint)), str(tmp), metadata={"dfmod": new_meta.to_json()})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return new_meta
