"""The face stage: crop framing, the most-fake-face verdict, no_face, and faces found in whole photos.

The tests with real faces use the held-out faces256 Test crops from the shared data sets (``DFMOD_DATASETS``,
default ``../shared/datasets`` beside the repository) and are skipped where that folder is absent.
"""

import os
import random
from pathlib import Path

import pytest
from PIL import Image

from dfmod.faces import CROP_MARGIN, NO_FACE, FaceFinder, face_crops, image_verdict, square_crop_box
from dfmod.training.data import Sample, scan_labelled_folder
from dfmod.training.whole_photos import background, build_composites, evaluate_whole_photos, iou

REPO_ROOT = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("DFMOD_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))
FACES_TEST = DATASETS / "faces256" / "Test"
needs_faces = pytest.mark.skipif(not FACES_TEST.is_dir(), reason=f"no faces256 data set at {FACES_TEST}")


def test_crop_box_frames_the_face_like_the_training_crops():
    # A 100 px face box in the middle of a big image: a 143 px square, centred 9.7 px above the box's centre.
    assert square_crop_box((450, 450, 550, 550), (1000, 1000)) == (428, 419, 571, 562)
    # Near an edge the square moves inside the image instead of shrinking.
    left, top, right, bottom = square_crop_box((0, 0, 100, 120), (1000, 1000))
    assert (left, top) == (0, 0) and right - left == bottom - top == round(120 * CROP_MARGIN)
    # An image smaller than the square: the square shrinks to the image.
    assert square_crop_box((10, 10, 90, 90), (100, 60)) == (20, 0, 80, 60)


def test_image_verdict_is_the_most_fake_face():
    assert image_verdict([0.1, 0.93, 0.4]) == pytest.approx(0.93)
    assert image_verdict([]) is None


@pytest.fixture(scope="module")
def finder():
    return FaceFinder()


def test_a_photo_without_a_face_is_no_face(finder):
    result = finder.find(background(random.Random(7), (1600, 1200)))
    assert result.faces == [] and result.state == NO_FACE
    assert face_crops(Image.new("RGB", (10, 10)), result) == []


def test_composites_are_seeded(tmp_path):
    crop = tmp_path / "face.jpg"
    Image.new("RGB", (256, 256), (180, 140, 120)).save(crop)
    samples = [Sample(crop, 0)]
    first = build_composites(samples, tmp_path / "a", seed=3)
    again = build_composites(samples, tmp_path / "b", seed=3)
    other = build_composites(samples, tmp_path / "c", seed=4)
    assert first[0].box == again[0].box and first[0].path.read_bytes() == again[0].path.read_bytes()
    assert other[0].box != first[0].box
    with Image.open(first[0].path) as image:
        x0, y0, x1, y1 = first[0].box
        assert 0.10 <= (x1 - x0) / min(image.size) <= 0.30  # a small face in a larger photo


@needs_faces
def test_faces_are_found_in_whole_photos_and_cropped_around_the_placed_face(finder, tmp_path):
    samples = scan_labelled_folder(FACES_TEST, limit_per_class=4, seed=1)
    composites = build_composites(samples, tmp_path / "composites", seed=1)
    for composite in composites:
        with Image.open(composite.path) as image:
            result = finder.find(image)
            crops = face_crops(image, result)
        assert result.faces, composite.path.name
        best = max(iou(face.crop_box, composite.box) for face in result.faces)
        assert best >= 0.5, (composite.path.name, best)
        assert all(crop.width == crop.height for crop in crops)
        assert all(0.9 <= face.score <= 1.0 for face in result.faces)


@needs_faces
@pytest.mark.slow
def test_whole_photo_evaluation_reports_all_three_ways(finder, tmp_path):
    report = evaluate_whole_photos(FACES_TEST, None, tmp_path / "report", limit_per_class=3, seed=2, device="cpu",
                                   finder=finder)
    assert report["n"] == 6 and report["detection_rate"] == 1.0 and report["no_face"] == 0
    for way in ("crops", "whole_image", "face_stage"):
        assert 0 <= report[way]["accuracy"] <= 1 and report[way]["without_verdict"] == 0
    assert 1.2 <= report["crop_margin_median"] <= 1.7
    assert (tmp_path / "report" / "whole_photos.json").is_file()
    assert len(list((tmp_path / "report" / "composites").glob("*.jpg"))) == 6
