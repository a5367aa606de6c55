"""`patchnet push`: bless, warm up, infra-validate, push atomically; failures touch nothing."""

import os
import shutil

import keras
import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from patchnet_tf import build_patchnet
from patchnet_tf.cli import main as cli_main
from patchnet_tf.preprocessing import Preprocessing
from patchnet_tf.synthetic import write_appendix_a_dataset
from pipelines import push as push_module
from pipelines.export import SIGNATURES
from pipelines.push import Evaluation, PushError, blessing, copy_version, push
from serving import client, warmup
from serving.server import start_server

MODEL = "patchnet"


def make_run(root, seed):
    keras.utils.set_random_seed(seed)
    os.makedirs(root, exist_ok=True)
    build_patchnet(9, filters=4, conv_layers=2).save(os.path.join(root, "model.keras"))
    Preprocessing(image_size=(32, 32), class_names=("black", "square")).save(str(root))
    return str(root)


def snapshot(base):
    """Every file under BASE with its size and modification time."""
    files = {}
    for root, dirs, names in os.walk(base):
        for name in dirs + names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            files[os.path.relpath(path, base)] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """A data folder, a base folder with version 1 pushed, and the run that made it."""
    root = tmp_path_factory.mktemp("push")
    data = write_appendix_a_dataset(str(root / "data"), copies=4, image_size=32, square_size=16)
    run = make_run(root / "run1", 0)
    base = str(root / "models" / MODEL)
    logs = []
    # An untrained model: pushed because told to (min_auroc=0); by default chance level is refused.
    version = push(run, base, data_dir=data, model_name=MODEL, min_auroc=0.0, log=logs.append)
    return {"root": root, "data": data, "run": run, "base": base, "version": version, "logs": logs}


def test_push_writes_a_version_warmup_and_models_config(pushed):
    base = pushed["base"]
    assert pushed["version"] == 1
    assert sorted(os.listdir(base)) == ["1"]  # no temporary sibling left
    assert os.path.isfile(os.path.join(base, "1", "saved_model.pb"))
    steps = [line.split("]")[0].strip("[") for line in pushed["logs"]]
    assert steps[0] == "export" and steps[-1] == "push"
    assert {"evaluate", "bless", "warmup", "infra-validate"} <= set(steps)
    requests = warmup.read_warmup_requests(os.path.join(base, "1"))
    assert sorted(r.model_spec.signature_name for r in requests) == sorted(SIGNATURES)
    assert all(r.model_spec.name == MODEL for r in requests)
    config = model_server_config_pb2.ModelServerConfig()
    with open(os.path.join(os.path.dirname(base), "models.config")) as file:
        text_format.Parse(file.read(), config)
    (entry,) = config.model_config_list.config
    assert (entry.name, entry.base_path, entry.model_platform) == (MODEL, f"/models/{MODEL}", "tensorflow")


def test_failed_bless_leaves_served_version_in_place(pushed):
    base = pushed["base"]
    before = snapshot(base)
    server = start_server(base, MODEL, port=0, poll_seconds=0.1)
    try:
        server.wait_for_version(1)
        answer = client.predict(server.address, MODEL, [_first_image(pushed["data"])])
        candidate = make_run(pushed["root"] / "run-bad", 3)
        with pytest.raises(PushError) as error:
            push(candidate, base, data_dir=pushed["data"], model_name=MODEL, min_accuracy=1.01,
                 log=lambda line: None)
        assert error.value.step == "bless"
        assert "below --min-accuracy 1.01" in str(error.value)
        assert snapshot(base) == before
        server.core.poll()
        assert server.versions() == [1]
        again = client.predict(server.address, MODEL, [_first_image(pushed["data"])])
        assert again[0].probability == answer[0].probability
    finally:
        server.stop()


