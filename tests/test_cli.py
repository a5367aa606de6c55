"""The command line: help everywhere, one clear line for bad input, resume after kill -9."""

import argparse
import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import keras
import pytest

from patchnet_tf import build_patchnet, cli
from patchnet_tf.preprocessing import Preprocessing
from patchnet_tf.synthetic import write_appendix_a_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--patch-size", "9", "--filters", "4", "--conv-layers", "2", "--image-size", "32", "--batch-size", "4"]


def patchnet(capsys, *argv):
    """Runs `patchnet ARGV` in-process; returns (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_appendix_a_dataset(str(tmp_path_factory.mktemp("data")), copies=4, image_size=32, square_size=16)


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    build_patchnet(9, filters=4, conv_layers=2).save(str(folder / "model.keras"))
    Preprocessing(image_size=(32, 32)).save(str(folder))
    return str(folder / "model.keras")


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help_showing_every_default(capsys, command):
    code, out, _ = patchnet(capsys, command, "--help")
    assert code == 0
    assert f"usage: patchnet {command}" in out
    parser = cli.command_parser(command)
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and not isinstance(action.default, bool):
            flag = max(action.option_strings, key=len)
            entry = re.search(rf"\n  (?:-\w, )?{flag}\b(.*?)(?=\n  -|\n\n|\Z)", out, re.S)
            wanted = "".join(f"default: {action.default}".split())  # help wraps at spaces and hyphens
            assert entry and wanted in "".join(entry.group(1).split()), flag


def test_start_up_prints_no_native_tensorflow_lines():
    """A healthy start on a CPU machine shows nothing that reads like a failure (e.g. cuInit)."""
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-m", "patchnet_tf", "--help"], env={**env, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: patchnet" in result.stdout
    assert result.stderr == ""


def test_top_level_help_does_not_load_tensorflow():
    """`patchnet --help` (the installed console script) answers without importing TensorFlow,
    which takes seconds; PYTHONPROFILEIMPORTTIME lists every module the process imported."""
    script = os.path.join(os.path.dirname(sys.executable), "patchnet")
    for argv in (["--help"], ["fly"]):
        result = subprocess.run([script, *argv], env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
                                capture_output=True, text=True, timeout=120)
        imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
        assert "argparse" in imported  # the listing works
        assert not [name for name in imported if name.startswith(("tensorflow", "keras", "patchnet_tf"))], argv
    assert result.returncode == 2 and "invalid choice: 'fly'" in result.stderr


def _modules_imported_by(argv):
    """(exit code, stdout, stderr, every module the `patchnet ARGV` process imported) of the console script."""
    script = os.path.join(os.path.dirname(sys.executable), "patchnet")
    result = subprocess.run([script, *argv], env={**os.environ, "PYTHONPATH": ROOT, "PYTHONPROFILEIMPORTTIME": "1"},
                            capture_output=True, text=True, timeout=120)
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    errors = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    assert "argparse" in imported  # the listing works
    return result.returncode, result.stdout, errors, imported


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_help_does_not_load_tensorflow(command):
    """Each command's flags are declared in TF-free modules, so `patchnet COMMAND --help` answers at once."""
    code, out, _, imported = _modules_imported_by([command, "--help"])
    assert code == 0 and f"usage: patchnet {command}" in out
    assert not [name for name in imported if name.startswith(("tensorflow", "keras", "patchnet_tf"))], command


@pytest.mark.parametrize("argv, message", [
    (["train", "DATA", "--out", "RUN", "--epochs", "many"], "argument --epochs: expected a positive integer"),
    (["compare", "DATA", "--out", "OUT", "--cell", "100000"], "argument --cell: expected a cell size"),
    (["serve", "BASE", "--port", "70000"], "argument --port: expected a port number"),
    (["bulk", "IMAGE", "--model", "RUN", "--out", "OUT", "--stride", "0"], "argument --stride: expected a positive"),
])
def test_a_bad_flag_is_refused_before_tensorflow_loads(argv, message):
    code, _, err, imported = _modules_imported_by(argv)
    assert code == 2 and err.startswith(f"patchnet {argv[0]}: error: {message}"), err
    assert not [name for name in imported if name.startswith(("tensorflow", "keras", "patchnet_tf"))], argv


