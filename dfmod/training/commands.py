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


class Recipe(str, Enum):
    paper = "paper"
    transfer = "transfer"


class Sampling(str, Enum):
    balanced = "balanced"
    uniform = "uniform"


def train_command(
    data_dirs: Annotated[list[Path], typer.Argument(
        help="One or more data set folders: Train/, Validation/ (and Test/), each with Real/ and Fake/ (any "
             "case), optionally a manifest.csv naming each file's source. Several folders are mixed.",
        show_default=False)],
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
    recipe: Annotated[Recipe, typer.Option(
        help="Augmentation recipe: paper (flip, rotation, colour jitter: the baseline) or transfer (paper + "
             "random resized crops, Gaussian blur and JPEG re-encoding at random strengths, each p=0.5, after "
             "Wang et al. 2020). The options below override single values.")] = Recipe.paper,
    sampling: Annotated[Sampling | None, typer.Option(
        help="uniform: every training image once per epoch; balanced: --epoch-size draws weighted so every "
             "data folder, and real and fake within it, get equal shares (default: balanced with several "
             "folders or --recipe transfer, else uniform).", show_default=False)] = None,
    epoch_size: Annotated[int | None, typer.Option(help="Images per epoch with balanced sampling (default: "
                                                           "the training set's size).", show_default=False)] = None,
    source_power: Annotated[float, typer.Option(help="Balanced sampling: a source's share within its (folder, "
                                                     "label) grows as n**power (0: all sources alike, 1: as "
                                                     "the data has them).")] = 0.5,
    exclude_source: Annotated[list[str] | None, typer.Option(
        help="Leave this source (from manifest.csv) out of Train and Validation; repeatable.",
        show_default=False)] = None,
    hflip: Annotated[float | None, typer.Option(help="Augmentation: horizontal-flip probability (0.5).",
                                                   show_default=False)] = None,
    rotation: Annotated[float | None, typer.Option(help="Augmentation: random rotation range, +/- degrees "
                                                           "(10).", show_default=False)] = None,
    brightness: Annotated[float | None, typer.Option(help="Augmentation: colour-jitter brightness (0.2).",
                                                        show_default=False)] = None,
    contrast: Annotated[float | None, typer.Option(help="Augmentation: colour-jitter contrast (0.2).",
                                                      show_default=False)] = None,
    saturation: Annotated[float | None, typer.Option(help="Augmentation: colour-jitter saturation (0.2).",
                                                        show_default=False)] = None,
    hue: Annotated[float | None, typer.Option(help="Augmentation: colour-jitter hue (0.05).",
                                                 show_default=False)] = None,
    crop_prob: Annotated[float | None, typer.Option(help="Augmentation: random-resized-crop probability "
                                                            "(transfer 0.5).", show_default=False)] = None,
    blur_prob: Annotated[float | None, typer.Option(help="Augmentation: Gaussian-blur probability, sigma "
                                                            "U(0, 3) (transfer 0.5).", show_default=False)] = None,
    jpeg_prob: Annotated[float | None, typer.Option(help="Augmentation: JPEG re-encoding probability, quality "
                                                            "U{30..100} (transfer 0.5).",
                                                       show_default=False)] = None,
    threshold_rule: Annotated[ThresholdRule, typer.Option(
        help="How the 'fake' threshold is chosen on validation: f1 = maximise F1; fpr = lowest threshold "
             "whose false-positive rate is <= --target-fpr (moderation).")] = ThresholdRule.f1,
    target_fpr: Annotated[float, typer.Option(help="Target validation false-positive rate for "
                                                   "--threshold-rule fpr.")] = 0.01,
    seed: Annotated[int, typer.Option(help="Seed for initialisation, shuffling, augmentation and subsets.")] = 42,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present; CUDA trains channels_last "
                                                "with autocast.")] = Device.auto,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bf16 autocast on CUDA.")] = True,
    cpu_bf16: Annotated[bool, typer.Option("--cpu-bf16/--no-cpu-bf16", help="bf16 autocast on CPU (fast only on "
                                                                            "CPUs with avx512_bf16 or AMX).")] = False,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes (default: min(8, CPU "
                                                        "count)).", show_default=False)] = None,
    init: Annotated[Path | None, typer.Option(help="Start from local weights: a dfmod checkpoint (e.g. the "
                                                      "shipped model) is loaded whole, head included; other "
                                                      "timm-compatible weights (.safetensors or .pth) lose their "
                                                      "classifier. Default: random initialisation. Nothing is "
                                                      "downloaded.")] = None,
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
    """Train the MobileNetV4-Small deepfake detector (the paper's recipe by default).

    Defaults follow the paper: 224x224 input, ImageNet mean/std, batch 32,
    Adam lr 0.001, cross-entropy, 11 epochs, dropout 0.2 before the dense head,
    random initial weights.
    Training augmentation: horizontal flip p=0.5, rotation +/-10 degrees,
    colour jitter brightness 0.2, contrast 0.2, saturation 0.2, hue 0.05.
    Validation: resize and normalise only (the service's preprocessing).
    --recipe transfer adds random resized crops, blur and JPEG re-encoding
    and balanced sampling over several data folders.
    Every epoch is validated (loss, accuracy, ROC-AUC, per folder and per
    source). OUT keeps the best epoch (highest validation ROC-AUC, the mean
    over folders when there are several; ties by lower loss), calibrated by
    temperature scaling on validation, with its decision threshold and the
    operating points fpr_1, fpr_5 and balanced, preprocessing and model version.
    """
    _setup_logging()
    from dfmod.training.data import Augmentation, DatasetError
    from dfmod.training.train import TrainConfig, TrainingError, train

    overrides = {name: value for name, value in (
        ("hflip", hflip), ("rotation", rotation), ("brightness", brightness), ("contrast", contrast),
        ("saturation", saturation), ("hue", hue), ("crop_prob", crop_prob), ("blur_prob", blur_prob),
        ("jpeg_prob", jpeg_prob)) if value is not None}
    if sampling is None:
        sampling = Sampling.balanced if len(data_dirs) > 1 or recipe is Recipe.transfer else Sampling.uniform
    config = TrainConfig(
        data_dir=list(data_dirs), out=out, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule=schedule, drop_rate=drop_rate, image_size=image_size, mean=_triple(mean, "--mean"),
        std=_triple(std, "--std"), augmentation=Augmentation.recipe(recipe.value, **overrides), recipe=recipe.value,
        sampling=sampling.value, epoch_size=epoch_size, source_power=source_power,
        exclude_sources=tuple(exclude_source or ()), seed=seed, device=device.value, workers=workers, amp=amp,
        cpu_bf16=cpu_bf16, init=init, resume=resume, half=half, limit_per_class=limit_per_class,
        threshold_rule=threshold_rule.value, target_fpr=target_fpr, progress=progress, dataset_name=dataset_name,
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
    model_card: Annotated[Path | None, typer.Option(help="Also rewrite this folder's section of the model "
                                                            "card (e.g. docs/model-card.md) with the per-source "
                                                            "and calibration tables.", show_default=False)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    backend: Annotated[str, typer.Option(help="Inference backend: auto (what the service picks), torch, "
                                              "onnxruntime or openvino.")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32, bf16, int8 or auto (what the service picks).")] = "auto",
) -> None:
    """Evaluate a checkpoint on Real/ and Fake/ images, as the worker would.

    Loss, accuracy, precision, recall, F1, ROC-AUC, average precision and
    equal error rate at the checkpoint's threshold and at 0.5; per source
    when a manifest.csv names the sources; calibration (ECE, reliability
    plot) and the checkpoint's operating points; confusion-matrix and ROC
    images. Unreadable images are listed in report.json, not fatal.
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
    if model_card is not None:
        from dfmod.training.data import root_name
        from dfmod.training.evaluate import report_markdown
        from dfmod.training.modelcard import replace_section, section_name

        title = f"{root_name(folder.parent)} {folder.name}"
        replace_section(model_card, f"evaluate-{section_name(title)}", report_markdown(result, title))
        typer.echo(f"model card section evaluate-{section_name(title)} rewritten in {model_card}")


def loso_command(
    data_dirs: Annotated[list[Path], typer.Argument(help="Data set folders (Train/, Validation/, Test/ and a "
                                                         "manifest.csv naming sources).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for one run per held-out group, loso.json "
                                      "and loso.md.", show_default=False)],
    holdout: Annotated[list[str] | None, typer.Option(
        help="Sources to hold out together, comma-separated; repeatable (default: every source on its own).",
        show_default=False)] = None,
    epochs: Annotated[int, typer.Option(help="Epochs per run.")] = 2,
    epoch_size: Annotated[int | None, typer.Option(help="Images per epoch (balanced sampling).",
                                                      show_default=False)] = None,
    recipe: Annotated[Recipe, typer.Option(help="Augmentation recipe of the runs.")] = Recipe.transfer,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    image_size: Annotated[int, typer.Option(help="Square model input in pixels.")] = 224,
    init: Annotated[Path | None, typer.Option(help="Starting weights; refused if trained on a held-out "
                                                      "source's data.", show_default=False)] = None,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.", show_default=False)] = None,
    limit_per_class: Annotated[int | None, typer.Option(help="At most N images per class per split (smoke "
                                                                "runs).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 42,
    model_card: Annotated[Path | None, typer.Option(help="Rewrite the model card's loso section with the "
                                                            "table.", show_default=False)] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
) -> None:
    """Leave-one-source-out: train without each source, score on it.

    One training run per held-out group in OUT/without-<sources>/ (resumed
    when run again), scored on the group's Test images: its own ROC-AUC when
    it holds both labels, else against the same root's Test images of the
    other label. Writes OUT/loso.json and the table OUT/loso.md.
    """
    _setup_logging()
    from dfmod.detector import pick_device
    from dfmod.training.data import DatasetError
    from dfmod.training.loso import CARD_SECTION, LOSO_MD, LosoConfig, leave_one_source_out
    from dfmod.training.modelcard import replace_section
    from dfmod.training.train import TrainingError

    _require_device(device)
    config = LosoConfig(
        data_dirs=list(data_dirs), out_dir=out,
        holdouts=[tuple(part.strip() for part in group.split(",") if part.strip()) for group in holdout] if holdout
        else None,
        epochs=epochs, epoch_size=epoch_size, recipe=recipe.value, lr=lr, batch_size=batch_size,
        image_size=image_size, init=init, device=pick_device(device.value), workers=workers,
        limit_per_class=limit_per_class, seed=seed, progress=progress)
    try:
        report = leave_one_source_out(config)
    except (DatasetError, TrainingError) as exc:
        raise _fail(exc) from None
    table = (out / LOSO_MD).read_text()
    typer.echo(table)
    if model_card is not None:
        replace_section(model_card, CARD_SECTION, table)
        typer.echo(f"model card section {CARD_SECTION} rewritten in {model_card}")
    typer.echo(f"{len(report['holdouts'])} held-out groups: {out}")


def evaluate_faces_command(
    folder: Annotated[Path, typer.Argument(help="Held-out face crops: a folder with Real/ and Fake/ (e.g. "
                                                "DATA_DIR/Test).", show_default=False)],
    report: Annotated[Path, typer.Option("--report", "-r", help="Folder for whole_photos.json and the "
                                         "composites/ it builds.", show_default=False)],
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", "-c", help="Checkpoint (default: the "
                                                       "shipped model).", show_default=False)] = None,
    limit_per_class: Annotated[int | None, typer.Option(help="At most N crops per class (a seeded subset).",
                                                           show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the composites (placement, scale, background).")] = 0,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
) -> None:
    """Whole photos: place face crops small into larger images and score them with and without the face stage.

    Reports the face detection rate, and accuracy / ROC-AUC on the crops
    themselves, on the whole composites squashed to the model input, and
    through the face stage (most-fake face; no face found counts as wrong).
    """
    _setup_logging()
    from dfmod.detector import ModelNotAvailable, pick_device
    from dfmod.faces import FaceNotAvailable
    from dfmod.training.data import DatasetError
    from dfmod.training.whole_photos import REPORT_FILE, evaluate_whole_photos

    _require_device(device)
    try:
        result = evaluate_whole_photos(folder, checkpoint, report, limit_per_class=limit_per_class, seed=seed,
                                       device=pick_device(device.value))
    except (DatasetError, ModelNotAvailable, FaceNotAvailable) as exc:
        raise _fail(exc) from None
    typer.echo(f"{result['n']} composites from {folder}: face found in {_fmt(result['detection_rate'], True)}, "
               f"no face in {result['no_face']}, crop margin median {_fmt(result['crop_margin_median'])}")
    for name in ("crops", "whole_image", "face_stage"):
        entry = result[name]
        typer.echo(f"  {name:<12} accuracy {_fmt(entry['accuracy'], True)}  ROC-AUC {_fmt(entry['roc_auc'])}"
                   f"  without verdict {entry['without_verdict']}")
    typer.echo(f"face detection {result['face_detect_ms_per_image']} ms/image; report: {report / REPORT_FILE}")


class CalibrationThreshold(str, Enum):
    keep = "keep"
    f1 = "f1"
    fpr = "fpr"


def calibrate_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint to calibrate (e.g. the shipped model).",
                                               show_default=False)],
    data_dirs: Annotated[list[Path], typer.Argument(help="Data set folder(s) whose Validation/ split fits the "
                                                         "temperature.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Calibrated checkpoint to write (same weights).",
                                      show_default=False)],
    threshold_rule: Annotated[CalibrationThreshold, typer.Option(
        help="keep: the checkpoint's threshold moved onto the calibrated scale (same decisions); f1 or fpr: "
             "chosen afresh on calibrated validation scores.")] = CalibrationThreshold.keep,
    target_fpr: Annotated[float, typer.Option(help="Target validation FPR for --threshold-rule fpr.")] = 0.01,
    device: Annotated[Device, typer.Option(help="auto picks CUDA when present.")] = Device.auto,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 0,
    limit_per_class: Annotated[int | None, typer.Option(help="Use at most N images per class per folder "
                                                                "(smoke runs).")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Add temperature scaling and operating points (fpr_1, fpr_5, balanced) to an existing checkpoint.

    Fits the temperature on the Validation split of DATA_DIRS (minimum NLL),
    stores it with each operating point's threshold (on calibrated
    probability) and validation figures, and writes the same weights to OUT.
    """
    _setup_logging()
    from dfmod.detector import ModelNotAvailable, pick_device
    from dfmod.training.calibration import calibrate_checkpoint
    from dfmod.training.data import DatasetError

    _require_device(device)
    try:
        meta = calibrate_checkpoint(checkpoint, data_dirs, out, threshold_rule=threshold_rule.value,
                                    target_fpr=target_fpr, device=pick_device(device.value), batch_size=batch_size,
                                    workers=workers, limit_per_class=limit_per_class, progress=progress)
    except (DatasetError, ModelNotAvailable, ValueError, OSError) as exc:
        raise _fail(exc) from None
    record = meta.calibration
    typer.echo(f"temperature {meta.temperature:.4f} on {record['n']} validation images: ECE "
               f"{record['ece_before']:.4f} -> {record['ece_after']:.4f}, NLL {record['nll_before']:.4f} -> "
               f"{record['nll_after']:.4f}")
    for name, point in meta.operating_points.items():
        typer.echo(f"  {name:<9} threshold {point['threshold']:.4f}: validation FPR "
                   f"{_fmt(point['false_positive_rate'], True)}, recall {_fmt(point['recall'], True)}")
    typer.echo(f"threshold {meta.threshold:.4f} ({meta.threshold_rule})")
    typer.echo(f"model version {meta.model_version}: {out}")


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