def test_failed_infra_validation_pushes_nothing(pushed, monkeypatch):
    """Warmup records the model cannot answer fail in the fresh validating process."""
    base = pushed["base"]
    before = snapshot(base)
    original = warmup.warmup_requests

    def corrupted(signatures, model_name, images=None):
        requests = original(signatures, model_name, images)
        for request in requests:
            if "image_bytes" in request.inputs:
                request.inputs["image_bytes"].string_val[0] = b"not an image"
        return requests

    monkeypatch.setattr(warmup, "warmup_requests", corrupted)
    with pytest.raises(PushError) as error:
        push(make_run(pushed["root"] / "run-infra", 4), base, data_dir=pushed["data"], model_name=MODEL,
             tolerance=1.0, min_auroc=0.0, log=lambda line: None)
    assert error.value.step == "infra-validate"
    assert "warmup request failed" in str(error.value) and "image_bytes" in str(error.value)
    assert snapshot(base) == before


def test_interrupted_copy_leaves_no_version(pushed, tmp_path, monkeypatch):
    base = str(tmp_path / MODEL)
    real_copy = shutil.copy2

    def failing_copy(source, target, **kwargs):
        if os.path.basename(source) == "saved_model.pb":
            raise OSError("disk full")
        return real_copy(source, target, **kwargs)

    monkeypatch.setattr(push_module.shutil, "copy2", failing_copy)
    with pytest.raises(OSError):
        copy_version(os.path.join(pushed["base"], "1"), base, 5)
    assert os.listdir(base) == []


def test_blessing_compares_with_the_served_version():
    served = Evaluation(accuracy=0.90, auroc=0.95, examples=20)
    assert blessing(Evaluation(0.89, 0.95, 20), served, tolerance=0.02) is None
    assert "worse than the served version's 0.9000" in blessing(Evaluation(0.80, 0.95, 20), served)
    assert "AUROC" in blessing(Evaluation(0.95, 0.70, 20), served)
    assert "min-auroc" in blessing(Evaluation(0.95, 0.70, 20), None, min_auroc=0.8)
    # The first version too: no better than chance is refused unless --min-auroc 0.
    assert "not above --min-auroc 0.5 (chance)" in blessing(Evaluation(0.5, 0.08, 20), None)
    assert "not above --min-auroc 0.5 (chance)" in blessing(Evaluation(0.5, 0.5, 20), None)
    assert blessing(Evaluation(0.5, 0.08, 20), None, min_auroc=0.0) is None
    assert "one class" in blessing(Evaluation(1.0, None, 20), None, min_auroc=0.8)
    assert blessing(Evaluation(0.5, None, 2), None) is None


def test_push_cli_reports_the_failed_step(pushed, capsys):
    missing = str(pushed["root"] / "no-such-run")
    code = cli_main(["push", missing, "--base", pushed["base"], "--data", pushed["data"]])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "push failed at step 'export'" in err[0] and "no-such-run" in err[0]
    assert sorted(os.listdir(pushed["base"])) == ["1"]


def _first_image(data):
    folder = os.path.join(data, "square")
    with open(os.path.join(folder, sorted(os.listdir(folder))[0]), "rb") as file:
        return file.read()


def test_a_corrupt_newest_version_does_not_block_the_next_push(pushed, tmp_path):
    """The server keeps serving version 1 when version 2 is corrupt; push compares with version 1."""
    base = str(tmp_path / "models" / MODEL)
    shutil.copytree(pushed["base"], base)
    os.makedirs(os.path.join(base, "2"))
    with open(os.path.join(base, "2", "saved_model.pb"), "wb") as file:
        file.write(b"this is not a SavedModel")
    logs = []
    with pytest.raises(PushError) as error:  # --min-accuracy 1.01 stops it right after the comparison
        push(pushed["run"], base, data_dir=pushed["data"], model_name=MODEL, min_accuracy=1.01, log=logs.append)
    assert error.value.step == "bless"  # past evaluate, which used to fail on version 2
    evaluate = [line for line in logs if line.startswith("[evaluate]")]
    assert any(line.startswith("[evaluate] version 2 cannot be evaluated") for line in evaluate), evaluate
    assert any(line.startswith("[evaluate] served version 1:") for line in evaluate), evaluate
