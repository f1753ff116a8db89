"""``dfmod evaluate``: score a checkpoint on a folder of ``Real/`` and ``Fake/`` images and write a report.

The images go through the worker's own path (:func:`dfmod.detector.load_pixels`: decode, resize to uint8;
then :class:`dfmod.detector.Predictor` on the same backend and precision the service would pick, which
normalises inside the model), so the report describes exactly what the service would decide. The report folder
receives ``report.json`` (metrics at the checkpoint's threshold at top level, the rest nested),
``confusion_matrix.png``, ``roc_curve.png`` and ``predictions.csv`` (one row per image).

When a ``manifest.csv`` with ``file`` and ``source`` columns lies in the folder or its parent (as in the
faces256 data set), the metrics are also broken down per source; metrics a single-class source cannot have
(ROC-AUC, EER, ...) are null.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dfmod.training import scores
from dfmod.training.data import DatasetError, Sample, scan_labelled_folder

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc_curve.png"
PREDICTIONS_CSV = "predictions.csv"
MANIFEST = "manifest.csv"
UNKNOWN_SOURCE = "(not in manifest)"
TOP_LEVEL = ("loss", "accuracy", "precision", "recall", "f1", "roc_auc", "average_precision", "eer")
_RATE_KEYS = ("accuracy", "precision", "recall", "f1", "false_positive_rate", "false_negative_rate",
              "specificity", "confusion_matrix")


def find_manifest(folder: Path) -> Path | None:
    """``manifest.csv`` in the folder, else in its parent (faces256 keeps it beside Train/Validation/Test)."""
    for candidate in (folder / MANIFEST, folder.parent / MANIFEST):
        if candidate.is_file():
            return candidate
    return None


def read_sources(manifest: Path, split: str | None = None) -> dict[str, str]:
    """File name -> source from a manifest; rows of ``split`` win when the manifest has a split column."""
    with manifest.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or ())
        if not {"file", "source"} <= columns:
            raise DatasetError(f"{manifest} needs the columns file and source (has {', '.join(sorted(columns))})")
        rows = list(reader)
    sources: dict[str, str] = {}
    # Rows from other splits fill in only names the folder's own split lacks.
    preferred = [r for r in rows if split and r.get("split", "").lower() == split.lower()]
    for row in preferred + rows:
        sources.setdefault(Path(row["file"]).name, row["source"] or UNKNOWN_SOURCE)
    return sources


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(predictor, samples: list[Sample], batch_size: int, workers: int, progress: bool):
    """P(fake) per sample (NaN where it failed) and the failures' reasons, through the worker's path."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from dfmod.detector import fake_probabilities, load_pixels
    from dfmod.imaging import ImageLimits, ImageRejected

    limits = ImageLimits()
    height, width = predictor.meta.input_size[1:]

    def load(index: int, out: np.ndarray) -> str:
        try:
            load_pixels(samples[index].path.read_bytes(), limits, predictor.meta, out=out)
            return ""
        except ImageRejected as exc:
            return str(exc)
        except OSError as exc:
            return f"unreadable: {exc}"

    probs = np.full(len(samples), np.nan)
    errors: dict[int, str] = {}
    starts = range(0, len(samples), batch_size)
    # Decoding releases the GIL: threads overlap it with the previous batch's forward pass.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in tqdm(starts, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True,
                          leave=False):
            indices = list(range(start, min(start + batch_size, len(samples))))
            batch = np.empty((len(indices), height, width, 3), dtype=np.uint8)
            failures = list(pool.map(load, indices, list(batch)))
            ok = [position for position, error in enumerate(failures) if not error]
            for position, error in enumerate(failures):
                if error:
                    errors[indices[position]] = error
            if ok:
                probs[[indices[position] for position in ok]] = fake_probabilities(predictor.logits(batch[ok]))
    return probs, errors


