"""Training loop of ``dfmod train``: the paper's recipe, model selection, threshold choice and checkpoints.

:func:`train` takes a :class:`TrainConfig` and writes, beside ``config.out`` (say ``run/ckpt.safetensors``):

* ``ckpt.safetensors``: the best epoch's weights with their :class:`~dfmod.detector.ModelMeta` (preprocessing,
  decision threshold, model version, training summary in ``extra``); fp16 with ``half``;
* ``ckpt.state.pt``: the last epoch's model, optimizer and history, rewritten every epoch; ``resume`` reads it;
* ``ckpt.metrics.csv`` and ``ckpt.metrics.json``: per-epoch training and validation scores.

The best epoch is the one with the highest validation ROC-AUC, ties broken by the lower validation loss.
Randomness is seeded from ``seed`` and the epoch number at the start of every epoch, so a resumed run draws
the same shuffles, augmentations and dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dfmod.detector import (
    CHECKPOINT_FORMAT,
    DEFAULT_ARCH,
    FAKE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelMeta,
    build_model,
    pick_device,
    save_checkpoint,
    weights_digest,
)
from dfmod.training import scores
from dfmod.training.data import (
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    Augmentation,
    DatasetError,
    EvalDataset,
    TrainDataset,
    check_readable,
    scan_dataset,
)

logger = logging.getLogger(__name__)

SELECTION_RULE = "highest validation ROC-AUC; ties broken by lower validation loss"
STATE_FORMAT = "dfmod-train-state/1"
VERSION_PREFIX = "mnv4s"


class TrainingError(RuntimeError):
    """A training run cannot start or continue as configured (bad option, incompatible resume state)."""


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


@dataclass
class TrainConfig:
    """Options of ``dfmod train``; the defaults are the paper's settings."""

    data_dir: Path
    out: Path
    epochs: int = 11
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # the paper keeps Adam's rate fixed; "cosine" anneals it per epoch to zero
    drop_rate: float = 0.2
    image_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augmentation: Augmentation = field(default_factory=Augmentation)
    seed: int = 42
    device: str = "auto"
    workers: int | None = None  # None: min(8, CPU count)
    amp: bool = True  # bf16 autocast on CUDA (fp16 with loss scaling where bf16 is missing); ignored on CPU
    init: Path | None = None
    resume: Path | None = None
    half: bool = False
    limit_per_class: int | None = None
    threshold_rule: str = "f1"
    target_fpr: float = 0.01
    progress: bool = True
    dataset_name: str | None = None  # for the model version; defaults to the data folder's name


@dataclass
class TrainResult:
    checkpoint: Path
    state: Path
    metrics_csv: Path
    metrics_json: Path
    best_epoch: int
    threshold: float
    model_version: str
    history: list[dict[str, Any]]
    seconds: float
    meta: ModelMeta


@dataclass(frozen=True)
class OutputPaths:
    checkpoint: Path
    state: Path
    metrics_csv: Path
    metrics_json: Path

    @classmethod
    def beside(cls, out: Path) -> OutputPaths:
        out = Path(out)
        stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
        return cls(out, out.with_name(f"{stem}.state.pt"), out.with_name(f"{stem}.metrics.csv"),
                   out.with_name(f"{stem}.metrics.json"))


def state_path_for(path: Path) -> Path:
    """The training-state file for ``--resume PATH``: PATH itself, or the state beside a checkpoint PATH."""
    path = Path(path)
    if path.name.endswith(".safetensors"):
        return OutputPaths.beside(path).state
    return path


def dataset_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "data"


def model_version(dataset: str, digest: str, when: datetime | None = None) -> str:
    when = when or datetime.now(timezone.utc)
    return f"{VERSION_PREFIX}-{dataset_slug(dataset)}-{when:%Y%m%d}-{digest[:8]}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1000 + epoch


