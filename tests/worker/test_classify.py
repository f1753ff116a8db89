"""The batch classifier on real Postgres and a real S3 server: good and bad files in one batch,
redelivery, identical bytes, transient storage faults."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image
from sqlalchemy import func, select

from dfmod.db import Item, ItemStatus, Verdict, make_engine, make_session_factory, session_scope
from dfmod.detector import Predictor
from dfmod.lifecycle import NewItem, record_items
from dfmod.storage import S3Storage
from tests.utils.images import make_image_bytes
from worker.classify import BatchClassifier


@pytest.fixture(scope="module")
def predictor(checkpoint_path):
    return Predictor(checkpoint_path, device="cpu", torch_threads=1)


@pytest.fixture
def classifier(integration_settings, predictor):
    factory = make_session_factory(make_engine(integration_settings.resolved_database_url))
    storage = S3Storage(integration_settings)
    instance = BatchClassifier(integration_settings, factory, storage, predictor, celery_app=None)
    yield instance
    instance.close()


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (64, 64), (0, 120, 200, 10)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _animated_gif() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("P", (48, 48), i) for i in (3, 7)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _bomb_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _put_and_record(classifier, s3_buckets, objects: dict[str, bytes]) -> dict[str, str]:
    client, (bucket, _extra) = s3_buckets
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    with session_scope(classifier.session_factory) as session:
        recorded = record_items(session, [NewItem(bucket=bucket, key=key) for key in objects])
    return {key: r.item.id for key, r in zip(objects, recorded, strict=True)}


def _items(classifier) -> dict[str, Item]:
    with session_scope(classifier.session_factory) as session:
        return {item.key: item for item in session.scalars(select(Item))}


def test_bad_files_fail_with_reasons_while_good_ones_in_the_same_batch_are_classified(classifier, s3_buckets):
    good = make_image_bytes("JPEG", size=(300, 240))
    objects = {
        "good.jpg": good,
        "good.png": make_image_bytes("PNG", size=(100, 100), color=(10, 90, 200)),
        "cmyk.jpg": _cmyk_jpeg(),
        "animated.gif": _animated_gif(),
        "truncated.jpg": good[: len(good) // 2],
        "text.jpg": b"this is not an image, only text renamed to .jpg\n",
        "bomb.png": _bomb_png(),
        "tiny.png": make_image_bytes("PNG", size=(1, 1)),
    }
    ids = _put_and_record(classifier, s3_buckets, objects)
    report = classifier.run(list(ids.values()))
    items = _items(classifier)
    for key in ("good.jpg", "good.png", "cmyk.jpg", "animated.gif"):
        assert items[key].status == ItemStatus.classified, (key, items[key].failure_detail)
        assert items[key].sha256 and items[key].size
    expected_reasons = {
        "truncated.jpg": {"truncated", "corrupt"},
        "text.jpg": {"not_an_image"},
        "bomb.png": {"decompression_bomb"},
        "tiny.png": {"too_small"},
    }
    for key, reasons in expected_reasons.items():
        assert items[key].status == ItemStatus.failed and items[key].failure_reason in reasons, key
        assert items[key].failure_detail
    assert report.classified == 4 and report.failed == 4
    with session_scope(classifier.session_factory) as session:
        verdicts = session.scalars(select(Verdict)).all()
    assert len(verdicts) == 4
    assert {v.batch_size for v in verdicts} == {4}  # one forward pass for the four good images
    for verdict in verdicts:
        assert verdict.label in ("real", "fake") and 0.0 <= verdict.fake_probability <= 1.0
        assert verdict.model_version == "test-random-0001" and verdict.threshold == 0.5


def test_missing_object_fails_its_item(classifier, s3_buckets):
    _client, (bucket, _extra) = s3_buckets
    with session_scope(classifier.session_factory) as session:
        [recorded] = record_items(session, [NewItem(bucket=bucket, key="never/uploaded.jpg")])
    classifier.run([recorded.item.id])
    item = _items(classifier)["never/uploaded.jpg"]
    assert item.status == ItemStatus.failed and item.failure_reason == "object_not_found"


def test_a_redelivered_batch_writes_no_second_verdict(classifier, s3_buckets):
    ids = _put_and_record(classifier, s3_buckets, {f"{i}.jpg": make_image_bytes(color=(i * 30, 0, 0)) for i in range(3)})
    first = classifier.run(list(ids.values()))
    second = classifier.run(list(ids.values()) + list(ids.values()))
    assert first.classified == 3
    assert second.claimed == 0 and second.skipped == 3
    with session_scope(classifier.session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Verdict)) == 3


def test_identical_bytes_reuse_the_existing_verdict(classifier, s3_buckets):
    data = make_image_bytes(size=(128, 128), color=(50, 60, 70))
    ids = _put_and_record(classifier, s3_buckets, {"a.jpg": data, "b.jpg": data})
    report = classifier.run([ids["a.jpg"], ids["b.jpg"]])
    assert report.classified == 1 and report.reused == 1  # same bytes in one batch: one inference
    ids_later = _put_and_record(classifier, s3_buckets, {"c.jpg": data})
    report = classifier.run([ids_later["c.jpg"]])
    assert report.reused == 1 and report.classified == 0
    with session_scope(classifier.session_factory) as session:
        verdicts = {v.item_id: v for v in session.scalars(select(Verdict))}
    assert len(verdicts) == 3
    assert len({v.fake_probability for v in verdicts.values()}) == 1
    assert verdicts[ids_later["c.jpg"]].reused_from_item_id in (ids["a.jpg"], ids["b.jpg"])


def test_transient_storage_fault_sends_the_item_back_to_the_queue(integration_settings, predictor, s3_buckets):
    from dfmod.loopback import free_port

    broken = integration_settings.model_copy(
        update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}", "s3_max_attempts": 1, "s3_connect_timeout_s": 0.3}
    )
    factory = make_session_factory(make_engine(broken.resolved_database_url))
    classifier = BatchClassifier(broken, factory, S3Storage(broken), predictor, celery_app=None)
    _client, (bucket, _extra) = s3_buckets
    with session_scope(factory) as session:
        [recorded] = record_items(session, [NewItem(bucket=bucket, key="x.jpg")])
    report = classifier.run([recorded.item.id])
    classifier.close()
    assert report.retried == 1 and report.failed == 0
    with session_scope(factory) as session:
        item = session.get(Item, recorded.item.id)
    assert item.status == ItemStatus.queued and item.attempts == 1 and "retrying" in item.failure_detail


def test_items_past_max_attempts_fail_for_good(classifier, s3_buckets):
    ids = _put_and_record(classifier, s3_buckets, {"poison.jpg": make_image_bytes()})
    from sqlalchemy import update

    with session_scope(classifier.session_factory) as session:
        session.execute(update(Item).values(attempts=classifier.settings.max_attempts))
    classifier.run(list(ids.values()))
    item = _items(classifier)["poison.jpg"]
    assert item.status == ItemStatus.failed and item.failure_reason == "too_many_attempts"


def _tenant(classifier, name: str, **options) -> str:
    from dfmod import tenants

    with session_scope(classifier.session_factory) as session:
        box = tenants.SecretBox([tenants.generate_secret_key()])
        return tenants.create_tenant(session, box, name, **options).tenant.id


def _put_and_record_for(classifier, s3_buckets, tenant_id: str, objects: dict[str, bytes]) -> dict[str, str]:
    client, (bucket, _extra) = s3_buckets
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    with session_scope(classifier.session_factory) as session:
        recorded = record_items(session, [NewItem(bucket=bucket, key=key, tenant_id=tenant_id) for key in objects])
    return {key: r.item.id for key, r in zip(objects, recorded, strict=True)}


def test_identical_bytes_across_tenants_reuse_the_verdict_but_never_name_the_other_item(classifier, s3_buckets):
    from dfmod.db import DEFAULT_TENANT_ID

    other = _tenant(classifier, "platform-b")
    data = make_image_bytes(size=(128, 128), color=(90, 10, 170))
    # One batch holding the same bytes for both tenants: one inference, no cross-tenant reference.
    mine = _put_and_record_for(classifier, s3_buckets, DEFAULT_TENANT_ID, {"mine-1.jpg": data})
    theirs = _put_and_record_for(classifier, s3_buckets, other, {"theirs-1.jpg": data})
    report = classifier.run([mine["mine-1.jpg"], theirs["theirs-1.jpg"]])
    assert report.classified == 1 and report.reused == 1
    # Later, the same bytes again for the other tenant (reuse from the database), then for the first one.
    theirs_later = _put_and_record_for(classifier, s3_buckets, other, {"theirs-2.jpg": data})
    mine_later = _put_and_record_for(classifier, s3_buckets, DEFAULT_TENANT_ID, {"mine-2.jpg": data})
    report = classifier.run([theirs_later["theirs-2.jpg"]])
    assert report.classified == 0 and report.reused == 1
    classifier.run([mine_later["mine-2.jpg"]])
    with session_scope(classifier.session_factory) as session:
        verdicts = {v.item_id: v for v in session.scalars(select(Verdict))}
    assert len({v.fake_probability for v in verdicts.values()}) == 1  # the verdict was reused ...
    first_mine, first_theirs = verdicts[mine["mine-1.jpg"]], verdicts[theirs["theirs-1.jpg"]]
    # ... but only an item of the same tenant is ever named, and a copied verdict looks like a fresh one.
    assert first_mine.reused_from_item_id is None and first_theirs.reused_from_item_id is None
    assert first_theirs.inference_ms == first_mine.inference_ms and first_theirs.device == first_mine.device
    assert verdicts[theirs_later["theirs-2.jpg"]].reused_from_item_id == theirs["theirs-1.jpg"]
    assert verdicts[mine_later["mine-2.jpg"]].reused_from_item_id == mine["mine-1.jpg"]


def test_a_tenants_threshold_labels_its_items(classifier, s3_buckets):
    from dfmod.db import DEFAULT_TENANT_ID

    strict = _tenant(classifier, "strict", threshold=0.0)  # every image is flagged
    data = make_image_bytes(size=(96, 96), color=(20, 120, 220))
    mine = _put_and_record_for(classifier, s3_buckets, DEFAULT_TENANT_ID, {"t-default.jpg": data})
    theirs = _put_and_record_for(classifier, s3_buckets, strict, {"t-strict.jpg": data})
    classifier.run([*mine.values(), *theirs.values()])
    with session_scope(classifier.session_factory) as session:
        items = {item.id: item for item in session.scalars(select(Item))}
    default_item, strict_item = items[mine["t-default.jpg"]], items[theirs["t-strict.jpg"]]
    assert strict_item.threshold == 0.0 and strict_item.label == "fake"
    assert default_item.threshold == 0.5
    assert default_item.label == ("fake" if default_item.score >= 0.5 else "real")


@pytest.mark.parametrize("streams", [1, 2])
def test_batches_in_flight_enter_the_model_together_as_far_as_the_predictor_has_streams(
    integration_settings, checkpoint_path, s3_buckets, streams
):
    # The threads pool runs two batches at once; with two streams both forward passes run side by side, with
    # one (CUDA, or one CPU) the second waits for the first.
    predictor = Predictor(checkpoint_path, device="cpu", torch_threads=2, streams=streams)
    assert predictor.streams == streams
    factory = make_session_factory(make_engine(integration_settings.resolved_database_url))
    classifier = BatchClassifier(integration_settings, factory, S3Storage(integration_settings), predictor)
    both_inside = threading.Barrier(2)
    met, logits = [], predictor.runner.logits

    def meet_then_score(pixels):
        try:
            both_inside.wait(timeout=2)
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return logits(pixels)

    predictor.runner.logits = meet_then_score
    try:
        ids = _put_and_record(classifier, s3_buckets, {f"in-flight/{i}.jpg": make_image_bytes(color=(i * 90, 9, 9))
                                                       for i in range(2)})
        with ThreadPoolExecutor(2) as pool:
            reports = list(pool.map(classifier.run, [[item_id] for item_id in ids.values()]))
    finally:
        classifier.close()
    assert [report.classified for report in reports] == [1, 1]
    assert met == ([True, True] if streams == 2 else [False, False])
