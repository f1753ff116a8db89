"""Leave-one-source-out evaluation: train without a source, then score the detector on that source.

A detector that only knows its training generators fails on the next one; this measures how much. For each
held-out group of sources (one source by default, or several named together, e.g. the three ciplab Photoshop
levels) :func:`leave_one_source_out` trains a run on every data root with those sources removed from Train and
Validation, then scores the Test images of the held-out sources:

* a held-out source with both labels (dfdc) gives its own ROC-AUC;
* a one-label source is ranked against the Test images of the other label from the same root (sources the run
  did train on), so "ROC-AUC 0.62 for stylegan-tpdne" means: its fakes against that root's Test reals.

Each run is a normal ``dfmod train`` run in ``OUT/without-<sources>/`` and resumes from its state when the
command is run again. ``loso.json`` and ``loso.md`` (a table) go to ``OUT``; with ``model_card`` the table
replaces the ``loso`` section of the model card (see :mod:`dfmod.training.modelcard`).

An ``init`` checkpoint that was trained on a held-out source's root would have seen that source: refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dfmod.training import calibration, scores
from dfmod.training.data import TEST_SPLIT, TRAIN_SPLIT, Augmentation, DatasetError, root_name, scan_roots

logger = logging.getLogger(__name__)

LOSO_JSON = "loso.json"
LOSO_MD = "loso.md"
CARD_SECTION = "loso"


@dataclass
class LosoConfig:
    data_dirs: list[Path]
    out_dir: Path
    holdouts: list[tuple[str, ...]] | None = None  # None: every source on its own
    epochs: int = 2
    epoch_size: int | None = None
    recipe: str = "transfer"
    lr: float = 1e-3
    batch_size: int = 32
    image_size: int = 224
    init: Path | None = None
    device: str = "auto"
    workers: int | None = None
    limit_per_class: int | None = None
    seed: int = 42
    progress: bool = True
    extra_train: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields


def slug(sources: tuple[str, ...]) -> str:
    return "without-" + "+".join(re.sub(r"[^a-z0-9-]+", "-", s.lower()) for s in sources)


def _check_init(init: Path | None, held_roots: set[str]) -> None:
    if init is None or not str(init).endswith(".safetensors"):
        return
    from dfmod.detector import read_meta

    try:
        extra = read_meta(Path(init)).extra
    except ValueError:
        return  # timm weights, not a detector: they never saw a deepfake source
    seen = set(extra.get("data_roots") or [extra.get("dataset")])
    overlap = seen & held_roots
    if overlap:
        raise DatasetError(f"--init {Path(init).name} was trained on {', '.join(sorted(overlap))}, which holds a "
                           "held-out source: a leave-one-source-out run must not start from it")


def score_holdout(labels: np.ndarray, probs: np.ndarray, held: np.ndarray, counterpart: np.ndarray,
                  threshold: float) -> dict[str, Any]:
    """Figures for the held-out images (``held`` mask) and their ROC-AUC against ``counterpart`` images."""
    y, p = labels[held], probs[held]
    if scores.both_classes(y):
        ranked_y, ranked_p, against = y, p, "its own real and fake images"
    else:
        mask = held | counterpart
        ranked_y, ranked_p = labels[mask], probs[mask]
        against = f"{int(counterpart.sum())} Test images of the other label from the same root"
    at = scores.threshold_metrics(y, p, threshold)
    return {
        "n": int(y.size), "n_real": int((y == 0).sum()), "n_fake": int((y == 1).sum()),
        "accuracy": at["accuracy"], "recall": at["recall"], "false_positive_rate": at["false_positive_rate"],
        "roc_auc": scores.ranking_metrics(ranked_y, ranked_p)["roc_auc"], "roc_auc_against": against,
        "ece": calibration.expected_calibration_error(y, p), "threshold": threshold,
    }


def leave_one_source_out(config: LosoConfig) -> dict[str, Any]:
    """Train one run per held-out group and score it; writes and returns the report."""
    from dfmod.training.calibration import checkpoint_probabilities
    from dfmod.training.train import TrainConfig, default_workers, state_path_for, train

    roots = [Path(root) for root in config.data_dirs]
    splits = scan_roots(roots, (TRAIN_SPLIT, TEST_SPLIT), limit_per_class=config.limit_per_class, seed=config.seed)
    test = splits[TEST_SPLIT]
    all_sources = sorted({s.source for s in splits[TRAIN_SPLIT]})
    holdouts = config.holdouts or [(source,) for source in all_sources]
    unknown = sorted({s for group in holdouts for s in group} - set(all_sources))
    if unknown:
        raise DatasetError(f"unknown source(s) {', '.join(unknown)}; sources: {', '.join(all_sources)}")
    out_dir = Path(config.out_dir)
    workers = default_workers() if config.workers is None else config.workers
    rows = []
    for group in holdouts:
        group = tuple(group)
        held_roots = {s.domain for s in splits[TRAIN_SPLIT] if s.source in group}
        _check_init(config.init, held_roots)
        run_out = out_dir / slug(group) / "ckpt.safetensors"
        state = state_path_for(run_out)
        logger.info("leave-one-source-out: training without %s -> %s", ", ".join(group), run_out)
        result = train(TrainConfig(
            data_dir=roots, out=run_out, epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
            image_size=config.image_size, augmentation=Augmentation.recipe(config.recipe), recipe=config.recipe,
            sampling="balanced", epoch_size=config.epoch_size, exclude_sources=group, init=config.init,
            resume=state if state.is_file() else None, device=config.device, workers=workers,
            limit_per_class=config.limit_per_class, seed=config.seed, progress=config.progress,
            **config.extra_train,
        ))
        held = np.array([s.source in group for s in test])
        held_labels = {s.label for s, h in zip(test, held, strict=True) if h}
        counterpart = np.array([(s.domain in held_roots and s.source not in group and s.label not in held_labels)
                                for s in test])
        scored = held | counterpart
        subset = [s for s, keep in zip(test, scored, strict=True) if keep]
        labels, margins = checkpoint_probabilities(result.checkpoint, subset, device=config.device,
                                                   workers=workers, progress=config.progress)
        probs = calibration.sigmoid(margins, result.meta.temperature)
        row = score_holdout(labels, probs, held[scored], counterpart[scored], result.meta.threshold)
        row.update({"held_out": list(group), "roots": sorted(held_roots), "checkpoint": str(run_out.relative_to(out_dir)),
                    "model_version": result.model_version, "epochs": result.history[-1]["epoch"],
                    "val_roc_auc": result.meta.extra["val_metrics"].get("roc_auc")})
        rows.append(row)
        logger.info("without %s: ROC-AUC %s, accuracy %s", ", ".join(group), row["roc_auc"], row["accuracy"])
    report = {"roots": [root_name(r) for r in roots], "recipe": config.recipe, "epochs": config.epochs,
              "epoch_size": config.epoch_size, "init": Path(config.init).name if config.init else None,
              "limit_per_class": config.limit_per_class, "holdouts": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LOSO_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / LOSO_MD).write_text(markdown_table(report))
    return report


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    lines = [
        f"Leave-one-source-out on {' + '.join(report['roots'])}: {report['recipe']} recipe, {report['epochs']} "
        f"epochs of {report['epoch_size'] or 'all'} images, init {report['init'] or 'random'}"
        + (f", at most {report['limit_per_class']} images per class" if report["limit_per_class"] else "") + ".",
        "",
        "| held out | Test images | ROC-AUC | ranked against | accuracy at threshold | fakes caught | reals flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["holdouts"]:
        lines.append(f"| {', '.join(row['held_out'])} | {row['n']} | {_num(row['roc_auc'])} | {row['roc_auc_against']} "
                     f"| {_pct(row['accuracy'])} | {_pct(row['recall'])} | {_pct(row['false_positive_rate'])} |")
    return "\n".join(lines) + "\n"