def _check_config(config: TrainConfig) -> None:
    problems = []
    if config.epochs < 1:
        problems.append("--epochs must be at least 1")
    if config.batch_size < 2:
        problems.append("--batch-size must be at least 2 (batch norm needs two images)")
    if config.lr <= 0:
        problems.append("--lr must be positive")
    if config.schedule not in ("constant", "cosine"):
        problems.append("--schedule must be constant or cosine")
    if config.weight_decay < 0:
        problems.append("--weight-decay must not be negative")
    if not 0 <= config.drop_rate < 1:
        problems.append("--drop-rate must be in [0, 1)")
    if config.image_size < 32:
        problems.append("--image-size must be at least 32")
    if config.limit_per_class is not None and config.limit_per_class < 1:
        problems.append("--limit-per-class must be at least 1")
    if config.threshold_rule not in scores.THRESHOLD_RULES:
        problems.append(f"--threshold-rule must be one of {', '.join(scores.THRESHOLD_RULES)}")
    if not 0 <= config.target_fpr < 1:
        problems.append("--target-fpr must be in [0, 1)")
    if config.workers is not None and config.workers < 0:
        problems.append("--workers must not be negative")
    if config.init is not None and not Path(config.init).is_file():
        problems.append(f"--init checkpoint {config.init} does not exist")
    if config.resume is not None and not state_path_for(config.resume).is_file():
        problems.append(f"--resume state {state_path_for(config.resume)} does not exist")
    if problems:
        raise TrainingError("; ".join(problems))


def _initial_meta(config: TrainConfig) -> ModelMeta:
    return ModelMeta(
        architecture=DEFAULT_ARCH,
        input_size=[3, config.image_size, config.image_size],
        mean=[float(v) for v in config.mean],
        std=[float(v) for v in config.std],
        drop_rate=float(config.drop_rate),
    )


class _Precision:
    """Autocast settings for a device: bf16 on CUDA when supported, fp16 with a grad scaler otherwise."""

    def __init__(self, device: str, amp: bool) -> None:
        self.device = device
        self.dtype = None
        if device == "cuda" and amp:
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self):
        return torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def _to_device(batch: torch.Tensor, device: str) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    if device == "cuda":
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def _train_epoch(model, loader, optimizer, precision: _Precision, device: str, desc: str, progress: bool):
    model.train()
    # Running sums stay on the device: reading them every step would synchronise the GPU each batch.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    started = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False)
    for step, (images, labels) in enumerate(bar, start=1):
        images = _to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
        count = labels.numel()
        total_loss += loss.detach().double() * count
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        seen += count
        if progress and (step % 10 == 0 or step == len(loader)):
            bar.set_postfix(loss=f"{total_loss.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}")
    if not seen:
        raise TrainingError("the training loader produced no batches")
    mean_loss, accuracy = total_loss.item() / seen, correct.item() / seen  # waits for the last step
    seconds = time.perf_counter() - started
    return {"train_loss": mean_loss, "train_accuracy": accuracy, "train_images": seen,
            "train_seconds": seconds, "train_images_per_s": seen / seconds if seconds else None}


@torch.inference_mode()
def predict_loader(model, loader, precision: _Precision, device: str, desc: str, progress: bool):
    """``(labels, fake probabilities, errors)`` for a loader of :class:`EvalDataset` items."""
    model.eval()
    labels, probs, errors = [], [], []
    bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True, leave=False)
    for images, batch_labels, indices, batch_errors in bar:
        with precision.autocast():
            logits = model(_to_device(images, device))
        # float64 softmax: confident float32 probabilities saturate at exactly 1.0 and distort the loss.
        probs.append(torch.softmax(logits.double(), dim=1)[:, FAKE_INDEX].cpu().numpy())
        labels.append(batch_labels.numpy())
        errors.extend((int(i), e) for i, e in zip(indices, batch_errors, strict=True) if e)
    return np.concatenate(labels), np.concatenate(probs), errors


