"""Whole-photo evaluation of the face stage: face crops placed small into larger images, scored three ways.

The detector was trained and tested on face crops; uploads are whole photos. :func:`build_composites` makes a
seeded test set from held-out crops (e.g. faces256 ``Test``): each crop is resized to 10-30 % of the short side
of a 1200-2400 px canvas (4:3 or 3:4) with a smooth, face-free background and saved as JPEG quality 90, like
an upload. :func:`evaluate_whole_photos` then reports, on the same images:

* ``crops``: the classifier on the crops themselves (the reference);
* ``whole_image``: the composite squashed to the model input, as the service does without the face stage;
* ``face_stage``: :class:`~dfmod.faces.FaceFinder`, a crop per face, every crop of a batch in one forward pass,
  the image's verdict = its most-fake face; an image with no face counts as wrong (``no_face`` is not a guess);

and the face detection rate: the share of composites where a found face's crop overlaps the placed crop
(intersection over union >= 0.3).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dfmod.training import scores
from dfmod.training.data import Sample, find_manifest, read_sources, scan_labelled_folder

logger = logging.getLogger(__name__)

REPORT_FILE = "whole_photos.json"
CANVAS_SIDES = (1200, 2400)
CROP_SHARE = (0.10, 0.30)  # crop side as a share of the canvas's short side
MATCH_IOU = 0.3


@dataclass(frozen=True)
class Composite:
    path: Path
    crop: Path
    label: int
    source: str
    box: tuple[int, int, int, int]  # where the crop was placed


def background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A face-free backdrop: smooth colour fields (upscaled coarse noise), a few soft shapes and fine grain."""
    width, height = size
    generator = np.random.default_rng(rng.getrandbits(32))
    coarse = generator.integers(0, 256, size=(rng.randint(3, 8), rng.randint(3, 8), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 12)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randint(20, width // 3), y0 + rng.randint(20, height // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, 6.0)))
    grain = generator.normal(0, rng.uniform(2, 8), size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))


def build_composites(samples: Sequence[Sample], out_dir: Path, seed: int = 0) -> list[Composite]:
    """One composite per sample (seeded: the same inputs and seed give the same images)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    composites = []
    for index, sample in enumerate(samples):
        rng = random.Random(f"{seed}:{index}:{sample.path.name}")
        long_side = rng.randint(*CANVAS_SIDES)
        size = (long_side, long_side * 3 // 4) if rng.random() < 0.5 else (long_side * 3 // 4, long_side)
        canvas = background(rng, size)
        with Image.open(sample.path) as crop:
            crop = crop.convert("RGB")
            side = int(min(size) * rng.uniform(*CROP_SHARE))
            crop = crop.resize((side, side), Image.Resampling.LANCZOS)
        left, top = rng.randint(0, size[0] - side), rng.randint(0, size[1] - side)
        canvas.paste(crop, (left, top))
        path = out_dir / f"{index:05d}_{('real', 'fake')[sample.label]}_{sample.path.stem}.jpg"
        canvas.save(path, quality=90)
        composites.append(Composite(path, sample.path, sample.label, sample.source,
                                    (left, top, left + side, top + side)))
    return composites


def iou(a: Sequence[int], b: Sequence[int]) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _decode(path: Path, target=None) -> Image.Image:
    from dfmod.imaging import ImageLimits, decode_image

    return decode_image(Path(path).read_bytes(), ImageLimits(), target=target)


def _scores(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, Any]:
    known = ~np.isnan(probs)
    # An image without a verdict (no face found) is an error whatever its label.
    correct = (probs[known] >= threshold).astype(int) == labels[known]
    return {"accuracy": float(correct.sum() / labels.size) if labels.size else None,
            "roc_auc": scores.ranking_metrics(labels[known], probs[known])["roc_auc"],
            "without_verdict": int((~known).sum())}


def evaluate_whole_photos(folder: Path, checkpoint: Path | None, report_dir: Path, *, limit_per_class: int | None = None,
                          seed: int = 0, device: str = "cpu", batch_size: int = 16, finder=None) -> dict[str, Any]:
    """Build composites from ``folder`` (Real/ and Fake/ crops) and score them with and without the face stage."""
    from dfmod.detector import Predictor
    from dfmod.faces import FaceFinder, face_crops

    folder, report_dir = Path(folder), Path(report_dir)
    samples = scan_labelled_folder(folder, limit_per_class=limit_per_class, seed=seed)
    manifest = find_manifest(folder)
    if manifest:
        sources = read_sources(manifest, folder.name)
        samples = [Sample(s.path, s.label, sources.get(s.path.name, ""), "") for s in samples]
    composites = build_composites(samples, report_dir / "composites", seed)
    predictor = Predictor(checkpoint, device=device)
    finder = finder or FaceFinder(device=device)
    threshold = float(predictor.threshold)
    size = predictor.meta.image_size
    labels = np.array([c.label for c in composites])
    crop_probs, whole_probs, stage_probs = (np.full(len(composites), np.nan) for _ in range(3))
    detected = np.zeros(len(composites), dtype=bool)
    faces_found, margins, rows = [], [], []
    detect_seconds = classify_seconds = 0.0
    for start in range(0, len(composites), batch_size):
        batch = composites[start:start + batch_size]
        crop_probs[start:start + len(batch)] = predictor.predict_images([_decode(c.crop, size) for c in batch])
        wholes = [_decode(c.path) for c in batch]
        whole_probs[start:start + len(batch)] = predictor.predict_images(
            [image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0) for image in wholes])
        began = time.perf_counter()
        results = [finder.find(image) for image in wholes]
        detect_seconds += time.perf_counter() - began
        crops = [crop for image, result in zip(wholes, results, strict=True) for crop in face_crops(image, result)]
        began = time.perf_counter()
        probs = predictor.predict_images(crops) if crops else np.zeros(0)  # all faces of the batch at once
        classify_seconds += time.perf_counter() - began
        offset = 0
        for i, (composite, result) in enumerate(zip(batch, results, strict=True)):
            face_probs = probs[offset:offset + len(result.faces)]
            offset += len(result.faces)
            index = start + i
            if len(face_probs):
                stage_probs[index] = float(face_probs.max())
            matches = [face for face in result.faces if iou(face.crop_box, composite.box) >= MATCH_IOU]
            detected[index] = bool(matches)
            if matches:
                face = matches[0]
                margins.append((composite.box[2] - composite.box[0]) / max(face.box[2] - face.box[0],
                                                                           face.box[3] - face.box[1]))
            faces_found.append(len(result.faces))
            rows.append({"composite": composite.path.name, "label": ("real", "fake")[composite.label],
                         "source": composite.source, "placed": composite.box,
                         "faces": [face.as_dict() for face in result.faces], "state": result.state,
                         "p_crop": float(crop_probs[index]), "p_whole": float(whole_probs[index]),
                         "p_face_stage": None if np.isnan(stage_probs[index]) else float(stage_probs[index])})
        logger.info("whole photos: %d/%d", min(start + batch_size, len(composites)), len(composites))
    n = len(composites)
    report = {
        "n": n, "folder": folder.name, "seed": seed, "threshold": threshold, "model_version": predictor.model_version,
        "detection_rate": float(detected.mean()) if n else None,
        "no_face": int(sum(1 for count in faces_found if count == 0)),
        "faces_per_image_mean": float(np.mean(faces_found)) if n else None,
        "crop_margin_median": float(np.median(margins)) if margins else None,
        "crops": _scores(labels, crop_probs, threshold),
        "whole_image": _scores(labels, whole_probs, threshold),
        "face_stage": _scores(labels, stage_probs, threshold),
        "face_detect_ms_per_image": round(1000 * detect_seconds / n, 1) if n else None,
        "face_classify_ms_per_image": round(1000 * classify_seconds / n, 1) if n else None,
        "canvas_sides": CANVAS_SIDES, "crop_share": CROP_SHARE, "match_iou": MATCH_IOU,
        "detector": getattr(finder, "description", type(finder).__name__),
        "images": rows,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
