"""Data sets in the paper's layout: folder checks, file lists, image verification, datasets and augmentation.

The layout is the Kaggle copy of OpenForensics used by the paper::

    DATA_DIR/Train/{Real,Fake}/*.jpg
    DATA_DIR/Validation/{Real,Fake}/*.jpg
    DATA_DIR/Test/{Real,Fake}/*.jpg
    DATA_DIR/manifest.csv          (optional: file -> source, for per-source metrics and balanced sampling)

Folder names match case-insensitively (``Real`` or ``real``). Label 0 is real and 1 is fake, the class order
of :data:`dfmod.detector.CLASS_NAMES`. Training may mix several such roots (faces256 and dfdc224): every
:class:`Sample` then knows its root (``domain``) and its ``source`` (from the root's manifest, else the root's
name), and :func:`balanced_weights` gives each (domain, label) the same share of an epoch so that neither a
data set's quirks (size, sharpness, compression) nor a one-label source becomes the real/fake cue.

Validation images go through :func:`dfmod.detector.load_pixels`, the worker's own path (libjpeg-turbo's DCT
scaling for clean JPEGs), so the epoch chosen is judged on what the service will see. Training images are
decoded by :func:`dfmod.imaging.decode_image` (Pillow, whose images the augmentation works on;
``scripts/compare_decoders.py`` measures how far the two decoders' verdicts differ) and resized by
:func:`dfmod.detector.resize_for_model`; training applies its augmentation to those pixels and both
datasets normalise with :func:`dfmod.torch_model.normalised_tensor`, the arithmetic of the serving module
that the exported models carry, so what differs between training and serving is the augmentation and, for
256-px JPEGs, the decoder's resampling (within the model card's acceptance rule).
"""

from __future__ import annotations

import csv
import io
import logging
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from torch.utils.data import Dataset

from dfmod.detector import ModelMeta, load_pixels, resize_for_model
from dfmod.imaging import ImageLimits, ImageRejected, decode_image, probe_image

logger = logging.getLogger(__name__)

TRAIN_SPLIT = "Train"
VALIDATION_SPLIT = "Validation"
TEST_SPLIT = "Test"
CLASS_FOLDERS = ("Real", "Fake")  # index = label, the order of dfmod.detector.CLASS_NAMES
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# How many offending files an error message lists before it summarises the rest as a count.
MAX_LISTED = 20