def test_generated_flags_default_to_the_settings():
    """The flags are generated from pipelines/settings.py: train's defaults are the dataclasses' (PAPER),
    compare's run flags default to the CPU preset and its own to ComparisonSettings'."""
    import dataclasses

    from patchnet_tf.heatmaps import DEFAULT_CHUNK_PATCHES
    from pipelines import flags
    from pipelines.settings import (
        CPU,
        PAPER,
        ComparisonSettings,
        DataSettings,
        ModelSettings,
        TrainingSettings,
        train_config,
    )
    from pipelines.train import train_defaults

    paths = {"data": "DATA", "out": "OUT"}
    train = vars(cli.command_parser("train").parse_args(["DATA", "--out", "OUT"]))
    assert train == train_config(ModelSettings(), DataSettings(), TrainingSettings(), **paths)
    assert train_defaults() == PAPER == {key: value for key, value in train.items() if key not in paths}
    sweep = vars(cli.command_parser("sweep").parse_args(["DATA", "--out", "OUT"]))
    assert {key: value for key, value in sweep.items() if key not in ("archs", "patch_sizes", "learning_rates")} == train

    compare = vars(cli.command_parser("compare").parse_args(["DATA", "--out", "OUT"]))
    for field in dataclasses.fields(ComparisonSettings):
        assert compare.pop(field.name) == field.default, field.name
    assert compare.pop("stride") is None  # CPU's stride rule for the padding
    runs = {key: value for key, value in compare.items() if key not in paths}
    assert runs and runs == {key: CPU[key] for key in runs}
    assert CPU == {**PAPER, "image_size": (64, 64), "patch_size": 15, "stride": 3, "padding": "valid", "filters": 16,
                   "conv_layers": 3, "learning_rate": 3e-3, "batch_size": 8, "epochs": 150}
    assert flags.DEFAULT_CHUNK_PATCHES == DEFAULT_CHUNK_PATCHES  # export's flag and the library's default


def test_start_up_noise_filter_keeps_real_errors():
    from patchnet_tf.quiet_start import START_UP_NOISE

    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796280081.074580    3839 port.cc:153] oneDNN custom operations are on. You may see ...",
        "I0000 00:00:1796280081.074995    3839 cudart_stub.cc:31] Could not find cuda drivers on your machine",
        "E0000 00:00:1764580000.000000    1234 cuda_executor.cc:1309] failed call to cuInit: INTERNAL: CUDA error",
    ]
    real = ["E0000 00:00:1796280081.1 1 op_kernel.cc:1] OP_REQUIRES failed: out of memory",
            "ImportError: libcudart.so.12: cannot open shared object file"]
    assert all(START_UP_NOISE.search(line) for line in noise)
    assert not any(START_UP_NOISE.search(line) for line in real)


def test_a_bad_flag_is_one_line_not_the_usage_block(capsys, tmp_path):
    code, _, err = patchnet(capsys, "train", str(tmp_path), "--out", str(tmp_path / "run"), "--epochs", "many")
    assert code == 2
    assert err.strip().splitlines() == [
        "patchnet train: error: argument --epochs: expected a positive integer, got 'many' "
        "(see patchnet train --help)"
    ]


def test_top_level_help_lists_commands(capsys):
    code, out, _ = patchnet(capsys, "--help")
    assert code == 0
    for command in cli.COMMANDS:
        assert command in out


def test_unknown_command_and_bad_flag_values(capsys, dataset, tmp_path):
    code, _, err = patchnet(capsys, "fly")
    assert code == 2 and "invalid choice: 'fly'" in err
    code, _, err = patchnet(capsys, "train", dataset, "--out", str(tmp_path), "--padding", "reflect")
    assert code == 2 and "--padding" in err and "reflect" in err
    code, _, err = patchnet(capsys, "train", dataset, "--out", str(tmp_path), "--image-size", "big")
    assert code == 2 and "HEIGHTxWIDTH" in err
    code, _, err = patchnet(capsys, "train", dataset, "--out", str(tmp_path), "--batch-size", "0")
    assert code == 2 and "positive integer" in err
    for value in ("inf", "nan", "-1e-3"):  # inf and nan would train to NaN and exit 0
        code, _, err = patchnet(capsys, "train", dataset, "--out", str(tmp_path), f"--learning-rate={value}")
        assert code == 2 and "--learning-rate" in err and "positive finite number" in err, value


