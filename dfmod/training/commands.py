"""Command functions for ``dfmod train`` and ``dfmod evaluate``.

Plain functions with typer annotations, registered by :mod:`dfmod.cli` (the full CLI) and by
:mod:`dfmod.training.__main__` (``python -m dfmod.training`` on a training machine without the service's
dependencies). torch, timm and matplotlib are imported inside the commands so ``dfmod --help`` stays fast.
"""

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

PAPER = "paper default"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ThresholdRule(str, Enum):
    f1 = "f1"
    fpr = "fpr"


def _triple(text: str, name: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise typer.BadParameter(f"{name} takes three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _fail(exc: BaseException) -> "typer.Exit":
    typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=1)


def _require_device(device: Device) -> None:
    if device is Device.cuda:
        import torch

        if not torch.cuda.is_available():
            raise _fail(RuntimeError("--device cuda, but no CUDA device is visible"))


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def train_command(
    data_dir: Annotated[Path, typer.Argument(help="Data set folder: Train/, Validation/ (and Test/), each with "
                                                  "Real/ and Fake/ (any case).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Best checkpoint to write (.safetensors); "
                                      "CKPT.state.pt, CKPT.metrics.csv and CKPT.metrics.json go beside it.",
                                      show_default=False)],
    epochs: Annotated[int, typer.Option(help=f"Training epochs ({PAPER}).")] = 11,
    batch_size: Annotated[int, typer.Option(help=f"Images per batch ({PAPER}).")] = 32,
    lr: Annotated[float, typer.Option(help=f"Adam learning rate ({PAPER}).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="Adam weight decay (L2).")] = 0.0,
    schedule: Annotated[str, typer.Option(help="Learning-rate schedule: constant (the paper) or cosine "
                                               "(annealed per epoch to zero).")] = "constant",
    drop_rate: Annotated[float, typer.Option(help=f"Dropout before the dense head ({PAPER}).")] = 0.2,
    image_size: Annotated[int, typer.Option(help=f"Square model input in pixels ({PAPER} 224).")] = 224,
    mean: Annotated[str, typer.Option(help="Normalisation mean R,G,B (ImageNet).")] = "0.485,0.456,0.406",
    std: Annotated[str, typer.Option(help="Normalisation std R,G,B (ImageNet).")] = "0.229,0.224,0.225",
    hflip: Annotated[float, typer.Option(help="Augmentation: horizontal-flip probability.")] = 0.5,
    rotation: Annotated[float, typer.Option(help="Augmentation: random rotation range, +/- degrees.")] = 10.0,
    brightness: Annotated[float, typer.Option(help="Augmentation: colour-jitter brightness.")] = 0.2,
    contrast: Annotated[float, typer.Option(help="Augmentation: colour-jitter contrast.")] = 0.2,
    saturation: Annotated[float, typer.Option(help="Augmentation: colour-jitter saturation.")] = 0.2,
    hue: Annotated[float, typer.Option(help="Augmentation: colour-jitter hue.")] = 0.05,
    threshold_rule: Annotated[ThresholdRule, typer.Option(
        help="How the 'fake' threshold is chosen on validation: f1 = maximise F1; fpr = lowest threshold "
             "whose false-positive rate is <= --target-fpr (moderation).")] = ThresholdRule.f1,
    target_fpr: Annotated[float, typer.Option(help="Target validation false-positive rate for "
                                                   "--threshold-rule fpr.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, shuffling, augmentation and subsets.")] = 42,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present; CUDA trains channels_last "
                                                "with autocast.")] = Device.auto,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA (ignored on CPU).")] = True,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes (default: min(8, CPU "
                                                        "count)).", show_default=False)] = None,
    init: Annotated[Path | None, typer.Option(help="Start from local timm-compatible weights (.safetensors "
                                                      "or .pth); its classifier is replaced. Default: random "
                                                      "initialisation. Nothing is downloaded.")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue a run from its CKPT.state.pt (or its CKPT); "
                                                        "--epochs is the total.")] = None,
    half: Annotated[bool, typer.Option("--half", help="Store the best checkpoint in fp16 (half the size, "
                                                      "for shipping).")] = False,
    limit_per_class: Annotated[int | None, typer.Option(help="Use at most N images per class per split "
                                                                "(smoke runs).")] = None,
    dataset_name: Annotated[str | None, typer.Option(help="Data set name in the model version (default: the "
                                                             "data folder's name).", show_default=False)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Train the MobileNetV4-Small deepfake detector with the paper's recipe.

    Defaults follow the paper: 224x224 input, ImageNet mean/std, batch 32,
    Adam lr 0.001, cross-entropy, 11 epochs, dropout 0.2 before the dense head,
    random initial weights.
    Training augmentation: horizontal flip p=0.5, rotation +/-10 degrees,
    colour jitter brightness 0.2, contrast 0.2, saturation 0.2, hue 0.05.
    Validation: resize and normalise only (the service's preprocessing).
    Every epoch is validated (loss, accuracy, ROC-AUC). OUT keeps the best
    epoch (highest validation ROC-AUC, ties by lower loss) with its decision
    threshold (chosen on validation), preprocessing and model version.
    """
    _setup_logging()
    from dfmod.training.data import Augmentation, DatasetError
    from dfmod.training.train import TrainConfig, TrainingError, train

    config = TrainConfig(
        data_dir=data_dir, out=out, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, schedule=schedule,
        drop_rate=drop_rate, image_size=image_size, mean=_triple(mean, "--mean"), std=_triple(std, "--std"),
        augmentation=Augmentation(hflip=hflip, rotation=rotation, brightness=brightness, contrast=contrast,
                                  saturation=saturation, hue=hue),
        seed=seed, device=device.value, workers=workers, amp=amp, init=init, resume=resume, half=half,
        limit_per_class=limit_per_class, threshold_rule=threshold_rule.value, target_fpr=target_fpr,
        progress=progress, dataset_name=dataset_name,
    )
    _require_device(device)
    try:
        result = train(config)
    except (DatasetError, TrainingError) as exc:
        raise _fail(exc) from None
    val = result.meta.extra["val_metrics"]
    typer.echo(f"best epoch {result.best_epoch}/{result.history[-1]['epoch']}: val ROC-AUC "
               f"{_fmt(val.get('roc_auc'))}, loss {_fmt(val.get('loss'))}, F1 {_fmt(val.get('f1_at_threshold'))} "
               f"at threshold {result.threshold:.4f}")
    typer.echo(f"model version {result.model_version}")
    typer.echo(f"checkpoint {result.checkpoint}  (state {result.state.name}, metrics {result.metrics_csv.name}, "
               f"{result.metrics_json.name}; {result.seconds:.0f}s)")


def evaluate_command(
    folder: Annotated[Path, typer.Argument(help="Folder with Real/ and Fake/ images (e.g. DATA_DIR/Test).",
                                           show_default=False)],
    report: Annotated[Path, typer.Option("--report", "-r", help="Folder for report.json, confusion_matrix.png, "
                                         "roc_curve.png and predictions.csv.", show_default=False)],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="Checkpoint to evaluate "
                                                       "(default: the shipped model).", show_default=False)] = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    workers: Annotated[int | None, typer.Option(help="Decoding worker processes (default: min(8, CPU "
                                                        "count)).", show_default=False)] = None,
    limit_per_class: Annotated[int | None, typer.Option(help="Evaluate at most N images per class (a seeded "
                                                                "random subset).")] = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV with file and source columns for per-source "
                                                          "metrics (default: manifest.csv in FOLDER or its "
                                                          "parent).", show_default=False)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    backend: Annotated[str, typer.Option(help="Inference backend: auto (what the service picks), torch, "
                                              "onnxruntime or openvino.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16, int8 or auto (what the service picks).")] = "auto",
) -> None:
    """Evaluate a checkpoint on Real/ and Fake/ images, as the worker would.

    Loss, accuracy, precision, recall, F1, ROC-AUC, average precision and
    equal error rate at the checkpoint's threshold and at 0.5; per source
    when a manifest.csv names the sources; confusion-matrix and ROC images.
    Unreadable images are listed in report.json, not fatal.
    """
    _setup_logging()
    from dfmod.detector import ModelNotAvailable
    from dfmod.training.data import DatasetError
    from dfmod.training.evaluate import REPORT_FILE, evaluate

    _require_device(device)
    if manifest is not None and not manifest.is_file():
        raise _fail(FileNotFoundError(f"manifest {manifest} does not exist"))
    try:
        result = evaluate(folder, checkpoint, report, device=device.value, backend=backend, precision=precision,
                          batch_size=batch_size, workers=workers,
                          limit_per_class=limit_per_class, manifest=manifest, progress=progress)
    except (DatasetError, ModelNotAvailable) as exc:
        raise _fail(exc) from None
    print_report(result)
    typer.echo(f"report: {report / REPORT_FILE}")


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2%}" if percent else f"{value:.4f}"


def print_report(report: dict[str, Any]) -> None:
    """The main metrics as a table (rich when installed, plain text otherwise)."""
    half = report["at_0.5"]
    rows = [(name, key, True) for name, key in (
        ("accuracy", "accuracy"), ("precision", "precision"), ("recall", "recall"), ("F1", "f1"),
        ("false-positive rate", "false_positive_rate"))]
    main = [(name, _fmt(report[key], pct), _fmt(half.get(key), pct)) for name, key, pct in rows]
    main += [(name, _fmt(report[key], pct), "") for name, key, pct in (
        ("ROC-AUC", "roc_auc", True), ("average precision", "average_precision", True), ("EER", "eer", True),
        ("loss", "loss", False))]
    header = (f"{report['model_version']}: {report['n']} images ({report['n_real']} real, {report['n_fake']} "
              f"fake), {report['unreadable']['count']} unreadable")
    per_source = [
        (name, str(m["n"]), _fmt(m["accuracy"], True), _fmt(m["recall"], True),
         _fmt(m["false_positive_rate"], True), _fmt(m["roc_auc"], True))
        for name, m in (report.get("per_source") or {}).items()
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain output keeps evaluation usable without rich
        typer.echo(header)
        typer.echo(f"{'metric':<22}{'@' + format(report['threshold'], '.4f'):>12}{'@0.5':>12}")
        for name, at_t, at_h in main:
            typer.echo(f"{name:<22}{at_t:>12}{at_h:>12}")
        for row in per_source:
            typer.echo("  ".join(row))
        return
    console = Console()
    console.print(header)
    table = Table()
    table.add_column("metric")
    table.add_column(f"threshold {report['threshold']:.4f}", justify="right")
    table.add_column("threshold 0.5", justify="right")
    for row in main:
        table.add_row(*row)
    console.print(table)
    if per_source:
        console.print(f"per source, threshold {report['threshold']:.4f} (recall: fakes caught; FPR: reals flagged)")
        sources = Table()
        sources.add_column("source", no_wrap=True)
        for column in ("n", "accuracy", "recall", "FPR", "ROC-AUC"):
            sources.add_column(column, justify="right")
        for row in per_source:
            sources.add_row(*row)
        console.print(sources)
