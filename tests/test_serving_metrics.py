"""`--monitoring-config-file`: Prometheus metrics with TF Serving's names on the REST port, read back with
prometheus_client's own text parser before and after requests."""

import base64
import collections
import json
import os
import urllib.error
import urllib.request

import grpc
import pytest
import tensorflow as tf
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import prediction_service_pb2_grpc
from test_serving import MODEL, PREPROCESSING, images, request, tiny_model

from patchnet_tf.cli import main as cli_main
from patchnet_tf.errors import PatchNetError
from pipelines.export import write_saved_model
from pipelines.push import copy_version
from serving.batching import BatchingOptions
from serving.metrics import DEFAULT_PATH, LATENCY_BUCKETS_MICROS, Metrics, read_monitoring_config
from serving.server import start_server

GOOD = images(1)[0]


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    """Versions 1 and 2 are wanted (latest 2); 2's saved_model.pb is junk, so its one load attempt fails."""
    root = tmp_path_factory.mktemp("metrics")
    base = root / MODEL
    copy_version(write_saved_model(tiny_model(0), PREPROCESSING, str(root / "export")), str(base), 1)
    os.makedirs(base / "2")
    (base / "2" / "saved_model.pb").write_bytes(b"not a SavedModel")
    config = write(root / "monitoring.config",
                   'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }')
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.2, rest_api_port=0, max_load_retries=0,
                          num_versions=2, batching=BatchingOptions(), monitoring_config_file=config)
    server.wait_for_version(1)
    yield server, str(base)
    server.stop()


def scrape(server):
    with urllib.request.urlopen(server.rest_url + DEFAULT_PATH, timeout=60) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        return list(text_string_to_metric_families(response.read().decode()))


def samples(families, name):
    """{frozenset of labels: value} of one sample name."""
    found = collections.Counter()
    for family in families:
        for sample in family.samples:
            if sample.name == name:
                found[frozenset(sample.labels.items())] += sample.value
    return found


def labels(**values):
    return frozenset(values.items())