def test_out_naming_an_existing_file_is_one_line(capsys, dataset, tmp_path, tiny_model_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    image = os.path.join(dataset, sorted(os.listdir(dataset))[0])
    image = os.path.join(image, sorted(os.listdir(image))[0])
    for argv in (["train", dataset, "--out", str(taken), *TINY, "--epochs", "1"],
                 ["heatmap", image, "--model", tiny_model_path, "--out", str(taken)]):
        code, _, err = patchnet(capsys, *argv)
        assert code == 2, argv
        assert err.strip().splitlines()[-1].startswith(f"patchnet {argv[0]}: error: {taken}"), err
        assert "Traceback" not in err
    assert taken.read_text() == "not a folder"


def test_missing_data_folder_is_named(capsys, tmp_path):
    missing = str(tmp_path / "nowhere")
    code, _, err = patchnet(capsys, "train", missing, "--out", str(tmp_path / "run"), *TINY)
    assert code == 2
    assert err.strip() == f"patchnet train: error: {missing}: no such data folder"


def test_patch_larger_than_image_is_refused(capsys, dataset, tmp_path):
    code, _, err = patchnet(
        capsys, "train", dataset, "--out", str(tmp_path), "--patch-size", "33", "--image-size", "32"
    )
    assert code == 2 and "--patch-size 33 is larger than the image (32 px" in err
    assert not os.path.exists(tmp_path / "model.keras")


def test_a_train_that_fails_on_a_bad_image_leaves_no_run_behind(capsys, dataset, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    class_folder = sorted(path for path in data.iterdir() if path.is_dir() and path.name != "masks")[0]
    (class_folder / "zz-broken.png").write_bytes(b"this is not a PNG")
    out = tmp_path / "run"
    code, _, err = patchnet(capsys, "train", str(data), "--out", str(out), *TINY, "--epochs", "1")
    assert code == 2 and "zz-broken.png: missing or not a decodable image" in err
    assert not out.exists() or os.listdir(out) == []  # nothing that would lock the next run
    (class_folder / "zz-broken.png").unlink()
    code, _, err = patchnet(capsys, "train", str(data), "--out", str(out), *TINY, "--epochs", "1", "--seed", "3")
    assert code == 0, err


def test_heatmap_names_an_undecodable_image(capsys, tiny_model_path, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    code, _, err = patchnet(capsys, "heatmap", str(bad), "--model", tiny_model_path, "--out", str(tmp_path))
    assert code == 2 and f"{bad}: not a decodable image" in err
    code, _, err = patchnet(capsys, "heatmap", str(tmp_path / "gone.png"), "--model", tiny_model_path,
                            "--out", str(tmp_path))
    assert code == 2 and "gone.png: no such file" in err
    code, _, err = patchnet(capsys, "heatmap", str(bad), "--model", str(tmp_path / "m.keras"),
                            "--out", str(tmp_path))
    assert code == 2 and "m.keras: no such model file" in err


def test_heatmap_refuses_even_patch_size(capsys, dataset, tmp_path):
    build_patchnet(8, filters=2, conv_layers=1).save(str(tmp_path / "model.keras"))
    Preprocessing(image_size=(32, 32)).save(str(tmp_path))
    code, _, err = patchnet(capsys, "heatmap", dataset, "--model", str(tmp_path / "model.keras"),
                            "--out", str(tmp_path / "maps"))
    assert code == 2 and "odd patch size" in err and "got 8" in err


def test_heatmap_writes_pngs_for_a_folder(capsys, dataset, tiny_model_path, tmp_path):
    code, out, _ = patchnet(capsys, "heatmap", dataset, "--model", tiny_model_path,
                            "--out", str(tmp_path), "--stride", "2", "--filters")
    assert code == 0 and "wrote heatmaps of 8 image(s)" in out
    assert "heatmaps: 512/512 rows" in out  # progress counts rows: 8 images x 32 rows, maps and filters
    written = sorted(os.listdir(tmp_path))
    # black/000.png and square/000.png: one set of PNGs each, named apart by their folder.
    assert len([name for name in written if name.endswith("-heatmap.png")]) == 8
    assert {"black-000-heatmap.png", "square-000-overlay.png", "black-000-filters.png"} <= set(written)
    import cv2

    assert cv2.imread(str(tmp_path / "black-000-heatmap.png"), cv2.IMREAD_UNCHANGED).shape == (32, 32)


def test_heatmap_precision_flag(capsys, dataset, tiny_model_path, tmp_path):
    import cv2

    image = os.path.join(dataset, "square", "000.png")
    maps, probabilities = {}, {}
    for precision in ("float32", "auto", "bfloat16"):
        code, out, _ = patchnet(capsys, "heatmap", image, "--model", tiny_model_path,
                                "--out", str(tmp_path / precision), "--precision", precision)
        assert code == 0
        probabilities[precision] = float(re.search(r"probability ([0-9.]+)", out).group(1))
        maps[precision] = cv2.imread(str(tmp_path / precision / "000-heatmap.png"), cv2.IMREAD_UNCHANGED)
    # The tiny subnet is narrow: auto computes in float32, the very same map.
    assert (maps["auto"] == maps["float32"]).all() and probabilities["auto"] == probabilities["float32"]
    difference = abs(maps["bfloat16"].astype(int) - maps["float32"].astype(int))
    assert difference.max() <= 3 and abs(probabilities["bfloat16"] - probabilities["float32"]) < 0.01


def test_heatmap_outputs_never_collide_and_masks_are_not_inputs(capsys, dataset, tiny_model_path, tmp_path):
    import shutil

    from patchnet_tf import baselines

    data = tmp_path / "data"
    for folder in ("a", "b", "masks"):
        (data / folder).mkdir(parents=True)
    image = os.path.join(dataset, "black", sorted(os.listdir(os.path.join(dataset, "black")))[0])
    for folder in ("a", "b", "masks"):
        shutil.copy(image, data / folder / "same.png")
    out = tmp_path / "maps"
    code, stdout, _ = patchnet(capsys, "heatmap", str(data), "--model", tiny_model_path, "--out", str(out))
    assert code == 0 and "wrote heatmaps of 2 image(s)" in stdout  # masks/ is skipped
    assert sorted(os.listdir(out)) == ["a-same-heatmap.png", "a-same-overlay.png",
                                       "b-same-heatmap.png", "b-same-overlay.png"]
    cam = tmp_path / "cam"
    cam.mkdir()
    baselines.build("cam", (32, 32, 3), width=1).save(str(cam / "model.keras"))
    shutil.copy(os.path.join(os.path.dirname(tiny_model_path), "preprocessing.json"), cam)
    code, _, err = patchnet(capsys, "heatmap", str(data / "a"), "--model", str(cam), "--out", str(tmp_path / "c"),
                            "--filters")
    assert code == 2 and "--filters needs a PatchNet" in err and not (tmp_path / "c").exists()


def _backup_epoch(run):
    path = os.path.join(run, "backup", "training_metadata.json")
    try:
        with open(path) as file:
            return json.load(file)["epoch"]
    except (OSError, ValueError):
        return 0


def test_training_resumes_after_kill_9(dataset, tmp_path):
    """A run killed mid-training continues from its last finished epoch and ends as if never killed."""
    run = str(tmp_path / "run")
    command = [sys.executable, "-m", "patchnet_tf", "train", dataset, "--out", run, "--epochs", "8",
               "--patience", "100", *TINY]
    env = {**os.environ, "PYTHONPATH": ROOT}
    uninterrupted = str(tmp_path / "uninterrupted")
    subprocess.run([*command[:6], uninterrupted, *command[7:]], env=env, check=True, capture_output=True)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _backup_epoch(run) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done = _backup_epoch(run)
    assert 2 <= done < 8, f"the first run should be killed mid-training, it had finished {done} epochs"
    # What a kill during a checkpoint or backup write leaves (timing decides whether this one did).
    stale = [os.path.join(run, ".tmp-abc.keras"), os.path.join(run, "backup", ".tmp-def.weights.h5")]
    for path in stale:
        open(path, "wb").close()

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"resuming after epoch {done} from {os.path.join(run, 'backup')}" in second.stdout
    started = [line for line in second.stdout.splitlines() if line.startswith("Epoch ")]
    assert started[0] == f"Epoch {done + 1}/8", started  # finished epochs are not repeated
    assert started[-1] == "Epoch 8/8"
    with open(os.path.join(run, "history.csv")) as file:
        epochs = [int(row["epoch"]) for row in csv.DictReader(file)]
    assert epochs == list(range(8))  # one row per epoch, none lost or repeated
    left = glob.glob(os.path.join(run, ".tmp-*")) + glob.glob(os.path.join(run, "backup", ".tmp-*"))
    assert left == [], left
    resumed = keras.models.load_model(os.path.join(run, "model.keras"))
    reference = keras.models.load_model(os.path.join(uninterrupted, "model.keras"))
    for got, want in zip(resumed.get_weights(), reference.get_weights(), strict=True):
        assert abs(got - want).max() <= 1e-6  # same data order, augmentation and optimizer state


def test_an_interrupted_run_says_how_to_resume(dataset, tmp_path):
    run = str(tmp_path / "run")
    # Far more epochs than the interrupt waits for: the run must still be training when it comes.
    command = [sys.executable, "-m", "patchnet_tf", "train", dataset, "--out", run, "--epochs", "1000",
               "--patience", "1000", *TINY]
    # As a terminal's Ctrl-C: a shell that starts the suite in the background (`cmd &`) ignores SIGINT,
    # and the run would inherit that.
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while _backup_epoch(run) < 1 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, (_backup_epoch(run), err[-2000:])
    assert err.strip().splitlines()[-1] == "patchnet train: interrupted; run the same command to resume"


def test_history_rows_beyond_the_backup_are_dropped(tmp_path):
    """Killed between the CSV row and the backup: the epoch reruns, its row is not doubled."""
    from pipelines.callbacks import trim_csv_log

    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 2}))
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n0,0.9\n1,0.8\n2,0.7\n")
    trim_csv_log(str(history), str(tmp_path / "backup"))
    assert history.read_text() == "epoch,loss\n0,0.9\n1,0.8\n"


