"""dfmod.moto_main, the tests' and the bench's S3 server, as a real process: requests without a body keep their
connection (many GETs on one socket), requests with a body still close theirs, and moto's S3 behaviour is
moto_server's (objects, metadata with underscores, errors)."""

from __future__ import annotations

import http.client
from urllib.parse import urlparse

import boto3
import pytest
from botocore.exceptions import ClientError

from dfmod.loopback import moto_server


@pytest.fixture(scope="module")
def endpoint():
    with moto_server() as url:
        s3 = _s3(url)
        s3.create_bucket(Bucket="keepalive-test")
        s3.put_object(Bucket="keepalive-test", Key="a.bin", Body=b"a" * 30_000, Metadata={"trace_id": "7"})
        yield url


def _connection(endpoint: str) -> http.client.HTTPConnection:
    parsed = urlparse(endpoint)
    return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)


def _s3(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                        region_name="us-east-1")


def test_gets_share_one_connection(endpoint):
    url = urlparse(_s3(endpoint).generate_presigned_url("get_object", Params={"Bucket": "keepalive-test", "Key": "a.bin"}))
    connection = _connection(endpoint)
    sockets = set()
    for _ in range(5):
        connection.request("GET", f"{url.path}?{url.query}")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == b"a" * 30_000
        assert response.getheader("Connection") != "close"
        sockets.add(id(connection.sock))
    assert len(sockets) == 1 and connection.sock is not None
    connection.close()


def test_a_request_with_a_body_closes_its_connection(endpoint):
    url = urlparse(_s3(endpoint).generate_presigned_url("put_object", Params={"Bucket": "keepalive-test", "Key": "b.bin"}))
    connection = _connection(endpoint)
    connection.request("PUT", f"{url.path}?{url.query}", body=b"b" * 1000)
    response = connection.getresponse()
    response.read()
    assert response.status == 200 and response.getheader("Connection") == "close"
    connection.close()


def test_s3_behaviour_is_motos(endpoint):
    s3 = _s3(endpoint)
    assert s3.head_object(Bucket="keepalive-test", Key="a.bin")["Metadata"] == {"trace_id": "7"}
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket="keepalive-test", Key="nope")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    s3.delete_object(Bucket="keepalive-test", Key="b.bin")
    keys = [entry["Key"] for entry in s3.list_objects_v2(Bucket="keepalive-test").get("Contents", [])]
    assert keys == ["a.bin"]
