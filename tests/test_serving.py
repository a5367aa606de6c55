"""The local TF-Serving-compatible server over real gRPC (docs/serving.md)."""

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
)

from patchnet_tf import build_patchnet, heatmap
from patchnet_tf.cli import main as cli_main
from patchnet_tf.preprocessing import Preprocessing, decode_image
from pipelines.export import SIGNATURES
from pipelines.push import copy_version
from serving import client, warmup
from serving.loader import LoadedModel
from serving.server import start_server

MODEL = "patchnet"
TOLERANCE = 1e-5
PREPROCESSING = Preprocessing(image_size=(32, 32))


def encode(image, extension=".png"):
    ok, data = cv2.imencode(extension, image)
    assert ok
    return data.tobytes()


def images(count=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(40, 48), (32, 32), (57, 23), (33, 41)]
    return [encode(rng.integers(0, 256, (*shapes[i % 4], 3), dtype=np.uint8)) for i in range(count)]


def expected(model, image_bytes):
    inputs = np.stack([PREPROCESSING(decode_image(data)).numpy() for data in image_bytes])
    return model(inputs, training=False).numpy()[:, 0], heatmap(model, inputs)


def tiny_model(seed):
    keras.utils.set_random_seed(seed)
    return build_patchnet(9, filters=4, conv_layers=2)


@pytest.fixture(scope="module")
def served(exports, tmp_path_factory):
    models, dirs = exports
    base = tmp_path_factory.mktemp("models") / MODEL
    copy_version(dirs[0], str(base), 1)
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.2)
    server.wait_for_version(1)
    channel = grpc.insecure_channel(server.address)
    stub = client.prediction_service_pb2_grpc.PredictionServiceStub(channel)
    yield server, stub, models[0]
    channel.close()
    server.stop()


def request(signature="classify", inputs=None, model=MODEL, version=None):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    inputs = {"image_bytes": tf.make_tensor_proto(images(2), dtype=tf.string)} if inputs is None else inputs
    for key, proto in inputs.items():
        req.inputs[key].CopyFrom(proto)
    return req


def assert_serves(server, model, data, version=None):
    """`patchnet predict` against `server` gives `model`'s probabilities for the encoded images `data`."""
    served = client.predict(server.address, MODEL, data, version=version)
    np.testing.assert_allclose([p.probability for p in served], expected(model, data)[0], atol=TOLERANCE)


def outputs(response):
    return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}


def test_binds_localhost_by_default(served):
    server, _, _ = served
    assert server.host == "127.0.0.1" and server.port > 0


def test_classify_and_heatmap_over_grpc_equal_keras(served):
    server, stub, model = served
    data = images(3)
    probability, heat = expected(model, data)
    for signature in ("classify", "serving_default", ""):
        response = stub.Predict(request(signature, {"image_bytes": tf.make_tensor_proto(data, tf.string)}))
        out = outputs(response)
        np.testing.assert_allclose(out["probability"], probability, atol=TOLERANCE)
        np.testing.assert_array_equal(out["label"], (probability >= 0.5).astype(np.int64))
        assert response.model_spec.name == MODEL and response.model_spec.version.value == 1
    predictions = client.predict(server.address, MODEL, data, "heatmap")
    np.testing.assert_allclose([p.probability for p in predictions], probability, atol=TOLERANCE)
    np.testing.assert_allclose(np.stack([p.heatmap for p in predictions]), heat, atol=TOLERANCE)


def test_images_signatures_over_grpc_equal_keras(served):
    _, stub, model = served
    pixels = np.random.default_rng(3).integers(0, 256, (2, 45, 37, 3)).astype(np.float32)
    inputs = PREPROCESSING(tf.constant(pixels / 255.0)).numpy()
    out = outputs(stub.Predict(request("classify_images", {"images": tf.make_tensor_proto(pixels)})))
    np.testing.assert_allclose(out["probability"], model(inputs).numpy()[:, 0], atol=TOLERANCE)
    out = outputs(stub.Predict(request("heatmap_images", {"images": tf.make_tensor_proto(pixels)})))
    np.testing.assert_allclose(out["heatmap"], heatmap(model, inputs), atol=TOLERANCE)


def test_metadata_and_status(served):
    server, stub, _ = served
    req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    req.model_spec.name = MODEL
    response = stub.GetModelMetadata(req)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    assert {"classify", "heatmap", "classify_images", "heatmap_images", "serving_default"} <= set(
        signature_map.signature_def
    )
    status_stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(server.address))
    status = status_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": MODEL}))
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    with pytest.raises(grpc.RpcError) as error:
        status_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
            model_spec={"name": MODEL, "version": {"value": 7}}))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


