#!/usr/bin/env python3
"""The OpenVINO int8 recipes of the model card's table "The int8 recipe of 2026-12-06", measured again.

    python scripts/int8_recipes.py DATA_DIR [--checkpoint CKPT] [--calibration-images 300] [--out DIR]

Each recipe is NNCF post-training quantization (mixed preset) of the checkpoint's fp32 ONNX export, calibrated
on the seeded sample of ``DATA_DIR/Validation`` that ``dfmod export`` uses, and is compared with openvino-fp32
on the Validation images not used for calibration and on ``DATA_DIR/Test``, decoded the worker's way. Printed per
recipe: the labels that differ from fp32 (at the checkpoint's threshold) on each, the ROC-AUC drop and the
largest P(fake) change. The shipped recipe is :func:`dfmod.export.quantize_openvino_int8`; a previously shipped
file can be measured alongside with ``--file NAME=PATH.xml``. Needs the training and openvino extras (a few
minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from dfmod.detector import default_checkpoint_path, fake_probabilities, openvino_core, read_meta
from dfmod.export import (
    OPENVINO_FP32_LAYERS,
    agreement_figures,
    export_onnx,
    labelled_images,
    pixels_of,
    quantize_openvino_int8,
)

HEAD = (".*conv_head.*", ".*classifier.*")


def recipes():
    """name -> (layers left in fp32, range estimator or None for NNCF's default, widen the input's range)."""
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return {
        "first conv, head and classifier in fp32": ((".*conv_stem.*", *HEAD), None, False),
        "the first conv quantized, calibrated input range": (HEAD, None, False),
        "the first conv quantized, input range every pixel value (shipped)": (OPENVINO_FP32_LAYERS, None, True),
        "everything quantized, calibrated input range": ((), None, False),
        "the first conv quantized, every range the calibration's global min/max": (
            HEAD, RangeEstimatorParametersSet.MINMAX, False,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="folder with Validation/ and Test/, each with Real/ and Fake/")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--file", action="append", default=[], help="NAME=PATH.xml: an existing int8 file too")
    parser.add_argument("--out", type=Path, default=None, help="keep the quantized files here")
    args = parser.parse_args()
    logging.basicConfig(level="WARNING")

    checkpoint = args.checkpoint or default_checkpoint_path()
    meta = read_meta(checkpoint)
    out = args.out or Path(tempfile.mkdtemp(prefix="dfmod-int8-"))
    out.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(checkpoint, out / "fp32.onnx")

    calibration_files = [p for p, _ in labelled_images(args.data / "Validation", args.calibration_images)]
    calibration, _ = pixels_of(calibration_files, meta)
    chosen = set(calibration_files)
    held_out = [(p, label) for p, label in labelled_images(args.data / "Validation") if p not in chosen]
    splits = {}
    for name, samples in (("held-out Validation", held_out), ("Test", labelled_images(args.data / "Test"))):
        batch, kept = pixels_of([p for p, _ in samples], meta)
        splits[name] = (batch, np.array([samples[i][1] for i in kept]))

    core = openvino_core()

    def probabilities(model_path: Path, batch: np.ndarray) -> np.ndarray:
        compiled = core.compile_model(core.read_model(str(model_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        request = compiled.create_infer_request()
        logits = [request.infer({0: batch[i : i + 64]})[compiled.output(0)] for i in range(0, len(batch), 64)]
        return fake_probabilities(np.concatenate(logits), meta.temperature)

    references = {name: probabilities(fp32, batch) for name, (batch, _) in splits.items()}
    files = {name: Path(path) for name, path in (item.split("=", 1) for item in args.file)}
    for index, (name, (fp32_layers, estimator, widen)) in enumerate(recipes().items()):
        files[name] = quantize_openvino_int8(
            fp32, out / f"recipe{index}.xml", calibration, meta,
            fp32_layers=fp32_layers, range_estimator=estimator, input_pixel_range=widen,
        )

    print(f"labels differing from openvino-fp32 (threshold {meta.threshold:.4f}); quantized files in {out}")
    for name, path in files.items():
        cells = []
        for split, (batch, labels) in splits.items():
            candidate = probabilities(path, batch)
            figures = agreement_figures(labels, references[split], candidate, meta.threshold)
            differing = int(np.sum((references[split] >= meta.threshold) != (candidate >= meta.threshold)))
            cells.append(
                f"{split}: {differing} of {len(labels)} (AUC drop {figures['roc_auc_drop']:+.5f}, "
                f"largest change {figures['max_abs_probability_difference']:.3f})"
            )
        print(f"- {name}\n    " + "\n    ".join(cells))


if __name__ == "__main__":
    main()
