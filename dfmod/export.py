"""``dfmod export``: a checkpoint in the serving formats, int8 quantization and the precision acceptance check.

The exported graph is :class:`dfmod.torch_model.ServingModule` with BatchNorm folded: it takes the uint8
NHWC batch that every backend receives (dynamic batch size), normalises inside and returns logits, so
ONNX Runtime, OpenVINO and torch run the same function on the same input. Written to ``--out``::

    NAME.safetensors   the checkpoint itself (the torch backend and training read it)
    NAME.onnx          fp32 ONNX (ONNX Runtime; OpenVINO reads it directly too)
    NAME.int8.onnx     int8 static quantization (QDQ), calibrated on Validation images, if asked for
    NAME.xml / .bin    OpenVINO IR (``--format openvino``); NAME.int8.xml: int8 by NNCF, calibrated likewise
    NAME.json          the sidecar: ModelMeta, the files, and each precision's acceptance figures

The ModelMeta also travels inside the ONNX file (``metadata_props["dfmod"]``).

**Acceptance.** A reduced precision (int8, bf16) is served by ``auto`` only if, on a labelled test folder,
its ROC-AUC is within :data:`MAX_AUC_DROP` of fp32's and at least :data:`MIN_LABEL_AGREEMENT` of its labels
(at the checkpoint's threshold) agree with fp32's. The figures go into the sidecar; the model card shows them.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from dfmod.detector import (
    SERVING_FORMAT,
    ModelMeta,
    Predictor,
    backend_installed,
    cpu_has_native_bf16,
    load_pixels,
    model_stem,
    read_meta,
    sidecar_path,
)
from dfmod.imaging import ImageLimits, ImageRejected

logger = logging.getLogger(__name__)

MAX_AUC_DROP = 0.002
MIN_LABEL_AGREEMENT = 0.995
ONNX_OPSET = 17
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def labelled_images(folder: Path, limit: int | None = None, seed: int = 0) -> list[tuple[Path, int]]:
    """``(path, label)`` for ``folder/Real/*`` (0) and ``folder/Fake/*`` (1); a seeded sample of ``limit``."""
    found = []
    for child in sorted(Path(folder).iterdir()):
        label = {"real": 0, "fake": 1}.get(child.name.lower())
        if label is None or not child.is_dir():
            continue
        found += [(path, label) for path in sorted(child.rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if limit is not None and len(found) > limit:
        found = sorted(random.Random(seed).sample(found, limit))
    return found


def pixels_of(paths: Iterable[Path], meta: ModelMeta) -> tuple[np.ndarray, list[int]]:
    """The files as one uint8 batch through the service's path; returns (batch, indices that decoded)."""
    paths = list(paths)
    height, width = meta.input_size[1:]
    batch = np.empty((len(paths), height, width, 3), dtype=np.uint8)
    kept = []
    for index, path in enumerate(paths):
        try:
            load_pixels(path.read_bytes(), ImageLimits(), meta, out=batch[len(kept)])
        except ImageRejected as exc:
            logger.warning("skipping %s: %s", path, exc)
            continue
        kept.append(index)
    return batch[: len(kept)], kept


# --- export --------------------------------------------------------------------------------------------


def export_onnx(checkpoint: Path, out: Path) -> Path:
    """The folded serving module as fp32 ONNX with a dynamic batch and the ModelMeta in its metadata."""
    import onnx
    import torch

    from dfmod.torch_model import load_serving_module

    serving, meta, folded = load_serving_module(checkpoint)
    height, width = meta.input_size[1:]
    example = torch.zeros((2, height, width, 3), dtype=torch.uint8)
    torch.onnx.export(
        serving, (example,), str(out), input_names=["pixels"], output_names=["logits"],
        dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
    )
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {"dfmod": meta.to_json(), "dfmod_batchnorm_folded": str(folded)})
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    logger.info("wrote %s (%d BatchNorm layers folded)", out, folded)
    return out


def quantize_int8(fp32_onnx: Path, out: Path, calibration: np.ndarray, batch_size: int = 16) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) calibrated on ``calibration`` pixels.

    Only convolutions are quantized, and the first one (it sees the normalised pixels) and the last one
    (the 1x1 head before pooling) stay in fp32: on the shipped model, quantizing everything flipped 8 % of
    the labels and these two layers carried most of that error (see the model card's int8 table).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([calibration[i : i + batch_size] for i in range(0, len(calibration), batch_size)])

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {"pixels": batch}

    with tempfile.TemporaryDirectory(prefix="dfmod-quant-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared))
        convolutions = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type == "Conv"]
        quantize_static(
            str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"],
            nodes_to_exclude=[convolutions[0], convolutions[-1]] if len(convolutions) > 2 else [],
        )
    reference = onnx.load(str(fp32_onnx))
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {p.key: p.value for p in reference.metadata_props})
    onnx.save(model, str(out))
    return out


# The layers OpenVINO's int8 leaves in fp32: MobileNetV4's 1x1 head (after the pooling) and the classifier.
# The first convolution is quantized: with its input's range set to every possible pixel (below), it cost no
# labels, and in fp32 it and the reorders around it took a quarter of an int8 forward pass (model card).
OPENVINO_FP32_LAYERS = (".*conv_head.*", ".*classifier.*")


def quantize_openvino_int8(
    fp32_onnx: Path, out: Path, calibration: np.ndarray, meta: ModelMeta, *,
    fp32_layers: tuple[str, ...] = OPENVINO_FP32_LAYERS, range_estimator=None, input_pixel_range: bool = True,
) -> Path:
    """OpenVINO int8 by NNCF post-training quantization (mixed preset, bias correction) on ``calibration``.

    NNCF's bias correction keeps the shipped model closer to fp32 than ONNX Runtime's plain min/max
    calibration does (model card, int8 table). The input's quantizer then gets the range of every pixel the
    model can receive (:func:`quantize_input_to_pixel_range`). The keywords are the shipped recipe; the
    model card's other recipes (``scripts/int8_recipes.py``) change them: the layers left in fp32 (name
    patterns), NNCF's activation range estimator (its default when None), the input's full range.
    """
    import nncf
    import openvino as ov

    from dfmod.detector import openvino_core

    model = openvino_core().read_model(str(fp32_onnx))  # the process's one Core (see there)
    advanced = None
    if range_estimator is not None:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

        advanced = AdvancedQuantizationParameters(activations_range_estimator_params=range_estimator)
    quantized = nncf.quantize(
        model, nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))]),
        preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration), advanced_parameters=advanced,
        ignored_scope=nncf.IgnoredScope(patterns=list(fp32_layers), validate=False),
    )
    if input_pixel_range and not quantize_input_to_pixel_range(quantized, meta):
        logger.warning("%s: no quantizer reads the input; its range stays as calibrated", fp32_onnx.name)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


# What lies between the uint8 input and its quantizer: the layout change and the normalisation.
_INPUT_PATH_OPS = {"Convert", "Transpose", "Multiply", "Subtract", "Divide", "Add"}


def quantize_input_to_pixel_range(model, meta: ModelMeta) -> int:
    """Give the quantizer of the normalised input the range of every pixel value; returns how many were set.

    NNCF sets each activation's range from the calibration images (the mean of their minima and maxima),
    which is right for a hidden layer and wrong for the input: the range of ``(pixel / 255 - mean) / std``
    is known exactly, and on the shipped model the calibrated one clipped reds below 3, greens above 249 and
    blues above 237 of 255. The full range's step is 1.07-1.09 pixel levels, and it took the labels that
    differ from fp32 from 4 to 2 on held-out Validation images and from 6 to 4 on Test (model card).
    """
    import openvino as ov

    mean, std = np.asarray(meta.mean, dtype=np.float64), np.asarray(meta.std, dtype=np.float64)
    low, high = float(np.min((0.0 - mean) / std)), float(np.max((1.0 - mean) / std))
    changed = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize" or not _fed_by_the_input(node.input_value(0).get_node()):
            continue
        for port, value in ((1, low), (2, high), (3, low), (4, high)):
            node.input(port).replace_source_output(ov.op.Constant(np.array(value, dtype=np.float32)).output(0))
        changed += 1
    return changed


def _fed_by_the_input(node) -> bool:
    """Whether ``node`` computes from the model's Parameter through the input path's elementwise ops only."""
    while node.get_type_name() in _INPUT_PATH_OPS:
        variable = [v.get_node() for v in node.input_values() if v.get_node().get_type_name() != "Constant"]
        if len(variable) != 1:
            return False
        node = variable[0]
    return node.get_type_name() == "Parameter"


def export_openvino(onnx_path: Path, out: Path) -> Path:
    """OpenVINO IR (``.xml`` + ``.bin``) of an ONNX file, weights kept in their precision."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(out), compress_to_fp16=False)
    return out


# --- acceptance ------------------------------------------------------------------------------------------


def agreement_figures(labels: np.ndarray, reference: np.ndarray, candidate: np.ndarray, threshold: float) -> dict:
    """ROC-AUC of both, their difference, and the share of labels (at ``threshold``) that agree."""
    from sklearn.metrics import roc_auc_score

    auc_reference = float(roc_auc_score(labels, reference))
    auc = float(roc_auc_score(labels, candidate))
    agreement = float(np.mean((reference >= threshold) == (candidate >= threshold)))
    return {
        "roc_auc": round(auc, 5),
        "roc_auc_fp32": round(auc_reference, 5),
        "roc_auc_drop": round(auc_reference - auc, 5),
        "label_agreement": round(agreement, 5),
        "max_abs_probability_difference": round(float(np.max(np.abs(reference - candidate))), 5),
        "accepted": bool(auc_reference - auc <= MAX_AUC_DROP and agreement >= MIN_LABEL_AGREEMENT),
    }


@dataclass
class ExportResult:
    folder: Path
    files: dict[str, str]
    precisions: dict[str, dict]


def export(
    checkpoint: Path,
    out: Path,
    formats: Iterable[str] = ("onnx",),
    calibration_folder: Path | None = None,
    calibration_images: int = 256,
    accept_on: Path | None = None,
    accept_limit: int | None = None,
    threads: int | None = None,
) -> ExportResult:
    """Write the serving files for ``checkpoint`` into ``out`` and, given a test folder, check precisions."""
    checkpoint, out = Path(checkpoint), Path(out)
    meta = read_meta(checkpoint)
    stem = model_stem(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    local = out / f"{stem}.safetensors"
    if local.resolve() != checkpoint.resolve():
        shutil.copyfile(checkpoint, local)
    files = {"torch-fp32": local.name}
    fp32 = export_onnx(local, out / f"{stem}.onnx")
    files["onnx-fp32"] = fp32.name
    calibration = None
    if calibration_folder is not None:
        calibration, _ = pixels_of([p for p, _ in labelled_images(calibration_folder, calibration_images)], meta)
        files["onnx-int8"] = quantize_int8(fp32, out / f"{stem}.int8.onnx", calibration).name
    if "openvino" in formats:
        files["openvino-fp32"] = export_openvino(fp32, out / f"{stem}.xml").name
        if calibration is not None:
            files["openvino-int8"] = quantize_openvino_int8(fp32, out / f"{stem}.int8.xml", calibration, meta).name
    sidecar = {"format": SERVING_FORMAT, "meta": json.loads(meta.to_json()), "files": files, "precisions": {}}
    _write_sidecar(local, sidecar)

    precisions: dict[str, dict] = {}
    if accept_on is not None:
        precisions = check_precisions(local, accept_on, accept_limit, threads)
        sidecar["precisions"] = precisions
        _write_sidecar(local, sidecar)
    return ExportResult(out, files, precisions)


def _write_sidecar(checkpoint: Path, document: dict) -> None:
    sidecar_path(checkpoint).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def check_precisions(checkpoint: Path, test_folder: Path, limit: int | None = None, threads: int | None = None) -> dict:
    """Acceptance figures of every reduced precision installed, against fp32 on the same backend."""
    meta = read_meta(checkpoint)
    samples = labelled_images(test_folder, limit)
    batch, kept = pixels_of([p for p, _ in samples], meta)
    labels = np.array([samples[i][1] for i in kept])

    def probabilities(backend: str, precision: str) -> np.ndarray:
        predictor = Predictor(checkpoint, device="cpu", torch_threads=threads, backend=backend, precision=precision)
        return np.concatenate([predictor.predict_pixels(batch[i : i + 64]) for i in range(0, len(batch), 64)])

    results: dict[str, dict] = {}
    for backend in ("onnxruntime", "openvino"):
        if not backend_installed(backend):
            continue
        reference = probabilities(backend, "fp32")
        candidates = ["int8"] + (["bf16"] if backend == "openvino" else [])
        for precision in candidates:
            name = f"{backend}-{precision}"
            if precision == "bf16" and not cpu_has_native_bf16():
                results[name] = {"accepted": False, "reason": "not measured: this CPU has no avx512_bf16/amx"}
                continue
            try:
                candidate = probabilities(backend, precision)
            except Exception as exc:  # noqa: BLE001 - a missing file or unsupported precision is a finding
                results[name] = {"accepted": False, "reason": f"{type(exc).__name__}: {exc}"}
                continue
            figures = agreement_figures(labels, reference, candidate, meta.threshold)
            figures.update(test_images=int(len(labels)), test_folder=Path(test_folder).name)
            results[name] = figures
            logger.info("%s: %s", name, figures)
    return results


def export_command(
    checkpoint: Path = typer.Argument(..., help="The .safetensors checkpoint (e.g. one made by `dfmod train`)."),
    out: Path = typer.Option(..., "--out", help="Folder for the serving files (created)."),
    formats: list[str] = typer.Option(["onnx"], "--format", help="onnx (always written) and/or openvino (IR); repeat for both."),
    calibration: Path | None = typer.Option(
        None, help="Folder with Real/ and Fake/ images (the Validation split) to calibrate int8 on; no int8 without it."
    ),
    calibration_images: int = typer.Option(256, help="Calibration images (a seeded sample)."),
    accept_on: Path | None = typer.Option(
        None, help="Folder with Real/ and Fake/ images (the Test split) on which each reduced precision must match "
        f"fp32 (ROC-AUC within {MAX_AUC_DROP}, labels agreeing >= {MIN_LABEL_AGREEMENT:.1%}) to be accepted."
    ),
    accept_limit: int | None = typer.Option(None, help="Use at most this many test images (a seeded sample)."),
) -> None:
    """Export a checkpoint for serving: folded, dynamic batch, uint8 input, ModelMeta carried along."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    unknown = set(formats) - {"onnx", "openvino"}
    if unknown:
        raise typer.BadParameter(f"--format takes onnx or openvino, not {', '.join(sorted(unknown))}")
    if not checkpoint.is_file():
        raise typer.BadParameter(f"{checkpoint} does not exist")
    result = export(checkpoint, out, formats, calibration, calibration_images, accept_on, accept_limit)
    for name, file in result.files.items():
        typer.echo(f"{name:16} {out / file}")
    for name, figures in result.precisions.items():
        verdict = "accepted" if figures.get("accepted") else "rejected"
        detail = figures.get("reason") or (
            f"ROC-AUC {figures['roc_auc']:.4f} vs fp32 {figures['roc_auc_fp32']:.4f}, labels agree "
            f"{figures['label_agreement']:.2%} on {figures['test_images']} images"
        )
        typer.echo(f"{name:16} {verdict}: {detail}")
    typer.echo(f"sidecar          {sidecar_path(out / model_stem(checkpoint))}")
