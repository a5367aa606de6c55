"""Server-side batching as TF Serving's --enable_batching (serving/batching.py)."""

import concurrent.futures
import json
import os
import threading
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tensorflow as tf
from test_serving import MODEL, PREPROCESSING, TOLERANCE, images, outputs, request, tiny_model

from patchnet_tf.cli import main as cli_main
from patchnet_tf.errors import PatchNetError
from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving import client
from serving.batching import QUEUE_FULL, BatchingOptions, BatchScheduler, read_batching_parameters
from serving.loader import LoadedModel
from serving.server import start_server

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving", "batching.config")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    export_dir = write_saved_model(tiny_model(0), PREPROCESSING, str(root / "export"))
    copy_version(export_dir, str(root / MODEL), 1)
    return export_dir, str(root / MODEL)


def serve(base, **options):
    server = start_server(base, MODEL, port=0, poll_seconds=0.2, rest_api_port=0,
                          batching=BatchingOptions(**options))
    server.wait_for_version(1)
    return server


def predict(stub, data, signature="classify"):
    return outputs(stub.Predict(request(signature, {"image_bytes": tf.make_tensor_proto(data, tf.string)}),
                                timeout=60))


def test_the_shipped_batching_config_parses_as_batching_parameters(tmp_path):
    options = read_batching_parameters(CONFIG)
    assert (options.max_batch_size, options.batch_timeout_micros, options.max_enqueued_batches,
            options.num_batch_threads) == (16, 0, 100, 2)
    bad = tmp_path / "bad.config"
    for text, message in (("max_batch_size { value: 16 }\nmax_batch_sise { value: 2 }", "max_batch_sise"),
                          ("max_batch_size { value: 0 }", "max_batch_size must be at least 1"),
                          ("max_batch_size { value: 8 }\nallowed_batch_sizes: 4", "allowed_batch_sizes")):
        bad.write_text(text)
        with pytest.raises(PatchNetError) as error:
            read_batching_parameters(str(bad))
        assert str(bad) in str(error.value) and message in str(error.value)


def test_batched_answers_equal_unbatched_ones_under_16_concurrent_clients(export):
    export_dir, base = export
    unbatched = LoadedModel(export_dir)
    # Requests of 1 or 2 images; 16 clients always have more rows waiting than a batch holds.
    requests = [images(1 + seed % 2, seed) for seed in range(16)]
    want = [unbatched.run("classify", {"image_bytes": np.array(data, dtype=object)}) for data in requests]
    want_heat = unbatched.run("heatmap", {"image_bytes": np.array(requests[1], dtype=object)})
    unbatched.close()
    server = serve(base, max_batch_size=4, batch_timeout_micros=1_000_000, num_batch_threads=1)
    try:
        def client_session(index):
            channel = grpc.insecure_channel(server.address)
            stub = client.prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                for _ in range(6):
                    got = predict(stub, requests[index])
                    np.testing.assert_allclose(got["probability"], want[index]["probability"], atol=TOLERANCE)
                    np.testing.assert_array_equal(got["label"], want[index]["label"])
                if index == 1:
                    got = predict(stub, requests[1], "heatmap")
                    np.testing.assert_allclose(got["heatmap"], want_heat["heatmap"], atol=TOLERANCE)
                return 6
            finally:
                channel.close()

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert sum(pool.map(client_session, range(16))) == 96
        stats = server.batcher.stats()
    finally:
        server.stop()
    assert stats["requests"] == 97
    assert max(stats["tasks_per_batch"]) > 1  # requests really were merged
    assert stats["batches"] < stats["requests"]


