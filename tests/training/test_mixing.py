"""Several data roots: sources from manifests, balanced sampling, the transfer recipe, --init from a dfmod
checkpoint, per-source validation and leaving sources out."""

import csv
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dfmod.detector import ModelMeta, read_meta
from dfmod.training.data import Augmentation, DatasetError, Sample, TrainDataset, balanced_weights, scan_roots
from dfmod.training.train import train

from .conftest import make_dataset, tiny_config


def write_manifest(root, source_of):
    """manifest.csv beside the splits, naming each file's source with ``source_of(split, label, name)``."""
    rows = [("split", "label", "source", "file")]
    for split_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for class_dir in sorted(split_dir.iterdir()):
            for path in sorted(class_dir.iterdir()):
                label = class_dir.name.lower()
                rows.append((split_dir.name, label, source_of(split_dir.name, label, path.name), path.name))
    with (root / "manifest.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)


@pytest.fixture
def two_roots(tmp_path):
    """'gans' (reals from two cameras, fakes from two generators, 12 per class) and 'swaps' (one source, 6
    per class, no manifest)."""
    gans = make_dataset(tmp_path / "gans", per_class=12, seed=1)
    write_manifest(gans, lambda split, label, name: (
        ("cam-a" if int(name[-7:-4]) % 3 else "cam-b") if label == "real"
        else ("gan-big" if int(name[-7:-4]) < 10 else "gan-small")))
    swaps = make_dataset(tmp_path / "swaps", per_class=6, seed=2)
    return gans, swaps


def test_scan_roots_tags_domain_and_source(two_roots):
    gans, swaps = two_roots
    splits = scan_roots([gans, swaps])
    train_samples = splits["Train"]
    assert len(train_samples) == 24 + 12
    sources = Counter((s.domain, s.source, s.label) for s in train_samples)
    assert sources[("gans", "gan-big", 1)] == 10 and sources[("gans", "gan-small", 1)] == 2
    assert sources[("gans", "cam-a", 0)] == 8 and sources[("gans", "cam-b", 0)] == 4
    assert sources[("swaps", "swaps", 0)] == 6  # no manifest: the root's name is the source
    without = scan_roots([gans, swaps], exclude_sources=["gan-small"])["Train"]
    assert len(without) == 34 and not any(s.source == "gan-small" for s in without)
    with pytest.raises(DatasetError, match="excluded source.*gan-typo"):
        scan_roots([gans, swaps], exclude_sources=["gan-typo"])


def test_balanced_weights_give_each_root_and_label_equal_shares():
    samples = ([Sample(f"a{i}", 0, "celeb", "faces") for i in range(90)]
               + [Sample(f"b{i}", 0, "cam", "faces") for i in range(10)]
               + [Sample(f"c{i}", 1, "gan", "faces") for i in range(400)]
               + [Sample(f"d{i}", 0, "dfdc", "swaps") for i in range(30)]
               + [Sample(f"e{i}", 1, "dfdc", "swaps") for i in range(70)])
    weights = balanced_weights(samples, source_power=0.5)
    assert weights.sum() == pytest.approx(1.0)

    def share(predicate):
        return sum(w for s, w in zip(samples, weights, strict=True) if predicate(s))

    for domain in ("faces", "swaps"):
        assert share(lambda s, domain=domain: s.domain == domain) == pytest.approx(0.5)
        for label in (0, 1):  # the root does not predict the label
            assert share(lambda s, domain=domain, label=label: s.domain == domain and s.label == label) == pytest.approx(0.25)
    # Within faces/real: 90 vs 10 images get sqrt shares 3:1, not 9:1.
    assert share(lambda s: s.source == "celeb") / share(lambda s: s.source == "cam") == pytest.approx(3.0)
    equal = balanced_weights(samples, source_power=0.0)
    assert sum(w for s, w in zip(samples, equal, strict=True) if s.source == "cam") == pytest.approx(0.125)


def test_transfer_recipe_adds_crop_blur_and_jpeg_and_paper_stays_the_default():
    assert Augmentation.recipe("paper") == Augmentation()
    transfer = Augmentation.recipe("transfer", jpeg_prob=1.0)
    assert (transfer.crop_prob, transfer.blur_prob, transfer.jpeg_prob) == (0.5, 0.5, 1.0)
    assert transfer.hflip == Augmentation().hflip
    with pytest.raises(ValueError, match="unknown augmentation recipe"):
        Augmentation.recipe("fancy")
    assert Augmentation(jpeg_quality_min=90, jpeg_quality_max=50).problems()


def test_jpeg_reencoding_and_blur_change_the_pixels(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    meta = ModelMeta(input_size=[3, 64, 64])
    plain = Augmentation(hflip=0, rotation=0, brightness=0, contrast=0, saturation=0, hue=0)
    degraded = Augmentation.recipe("transfer", hflip=0, rotation=0, brightness=0, contrast=0, saturation=0, hue=0,
                                   crop_prob=0, blur_prob=1.0, jpeg_prob=1.0, jpeg_quality_max=40)
    random.seed(1)
    clean, _ = TrainDataset([Sample(path, 0)], meta, plain)[0]
    noisy, _ = TrainDataset([Sample(path, 0)], meta, degraded)[0]
    assert clean.shape == noisy.shape == (3, 64, 64)
    # Blur and q<=40 JPEG smooth white noise: much less pixel-to-pixel variation.
    assert noisy.diff(dim=2).abs().mean() < 0.7 * clean.diff(dim=2).abs().mean()


@pytest.mark.slow
def test_mixed_roots_train_balanced_with_per_source_validation_and_init(two_roots, tmp_path):
    gans, swaps = two_roots
    first = train(tiny_config(gans, tmp_path / "first" / "ckpt.safetensors"))
    # A vanishing learning rate shows where the weights came from: the whole dfmod checkpoint, head included.
    result = train(tiny_config([gans, swaps], tmp_path / "mix" / "ckpt.safetensors", sampling="balanced",
                               epoch_size=24, augmentation=Augmentation.recipe("transfer"), recipe="transfer",
                               init=first.checkpoint, lr=1e-12))
    before, after = load_file(str(first.checkpoint)), load_file(str(result.checkpoint))
    assert torch.allclose(before["classifier.weight"], after["classifier.weight"], atol=1e-6)
    row = result.history[0]
    assert row["train_images"] == 24  # --epoch-size, not the 36 training images
    for key in ("val_roc_auc[gans]", "val_roc_auc[swaps]", "val_false_positive_rate[cam-a]",
                "val_recall[gan-small]", "val_mean_root_roc_auc"):
        assert key in row, key
    meta = read_meta(result.checkpoint)
    assert meta.extra["data_roots"] == ["gans", "swaps"] and meta.extra["sampling"] == "balanced"
    assert meta.extra["train_groups"]["swaps/fake/swaps"] == 6
    assert meta.model_version.startswith("mnv4s-gans-swaps-")
    with result.metrics_csv.open() as handle:
        assert "val_roc_auc[gan-big]" in next(csv.DictReader(handle))