def _validation_row(labels: np.ndarray, probs: np.ndarray, config: TrainConfig) -> tuple[dict, float, str]:
    at_half = scores.summarize(labels, probs, 0.5)
    threshold, rule_text = scores.choose_threshold(labels, probs, config.threshold_rule, config.target_fpr)
    at_threshold = scores.threshold_metrics(labels, probs, threshold)
    row = {
        "val_loss": at_half["loss"],
        "val_accuracy": at_half["accuracy"],
        "val_roc_auc": at_half["roc_auc"],
        "val_average_precision": at_half["average_precision"],
        "val_eer": at_half["eer"],
        "val_f1": at_half["f1"],
        "val_threshold": threshold,
        "val_accuracy_at_threshold": at_threshold["accuracy"],
        "val_precision_at_threshold": at_threshold["precision"],
        "val_recall_at_threshold": at_threshold["recall"],
        "val_f1_at_threshold": at_threshold["f1"],
        "val_fpr_at_threshold": at_threshold["false_positive_rate"],
    }
    return row, threshold, rule_text


def _selection_key(row: dict) -> tuple[float, float]:
    auc = row["val_roc_auc"]
    return (auc if auc is not None else float("-inf"), -row["val_loss"])


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _device_name(device: str) -> str:
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name()})"
    return "cpu"


def _public_config(config: TrainConfig, dataset: str) -> dict[str, Any]:
    """The settings worth recording, without machine paths (checkpoints travel)."""
    return {
        "dataset": dataset,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "optimizer": "Adam",
        "lr": config.lr,
        "lr_schedule": config.schedule,
        "weight_decay": config.weight_decay,
        "loss": "cross-entropy",
        "drop_rate": config.drop_rate,
        "image_size": config.image_size,
        "mean": list(config.mean),
        "std": list(config.std),
        "augmentation": config.augmentation.as_dict(),
        "seed": config.seed,
        "amp": config.amp,
        "init": Path(config.init).name if config.init else None,
        "limit_per_class": config.limit_per_class,
        "threshold_rule": config.threshold_rule,
        "target_fpr": config.target_fpr if config.threshold_rule == "fpr" else None,
        "half": config.half,
    }


# Settings a resumed run must share with the run that wrote the state, or the weights would not fit.
_RESUME_MUST_MATCH = ("image_size", "drop_rate", "mean", "std", "dataset", "limit_per_class", "seed")


def _load_state(path: Path, public: dict[str, Any]) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingError(f"{path} is not a dfmod training state (expected {STATE_FORMAT})")
    saved = state["config"]
    mismatched = [f"{key}: saved {saved.get(key)!r}, now {public.get(key)!r}"
                  for key in _RESUME_MUST_MATCH if saved.get(key) != public.get(key)]
    if mismatched:
        raise TrainingError(f"cannot resume from {path}; settings differ: " + "; ".join(mismatched))
    return state