BAD_REQUESTS = {
    "unknown model": (
        lambda: request(model="nope"), "NOT_FOUND", "Servable not found for request: Latest(nope)"),
    "unknown version": (
        lambda: request(version=99), "NOT_FOUND", f"Specific({MODEL}, 99)"),
    "unknown signature": (
        lambda: request("predict_all"), "FAILED_PRECONDITION",
        'Serving signature name: "predict_all" not found'),
    "wrong input key": (
        lambda: request(inputs={"image": tf.make_tensor_proto(images(1), tf.string)}),
        "INVALID_ARGUMENT", "input tensor alias not found in signature: image. "
        "Inputs expected to be in the set {image_bytes}"),
    "floats to image_bytes": (
        lambda: request(inputs={"image_bytes": tf.make_tensor_proto([1.0, 2.0])}),
        "INVALID_ARGUMENT", "input image_bytes: expects string but float is provided"),
    "bytes that are not an image": (
        lambda: request(inputs={"image_bytes": tf.make_tensor_proto(images(1) + [b"hello"], tf.string)}),
        "INVALID_ARGUMENT", "image_bytes: not a JPEG, PNG, GIF or BMP image"),
    "truncated image": (
        lambda: request(inputs={"image_bytes": tf.make_tensor_proto([images(1)[0][:60]], tf.string)}),
        "INVALID_ARGUMENT", "image_bytes: "),
    "wrong rank": (
        lambda: request("classify_images", {"images": tf.make_tensor_proto(np.zeros((2, 8, 8), np.float32))}),
        "INVALID_ARGUMENT", "input images: expected rank 4 [?, ?, ?, 3], got shape [2, 8, 8]"),
    "wrong channel count": (
        lambda: request("classify_images", {"images": tf.make_tensor_proto(np.zeros((1, 8, 8, 4), np.float32))}),
        "INVALID_ARGUMENT", "input images: expected shape [?, ?, ?, 3], got [1, 8, 8, 4]"),
    "empty batch": (
        lambda: request(inputs={"image_bytes": tf.make_tensor_proto([], tf.string)}),
        "INVALID_ARGUMENT", "input image_bytes: empty batch"),
    "missing input": (
        lambda: request(inputs={}), "INVALID_ARGUMENT", "Missing but required: {image_bytes}"),
    "no model spec": (
        lambda: predict_pb2.PredictRequest(inputs={"image_bytes": tf.make_tensor_proto(images(1), tf.string)}),
        "INVALID_ARGUMENT", "Missing ModelSpec"),
    "empty model name": (
        lambda: request(model=""), "INVALID_ARGUMENT", "ModelSpec has no name specified."),
    "duplicate output alias": (
        lambda: _with_output_filter(request(), ["probability", "probability"]),
        "INVALID_ARGUMENT", "duplicate output tensor alias: probability"),
    "negative dimension": (
        lambda: request(inputs={"image_bytes": _negative_dimension(tf.make_tensor_proto(images(1), tf.string))}),
        "INVALID_ARGUMENT", "tensor parsing error: image_bytes"),
}


def _with_output_filter(req, aliases):
    req.output_filter.extend(aliases)
    return req


def _negative_dimension(proto):
    proto.tensor_shape.dim[0].size = -1
    return proto


def test_metadata_and_status_check_the_request_as_tf_serving(served):
    server, stub, _ = served
    status_stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(server.address))
    calls = {
        "metadata without model spec": (
            lambda: stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
                metadata_field=["signature_def"])), "Missing ModelSpec"),
        "status without model spec": (
            lambda: status_stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest()), "Missing ModelSpec"),
        "metadata field checked before the model": (
            lambda: stub.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec={"name": "nope"})), "must specify at least one metadata_field"),
    }
    for case, (call, message) in calls.items():
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert message in error.value.details(), case


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_tf_serving_status_and_server_keeps_serving(served, case):
    _, stub, model = served
    make, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(make())
    assert error.value.code() == getattr(grpc.StatusCode, code), error.value.details()
    assert message in error.value.details()
    data = images(1)
    out = outputs(stub.Predict(request(inputs={"image_bytes": tf.make_tensor_proto(data, tf.string)})))
    np.testing.assert_allclose(out["probability"], expected(model, data)[0], atol=TOLERANCE)


def test_concurrent_clients(served):
    server, _, model = served
    batches = [images(2, seed) for seed in range(8)]
    want = [expected(model, batch)[0] for batch in batches]

    def client_session(index):
        channel = grpc.insecure_channel(server.address)
        stub = client.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            for _ in range(25):
                out = outputs(stub.Predict(
                    request(inputs={"image_bytes": tf.make_tensor_proto(batches[index], tf.string)}),
                    timeout=60))
                np.testing.assert_allclose(out["probability"], want[index], atol=TOLERANCE)
            return 25
        finally:
            channel.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client_session, range(8))) == 200


