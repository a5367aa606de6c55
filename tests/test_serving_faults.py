"""Faults under load: a version deleted from disk, and kill -9 of `patchnet serve` with a restart."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
from test_serving import MODEL, TOLERANCE, expected, images, predicting_in_a_loop, wait_until

from patchnet_tf.errors import PatchNetError
from pipelines.push import copy_version
from serving import client
from serving.loader import LoadedModel
from serving.server import start_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_version_deleted_under_load_is_unloaded_without_failing_a_request(exports, tmp_path, monkeypatch):
    """Requests running on version 2 when its folder goes finish on it; its session closes after them."""
    models, dirs = exports
    base = tmp_path / MODEL
    copy_version(dirs[0], str(base), 1)
    copy_version(dirs[1], str(base), 2)
    real_run = LoadedModel.run

    def slow_run(self, *args, **kwargs):  # every request holds its version for a while
        time.sleep(0.02)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(LoadedModel, "run", slow_run)
    server = start_server(str(base), MODEL, port=0, poll_seconds=0.05, num_versions=2)
    data = images(2)
    try:
        assert server.versions() == [1, 2]
        version_2 = server.core.manager(MODEL).acquire(2)[1]
        version_2.release()
        with predicting_in_a_loop(server.address, data) as (answered, failed):
            wait_until(lambda: len(answered) > 20)
            shutil.rmtree(base / "2")
            wait_until(lambda: server.versions() == [1])
            seen = len(answered)
            wait_until(lambda: len(answered) > seen + 20)
            statuses = server.core.statuses(MODEL)
    finally:
        server.stop()
    assert failed == []
    assert {version for version, _ in answered} == {1, 2}
    assert answered[-1][0] == 1
    want = {1: expected(models[0], data)[0], 2: expected(models[1], data)[0]}
    for version, probability in answered:
        np.testing.assert_allclose(probability, want[version], atol=TOLERANCE)
    assert version_2.closed  # unloaded and closed once its last request finished
    assert {version: state for version, (state, _) in statuses.items()} == {1: "AVAILABLE", 2: "END"}


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_serve(base, port):
    """`patchnet serve BASE --port PORT` in a process of its own; returns once it serves."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    process = subprocess.Popen([sys.executable, "-m", "patchnet_tf", "serve", str(base), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = process.stdout.readline()
    assert line.startswith("serving model"), line
    return process


def test_kill_9_under_load_then_a_restart_serves_again_and_predict_clients_recover(exports, tmp_path):
    models, dirs = exports
    base = tmp_path / MODEL
    copy_version(dirs[0], str(base), 1)
    port = free_port()
    address = f"127.0.0.1:{port}"
    data = images(1)
    want = expected(models[0], data)[0]
    stop = threading.Event()
    results = [[], []]  # per client: (time.monotonic(), probability or None if the call failed)

    def client_loop(index):
        while not stop.is_set():
            try:  # `patchnet predict`'s path: wait for the server, retry UNAVAILABLE with backoff
                answer = client.predict(address, MODEL, data, wait=120)
                results[index].append((time.monotonic(), answer[0].probability))
            except PatchNetError:
                results[index].append((time.monotonic(), None))

    process = start_serve(base, port)
    threads = [threading.Thread(target=client_loop, args=(index,)) for index in range(2)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: all(len(answers) >= 5 for answers in results))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process = start_serve(base, port)
        restarted = time.monotonic()
        wait_until(lambda: all(any(at > restarted and p is not None for at, p in answers) for answers in results),
                   timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=300)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    for answers in results:
        after = [p for at, p in answers if at > restarted]
        assert after and after[-1] is not None  # recovered, and still answering at the end
        served = [p for p in after if p is not None]
        np.testing.assert_allclose(served, np.full(len(served), want[0]), atol=TOLERANCE)
