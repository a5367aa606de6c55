"""Multi-worker training for real: `patchnet train --strategy multiworker` in worker processes on 127.0.0.1."""

import csv
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from patchnet_tf import cli
from patchnet_tf.runs import load_trained_model
from pipelines.cluster import free_ports, start_workers
from pipelines.textures import write_texture_dataset

# A tiny PatchNet, no augmentation: with the same global batch, one and two workers compute the
# same updates, up to the order in which the all-reduce adds the two halves of each batch.
FLAGS = ["--image-size", "32x32", "--patch-size", "9", "--filters", "4", "--conv-layers", "2",
         "--learning-rate", "3e-3", "--no-border-patches", "--heatmap-every", "0"]
WAIT = 240  # seconds a worker may take on a busy 2-core machine before the test gives up


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return write_texture_dataset(str(tmp_path_factory.mktemp("tex")), image_size=(32, 32),
                                 count={"train": 12, "val": 4, "test": 1})


@pytest.fixture
def launch():
    """Starts the processes of one cluster; a failed test leaves none of them running."""
    started = []

    def launch(data, out, workers, extra, logs, scratch):
        # TMPDIR: where the non-chief workers keep their scratch (patchnet-*).
        addresses = [f"127.0.0.1:{port}" for port in free_ports(workers)]
        os.makedirs(logs, exist_ok=True)
        processes = start_workers([data, "--out", out, *FLAGS, *extra], addresses,
                                  log_path=lambda index: os.path.join(logs, f"{os.path.basename(out)}-{index}.log"),
                                  env={"TMPDIR": scratch, "TF_CPP_MIN_LOG_LEVEL": "3"})
        started.extend(processes)
        return processes

    yield launch
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def finish(worker, logs, out, index):
    status = worker.wait(timeout=WAIT)
    with open(os.path.join(logs, f"{os.path.basename(out)}-{index}.log")) as file:
        return status, file.read()


def history(run):
    with open(os.path.join(run, "history.csv")) as file:
        return list(csv.DictReader(file))


def column(rows, name):
    return np.array([float(row[name]) for row in rows])


def test_two_workers_train_like_one_and_only_the_chief_writes_the_run(textures, tmp_path, launch):
    """Tolerances: 10x the largest differences `python -m bench.multiworker [--count 16]` measured
    (docs/results/training.md): losses per epoch 5e-5 (seen: 4.8e-6), weights 3e-3 (seen: 2.9e-4; Adam
    divides by the gradient's running RMS, so a weight whose gradient is near zero can move by
    a fraction of the learning rate on the all-reduce's rounding alone). Augmentation, which
    draws per replica, would differ by 3e-3 to 1e-2 in loss and 2e-2 to 4e-2 in weights."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    runs = {count: str(tmp_path / f"workers-{count}") for count in (1, 2)}
    extra = ["--batch-size", "8", "--epochs", "2"]
    processes = {count: launch(textures, runs[count], count, extra, str(tmp_path / "logs"), str(scratch))
                 for count in (1, 2)}
    for count, workers in processes.items():
        for index, worker in enumerate(workers):
            status, output = finish(worker, str(tmp_path / "logs"), runs[count], index)
            assert status == 0, output[-3000:]
            assert "trained 2 epoch(s)" in output

    one, two = history(runs[1]), history(runs[2])
    assert [row["epoch"] for row in two] == ["0", "1"]
    for name in ("loss", "val_loss"):
        np.testing.assert_allclose(column(two, name), column(one, name), atol=5e-5)
    for name in ("accuracy", "val_accuracy"):
        np.testing.assert_array_equal(column(two, name), column(one, name))
    (model_one, _), (model_two, _) = load_trained_model(runs[1]), load_trained_model(runs[2])
    for a, b in zip(model_one.get_weights(), model_two.get_weights()):
        np.testing.assert_allclose(b, a, atol=3e-3)
    assert any(np.abs(a).max() > 0 for a in model_two.get_weights())

    # The chief wrote the run folder, exactly as one worker does; worker 1 left nothing behind.
    def listing(run):  # event files name host and pid: left out
        return sorted(os.path.relpath(os.path.join(folder, name), run)
                      for folder, _, names in os.walk(run) for name in names if not name.startswith("events.out"))

    assert listing(runs[2]) == listing(runs[1])
    assert not [name for name in os.listdir(scratch) if name.startswith("patchnet-")]
    assert json.loads(Path(os.path.join(runs[2], "train_config.json")).read_text())["strategy"] == "multiworker"


def test_killed_worker_resumes_after_the_last_finished_epoch(textures, tmp_path, launch):
    """kill -9 worker 1 in epoch 2 of 2; worker 0 stops with one line; both restarted finish the run."""
    run, logs, scratch = str(tmp_path / "run"), str(tmp_path / "logs"), str(tmp_path / "scratch")
    os.makedirs(scratch)
    extra = ["--batch-size", "2", "--epochs", "2"]  # 12 steps an epoch: the kill lands inside one
    chief, worker = launch(textures, run, 2, extra, logs, scratch)
    metadata = os.path.join(run, "backup", "training_metadata.json")
    deadline = time.monotonic() + WAIT
    while not (os.path.exists(metadata) and json.loads(Path(metadata).read_text())["epoch"] >= 1):
        assert chief.poll() is None and worker.poll() is None, "a worker stopped before epoch 1 ended"
        assert time.monotonic() < deadline, "epoch 1 did not finish"
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()

    status, output = finish(chief, logs, run, 0)
    finished = json.loads(Path(metadata).read_text())["epoch"]
    assert finished == 1  # epoch 2 cannot finish without worker 1
    assert status == 75, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith("patchnet train: error: lost worker 1 of the cluster"), output[-3000:]
    assert last.endswith("restart every worker with the same command and the run resumes after epoch 1")
    assert "Traceback" not in output
    assert [row["epoch"] for row in history(run)] == ["0"]

    restarted = launch(textures, run, 2, extra, logs + "-restart", scratch)
    outputs = [finish(process, logs + "-restart", run, index) for index, process in enumerate(restarted)]
    for status, output in outputs:
        assert status == 0, output[-3000:]
        assert f"resuming after epoch 1 from {os.path.join(run, 'backup')}" in output
        assert "Epoch 2/2" in output and "Epoch 1/2" not in output
    rows = history(run)
    assert [row["epoch"] for row in rows] == ["0", "1"]  # one row per epoch, none twice
    assert np.isfinite(column(rows, "loss")).all()
    assert not [name for name in os.listdir(scratch) if name.startswith("patchnet-")]  # the restart cleared it


@pytest.mark.parametrize("tf_config, expected", [
    ("not json", "TF_CONFIG is not JSON"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}', 'TF_CONFIG has no "task"'),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no "cluster"'),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 1}}', "is not a member"),
    (None, "--strategy multiworker needs TF_CONFIG"),
])
def test_bad_tf_config_is_one_line_and_status_2(textures, tmp_path, monkeypatch, capsys, tf_config, expected):
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    out = tmp_path / "run"
    status = cli.main(["train", textures, "--out", str(out), *FLAGS, "--strategy", "multiworker"])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error.startswith("patchnet train: error: ") and expected in error and "\n" not in error
    assert not out.exists()