def _write_history(paths: OutputPaths, history: list[dict], summary: dict[str, Any]) -> None:
    columns = list(history[0].keys())
    tmp = paths.metrics_csv.with_name(paths.metrics_csv.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, paths.metrics_csv)
    tmp = paths.metrics_json.with_name(paths.metrics_json.name + ".tmp")
    tmp.write_text(json.dumps({**summary, "history": history}, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, paths.metrics_json)


def _export(best_state: dict[str, torch.Tensor], meta: ModelMeta, path: Path, half: bool) -> ModelMeta:
    """Save ``best_state`` with ``meta``; the model version names the weights exactly as stored."""
    stored = {k: (v.half() if half and v.is_floating_point() else v) for k, v in best_state.items()}
    meta = replace(meta, model_version=model_version(meta.extra["dataset"], weights_digest(stored)))
    model = build_model(replace(meta, extra={}))
    model.load_state_dict(best_state)
    save_checkpoint(model, meta, path, half=half)
    return meta


def train(config: TrainConfig) -> TrainResult:
    """Train, validate every epoch, keep the best checkpoint and return where everything went."""
    _check_config(config)
    started = time.perf_counter()
    paths = OutputPaths.beside(config.out)
    device = pick_device(config.device)
    workers = default_workers() if config.workers is None else config.workers
    data_dir = Path(config.data_dir)
    dataset = config.dataset_name or data_dir.resolve().name
    public = _public_config(config, dataset)

    splits = scan_dataset(data_dir, (TRAIN_SPLIT, VALIDATION_SPLIT), limit_per_class=config.limit_per_class,
                          seed=config.seed)
    train_samples, val_samples = splits[TRAIN_SPLIT], splits[VALIDATION_SPLIT]
    check_readable(train_samples + val_samples, threads=max(4, workers))
    if len(train_samples) < 2:
        raise DatasetError(f"{data_dir}: training needs at least two images")
    logger.info("training on %d images, validating on %d (%s)", len(train_samples), len(val_samples), dataset)

    meta = _initial_meta(config)
    seed_everything(config.seed)
    model = build_model(meta, init_checkpoint=Path(config.init) if config.init else None)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(device, memory_format=torch.channels_last)
    else:
        model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    precision = _Precision(device, config.amp)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None  # {"epoch", "row", "threshold", "rule", "state"}
    start_epoch, previous_seconds = 1, 0.0
    if config.resume is not None:
        state_file = state_path_for(config.resume)
        state = _load_state(state_file, public)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # a resumed run may change these on purpose
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
        if state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        best = state["best"]
        start_epoch = int(state["epoch"]) + 1
        previous_seconds = float(state.get("seconds", 0.0))
        logger.info("resuming from %s after epoch %d", state_file, state["epoch"])
        if start_epoch > config.epochs:
            logger.warning("the state has %d epochs already; nothing left to train for --epochs %d",
                           state["epoch"], config.epochs)

    train_data = TrainDataset(train_samples, meta, config.augmentation)
    val_data = EvalDataset(val_samples, meta)
    loader_args = {"num_workers": workers, "pin_memory": device == "cuda"}
    # A final batch of one image breaks batch norm on the pooled features; drop only that case.
    drop_last = len(train_data) % config.batch_size == 1
    base = {
        "format": STATE_FORMAT, "config": public, "device": _device_name(device), "precision": precision.name,
        "train_images": len(train_samples), "val_images": len(val_samples),
    }

    for epoch in range(start_epoch, config.epochs + 1):
        epoch_started = time.perf_counter()
        seed_everything(_epoch_seed(config.seed, epoch))
        train_loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True, drop_last=drop_last,
                                  **loader_args)
        val_loader = DataLoader(val_data, batch_size=config.batch_size, shuffle=False, **loader_args)
        row: dict[str, Any] = {"epoch": epoch}
        if config.schedule == "cosine":
            # Set from the epoch number rather than a scheduler's state, so a resumed run lands on the same rate.
            for group in optimizer.param_groups:
                group["lr"] = config.lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / config.epochs))
        row.update(_train_epoch(model, train_loader, optimizer, precision, device,
                                f"epoch {epoch}/{config.epochs} train", config.progress))
        labels, probs, errors = predict_loader(model, val_loader, precision, device,
                                               f"epoch {epoch}/{config.epochs} val", config.progress)
        if errors:
            bad = "; ".join(f"{val_samples[i].path} ({e})" for i, e in errors[:20])
            raise DatasetError(f"{len(errors)} validation images cannot be decoded: {bad}")
        val_row, threshold, rule_text = _validation_row(labels, probs, config)
        row.update(val_row)
        row["lr"] = optimizer.param_groups[0]["lr"]
        row["epoch_seconds"] = time.perf_counter() - epoch_started
        improved = best is None or _selection_key(row) > _selection_key(best["row"])
        row["best"] = improved
        if improved:
            best = {"epoch": epoch, "row": dict(row), "threshold": threshold, "rule": rule_text,
                    "state": _cpu_state(model)}
        history.append(row)
        seconds = previous_seconds + time.perf_counter() - started
        best_meta = _export(best["state"], _best_meta(meta, best, history, public, base, seconds, config),
                            paths.checkpoint, config.half) if improved else None
        if best_meta is not None:
            best["model_version"] = best_meta.model_version
        _write_history(paths, history, _summary(public, base, best, seconds, paths))
        _atomic_torch_save({
            **base, "epoch": epoch, "seconds": seconds, "model": _cpu_state(model),
            "optimizer": optimizer.state_dict(), "scaler": precision.scaler.state_dict(), "history": history,
            "best": best,
        }, paths.state)
        tqdm.write(_epoch_line(row, config.epochs))

    if best is None:
        raise TrainingError("no epoch was trained and the resume state holds no best model")
    seconds = previous_seconds + time.perf_counter() - started
    # Re-save so the checkpoint's training summary covers the whole run, not just the best epoch.
    final_meta = _export(best["state"], _best_meta(meta, best, history, public, base, seconds, config),
                         paths.checkpoint, config.half)
    best["model_version"] = final_meta.model_version
    _write_history(paths, history, _summary(public, base, best, seconds, paths))
    return TrainResult(paths.checkpoint, paths.state, paths.metrics_csv, paths.metrics_json, best["epoch"],
                       best["threshold"], final_meta.model_version, history, seconds, final_meta)


