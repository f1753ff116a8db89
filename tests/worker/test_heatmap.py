"""Heatmaps made by the worker on real Postgres and an S3 server: written once, under the model version,
and only by a worker running that model."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dfmod.db import make_engine, make_session_factory
from dfmod.detector import Predictor
from dfmod.storage import S3Storage, heatmap_key
from tests.utils.images import make_image_bytes
from tests.utils.records import seed_items
from worker.heatmap import HeatmapMaker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def predictor(checkpoint_path):
    return Predictor(checkpoint_path, device="cpu", torch_threads=1)


@pytest.fixture
def maker(integration_settings, predictor):
    engine = make_engine(integration_settings.resolved_database_url)
    yield HeatmapMaker(integration_settings, make_session_factory(engine), S3Storage(integration_settings), predictor)
    engine.dispose()


def test_heatmap_is_written_once_under_the_model_version(maker, integration_settings, s3_buckets):
    s3, (bucket, extra) = s3_buckets
    s3.put_object(Bucket=extra, Key="p/face.jpg", Body=make_image_bytes(size=(200, 300)))
    [item_id] = seed_items(integration_settings, [{"score": 0.9, "bucket": extra, "key": "p/face.jpg"}])
    key = maker.make(item_id, "test-random-0001")
    assert key == heatmap_key(item_id, "test-random-0001") == f"heatmaps/{item_id}/test-random-0001.png"
    png = s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # cached in the upload bucket
    assert Image.open(io.BytesIO(png)).size == (200, 300)
    # Asked again (a duplicate task): the cached object is left as it is, not recomputed.
    s3.put_object(Bucket=bucket, Key=key, Body=b"sentinel")
    assert maker.make(item_id, "test-random-0001") == key
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"sentinel"


def test_nothing_is_written_for_another_model_a_missing_item_or_a_broken_image(maker, integration_settings, s3_buckets):
    s3, (bucket, _extra) = s3_buckets
    s3.put_object(Bucket=bucket, Key="p/broken.jpg", Body=b"not an image at all")
    [broken] = seed_items(integration_settings, [{"score": 0.9, "key": "p/broken.jpg"}])
    assert maker.make(broken, "some-other-model") is None
    assert maker.make("00000000-0000-0000-0000-000000000000", "test-random-0001") is None
    assert maker.make(broken, "test-random-0001") is None
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="heatmaps/")
    assert listed.get("KeyCount", 0) == 0


@pytest.mark.parametrize("version,expected", [("v1.2", "v1.2"), ("team/model v2", "team_model_v2"), ("..", "model")])
def test_heatmap_keys_are_valid_object_keys(version, expected):
    from dfmod.storage import validate_key

    key = heatmap_key("item", version)
    assert key == f"heatmaps/item/{expected}.png" and validate_key(key) == key