class DatasetError(ValueError):
    """The data folder cannot be used as given; the message says what is wrong and where."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    source: str = ""  # from the root's manifest.csv; the root's name when it has none
    domain: str = ""  # the data root the image came from


MANIFEST = "manifest.csv"
UNKNOWN_SOURCE = "(not in manifest)"


def find_manifest(folder: Path) -> Path | None:
    """``manifest.csv`` in the folder, else in its parent (faces256 keeps it beside Train/Validation/Test)."""
    folder = Path(folder)
    for candidate in (folder / MANIFEST, folder.parent / MANIFEST):
        if candidate.is_file():
            return candidate
    return None


def read_sources(manifest: Path, split: str | None = None) -> dict[str, str]:
    """File name -> source from a manifest; rows of ``split`` win when the manifest has a split column."""
    with Path(manifest).open(newline="") as handle:
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


def find_child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name``, ignoring case; None if there is none."""
    if not parent.is_dir():
        return None
    matches = sorted(child for child in parent.iterdir() if child.is_dir() and child.name.lower() == name.lower())
    if len(matches) > 1:
        # Case-sensitive file systems can hold both "Real" and "real"; merging them silently would hide a mistake.
        raise DatasetError(f"{parent} has several folders named {name!r} in different case: "
                           f"{', '.join(m.name for m in matches)}; keep one")
    return matches[0] if matches else None


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, hidden files skipped), sorted by name."""
    files = []
    ignored = 0
    for child in folder.iterdir():
        if child.name.startswith(".") or not child.is_file():
            continue
        if child.suffix.lower() in IMAGE_EXTENSIONS:
            files.append(child)
        else:
            ignored += 1
    if ignored:
        logger.warning("%s: ignored %d files without an image extension", folder, ignored)
    return sorted(files, key=lambda path: path.name)


def _take(files: list[Path], limit: int | None, seed: int) -> list[Path]:
    if limit is None or len(files) <= limit:
        return files
    # A seeded random subset, not the first N names: file names start with their source, so the first N would
    # all come from one source.
    return sorted(random.Random(seed).sample(files, limit), key=lambda path: path.name)


def scan_labelled_folder(
    folder: Path, *, limit_per_class: int | None = None, seed: int = 0, allow_empty_class: bool = False
) -> list[Sample]:
    """Samples of a folder holding ``Real/`` and ``Fake/``; raises :class:`DatasetError` listing every problem."""
    samples, problems = _scan(folder, limit_per_class, seed, allow_empty_class)
    if problems:
        raise DatasetError(_problem_message(folder, problems))
    return samples


def _scan(folder: Path, limit: int | None, seed: int, allow_empty_class: bool) -> tuple[list[Sample], list[str]]:
    folder = Path(folder)
    if not folder.is_dir():
        return [], [f"{folder} is not a folder"]
    samples: list[Sample] = []
    problems: list[str] = []
    for label, class_name in enumerate(CLASS_FOLDERS):
        class_dir = find_child_dir(folder, class_name)
        if class_dir is None:
            problems.append(f"missing class folder {folder / class_name} (expected {'/'.join(CLASS_FOLDERS)}, "
                            "any case)")
            continue
        files = list_images(class_dir)
        if not files and not allow_empty_class:
            problems.append(f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        samples.extend(Sample(path, label) for path in _take(files, limit, seed + label))
    return samples, problems


def scan_dataset(
    data_dir: Path,
    splits: Sequence[str] = (TRAIN_SPLIT, VALIDATION_SPLIT),
    *,
    limit_per_class: int | None = None,
    seed: int = 0,
) -> dict[str, list[Sample]]:
    """Samples of each split of ``data_dir``; all structure problems are reported together in one error."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"data folder {data_dir} does not exist or is not a folder")
    result: dict[str, list[Sample]] = {}
    problems: list[str] = []
    for index, split in enumerate(splits):
        split_dir = find_child_dir(data_dir, split)
        if split_dir is None:
            present = ", ".join(sorted(child.name for child in data_dir.iterdir() if child.is_dir())) or "none"
            problems.append(f"missing split folder {data_dir / split} (sub-folders present: {present})")
            continue
        samples, split_problems = _scan(split_dir, limit_per_class, seed + 1000 * index, allow_empty_class=False)
        problems.extend(split_problems)
        result[split] = samples
    if problems:
        raise DatasetError(_problem_message(data_dir, problems))
    return result


def root_name(root: Path) -> str:
    return Path(root).resolve().name


def scan_roots(
    roots: Sequence[Path],
    splits: Sequence[str] = (TRAIN_SPLIT, VALIDATION_SPLIT),
    *,
    limit_per_class: int | None = None,
    seed: int = 0,
    exclude_sources: Iterable[str] = (),
) -> dict[str, list[Sample]]:
    """:func:`scan_dataset` over several roots, each sample tagged with its domain (root) and source.

    ``exclude_sources`` drops every image of those sources (leave-one-source-out runs); a source name that no
    root has is an error, so a typo cannot silently train on everything.
    """
    names = [root_name(root) for root in roots]
    if len(set(names)) != len(names):
        raise DatasetError(f"data roots must have distinct folder names (got {', '.join(names)})")
    excluded = set(exclude_sources)
    result: dict[str, list[Sample]] = {split: [] for split in splits}
    seen_sources: set[str] = set()
    for root, name in zip(roots, names, strict=True):
        scanned = scan_dataset(root, splits, limit_per_class=limit_per_class, seed=seed)
        manifest = find_manifest(Path(root))
        for split, samples in scanned.items():
            sources = read_sources(manifest, split) if manifest else {}
            for sample in samples:
                source = sources.get(sample.path.name, name if not sources else UNKNOWN_SOURCE)
                seen_sources.add(source)
                if source not in excluded:
                    result[split].append(Sample(sample.path, sample.label, source, name))
    unknown = excluded - seen_sources
    if unknown:
        raise DatasetError(f"no image belongs to the excluded source(s) {', '.join(sorted(unknown))} "
                           f"(sources present: {', '.join(sorted(seen_sources))})")
    return result


def group_counts(samples: Sequence[Sample]) -> dict[tuple[str, int, str], int]:
    """Images per (domain, label, source)."""
    counts: dict[tuple[str, int, str], int] = {}
    for sample in samples:
        key = (sample.domain, sample.label, sample.source)
        counts[key] = counts.get(key, 0) + 1
    return counts


