"""Data sets in the paper's layout: folder checks, file lists, image verification, datasets and augmentation.

The layout is the Kaggle copy of OpenForensics used by the paper::

    DATA_DIR/Train/{Real,Fake}/*.jpg
    DATA_DIR/Validation/{Real,Fake}/*.jpg
    DATA_DIR/Test/{Real,Fake}/*.jpg

Folder names match case-insensitively (``Real`` or ``real``). Label 0 is real and 1 is fake, the class order
of :data:`dfmod.detector.CLASS_NAMES`.

Every image goes through :func:`dfmod.imaging.decode_image`, the worker's decoder, and
:func:`dfmod.detector.to_pixels`, the worker's resize; training applies its augmentation to those pixels and
both datasets normalise with :func:`dfmod.torch_model.normalised_tensor`, the arithmetic of the serving
module that the exported models carry, so the only difference between training and serving is the
augmentation itself.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dfmod.detector import ModelMeta, to_pixels
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
    """Decode a file exactly as the worker decodes an upload (EXIF, draft downscaling, RGB)."""
    return decode_image(Path(path).read_bytes(), limits or ImageLimits(), target=meta.image_size)


@dataclass(frozen=True)
class Augmentation:
    """The paper's training augmentation; applied after the resize to the model input, before normalisation."""

    hflip: float = 0.5
    rotation: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def build(self):
        from torchvision import transforms

        steps = []
        if self.hflip > 0:
            steps.append(transforms.RandomHorizontalFlip(p=self.hflip))
        if self.rotation > 0:
            steps.append(transforms.RandomRotation(self.rotation, interpolation=transforms.InterpolationMode.BILINEAR))
        if any((self.brightness, self.contrast, self.saturation, self.hue)):
            steps.append(transforms.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue))
        return transforms.Compose(steps)


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

        image = self._transform(Image.fromarray(to_pixels(image, self.meta)))
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
            pixels = to_pixels(load_image(sample.path, self.meta, self.limits), self.meta)
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