class Gate:
    """Holds the first session run until released, so queue states are reached without timing."""

    def __init__(self, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        self.held = False
        real_run = LoadedModel.run
        gate = self

        def run(model, *args, **kwargs):
            if not gate.held:
                gate.held = True
                gate.entered.set()
                assert gate.release.wait(60)
            return real_run(model, *args, **kwargs)

        monkeypatch.setattr(LoadedModel, "run", run)


def _wait_for(condition):
    event = threading.Event()
    while not condition():
        event.wait(0.01)


def test_a_full_queue_answers_unavailable_over_grpc_and_rest(export, monkeypatch):
    _, base = export
    server = serve(base, max_batch_size=1, max_enqueued_batches=1, num_batch_threads=1)
    gate = Gate(monkeypatch)
    stub = client.prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.address))
    data = images(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(predict, stub, data)  # taken by the only batch thread, held there
            assert gate.entered.wait(60)
            waiting = pool.submit(predict, stub, data)  # the one batch the queue may hold
            _wait_for(lambda: server.batcher.stats()["enqueued_batches"] == 1)
            with pytest.raises(grpc.RpcError) as error:
                predict(stub, data)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error.value.details() == QUEUE_FULL
            # The same signature's queue over REST (serving_default has tensors of its own, so a queue too).
            body = json.dumps({"signature_name": "classify", "instances": [{"b64": "aGVsbG8="}]}).encode()
            with pytest.raises(urllib.error.HTTPError) as http_error:
                urllib.request.urlopen(f"{server.rest_url}/v1/models/{MODEL}:predict", body, timeout=60)
            assert http_error.value.code == 503
            assert json.loads(http_error.value.read()) == {"error": QUEUE_FULL}
            gate.release.set()
            first, second = running.result(60), waiting.result(60)
        np.testing.assert_allclose(first["probability"], second["probability"], atol=TOLERANCE)
        with pytest.raises(grpc.RpcError) as error:  # more rows than a batch holds
            predict(stub, images(2))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == "Task size 2 is larger than maximum input batch size 1"
    finally:
        gate.release.set()
        server.stop()


def test_a_junk_image_fails_only_its_own_request_in_a_merged_batch(export, monkeypatch):
    _, base = export
    server = serve(base, max_batch_size=4, num_batch_threads=1)
    gate = Gate(monkeypatch)
    stub = client.prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(server.address))
    good = images(2, seed=5)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            held = pool.submit(predict, stub, images(1))
            assert gate.entered.wait(60)
            fine = pool.submit(predict, stub, good)
            junk = pool.submit(predict, stub, [b"not an image"])
            _wait_for(lambda: server.batcher.stats()["enqueued_requests"] == 2)  # both in one open batch
            gate.release.set()
            held.result(60)
            with pytest.raises(grpc.RpcError) as error:
                junk.result(60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "image_bytes: not a JPEG, PNG, GIF or BMP image" in error.value.details()
            got = fine.result(60)
        assert server.batcher.stats()["tasks_per_batch"].get(2) == 1  # they did run as one batch
        alone = predict(stub, good)
        np.testing.assert_allclose(got["probability"], alone["probability"], atol=TOLERANCE)
    finally:
        gate.release.set()
        server.stop()


def test_serve_refuses_batching_flags_that_do_not_fit(export, tmp_path, capsys):
    _, base = export
    cases = [
        (["--batching-parameters-file", CONFIG], "--batching-parameters-file is used only with --enable-batching"),
        (["--enable-batching", "--batching-parameters-file", str(tmp_path / "missing.config")],
         f"{tmp_path / 'missing.config'}: cannot read batching parameters"),
    ]
    for flags, message in cases:
        assert cli_main(["serve", base, "--port", "0", *flags]) == 2
        assert message in capsys.readouterr().err


def test_allowed_batch_sizes_pad_the_batch_and_drop_the_padding(export, monkeypatch):
    export_dir, _ = export
    model = LoadedModel(export_dir)
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=4, allowed_batch_sizes=(2, 4), num_batch_threads=1))
    rows_run, real_run = [], LoadedModel.run

    def spy(self, name, inputs, output_filter=()):
        rows_run.append(len(inputs["image_bytes"]))
        return real_run(self, name, inputs, output_filter)

    try:
        data = np.array(images(3, seed=7), dtype=object)
        want = model.run("classify", {"image_bytes": data})
        monkeypatch.setattr(LoadedModel, "run", spy)
        got = scheduler.run(model, "classify", {"image_bytes": data})
    finally:
        scheduler.stop()
        model.close()
    assert rows_run == [4]  # 3 rows padded up to the allowed size 4
    assert got["probability"].shape == (3,)
    np.testing.assert_allclose(got["probability"], want["probability"], atol=TOLERANCE)