def balanced_weights(samples: Sequence[Sample], source_power: float = 0.5) -> np.ndarray:
    """Per-image sampling weights (summing to 1) that balance domains, labels within a domain, and sources.

    Every domain (data root) gets the same share; within a domain, real and fake get half each, so a domain
    cannot predict the label; within a (domain, label), a source of ``n`` images gets a share proportional to
    ``n ** source_power`` (0: every source alike, however small; 1: as the data set has them; the default 0.5
    lifts rare sources such as Photoshop composites without repeating their few images endlessly). A domain
    holding only one label gives that label its whole share.
    """
    if not 0.0 <= source_power <= 1.0:
        raise ValueError("source_power must be in [0, 1]")
    counts = group_counts(samples)
    domains = sorted({domain for domain, _label, _source in counts})
    shares: dict[tuple[str, int, str], float] = {}
    for domain in domains:
        labels = sorted({label for d, label, _s in counts if d == domain})
        for label in labels:
            groups = {key: n for key, n in counts.items() if key[0] == domain and key[1] == label}
            total = sum(n ** source_power for n in groups.values())
            for key, n in groups.items():
                shares[key] = (1.0 / len(domains)) * (1.0 / len(labels)) * (n ** source_power) / total
    weights = np.array([shares[(s.domain, s.label, s.source)] / counts[(s.domain, s.label, s.source)]
                        for s in samples], dtype=np.float64)
    return weights / weights.sum()


def _problem_message(root: Path, problems: list[str]) -> str:
    expected = "expected the layout Train/, Validation/, Test/, each with Real/ and Fake/ image folders"
    return f"unusable data folder {root}: " + "; ".join(problems) + f" ({expected})"


def _probe(path: Path, limits: ImageLimits) -> str | None:
    try:
        probe_image(path.read_bytes(), limits)
    except ImageRejected as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable: {exc}"
    return None


def find_unreadable(samples: Iterable[Sample], limits: ImageLimits | None = None,
                    threads: int = 8) -> list[tuple[Path, str]]:
    """Files whose header Pillow cannot read or that the worker would reject (size limits), with the reason.

    Only headers are parsed, so this takes seconds for ten thousand images; a file that is damaged past its
    header is still caught, with its path, when training first decodes it.
    """
    limits = limits or ImageLimits()
    paths = [sample.path for sample in samples]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        reasons = list(pool.map(lambda path: _probe(path, limits), paths))
    return [(path, reason) for path, reason in zip(paths, reasons, strict=True) if reason is not None]


def check_readable(samples: Sequence[Sample], limits: ImageLimits | None = None, threads: int = 8) -> None:
    """Raise :class:`DatasetError` naming every image that cannot be opened."""
    bad = find_unreadable(samples, limits, threads)
    if bad:
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:MAX_LISTED])
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise DatasetError(f"{len(bad)} of {len(samples)} images cannot be read: {listed}{more}. "
                           "Remove or replace them and run again.")


def load_image(path: Path, meta: ModelMeta, limits: ImageLimits | None = None):
    """Decode a file with Pillow as the worker decodes files that are not clean JPEGs (EXIF, draft, RGB), for
    the augmentation, which works on Pillow images."""
    return decode_image(Path(path).read_bytes(), limits or ImageLimits(), target=meta.image_size)


