"""Checks on DATA_DIR: layout, case of folder names, subsets and unreadable images."""

import shutil

import pytest
from typer.testing import CliRunner

from dfmod.detector import ModelMeta
from dfmod.training.data import (
    Augmentation,
    DatasetError,
    TrainDataset,
    check_readable,
    scan_dataset,
    scan_labelled_folder,
)
from dfmod.training.train import train

from .conftest import make_dataset, tiny_config


def test_scan_reads_both_splits_with_labels(tiny_data):
    splits = scan_dataset(tiny_data)
    assert set(splits) == {"Train", "Validation"}
    train_samples = splits["Train"]
    assert len(train_samples) == 16
    assert {s.label for s in train_samples if s.path.parent.name == "Real"} == {0}
    assert {s.label for s in train_samples if s.path.parent.name == "Fake"} == {1}


def test_lowercase_folder_names_are_accepted(tmp_path):
    root = make_dataset(tmp_path / "lower", per_class=2, splits=("train", "validation"),
                        class_names=("real", "fake"))
    splits = scan_dataset(root)
    assert sorted(s.label for s in splits["Validation"]) == [0, 0, 1, 1]


def test_limit_per_class_takes_a_seeded_subset(tiny_data):
    first = scan_dataset(tiny_data, limit_per_class=3, seed=7)["Train"]
    again = scan_dataset(tiny_data, limit_per_class=3, seed=7)["Train"]
    assert [s.label for s in first].count(0) == 3 and [s.label for s in first].count(1) == 3
    assert first == again


def test_missing_split_is_named(tiny_data):
    shutil.rmtree(tiny_data / "Validation")
    with pytest.raises(DatasetError, match=r"missing split folder .*Validation"):
        scan_dataset(tiny_data)


def test_missing_class_folder_is_named(tiny_data):
    shutil.rmtree(tiny_data / "Train" / "Fake")
    with pytest.raises(DatasetError, match=r"missing class folder .*Train/Fake"):
        scan_dataset(tiny_data)


def test_empty_class_is_named(tiny_data):
    for path in (tiny_data / "Validation" / "Real").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"Validation/Real holds no images"):
        scan_dataset(tiny_data)


def test_not_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")


def test_unreadable_image_is_listed(tiny_data):
    bad = tiny_data / "Train" / "Real" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    samples = scan_dataset(tiny_data)["Train"]
    with pytest.raises(DatasetError, match=r"1 of 17 images cannot be read: .*broken\.jpg"):
        check_readable(samples)


def test_train_refuses_bad_data_before_training(tiny_data, tmp_path):
    (tiny_data / "Validation" / "Fake" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "run" / "ckpt.safetensors"
    with pytest.raises(DatasetError, match=r"broken\.png"):
        train(tiny_config(tiny_data, out))
    assert not out.parent.exists()  # nothing trained, nothing written


def test_cli_reports_bad_data_dir_clearly(tiny_data, tmp_path):
    import typer

    from dfmod.training.commands import train_command

    shutil.rmtree(tiny_data / "Train")
    app = typer.Typer()
    app.command("train")(train_command)
    app.command("noop")(lambda: None)  # two commands keep typer from collapsing the app into one
    result = CliRunner().invoke(app, ["train", str(tiny_data), "--out", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 1
    assert "missing split folder" in result.output and "Train" in result.output
    assert "Traceback" not in result.output


def test_image_damaged_past_its_header_is_named_when_decoded(tiny_data):
    # The header check passes a truncated JPEG; decoding it must still name the file.
    victim = tiny_data / "Train" / "Fake" / "fake_train_000.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) * 2 // 3])
    samples = scan_labelled_folder(tiny_data / "Train")
    check_readable(samples)
    dataset = TrainDataset(samples, ModelMeta(input_size=[3, 64, 64]), Augmentation())
    index = next(i for i, s in enumerate(samples) if s.path == victim)
    with pytest.raises(DatasetError, match="fake_train_000.jpg"):
        dataset[index]
