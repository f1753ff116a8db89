#!/usr/bin/env python3
"""Does the worker's JPEG fast path change verdicts? Pillow-only decoding against the default path.

    python scripts/compare_decoders.py DATASETS/faces256/Test DATASETS/dfdc224/Test

For every image under FOLDER/{Real,Fake} the model input is made twice: by Pillow alone (decode, bilinear
resize: every file's path before ``dfmod.imaging.decode_jpeg_scaled``) and by the default path
(libjpeg-turbo's DCT scaling where it applies). Both go through the same fp32 backend and the checkpoint's
calibrated threshold. Printed per folder: ROC-AUC and accuracy of each, labels that agree, and the largest
change of P(fake). The decoder is held to the rule a precision is held to (model card): ROC-AUC within 0.002
and at least 99.5 % of labels the same.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dfmod.detector import Predictor, fake_probabilities, load_pixels
from dfmod.imaging import ImageLimits


def _images(folder: Path) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name.lower() in ("real", "fake"):
            found = sorted(p for p in child.rglob("*") if p.is_file())
            paths += found
            labels += [int(child.name.lower() == "fake")] * len(found)
    return paths, np.array(labels)


def _probabilities(predictor: Predictor, paths: list[Path], scaled_jpeg: bool, batch: int = 64) -> np.ndarray:
    limits, meta = ImageLimits(), predictor.meta
    width, height = meta.image_size
    out = np.empty(len(paths))
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        pixels = np.empty((len(chunk), height, width, 3), dtype=np.uint8)
        for row, path in enumerate(chunk):
            load_pixels(path.read_bytes(), limits, meta, out=pixels[row], scaled_jpeg=scaled_jpeg)
        out[start : start + len(chunk)] = fake_probabilities(predictor.logits(pixels), meta.temperature)
    return out


def compare(predictor: Predictor, folder: Path) -> dict:
    from sklearn.metrics import roc_auc_score

    paths, labels = _images(folder)
    pillow = _probabilities(predictor, paths, scaled_jpeg=False)
    default = _probabilities(predictor, paths, scaled_jpeg=True)
    threshold = predictor.threshold
    auc_pillow, auc_default = roc_auc_score(labels, pillow), roc_auc_score(labels, default)
    agree = float(np.mean((pillow >= threshold) == (default >= threshold)))
    return {
        "folder": str(folder), "images": len(paths), "threshold": round(threshold, 4),
        "roc_auc_pillow": round(auc_pillow, 5), "roc_auc_default": round(auc_default, 5),
        "accuracy_pillow": round(float(np.mean((pillow >= threshold) == labels)), 4),
        "accuracy_default": round(float(np.mean((default >= threshold) == labels)), 4),
        "labels_agree": round(agree, 4), "max_abs_change": round(float(np.max(np.abs(pillow - default))), 4),
        "mean_abs_change": round(float(np.mean(np.abs(pillow - default))), 5),
        "accepted": bool(abs(auc_default - auc_pillow) <= 0.002 and agree >= 0.995),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="Folders with Real/ and Fake/ (a Test split).")
    parser.add_argument("--checkpoint", type=Path, default=None, help="Default: the shipped model.")
    parser.add_argument("--backend", default="onnxruntime", help="An fp32 backend, so only the decoder differs.")
    parser.add_argument("--json", action="store_true", help="One JSON object per folder instead of a table.")
    args = parser.parse_args()
    predictor = Predictor(args.checkpoint, backend=args.backend, precision="fp32")
    rows = [compare(predictor, folder) for folder in args.folders]
    if args.json:
        print("\n".join(json.dumps(row) for row in rows))
        return
    keys = ["images", "roc_auc_pillow", "roc_auc_default", "accuracy_pillow", "accuracy_default", "labels_agree",
            "max_abs_change", "accepted"]
    print("| folder | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        print(f"| {row['folder']} | " + " | ".join(str(row[key]) for key in keys) + " |")


if __name__ == "__main__":
    main()
