"""Hostile or careless HTTP input to the REST port: every one gets an HTTP answer (never a dropped
connection or a 500), and the server answers a good request afterwards."""

import base64
import json
import re
import socket

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_service_pb2_grpc
from test_serving import MODEL, PREPROCESSING, TOLERANCE, expected, images, request, tiny_model

from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving.server import start_server

CAP = 1 << 20  # --max-message-bytes for this server: 1 MiB, for gRPC and REST alike
RSS_GROWTH_BOUND = 200 << 20  # no hostile request may grow the (in-process) server by more than this
BASELINE = {}  # the process's RSS once the server has answered its first request
PREDICT = f"/v1/models/{MODEL}:predict"
GOOD = images(1)[0]


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    model = tiny_model(0)
    root = tmp_path_factory.mktemp("hostile")
    copy_version(write_saved_model(model, PREPROCESSING, str(root / "export")), str(root / MODEL), 1)
    server = start_server(str(root / MODEL), MODEL, port=0, poll_seconds=0.2, rest_api_port=0,
                          max_message_bytes=CAP)
    server.wait_for_version(1)
    assert_still_serves(server, model)  # warm: what a first good request allocates is not the hostile one's
    BASELINE["rss"] = rss()
    yield server, model
    server.stop()


def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) << 10 for line in status if line.startswith("VmRSS:"))


def exchange(server, raw, timeout=30):
    """Sends raw bytes to the REST port; returns (HTTP status, headers text, body bytes) of the answer."""
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=timeout) as connection:
        try:
            connection.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):  # the server may answer and close before all is sent
            pass
        data = b""
        while b"\r\n\r\n" not in data:
            part = connection.recv(65536)
            assert part, f"connection closed without an answer after {data!r}"
            data += part
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines[1:]}
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            part = connection.recv(65536)
            if not part:
                break
            body += part
    return int(lines[0].split()[1]), headers, body[:length]


def post(path, body, extra_headers=""):
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}\r\n").encode() + body


def good_request_body():
    return json.dumps({"instances": [{"b64": base64.b64encode(GOOD).decode()}]}).encode()


def assert_still_serves(server, model):
    """A good request is answered right, and the process has not grown by RSS_GROWTH_BOUND."""
    if "rss" in BASELINE:
        assert rss() - BASELINE["rss"] < RSS_GROWTH_BOUND, f"grew {(rss() - BASELINE['rss']) >> 20} MiB"
    status, _, body = exchange(server, post(PREDICT, good_request_body()))
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["predictions"][0]["probability"], expected(model, [GOOD])[0][0],
                               atol=TOLERANCE)


def grpc_message_for_size(server, size):
    """What gRPC answers a request of about `size` bytes on the same server."""
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        proto = tf.make_tensor_proto([b"\0" * size], tf.string)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request(inputs={"image_bytes": proto}), timeout=60)
    return error.value.code(), error.value.details()


def test_a_huge_content_length_is_refused_before_the_body_is_read(capped):
    server, model = capped
    raw = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n").encode() + b'{"inst'
    status, headers, body = exchange(server, raw)
    assert status == 413 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": f"SERVER: Received message larger than max (1000000000000 vs. {CAP})"}
    assert_still_serves(server, model)


def test_the_rest_body_cap_is_grpcs_and_says_the_same(capped):
    server, model = capped
    code, message = grpc_message_for_size(server, 2 * CAP)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f" vs. {CAP})" in message, message
    status, _, body = exchange(server, post(PREDICT, b" " * (2 * CAP)))
    assert status == 413
    assert json.loads(body)["error"] == re.sub(r"\(\d+ vs\. ", f"({2 * CAP} vs. ", message)
    assert_still_serves(server, model)


def test_a_chunked_body_over_the_cap_is_cut_off_with_an_answer(capped):
    server, model = capped
    chunk = b"x" * 65536
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2 * CAP // len(chunk)))
    raw = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    status, _, body = exchange(server, raw)
    assert status == 413 and json.loads(body)["error"].startswith("SERVER: Received message larger than max (")
    assert_still_serves(server, model)


def test_a_chunked_body_within_the_cap_is_read(capped):
    server, model = capped
    data = good_request_body()
    pieces = [data[:10], data[10:]]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    raw = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    status, _, body = exchange(server, raw)
    assert status == 200, body
    np.testing.assert_allclose(json.loads(body)["predictions"][0]["probability"], expected(model, [GOOD])[0][0],
                               atol=TOLERANCE)


@pytest.mark.parametrize("framing", ["zz\r\n", "-5\r\n", "ffffffffffffffffffff\r\n", "4\r\nabcdefgh\r\n"])
def test_bad_chunking_gets_a_400_answer(capped, framing):
    server, model = capped
    raw = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{framing}0\r\n\r\n").encode()
    status, _, _ = exchange(server, raw)
    assert status == 400
    assert_still_serves(server, model)


def test_a_chunk_announced_and_never_sent_gets_an_answer(capped, monkeypatch):
    server, model = capped
    monkeypatch.setattr(server.rest, "body_idle_seconds", 1.0)
    raw = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           "10\r\n{").encode()  # 16 bytes announced, one sent
    status, _, body = exchange(server, raw)
    assert status == 408
    assert json.loads(body) == {"error": "no request body bytes arrived for 1 s; 1 of the body received"}
    assert_still_serves(server, model)


def test_a_content_length_that_is_not_a_number_gets_a_400_answer(capped):
    server, model = capped
    status, _, _ = exchange(server, f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n".encode())
    assert status == 400
    assert_still_serves(server, model)


@pytest.mark.parametrize("where", ["signature_name", "instances"])
def test_json_nested_deeper_than_pythons_recursion_limit_is_400_not_500(capped, where):
    server, model = capped
    deep = b"[" * 100_000 + b"]" * 100_000
    body = b'{"' + where.encode() + b'": ' + deep + b"}"
    status, _, answer = exchange(server, post(PREDICT, body))
    assert status == 400, answer
    message = json.loads(answer)["error"]
    if where == "signature_name":
        assert "'signature_name' key must be a string value." in message
    else:  # one image per row, but 100,000 levels of lists: TF Serving's tensor parsing error
        assert "image_bytes" in message
    assert_still_serves(server, model)


def test_invalid_utf8_in_the_json_is_400_with_a_message(capped):
    server, model = capped
    body = b'{"signature_name": "classify\xff\xfe", "instances": []}'
    status, _, answer = exchange(server, post(PREDICT, body))
    assert status == 400
    assert json.loads(answer) == {"error": "JSON Parse error: Invalid encoding in string. at offset: 28"}
    assert_still_serves(server, model)


def test_keep_alive_serves_several_requests_on_one_connection(capped):
    server, model = capped
    with socket.create_connection(("127.0.0.1", server.rest_port), timeout=30) as connection:
        for _ in range(3):
            connection.sendall(post(PREDICT, good_request_body()))
            data = b""
            while b"\r\n\r\n" not in data:
                data += connection.recv(65536)
            head, body = data.split(b"\r\n\r\n", 1)
            length = int([line for line in head.decode().split("\r\n") if line.lower().startswith("content-length")]
                         [0].split(":")[1])
            while len(body) < length:
                body += connection.recv(65536)
            assert head.startswith(b"HTTP/1.1 200"), head
            assert json.loads(body)["predictions"][0]["probability"] == pytest.approx(
                float(expected(model, [GOOD])[0][0]), abs=TOLERANCE)