@pytest.fixture
def dataset_run(tmp_path, dataset):
    """A tiny untrained run whose classes are the dataset's."""
    run = tmp_path / "run"
    run.mkdir()
    build_patchnet(9, filters=4, conv_layers=2).save(str(run / "model.keras"))
    Preprocessing(image_size=(32, 32), class_names=tuple(sorted(os.listdir(dataset)))).save(str(run))
    return str(run)


def _never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the bad input was checked")

    return fail


def test_evaluate_checks_the_masks_before_predicting(capsys, monkeypatch, dataset, dataset_run, tmp_path):
    from pipelines import evaluate

    monkeypatch.setattr(evaluate, "predict", _never("predict"))
    code, _, err = patchnet(capsys, "evaluate", dataset_run, dataset, "--masks", str(tmp_path / "none"))
    assert code == 2 and err.strip() == f"patchnet evaluate: error: {tmp_path / 'none'}: no such mask folder"


def test_push_checks_the_data_before_exporting(capsys, monkeypatch, dataset_run, tmp_path):
    from pipelines import push

    monkeypatch.setattr(push, "export_saved_model", _never("export"))
    code, _, err = patchnet(capsys, "push", dataset_run, "--base", str(tmp_path / "base" / "m"),
                            "--data", str(tmp_path / "nowhere"))
    assert code == 2 and f"{tmp_path / 'nowhere'}: no such data folder" in err, err
    assert not (tmp_path / "base").exists()