def _best_meta(meta: ModelMeta, best: dict, history: list[dict], public: dict, base: dict, seconds: float,
               config: TrainConfig) -> ModelMeta:
    row = best["row"]
    val_metrics = {key[len("val_"):]: value for key, value in row.items() if key.startswith("val_")}
    extra = {
        **public,
        "epochs_trained": history[-1]["epoch"],
        "best_epoch": best["epoch"],
        "selection": SELECTION_RULE,
        "val_metrics": val_metrics,
        "train_loss_at_best": row["train_loss"],
        "train_seconds": round(seconds, 1),
        "device": base["device"],
        "precision": base["precision"],
        "train_images": base["train_images"],
        "val_images": base["val_images"],
        "stored_dtype": "float16" if config.half else "float32",
        "torch": torch.__version__,
        "timm": _timm_version(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    rule = config.threshold_rule if config.threshold_rule == "f1" else f"fpr<={config.target_fpr:g}"
    return replace(meta, threshold=float(best["threshold"]), threshold_rule=f"{rule}: {best['rule']}",
                   format=CHECKPOINT_FORMAT, extra=extra)


def _timm_version() -> str:
    import timm

    return timm.__version__


def _summary(public: dict, base: dict, best: dict, seconds: float, paths: OutputPaths) -> dict[str, Any]:
    return {
        "config": public,
        "device": base["device"],
        "precision": base["precision"],
        "train_images": base["train_images"],
        "val_images": base["val_images"],
        "selection": SELECTION_RULE,
        "best_epoch": best["epoch"],
        "threshold": best["threshold"],
        "threshold_rule": best["rule"],
        "model_version": best.get("model_version"),
        "checkpoint": paths.checkpoint.name,
        "seconds": round(seconds, 2),
    }


def _epoch_line(row: dict, epochs: int) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    speed = row.get("train_images_per_s")
    return (f"epoch {row['epoch']}/{epochs}: train loss {fmt(row['train_loss'])} acc {fmt(row['train_accuracy'])}"
            f" | val loss {fmt(row['val_loss'])} acc {fmt(row['val_accuracy'])} auc {fmt(row['val_roc_auc'])}"
            f" f1@{row['val_threshold']:.3f} {fmt(row['val_f1_at_threshold'])}"
            f" | {speed or 0:.1f} img/s, {row['epoch_seconds']:.0f}s{' *best*' if row['best'] else ''}")