def test_new_version_picked_up_and_half_written_ignored(exports, tmp_path):
    models, dirs = exports
    base = tmp_path / MODEL
    copy_version(dirs[0], str(base), 1)
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.1, num_versions=2)
    try:
        server.wait_for_version(1)
        data = images(2)
        # Half-written: a push's temporary sibling, and an integer folder still missing saved_model.pb.
        shutil.copytree(dirs[1], base / ".tmp-2-abc")
        shutil.copytree(dirs[1], base / "3", ignore=shutil.ignore_patterns("saved_model.pb"))
        server.core.poll()
        assert server.versions() == [1]
        copy_version(dirs[1], str(base), 2)  # the real push protocol
        assert server.wait_for_version(2) == [1, 2]
        assert_serves(server, models[1], data)  # the latest
        assert_serves(server, models[0], data, version=1)  # pinned
    finally:
        server.stop()


def test_a_version_is_served_only_after_its_warmup_requests_ran(exports, tmp_path, monkeypatch):
    """As TF Serving: warmup records are replayed at load; a version whose warmup fails is not served."""
    models, dirs = exports
    base = tmp_path / MODEL
    for version, source in ((1, dirs[0]), (2, dirs[1])):
        staged = tmp_path / f"staged-{version}"
        shutil.copytree(source, staged)
        warmup.write_warmup_requests(str(staged), MODEL)
        copy_version(str(staged), str(base), version)
    replayed = []
    real_run = LoadedModel.run

    def recording_run(self, name, inputs, output_filter=()):
        replayed.append((os.path.basename(self.export_dir), name))
        return real_run(self, name, inputs, output_filter)

    monkeypatch.setattr(LoadedModel, "run", recording_run)
    warmup_file = base / "2" / "assets.extra" / "tf_serving_warmup_requests"
    warmup_file.write_bytes(b"not a TFRecord")  # version 2's warmup cannot run
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.1, num_versions=2)
    try:
        assert server.versions() == [1]
        assert {name for folder, name in replayed if folder == "1"} == set(SIGNATURES)
        assert_serves(server, models[0], images(1))
    finally:
        server.stop()


def test_client_cli_writes_json_and_heatmaps(served, tmp_path, capsys):
    server, _, model = served
    paths = []
    for index, data in enumerate(images(2)):
        paths.append(str(tmp_path / f"img{index}.png"))
        with open(paths[-1], "wb") as file:
            file.write(data)
    code = cli_main(["predict", "--server", server.address, "--model", MODEL, "--signature", "heatmap",
                     "--out", str(tmp_path / "maps"), *paths])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    import json

    answers = [json.loads(line) for line in lines]
    probability, _ = expected(model, images(2))
    np.testing.assert_allclose([a["probability"] for a in answers], probability, atol=TOLERANCE)
    assert [a["label"] for a in answers] == [int(p >= 0.5) for p in probability]
    for index in range(2):
        gray = cv2.imread(str(tmp_path / "maps" / f"img{index}-heatmap.png"), cv2.IMREAD_UNCHANGED)
        assert gray.shape == (32, 32)
        assert cv2.imread(str(tmp_path / "maps" / f"img{index}-overlay.png")).shape == (32, 32, 3)
    assert cli_main(["predict", "--server", server.address, "--model", "nope", paths[0]]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a PNG")
    assert cli_main(["predict", "--server", server.address, "--model", MODEL, paths[0], str(junk), paths[1]]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"patchnet predict: error: {junk}: ") and "INVALID_ARGUMENT" in error[0]


def test_client_retries_unavailable_then_reports():
    calls = []

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "connection refused"

    def method(request, timeout):
        calls.append(timeout)
        if len(calls) < 3:
            raise Unavailable()
        return "answer"

    assert client.call_with_retries(method, None, deadline=2.0, retries=3, backoff=0.001) == "answer"
    assert calls == [2.0, 2.0, 2.0]

    def always_unavailable(request, timeout):
        calls.append(timeout)
        raise Unavailable()

    calls.clear()
    with pytest.raises(grpc.RpcError):
        client.call_with_retries(always_unavailable, None, retries=2, backoff=0.001)
    assert len(calls) == 3


def test_serve_cli_stops_cleanly_on_sigterm(exports, tmp_path):
    _, dirs = exports
    base = tmp_path / MODEL
    copy_version(dirs[0], str(base), 1)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "patchnet_tf", "serve", str(base), "--port", "0", "--poll-seconds", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = process.stdout.readline()
        assert "serving model patchnet" in line and "127.0.0.1:" in line, line
        address = line.split(" on ")[1].split()[0]
        answers = client.predict(address, MODEL, images(1))
        assert 0.0 <= answers[0].probability <= 1.0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def _status(server, version=None):
    stub = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(server.address))
    spec = {"name": MODEL} if version is None else {"name": MODEL, "version": {"value": version}}
    response = stub.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
    return {s.version: s for s in response.model_version_status}


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def predicting_in_a_loop(address, data, clients=4):
    """`clients` threads sending classify for `data` until the block ends; yields (answered, failed):
    (served version, probabilities) per answer and (code, details) per failed request."""
    stop, answered, failed = threading.Event(), [], []

    def client_loop():
        channel = grpc.insecure_channel(address)
        stub = client.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        while not stop.is_set():
            try:
                response = stub.Predict(request(inputs={"image_bytes": tf.make_tensor_proto(data, tf.string)}),
                                        timeout=30)
                answered.append((response.model_spec.version.value, outputs(response)["probability"]))
            except grpc.RpcError as error:
                failed.append((error.code(), error.details()))
        channel.close()

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield answered, failed
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_a_corrupt_version_under_load_never_takes_the_serving_one_down(exports, tmp_path):
    """TF Serving's availability-preserving policy: version 1 serves on while version 2 fails to load."""
    models, dirs = exports
    base = tmp_path / MODEL
    copy_version(dirs[0], str(base), 1)
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.05, max_load_retries=2, load_retry_interval=0.1)
    data = images(2)
    want = expected(models[0], data)[0]
    server.wait_for_version(1)
    with predicting_in_a_loop(server.address, data) as (answered, failed):
        wait_until(lambda: len(answered) > 20)
        broken = tmp_path / "staging"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        os.rename(broken, base / "2")
        wait_until(lambda: 2 in _status(server) and _status(server)[2].state == _status(server)[2].END)
        seen = len(answered)
        wait_until(lambda: len(answered) > seen + 20)  # still serving after the failure was final
    statuses = _status(server)
    server.stop()
    assert failed == []
    assert {version for version, _ in answered} == {1}
    for _, probability in answered[::25]:
        np.testing.assert_allclose(probability, want, atol=TOLERANCE)
    assert statuses[1].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert statuses[2].status.error_code != 0 and statuses[2].status.error_message


