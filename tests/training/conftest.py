"""Tiny synthetic data sets for the training tests: real images are dark, fake ones bright."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SPLITS = ("Train", "Validation", "Test")


def write_image(path: Path, rng: np.random.Generator, fake: bool, size: int = 64) -> None:
    # Dark vs bright noise with a random gradient: trivially separable, yet not constant images.
    base = 170 if fake else 60
    noise = rng.normal(0, 25, size=(size, size, 3))
    gradient = np.linspace(-20, 20, size)[None, :, None] * rng.uniform(-1, 1)
    pixels = np.clip(base + noise + gradient, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def make_dataset(root: Path, per_class: int = 8, size: int = 64, splits=SPLITS, seed: int = 0,
                 class_names=("Real", "Fake")) -> Path:
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, name in enumerate(class_names):
            for i in range(per_class):
                write_image(root / split / name / f"{name.lower()}_{split.lower()}_{i:03d}.jpg", rng, label == 1, size)
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "tinyset")


def tiny_config(data_dir: Path, out: Path, **overrides):
    """A TrainConfig small enough for CPU tests: 64x64 input, batch 8, no worker processes, no progress bars."""
    from dfmod.training.train import TrainConfig

    settings = dict(data_dir=data_dir, out=out, epochs=1, batch_size=8, image_size=64, workers=0, progress=False,
                    device="cpu", seed=42)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One epoch on a tiny set, shared by the tests that only read its outputs."""
    from dfmod.training.train import train

    root = tmp_path_factory.mktemp("trained")
    data = make_dataset(root / "tinyset")
    result = train(tiny_config(data, root / "run" / "ckpt.safetensors"))
    return data, result
