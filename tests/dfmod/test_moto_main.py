"""dfmod.moto_main, the tests' and the bench's S3 server, as a real process behind each of its HTTP servers:
GETs share one connection, moto's S3 behaviour is moto_server's (objects, errors), the werkzeug server still
closes connections that carried a body and keeps metadata names with underscores, granian keeps every
connection and folds those names to dashes; and granian's worker process stops with the server."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time
from urllib.parse import urlparse

import boto3
import psutil
import pytest
from botocore.exceptions import ClientError

from dfmod.loopback import free_port, moto_command, moto_server, start_child, wait_for_port
from dfmod.moto_main import default_server


@pytest.fixture(scope="module", params=["granian", "werkzeug"])
def server(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def endpoint(server):
    with moto_server(server) as url:
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


def test_a_request_with_a_body_closes_its_connection_on_werkzeug_only(endpoint, server):
    url = urlparse(_s3(endpoint).generate_presigned_url("put_object", Params={"Bucket": "keepalive-test", "Key": "b.bin"}))
    connection = _connection(endpoint)
    connection.request("PUT", f"{url.path}?{url.query}", body=b"b" * 1000)
    response = connection.getresponse()
    response.read()
    assert response.status == 200
    assert (response.getheader("Connection") == "close") == (server == "werkzeug")
    connection.close()


def test_s3_behaviour_is_motos(endpoint, server):
    s3 = _s3(endpoint)
    # WSGI cannot tell x-amz-meta-trace_id from x-amz-meta-trace-id; moto's werkzeug handler keeps the spelling.
    metadata_key = "trace_id" if server == "werkzeug" else "trace-id"
    assert s3.head_object(Bucket="keepalive-test", Key="a.bin")["Metadata"] == {metadata_key: "7"}
    body = os.urandom(6 * 1024 * 1024)  # a multi-chunk upload body, read back whole and by range
    s3.put_object(Bucket="keepalive-test", Key="big.bin", Body=body)
    assert s3.get_object(Bucket="keepalive-test", Key="big.bin")["Body"].read() == body
    assert s3.get_object(Bucket="keepalive-test", Key="big.bin", Range="bytes=10-19")["Body"].read() == body[10:20]
    s3.delete_object(Bucket="keepalive-test", Key="big.bin")
    with pytest.raises(ClientError) as missing:
        s3.get_object(Bucket="keepalive-test", Key="nope")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    s3.delete_object(Bucket="keepalive-test", Key="b.bin")
    keys = [entry["Key"] for entry in s3.list_objects_v2(Bucket="keepalive-test").get("Contents", [])]
    assert keys == ["a.bin"]


def test_granian_is_the_default_where_installed():
    assert default_server() == "granian"  # the test extra installs it
    assert "--server" not in moto_command(5000)


def test_granians_worker_stops_when_the_server_is_killed():
    port = free_port()
    process = start_child(moto_command(port, "granian"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers, "granian serves from a worker process"
        process.send_signal(signal.SIGKILL)  # no clean-up of its own: only the kernel's parent-death signal
        process.wait(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive
    finally:
        if process.poll() is None:
            process.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _listening(port):
        time.sleep(0.1)
    assert not _listening(port)


def _listening(port: int) -> bool:
    try:
        http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/")
        return True
    except OSError:
        return False
