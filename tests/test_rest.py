"""TF Serving's REST API on the local server, with a plain HTTP client (urllib)."""

import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from test_serving import MODEL, PREPROCESSING, TOLERANCE, expected, images, request, tiny_model

from patchnet_tf import heatmap
from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving import client
from serving.rest import _float_texts, debug_string
from serving.server import start_server


@pytest.fixture(scope="module")
def rest(tmp_path_factory):
    model = tiny_model(0)
    root = tmp_path_factory.mktemp("rest")
    copy_version(write_saved_model(model, PREPROCESSING, str(root / "export")), str(root / MODEL), 1)
    server = start_server(str(root / MODEL), MODEL, port=0, poll_seconds=0.2, rest_api_port=0)
    server.wait_for_version(1)
    yield server, model
    server.stop()


def call(server, path, body=None, method=None):
    """(HTTP status, parsed JSON) of one call; `body` is a dict (sent as JSON) or raw bytes."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(server.rest_url + path, data=data, method=method or ("POST" if data is not None
                                                                                           else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if error.headers.get("Content-Type") == "application/json" else text


def b64(data):
    return {"b64": base64.b64encode(data).decode()}


PREDICT = f"/v1/models/{MODEL}:predict"


def test_row_and_columnar_predict_equal_in_process(rest):
    server, model = rest
    data = images(3)
    probability, heat = expected(model, data)
    for signature in ("classify", None):  # None: serving_default
        body = {"instances": [{"image_bytes": b64(item)} for item in data]}
        if signature:
            body["signature_name"] = signature
        status, answer = call(server, PREDICT, body)
        assert status == 200, answer
        np.testing.assert_allclose([row["probability"] for row in answer["predictions"]], probability,
                                   atol=TOLERANCE)
        assert [row["label"] for row in answer["predictions"]] == [int(p >= 0.5) for p in probability]
    # One input: the instances may be the bare values; the version may be in the path.
    status, answer = call(server, f"/v1/models/{MODEL}/versions/1:predict",
                          {"signature_name": "classify", "instances": [b64(item) for item in data]})
    assert status == 200
    np.testing.assert_allclose([row["probability"] for row in answer["predictions"]], probability, atol=TOLERANCE)
    status, answer = call(server, PREDICT, {"signature_name": "heatmap",
                                            "inputs": {"image_bytes": [b64(item) for item in data]}})
    assert status == 200 and set(answer["outputs"]) == {"heatmap", "probability"}
    np.testing.assert_allclose(answer["outputs"]["heatmap"], heat, atol=TOLERANCE)
    np.testing.assert_allclose(answer["outputs"]["probability"], probability, atol=TOLERANCE)
    status, answer = call(server, PREDICT, {"signature_name": "heatmap", "instances": [b64(data[0])]})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"][0]["heatmap"], heat[0], atol=TOLERANCE)


def test_float_images_signature_over_rest(rest):
    server, model = rest
    pixels = np.random.default_rng(3).integers(0, 256, (2, 20, 17, 3)).astype(np.float32)
    want = model(PREPROCESSING(tf.constant(pixels / 255.0)).numpy()).numpy()[:, 0]
    status, answer = call(server, PREDICT, {"signature_name": "classify_images", "inputs": pixels.tolist()})
    assert status == 200
    np.testing.assert_allclose(answer["outputs"]["probability"], want, atol=TOLERANCE)
    status, answer = call(server, PREDICT, {"signature_name": "heatmap_images",
                                            "instances": [{"images": image.tolist()} for image in pixels]})
    inputs = PREPROCESSING(tf.constant(pixels / 255.0)).numpy()
    np.testing.assert_allclose([row["heatmap"] for row in answer["predictions"]], heatmap(model, inputs),
                               atol=TOLERANCE)


def test_status_and_metadata_as_tf_serving_writes_them(rest):
    server, _ = rest
    for path in (f"/v1/models/{MODEL}", f"/v1/models/{MODEL}/versions/1"):
        status, answer = call(server, path)
        assert status == 200
        assert answer == {"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    status, answer = call(server, f"/v1/models/{MODEL}/metadata")
    assert status == 200
    assert answer["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    classify = answer["metadata"]["signature_def"]["signature_def"]["classify"]
    assert classify["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert classify["method_name"] == "tensorflow/serving/predict"
    assert set(classify["outputs"]) == {"probability", "label"}


def _images_body(signature, array):
    return {"signature_name": signature, "instances": array.tolist()}


GOOD = images(1)[0]
BAD_REQUESTS = {  # the gRPC battery of tests/test_serving.py, as JSON, plus what only JSON can get wrong
    "unknown model": (
        "/v1/models/nope:predict", {"instances": [b64(GOOD)]}, 404, "Servable not found for request: Latest(nope)"),
    "unknown version": (
        f"/v1/models/{MODEL}/versions/99:predict", {"instances": [b64(GOOD)]}, 404, f"Specific({MODEL}, 99)"),
    "unknown signature": (
        PREDICT, {"signature_name": "predict_all", "instances": [b64(GOOD)]}, 400,
        'Serving signature name: "predict_all" not found in signature def'),
    "wrong input key (row)": (
        PREDICT, {"instances": [{"image": b64(GOOD)}]}, 400,
        "Failed to process element: 0 key: image of 'instances' list. Error: INVALID_ARGUMENT: "
        "JSON object: does not have named input: image"),
    "wrong input key (columnar)": (
        PREDICT, {"inputs": {"image": [b64(GOOD)]}}, 400, "Missing named input: image_bytes in 'inputs' object."),
    "floats to image_bytes": (
        PREDICT, {"instances": [1.0, 2.0]}, 400,
        "Failed to process element: 0 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: 1.0 Type: Number "
        "is not of expected type: string"),
    "a string to a float input": (
        PREDICT, {"signature_name": "classify_images", "inputs": [[[["x", 1.0, 2.0]]]]}, 400,
        'JSON Value: "x" Type: String is not of expected type: float'),
    "bytes that are not an image": (
        PREDICT, {"instances": [b64(GOOD), b64(b"hello")]}, 400, "image_bytes: not a JPEG, PNG, GIF or BMP image"),
    "truncated image": (PREDICT, {"instances": [b64(GOOD[:60])]}, 400, "image_bytes: "),
    "not base64": (PREDICT, {"instances": [{"b64": "%%%"}]}, 400, "Unable to base64 decode"),
    "wrong rank": (
        PREDICT, _images_body("classify_images", np.zeros((2, 8, 8))), 400,
        "input images: expected rank 4 [?, ?, ?, 3], got shape [2, 8, 8]"),
    "wrong channel count": (
        PREDICT, _images_body("classify_images", np.zeros((1, 8, 8, 4))), 400,
        "input images: expected shape [?, ?, ?, 3], got [1, 8, 8, 4]"),
    "ragged instances": (
        PREDICT, {"signature_name": "classify_images", "instances": [np.zeros((2, 2, 3)).tolist(),
                                                                     np.zeros((3, 2, 3)).tolist()]}, 400,
        "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 12 "
        "but got: 18"),
    "ragged tensor": (
        PREDICT, {"signature_name": "classify_images", "inputs": [[[[1.0, 2.0, 3.0]], [[1.0, 2.0]]]]}, 400,
        "Encountered list at unexpected size: 2 at level: 3 expected size: 3"),
    "empty batch (row)": (PREDICT, {"instances": []}, 400, "No values in 'instances' array"),
    "empty batch (columnar)": (PREDICT, {"inputs": {"image_bytes": []}}, 400, "input image_bytes: empty batch"),
    "neither instances nor inputs": (PREDICT, {"signature_name": "classify"}, 400,
                                     "Missing 'inputs' or 'instances' key"),
    "both instances and inputs": (
        PREDICT, {"instances": [b64(GOOD)], "inputs": [b64(GOOD)]}, 400,
        "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"),
    "signature name not a string": (
        PREDICT, {"signature_name": 3, "instances": [b64(GOOD)]}, 400,
        "'signature_name' key must be a string value."),
    "truncated JSON": (PREDICT, b'{"instances": [', 400, "JSON Parse error: "),
    "not JSON": (PREDICT, b"\x89PNG junk", 400, "JSON Parse error: "),
    "empty body": (PREDICT, b"", 400, "JSON Parse error: The document is empty"),
    "JSON but not an object": (PREDICT, b"[1, 2]", 400, "JSON Value: [1, 2] Is not object"),
    "65 MiB of junk": (PREDICT, lambda: b"\x00\xff" * (65 << 19), 400, "JSON Parse error: "),
    "no :predict in the path": (
        f"/v1/models/{MODEL}", {"instances": [b64(GOOD)]}, 400, f"Malformed request: POST /v1/models/{MODEL}"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_tf_serving_json_errors_and_server_keeps_serving(rest, case):
    server, model = rest
    path, body, http_status, message = BAD_REQUESTS[case]
    status, answer = call(server, path, body() if callable(body) else body)
    assert status == http_status, answer
    assert set(answer) == {"error"} and message in answer["error"], answer
    status, answer = call(server, PREDICT, {"instances": [b64(GOOD)]})
    assert status == 200
    np.testing.assert_allclose(answer["predictions"][0]["probability"], expected(model, [GOOD])[0][0],
                               atol=TOLERANCE)


def test_status_and_metadata_errors(rest):
    server, _ = rest
    cases = [
        ("/v1/models/nope", 404, "Could not find any versions of model nope"),
        (f"/v1/models/{MODEL}/versions/7", 404, f"Could not find version 7 of model {MODEL}"),
        ("/v1/models/nope/metadata", 404, "Servable not found for request: Latest(nope)"),
        ("/v1/models", 400, "Missing model name in request."),
        ("/v1/modelz/x", 400, "Malformed request: GET /v1/modelz/x"),
    ]
    for path, http_status, message in cases:
        status, answer = call(server, path)
        assert (status, answer) == (http_status, {"error": message}), path
    # The label reaches the version manager unchanged (ModelSpec.version_label).
    status, answer = call(server, f"/v1/models/{MODEL}/labels/stable:predict", {"instances": [b64(GOOD)]})
    assert status in (400, 404) and "stable" in answer["error"]
    status, _ = call(server, "/metrics")
    assert status == 404  # not the REST API's path: TF Serving's dispatcher leaves it unanswered
    status, answer = call(server, PREDICT, {"instances": [b64(GOOD)]}, method="PUT")
    assert (status, answer) == (400, {"error": f"Malformed request: PUT {PREDICT}"})


def test_json_writing_follows_tf_serving():
    floats = np.array([0.2, 1.0, 1e-5, 123456789.0, np.nan, -np.inf, 0.1234567], np.float32)
    assert _float_texts(floats).tolist() == ["0.2", "1.0", "1e-05", "123456792.0", "NaN", "-Infinity",
                                             "0.123456702"]
    for text, value in zip(_float_texts(floats).tolist(), floats):  # what is written reads back exactly
        if np.isfinite(value):
            assert np.float32(float(text)) == value
    assert debug_string({"a": [1, 2]}) == '{\n    "a": [1, 2]\n}'
    assert len(debug_string(list(range(1000)))) < 270  # cut off after 256 bytes, as TF Serving's


def test_serve_cli_answers_rest_with_batching(rest, tmp_path):
    server, model = rest
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as probe:  # a free port: --rest-api-port 0 means "no REST", as in TF Serving
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "patchnet_tf", "serve", server.core.manager(MODEL).base_dir, "--port", "0",
         "--rest-api-port", str(port), "--enable-batching",
         "--batching-parameters-file", os.path.join(root, "serving", "batching.config")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = process.stdout.readline()
        assert f"REST API on http://127.0.0.1:{port}" in line and "batching on" in line, line

        class Remote:
            rest_url = f"http://127.0.0.1:{port}"

        status, answer = call(Remote, PREDICT, {"instances": [b64(GOOD)]})
        assert status == 200
        np.testing.assert_allclose(answer["predictions"][0]["probability"], expected(model, [GOOD])[0][0],
                                   atol=TOLERANCE)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_concurrent_rest_clients(rest):
    """16 clients connecting at once (socketserver's default backlog of 5 reset some of them)."""
    server, model = rest
    batches = [images(2, seed) for seed in range(16)]
    start = threading.Barrier(16)

    def client_session(index):
        start.wait(60)
        for _ in range(3):
            status, answer = call(server, PREDICT, {"instances": [b64(item) for item in batches[index]]})
            assert status == 200, answer
            np.testing.assert_allclose([row["probability"] for row in answer["predictions"]],
                                       expected(model, batches[index])[0], atol=TOLERANCE)
        return 3

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert sum(pool.map(client_session, range(16))) == 48


def test_rest_and_grpc_give_the_same_codes_and_messages(rest):
    """Both front ends call the same predict function: once JSON became tensors, the answers are one."""
    server, _ = rest
    stub = client.prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.address))
    cases = [  # (signature, input name, value as sent over gRPC, the same as JSON)
        ("classify", "image_bytes", [GOOD, b"hello"], [b64(GOOD), b64(b"hello")]),
        ("classify", "image_bytes", [GOOD[:60]], [b64(GOOD[:60])]),
        ("classify", "image_bytes", [], []),
        ("classify_images", "images", np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8)).tolist()),
        ("classify_images", "images", np.zeros((1, 8, 8, 4), np.float32), np.zeros((1, 8, 8, 4)).tolist()),
        ("predict_all", "image_bytes", [GOOD], [b64(GOOD)]),
    ]
    for signature, name, value, as_json in cases:
        proto = tf.make_tensor_proto(value, tf.string if name == "image_bytes" else tf.float32)
        with pytest.raises(grpc.RpcError) as error:
            stub.Predict(request(signature, {name: proto}))
        status, answer = call(server, PREDICT, {"signature_name": signature, "inputs": {name: as_json}})
        assert answer == {"error": error.value.details()}, signature
        assert status == 400 and error.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                        grpc.StatusCode.FAILED_PRECONDITION)