def evaluate(
    folder: Path,
    checkpoint: Path | None = None,
    report_dir: Path = Path("report"),
    *,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    limit_per_class: int | None = None,
    manifest: Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (default: the shipped model) on ``folder``; writes and returns the report."""
    from dfmod.detector import Predictor
    from dfmod.training.train import default_workers

    folder = Path(folder)
    report_dir = Path(report_dir)
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    samples = scan_labelled_folder(folder, limit_per_class=limit_per_class, seed=seed, allow_empty_class=True)
    if not samples:
        raise DatasetError(f"{folder} holds no images in Real/ or Fake/")

    predictor = Predictor(checkpoint, device=device, backend=backend, precision=precision)
    meta = predictor.meta
    threshold = float(predictor.threshold)
    started = time.perf_counter()
    probs, errors = _run(predictor, samples, batch_size, default_workers() if workers is None else workers,
                         progress)
    seconds = time.perf_counter() - started

    ok = np.array([i not in errors for i in range(len(samples))], dtype=bool)
    labels = np.array([sample.label for sample in samples], dtype=np.int64)
    y, p = labels[ok], probs[ok]
    if not y.size:
        raise DatasetError(f"none of the {len(samples)} images in {folder} could be decoded")

    overall = scores.summarize(y, p, threshold)
    at_half = scores.threshold_metrics(y, p, 0.5)

    manifest_path = manifest if manifest is not None else find_manifest(folder)
    sources = read_sources(Path(manifest_path), split=folder.name) if manifest_path else None
    sample_sources = [sources.get(s.path.name, UNKNOWN_SOURCE) for s in samples] if sources is not None else None
    per_source = None
    if sample_sources is not None:
        per_source = {}
        names = np.array(sample_sources, dtype=object)
        for source in sorted(set(names[ok])):
            mask = names[ok] == source
            entry = scores.summarize(y[mask], p[mask], threshold)
            entry["at_0.5"] = {k: v for k, v in scores.threshold_metrics(y[mask], p[mask], 0.5).items()
                               if k in _RATE_KEYS}
            per_source[source] = entry

    report_dir.mkdir(parents=True, exist_ok=True)
    _plot_confusion(overall["confusion_matrix"], at_half["confusion_matrix"], threshold,
                    report_dir / CONFUSION_PNG)
    _plot_roc(y, p, overall, threshold, report_dir / ROC_PNG)
    _write_predictions(report_dir / PREDICTIONS_CSV, folder, samples, probs, errors, sample_sources, threshold)

    checkpoint_path = predictor.checkpoint_path
    report: dict[str, Any] = {"n": overall["n"], "threshold": threshold}
    report.update({key: overall[key] for key in TOP_LEVEL})
    report.update({
        "n_real": overall["n_real"],
        "n_fake": overall["n_fake"],
        "false_positive_rate": overall["false_positive_rate"],
        "false_negative_rate": overall["false_negative_rate"],
        "specificity": overall["specificity"],
        "eer_threshold": overall["eer_threshold"],
        "confusion_matrix": overall["confusion_matrix"],
        "at_0.5": {k: v for k, v in at_half.items() if k in _RATE_KEYS},
        "threshold_rule": meta.threshold_rule,
        "model_version": meta.model_version,
        "checkpoint": str(checkpoint_path),
        "checkpoint_sha256": _sha256(checkpoint_path),
        "preprocessing": {"input_size": meta.input_size, "mean": meta.mean, "std": meta.std,
                          "interpolation": meta.interpolation},
        "folder": str(folder),
        "files_found": len(samples),
        "limit_per_class": limit_per_class,
        "unreadable": {
            "count": len(errors),
            "files": [{"file": _relative(samples[i].path, folder), "reason": reason}
                      for i, reason in sorted(errors.items())],
        },
        "manifest": str(manifest_path) if manifest_path else None,
        "per_source": per_source,
        "device": predictor.device,
        "backend": predictor.backend,
        "seconds": round(seconds, 3),
        "images_per_second": round(len(samples) / seconds, 2) if seconds else None,
        "outputs": {"confusion_matrix": CONFUSION_PNG, "roc_curve": ROC_PNG, "predictions": PREDICTIONS_CSV},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    })
    (report_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _write_predictions(path: Path, folder: Path, samples, probs, errors, sources, threshold: float) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "source", "p_fake", "predicted", "error"])
        for i, sample in enumerate(samples):
            error = errors.get(i, "")
            writer.writerow([
                _relative(sample.path, folder),
                "fake" if sample.label == 1 else "real",
                sources[i] if sources is not None else "",
                "" if error else f"{probs[i]:.6f}",
                "" if error else ("fake" if probs[i] >= threshold else "real"),
                error,
            ])


def _plot_confusion(matrix_at_threshold: dict, matrix_at_half: dict, threshold: float, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close

    figure = Figure(figsize=(9, 4), layout="constrained")
    for axes, matrix, title in zip(figure.subplots(1, 2), (matrix_at_threshold, matrix_at_half),
                                   (f"threshold {threshold:.4f}", "threshold 0.5"), strict=True):
        values = np.asarray(matrix["matrix"])
        totals = values.sum(axis=1, keepdims=True)
        shares = np.divide(values, totals, out=np.zeros(values.shape, dtype=float), where=totals > 0)
        axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for row in range(2):
            for col in range(2):
                axes.text(col, row, f"{values[row, col]}\n{shares[row, col]:.1%}", ha="center", va="center",
                          color="white" if shares[row, col] > 0.5 else "black")
        axes.set_xticks([0, 1], labels=["real", "fake"])
        axes.set_yticks([0, 1], labels=["real", "fake"])
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(title)
    figure.savefig(path, dpi=120)


def _plot_roc(y: np.ndarray, p: np.ndarray, overall: dict, threshold: float, path: Path) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    figure = Figure(figsize=(5, 5), layout="constrained")
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    if scores.both_classes(y):
        fpr, tpr, _ = roc_curve(y, p)
        axes.plot(fpr, tpr, label=f"ROC (AUC {overall['roc_auc']:.4f})")
        eer = overall["eer"]
        axes.plot([eer], [1 - eer], "o", label=f"EER {eer:.4f}")
        axes.plot([overall["false_positive_rate"]], [overall["recall"]], "s",
                  label=f"threshold {threshold:.4f}")
        axes.legend(loc="lower right")
    else:
        axes.text(0.5, 0.5, "ROC undefined: only one class", ha="center", va="center")
    axes.set_xlim(-0.01, 1.0)  # keep a marker at FPR 0 visible
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false-positive rate (real flagged fake)")
    axes.set_ylabel("true-positive rate (fakes caught)")
    axes.set_title("ROC curve")
    figure.savefig(path, dpi=120)