def rest_predict(server, model):
    body = json.dumps({"instances": [{"b64": base64.b64encode(GOOD).decode()}]}).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(server.rest_url + f"/v1/models/{model}:predict", body),
                                    timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_request_counts_and_latencies_before_and_after_requests(monitored):
    server, _ = monitored
    before = scrape(server)
    assert rest_predict(server, MODEL) == 200 and rest_predict(server, MODEL) == 200
    assert rest_predict(server, "nope") == 404
    with grpc.insecure_channel(server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(request("classify", {"image_bytes": tf.make_tensor_proto([GOOD], tf.string)}), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Predict(request("classify", {"image_bytes": tf.make_tensor_proto([b"junk"], tf.string)}), timeout=60)
    after = scrape(server)

    count = ":tensorflow:serving:request_count"
    delta = samples(after, count) - samples(before, count)
    assert delta[labels(model_name=MODEL, status="OK")] == 3
    assert delta[labels(model_name="nope", status="NOT_FOUND")] == 1
    assert delta[labels(model_name=MODEL, status="INVALID_ARGUMENT")] == 1
    latency = ":tensorflow:serving:request_latency_count"
    delta = samples(after, latency) - samples(before, latency)
    assert delta[labels(model_name=MODEL, API="predict", entrypoint="REST")] == 2
    assert delta[labels(model_name=MODEL, API="Predict", entrypoint="GRPC")] == 1  # failures are not timed
    assert sum(delta.values()) == 3
    # TF Serving's buckets, in microseconds: 10 * 1.8^i.
    limits = sorted({float(dict(key)["le"]) for key in samples(after, ":tensorflow:serving:request_latency_bucket")})
    assert limits[:-1] == pytest.approx(LATENCY_BUCKETS_MICROS) and limits[-1] == float("inf")
    total = ":tensorflow:serving:request_latency_sum"
    assert samples(after, total)[labels(model_name=MODEL, API="predict", entrypoint="REST")] > 0
    # --enable-batching: the merged runs are counted (two REST and one good gRPC call at least ran).
    runs = ":tensorflow:serving:batching_session:wrapped_run_count"
    assert samples(after, runs)[frozenset()] - samples(before, runs)[frozenset()] >= 3
    assert samples(after, "patchnet_batching_enqueued_requests")[frozenset()] == 0  # all answered, none waits
    # Each batched request's wait in the queue, per thread pool, in TF Serving's buckets (100 * 1.2^i us).
    waits = ":tensorflow:serving:batching_session:queuing_latency_count"
    pool = labels(thread_pool_name=BatchingOptions().thread_pool_name)
    assert samples(after, waits)[pool] - samples(before, waits).get(pool, 0) >= 3
    limits = sorted({float(dict(key)["le"]) for key in
                     samples(after, ":tensorflow:serving:batching_session:queuing_latency_bucket")})
    assert limits[:-1] == pytest.approx([100 * 1.2**index for index in range(51)]) and limits[-1] == float("inf")


def test_load_attempts_and_latency_per_version_path(monitored):
    server, base = monitored
    families = scrape(server)
    attempts = samples(families, ":tensorflow:cc:saved_model:load_attempt_count")
    assert attempts[labels(model_path=os.path.join(base, "1"), status="success")] >= 1
    assert attempts[labels(model_path=os.path.join(base, "2"), status="fail")] >= 1
    latency = samples(families, ":tensorflow:cc:saved_model:load_latency")
    assert latency[labels(model_path=os.path.join(base, "1"))] > 0
    assert labels(model_path=os.path.join(base, "2")) not in latency  # only successful loads are timed


def test_batching_queue_gauges_read_the_schedulers_stats():
    class Scheduler:  # what BatchScheduler.stats() reports (tests/test_batching.py tests the numbers)
        def __init__(self, batches, enqueued_batches, enqueued_requests):
            self.numbers = {"batches": batches, "enqueued_batches": enqueued_batches,
                            "enqueued_requests": enqueued_requests}

        def stats(self):
            return self.numbers

    metrics = Metrics()
    first, second = Scheduler(7, 2, 5), Scheduler(1, 1, 1)
    metrics.watch_batcher(first)
    metrics.watch_batcher(second)
    families = list(text_string_to_metric_families(metrics.text()))
    assert samples(families, ":tensorflow:serving:batching_session:wrapped_run_count")[frozenset()] == 8
    assert samples(families, "patchnet_batching_enqueued_batches")[frozenset()] == 3
    assert samples(families, "patchnet_batching_enqueued_requests")[frozenset()] == 6
    metrics.forget_batcher(second)
    families = list(text_string_to_metric_families(metrics.text()))
    assert samples(families, "patchnet_batching_enqueued_requests")[frozenset()] == 5


def test_the_metrics_path_is_only_the_configured_one(monitored):
    server, _ = monitored
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server.rest_url + "/metrics", timeout=60)
    assert error.value.code == 404


def test_monitoring_config_files_as_tf_serving_reads_them(tmp_path):
    assert read_monitoring_config(write(tmp_path / "a", "prometheus_config { enable: true }")) == DEFAULT_PATH
    assert read_monitoring_config(write(tmp_path / "b", 'prometheus_config { enable: true path: "/m" }')) == "/m"
    assert read_monitoring_config(write(tmp_path / "c", 'prometheus_config { path: "/m" }')) is None
    with pytest.raises(PatchNetError, match="not a MonitoringConfig"):
        read_monitoring_config(write(tmp_path / "d", "prometheus { enable: true }"))
    with pytest.raises(PatchNetError, match="cannot read"):
        read_monitoring_config(str(tmp_path / "missing"))


def test_serve_refuses_a_monitoring_config_without_the_rest_port(tmp_path, capsys):
    config = write(tmp_path / "monitoring.config", "prometheus_config { enable: true }")
    os.makedirs(tmp_path / "m")
    assert cli_main(["serve", str(tmp_path / "m"), "--port", "0", "--monitoring-config-file", config]) == 2
    assert "--monitoring-config-file: the metrics are served on the REST port: give --rest-api-port" in (
        capsys.readouterr().err)
