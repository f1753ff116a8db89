"""The worker's face stage on real Postgres and a real S3 server: faces of several photos classified in one
forward pass, the most-fake face as the image's score, and ``no_face`` for a photo without a face.

Uses held-out faces256 Test crops placed into larger photos (``DFMOD_DATASETS``, default ``../shared/datasets``
beside the repository); skipped where that folder is absent.
"""

from __future__ import annotations

import io
import random

import pytest
from sqlalchemy import select

from dfmod.db import ItemStatus, Verdict, VerdictFace, session_scope
from dfmod.detector import Predictor
from dfmod.settings import Settings
from dfmod.storage import S3Storage
from dfmod.training.data import scan_labelled_folder
from dfmod.training.whole_photos import background, build_composites
from tests.dfmod.test_faces import FACES_TEST, needs_faces
from tests.worker.test_classify import _items, _put_and_record
from worker.classify import BatchClassifier

pytestmark = [needs_faces, pytest.mark.integration]


@pytest.fixture
def face_classifier(integration_env, monkeypatch, checkpoint_path):
    from dfmod.db import make_engine, make_session_factory

    for key, value in {**integration_env, "DFMOD_FACE_STAGE": "true"}.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    instance = BatchClassifier(settings, factory, S3Storage(settings),
                               Predictor(checkpoint_path, device="cpu", torch_threads=1), celery_app=None)
    yield instance
    instance.close()


def _jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_faces_of_a_batch_are_classified_together_and_a_faceless_photo_is_no_face(face_classifier, s3_buckets,
                                                                                   tmp_path):
    samples = scan_labelled_folder(FACES_TEST, limit_per_class=1, seed=4)
    composites = build_composites(samples, tmp_path / "composites", seed=4)
    objects = {f"photo-{i}.jpg": c.path.read_bytes() for i, c in enumerate(composites)}
    objects["landscape.jpg"] = _jpeg(background(random.Random(11), (1600, 1200)))
    ids = _put_and_record(face_classifier, s3_buckets, objects)

    report = face_classifier.run(list(ids.values()))

    assert report.classified == 3 and report.failed == 0
    items = _items(face_classifier)
    assert all(item.status == ItemStatus.classified for item in items.values())
    with session_scope(face_classifier.session_factory) as session:
        verdicts = {v.item_id: v for v in session.scalars(select(Verdict))}
    no_face = verdicts[ids["landscape.jpg"]]
    assert no_face.label == "no_face" and no_face.fake_probability == 0.0
    for key in ("photo-0.jpg", "photo-1.jpg"):
        verdict = verdicts[ids[key]]
        assert verdict.label in ("real", "fake") and 0.0 <= verdict.fake_probability <= 1.0
        assert verdict.model_version == "test-random-0001+faces"
        assert verdict.batch_size == 2  # the two photos' faces went through the model in one pass
    # Every face is stored with its box, detector score and own probability; the verdict is the most-fake face.
    with session_scope(face_classifier.session_factory) as session:
        faces = session.scalars(select(VerdictFace).order_by(VerdictFace.item_id, VerdictFace.face_index)).all()
        assert {face.item_id for face in faces} == {ids["photo-0.jpg"], ids["photo-1.jpg"]}
        for face in faces:
            assert face.x1 > face.x0 and face.y1 > face.y0 and face.detector_score >= 0.9
            assert face.model_version == "test-random-0001+faces"
        for key in ("photo-0.jpg", "photo-1.jpg"):
            mine = [face.fake_probability for face in faces if face.item_id == ids[key]]
            assert verdicts[ids[key]].fake_probability == pytest.approx(max(mine))
        # A redelivered batch writes no second set of faces.
    face_classifier.run(list(ids.values()))
    with session_scope(face_classifier.session_factory) as session:
        assert len(session.scalars(select(VerdictFace)).all()) == len(faces)


def test_boxes_are_in_pixels_of_the_uploaded_photo_and_identical_faceless_bytes_stay_no_face(face_classifier,
                                                                                             s3_buckets):
    """A photo large enough for the JPEG decoder to halve it before detection still gets its face's box in
    the uploaded image's pixels (what the review page draws on). The same face-free bytes sent again reuse
    the verdict and stay ``no_face`` rather than becoming "real" by their score of 0; a photo sent again gets
    its reused verdict's faces."""
    from PIL import Image

    sample = scan_labelled_folder(FACES_TEST, limit_per_class=1, seed=5)[0]
    canvas = background(random.Random(5), (4096, 3072))
    placed = (1500, 900, 2300, 1700)
    with Image.open(sample.path) as crop:
        canvas.paste(crop.convert("RGB").resize((800, 800)), placed[:2])
    landscape = _jpeg(background(random.Random(12), (1600, 1200)))
    ids = _put_and_record(face_classifier, s3_buckets, {"big.jpg": _jpeg(canvas), "empty-1.jpg": landscape})
    face_classifier.run(list(ids.values()))
    again = _put_and_record(face_classifier, s3_buckets, {"empty-2.jpg": landscape, "big-2.jpg": _jpeg(canvas)})
    report = face_classifier.run(list(again.values()))
    assert report.reused == 2

    with session_scope(face_classifier.session_factory) as session:
        faces = session.scalars(select(VerdictFace).where(VerdictFace.item_id == ids["big.jpg"])).all()
        labels = {v.item_id: v.label for v in session.scalars(select(Verdict))}
    assert faces, "the placed face was not found"
    face = max(faces, key=lambda f: f.detector_score)
    # The face box lies inside the placed crop and covers a good part of it (a crop frames its face with a margin).
    assert placed[0] - 40 <= face.x0 < face.x1 <= placed[2] + 40 and placed[1] - 40 <= face.y0 < face.y1 <= placed[3] + 40
    assert (face.x1 - face.x0) > 0.4 * (placed[2] - placed[0])
    assert labels[ids["empty-1.jpg"]] == "no_face" and labels[again["empty-2.jpg"]] == "no_face"
    # The reused verdict of the same photo carries its faces too, so reviewers see the boxes on either item.
    with session_scope(face_classifier.session_factory) as session:
        copied = session.scalars(select(VerdictFace).where(VerdictFace.item_id == again["big-2.jpg"])
                                 .order_by(VerdictFace.face_index)).all()
    def boxes(rows):
        return [(f.x0, f.y0, f.x1, f.y1, f.detector_score, f.fake_probability) for f in rows]

    assert boxes(copied) == boxes(sorted(faces, key=lambda f: f.face_index))