RECIPES = ("paper", "transfer")


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation; the defaults are the paper's recipe (flip, rotation, colour jitter).

    The ``transfer`` recipe adds what Wang et al. (2020, "CNN-generated images are surprisingly easy to
    spot... for now") found makes a detector hold up on generators it never saw: random resized crops,
    Gaussian blur and JPEG re-encoding at random strengths. Re-encoding also hides the compression level as a
    label cue (dfdc224's real files are larger than its fakes). Crops are taken from the decoded image at full
    resolution and resized to the model input; blur and JPEG then act on the model-sized image, as a platform's
    recompression of an upload would; the paper's flip, rotation and jitter come last.
    """

    hflip: float = 0.5
    rotation: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    crop_prob: float = 0.0  # probability of a random resized crop instead of the plain resize
    crop_scale_min: float = 0.6  # smallest crop area as a share of the image
    blur_prob: float = 0.0
    blur_sigma_max: float = 3.0  # Gaussian blur sigma drawn from U(0, max), in model-input pixels
    jpeg_prob: float = 0.0
    jpeg_quality_min: int = 30  # quality drawn from U{min..max}
    jpeg_quality_max: int = 100

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> Augmentation:
        """The named recipe: ``paper`` (the baseline) or ``transfer`` (paper + crop, blur and JPEG at p=0.5)."""
        if name == "paper":
            base = cls()
        elif name == "transfer":
            base = cls(crop_prob=0.5, blur_prob=0.5, jpeg_prob=0.5)
        else:
            raise ValueError(f"unknown augmentation recipe {name!r}; use one of {', '.join(RECIPES)}")
        return replace(base, **overrides)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def problems(self) -> list[str]:
        found = []
        for name in ("hflip", "crop_prob", "blur_prob", "jpeg_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                found.append(f"augmentation {name} must be a probability in [0, 1]")
        if not 0.0 < self.crop_scale_min <= 1.0:
            found.append("augmentation crop_scale_min must be in (0, 1]")
        if self.blur_sigma_max < 0:
            found.append("augmentation blur_sigma_max must not be negative")
        if not 1 <= self.jpeg_quality_min <= self.jpeg_quality_max <= 100:
            found.append("augmentation JPEG qualities must satisfy 1 <= min <= max <= 100")
        return found

    def build(self):
        """The paper's steps (flip, rotation, jitter) as one torchvision transform on a PIL image."""
        from torchvision import transforms

        steps = []
        if self.hflip > 0:
            steps.append(transforms.RandomHorizontalFlip(p=self.hflip))
        if self.rotation > 0:
            steps.append(transforms.RandomRotation(self.rotation, interpolation=transforms.InterpolationMode.BILINEAR))
        if any((self.brightness, self.contrast, self.saturation, self.hue)):
            steps.append(transforms.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue))
        return transforms.Compose(steps)

    def crop(self, image: Image.Image, meta: ModelMeta) -> Image.Image:
        """A random resized crop to the model input with probability ``crop_prob``, else the plain resize."""
        if self.crop_prob > 0 and random.random() < self.crop_prob:
            from torchvision import transforms

            width, height = meta.image_size
            cropper = transforms.RandomResizedCrop((height, width), scale=(self.crop_scale_min, 1.0),
                                                   ratio=(3 / 4, 4 / 3),
                                                   interpolation=transforms.InterpolationMode.BILINEAR)
            return cropper(image)
        return resize_for_model(image, meta)

    def degrade(self, image: Image.Image) -> Image.Image:
        """Gaussian blur and JPEG re-encoding, each with its probability and a random strength."""
        if self.blur_prob > 0 and random.random() < self.blur_prob:
            sigma = random.uniform(0.0, self.blur_sigma_max)
            if sigma > 0:
                image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        if self.jpeg_prob > 0 and random.random() < self.jpeg_prob:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=random.randint(self.jpeg_quality_min, self.jpeg_quality_max))
            buffer.seek(0)
            image = Image.open(buffer).convert("RGB")
        return image


class TrainDataset(Dataset):
    """Decoded, resized, augmented and normalised training images: ``(tensor CHW float32, label)``."""

    def __init__(self, samples: Sequence[Sample], meta: ModelMeta, augmentation: Augmentation) -> None:
        self.samples = list(samples)
        self.meta = meta
        self.augmentation = augmentation
        self._transform = augmentation.build()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            image = load_image(sample.path, self.meta)
        except (ImageRejected, OSError) as exc:
            # DataLoader workers re-raise this in the training process with its message, so the file is named.
            raise DatasetError(f"cannot decode training image {sample.path}: {exc}") from exc
        from dfmod.torch_model import normalised_tensor

        image = self.augmentation.degrade(self.augmentation.crop(image.convert("RGB"), self.meta))
        image = self._transform(image)
        return normalised_tensor(np.asarray(image), self.meta), sample.label


class EvalDataset(Dataset):
    """Images preprocessed as the worker does: ``(tensor, label, index, error)``.

    A file that cannot be decoded yields a zero tensor and its error text instead of raising, so evaluation
    can report it and go on; training-time validation has checked its files beforehand.
    """

    def __init__(self, samples: Sequence[Sample], meta: ModelMeta, limits: ImageLimits | None = None) -> None:
        self.samples = list(samples)
        self.meta = meta
        self.limits = limits or ImageLimits()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        try:
            pixels = load_pixels(Path(sample.path).read_bytes(), self.limits, self.meta)
            error = ""
        except ImageRejected as exc:
            pixels, error = self._blank(), str(exc)
        except OSError as exc:
            pixels, error = self._blank(), f"unreadable: {exc}"
        from dfmod.torch_model import normalised_tensor

        return normalised_tensor(pixels, self.meta), sample.label, index, error

    def _blank(self) -> np.ndarray:
        height, width = self.meta.input_size[1:]
        return np.zeros((height, width, 3), dtype=np.uint8)