def test_a_half_copied_version_is_loaded_by_a_retry_once_complete(exports, tmp_path):
    """`cp` writes saved_model.pb before variables/: the first load fails, a retry succeeds."""
    models, dirs = exports
    base = tmp_path / MODEL
    copy_version(dirs[0], str(base), 1)
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.05, max_load_retries=5, load_retry_interval=0.3)
    try:
        server.wait_for_version(1)
        (base / "2").mkdir()
        shutil.copy(os.path.join(dirs[1], "saved_model.pb"), base / "2" / "saved_model.pb")
        wait_until(lambda: 2 in _status(server))
        assert _status(server)[2].state == get_model_status_pb2.ModelVersionStatus.LOADING  # retrying
        assert server.versions() == [1]
        shutil.copytree(dirs[1], base / "2", dirs_exist_ok=True)
        wait_until(lambda: server.versions() == [2])  # loaded by a retry, then version 1 unloaded
        assert_serves(server, models[1], images(2))
    finally:
        server.stop()


def test_serve_refuses_a_port_in_use_or_out_of_range(served, capsys, tmp_path):
    server, _, _ = served
    base = os.path.dirname(server.core.manager(MODEL).base_dir)
    with pytest.raises(Exception) as error:  # gRPC's SO_REUSEPORT would have let a second server share it
        start_server(server.core.manager(MODEL).base_dir, MODEL, port=server.port)
    assert f"cannot bind 127.0.0.1:{server.port}" in str(error.value)
    for port in ("70000", "-1"):
        with pytest.raises(SystemExit) as exit:
            cli_main(["serve", base, f"--port={port}"])
        assert exit.value.code == 2
        assert "expected a port number from 0 to 65535" in capsys.readouterr().err


def test_predict_waits_for_a_server_that_is_still_starting(exports, tmp_path, capsys):
    import socket

    models, dirs = exports
    base = tmp_path / MODEL
    copy_version(dirs[0], str(base), 1)
    with socket.socket() as probe:  # a free port for the server that starts late
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = images(1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.predict, f"127.0.0.1:{port}", MODEL, data, wait=60)
        time.sleep(2.0)  # the client is waiting, not failing
        assert not answer.done()
        server = start_server(str(base), MODEL, port=port)
        try:
            np.testing.assert_allclose(answer.result(timeout=60)[0].probability, expected(models[0], data)[0][0],
                                       atol=TOLERANCE)
        finally:
            server.stop()
    with open(tmp_path / "x.png", "wb") as file:
        file.write(data[0])
    code = cli_main(["predict", "--server", f"127.0.0.1:{port}", "--model", MODEL, "--wait", "0.5",
                     str(tmp_path / "x.png")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"patchnet predict: error: 127.0.0.1:{port}: no server answered within --wait 0.5 s")
