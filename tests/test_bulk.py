"""`patchnet bulk` on Apache Beam (multi-process DirectRunner): the same PNGs as `patchnet heatmap`,
a complete results file, a dead-letter list, and a re-run that does nothing."""

import contextlib
import csv
import io
import os
import zipfile

import cv2
import numpy as np
import pytest
from test_cli import patchnet

from patchnet_tf import build_patchnet, cli, heatmap
from patchnet_tf.heatmaps import heatmap_to_gray, output_stems
from patchnet_tf.preprocessing import Preprocessing
from patchnet_tf.runs import load_trained_model
from pipelines import bulk
from pipelines.data import read_image

CLASS_NAMES = ("benign", "malignant")


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Five random images (two share the name x.png) and one file that is not an image."""
    root = tmp_path_factory.mktemp("archive")
    rng = np.random.default_rng(7)
    names = ["a/x.png", "a/y.jpg", "b/x.png", "b/z.png", "b/w.bmp"]
    for name in names:
        os.makedirs(root / os.path.dirname(name), exist_ok=True)
        cv2.imwrite(str(root / name), rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG but cut off")
    return root, [str(root / name) for name in names], str(root / "b" / "broken.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A valid-padding PatchNet with input normalization, as `patchnet train` leaves it."""
    folder = tmp_path_factory.mktemp("run")
    build_patchnet(9, filters=4, conv_layers=2, padding="valid").save(str(folder / "model.keras"))
    Preprocessing(image_size=(32, 32), class_names=CLASS_NAMES, mean=(0.5, 0.4, 0.45),
                  std=(0.3, 0.25, 0.2)).save(str(folder))
    return folder


@pytest.fixture(scope="module")
def first_run(archive, run_dir, tmp_path_factory):
    """One bulk run over the archive folder: exit code, what it printed, its --out."""
    root, _, _ = archive
    out = tmp_path_factory.mktemp("bulk")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # capsys is per test; this runs once per module
        code = cli.main(["bulk", str(root), "--model", str(run_dir), "--out", str(out),
                         "--runner", "DirectRunner", "--workers", "2", "--batch-size", "2"])
    return code, stdout.getvalue(), out


def test_bulk_writes_what_heatmap_writes_and_a_complete_results_file(capsys, archive, run_dir, first_run,
                                                                     tmp_path):
    _, good, bad = archive
    code, stdout, out = first_run
    assert code == 0
    assert "5 done, 0 skipped, 1 failed" in stdout  # Beam's counters

    rows = read_csv(out / bulk.RESULTS_FILE)
    assert [row["path"] for row in rows] == sorted(good)

    # The model on each image, as the library computes it.
    model, preprocessing = load_trained_model(str(run_dir))
    inputs = np.stack([preprocessing(read_image(path)).numpy() for path in sorted(good)])
    probabilities = model.predict(inputs, verbose=0)[:, 0]
    maps = heatmap(model, inputs)
    for row, probability in zip(rows, probabilities):
        assert abs(float(row["probability"]) - probability) < 1e-5
        assert int(row["label"]) == int(probability >= 0.5)
        assert row["class_name"] == CLASS_NAMES[int(row["label"])]

    # `patchnet heatmap` on the good images: the same file names and the same pixels.
    code, _, _ = patchnet(capsys, "heatmap", *good, "--model", str(run_dir), "--out", str(tmp_path / "single"))
    assert code == 0
    expected = sorted(os.listdir(tmp_path / "single"))
    assert len(expected) == 10 and "a-x-heatmap.png" in expected and "b-x-overlay.png" in expected
    assert expected == sorted(name for name in os.listdir(out) if name.endswith(".png"))
    for name in expected:
        ours = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(ours, cv2.imread(str(tmp_path / "single" / name), cv2.IMREAD_UNCHANGED))
    # ... and those pixels are the library's float map, rounded once.
    stems = dict(zip(good, output_stems(good)))
    for path, heat in zip(sorted(good), maps):
        gray = cv2.imread(str(out / f"{stems[path]}-heatmap.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(gray, heatmap_to_gray(heat))

    # The broken file: in the dead-letter list with its reason, and nothing written for it.
    (failure,) = read_csv(out / bulk.DEAD_LETTER_FILE)
    assert failure["path"] == bad and "not a decodable image" in failure["reason"]
    assert not [name for name in os.listdir(out) if name.startswith("broken")]
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]


def test_a_rerun_does_no_work_and_loads_no_model(capsys, archive, run_dir, first_run, tmp_path):
    root, good, _ = archive
    _, _, out = first_run
    written = {name: os.stat(out / name) for name in os.listdir(out) if name.endswith(".png")}
    results = (out / bulk.RESULTS_FILE).read_text()
    # A model that cannot be loaded: the re-run must not need it.
    broken_run = tmp_path / "run"
    broken_run.mkdir()
    (broken_run / "model.keras").write_bytes(b"not a model")
    (broken_run / "preprocessing.json").write_text((run_dir / "preprocessing.json").read_text())
    listing = tmp_path / "images.csv"  # the good images, as a CSV of paths relative to it
    listing.write_text("path,note\n" + "".join(f"{os.path.relpath(path, tmp_path)},x\n" for path in good))

    (out / ".tmp-killed.png").write_bytes(b"half a PNG")  # what a kill -9 mid-write leaves

    code, stdout, err = patchnet(capsys, "bulk", str(listing), "--model", str(broken_run), "--out", str(out))
    assert code == 0, err
    assert "all 5 image(s) already have outputs" in stdout
    assert not (out / ".tmp-killed.png").exists()
    for name, before in written.items():  # nothing rewritten
        after = os.stat(out / name)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    assert (out / bulk.RESULTS_FILE).read_text() == results
    assert read_csv(out / bulk.DEAD_LETTER_FILE) == []

    # A half-finished archive: only the image whose outputs are gone (and the bad one) is to do.
    os.replace(out / "z-overlay.png", tmp_path / "z-overlay.png")
    try:
        inputs = bulk.list_inputs([str(root)])
        todo = [path for path, stem in zip(inputs, output_stems(inputs))
                if not bulk.is_done(str(out), stem, CLASS_NAMES)]
    finally:
        os.replace(tmp_path / "z-overlay.png", out / "z-overlay.png")
    assert sorted(todo) == sorted([str(root / "b" / "z.png"), str(root / "b" / "broken.png")])


def test_inputs_folders_globs_and_csvs(archive, tmp_path):
    root, good, bad = archive
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{good[1]}\n{os.path.relpath(good[0], tmp_path)}\n")
    paths = bulk.list_inputs([str(listing), str(root / "a" / "*.png"), str(root / "b")])
    # In the order given, each once; folders are walked, globs matched.
    assert paths == [good[1], good[0], bad, *sorted([good[2], good[3], good[4]])]


@pytest.mark.parametrize("argv, message", [
    (["{image}", "--model", "{run}", "--flink_mastr=localhost:8081"],
     "unrecognized arguments: --flink_mastr=localhost:8081"),
    (["{image}", "--model", "{run}", "--stride", "0"], "argument --stride: expected a positive integer"),
    (["{image}", "--model", "{tmp}/missing"], "missing: no such model file"),
    (["{tmp}/none-*.png", "--model", "{run}"], "none-*.png: no files match this pattern"),
    (["{tmp}/list.csv", "--model", "{run}"], "list.csv: expected a CSV with a 'path' column"),
])
def test_bad_flags_and_inputs_are_one_line(capsys, archive, run_dir, tmp_path, argv, message):
    (tmp_path / "list.csv").write_text("file\nx.png\n")
    argv = [arg.format(image=archive[1][0], run=run_dir, tmp=tmp_path) for arg in argv]
    code, _, err = patchnet(capsys, "bulk", *argv, "--out", str(tmp_path / "out"))
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("patchnet bulk: error: ") and message in line


def test_bulk_on_a_k_class_model_writes_a_map_per_class_and_the_most_probable_class(capsys, archive, tmp_path):
    _, good, _ = archive
    names = ("plain", "brick", "grass")
    run = tmp_path / "run3"
    run.mkdir()
    build_patchnet(9, filters=4, conv_layers=2, padding="valid", classes=3).save(str(run / "model.keras"))
    Preprocessing(image_size=(32, 32), class_names=names).save(str(run))
    code, _, _ = patchnet(capsys, "bulk", *good[:2], "--model", str(run), "--out", str(tmp_path / "bulk"),
                          "--runner", "DirectRunner", "--workers", "1")
    assert code == 0
    code, _, _ = patchnet(capsys, "heatmap", *good[:2], "--model", str(run), "--out", str(tmp_path / "single"))
    assert code == 0
    expected = sorted(os.listdir(tmp_path / "single"))
    assert len(expected) == 2 * 7 and "x-heatmap-grass.png" in expected and "x-classes.png" in expected
    assert expected == sorted(name for name in os.listdir(tmp_path / "bulk") if name.endswith(".png"))
    for name in expected:
        np.testing.assert_array_equal(cv2.imread(str(tmp_path / "bulk" / name), cv2.IMREAD_UNCHANGED),
                                      cv2.imread(str(tmp_path / "single" / name), cv2.IMREAD_UNCHANGED))
    model, preprocessing = load_trained_model(str(run))
    inputs = np.stack([preprocessing(read_image(path)).numpy() for path in sorted(good[:2])])
    probabilities = model.predict(inputs, verbose=0)
    for row, expected_row in zip(read_csv(tmp_path / "bulk" / bulk.RESULTS_FILE), probabilities):
        assert row["class_name"] == names[int(np.argmax(expected_row))]
        assert abs(float(row["probability"]) - expected_row.max()) < 1e-5


def test_results_and_patchnet_heatmap_print_the_models_probability_read_from_the_map(capsys, archive, run_dir,
                                                                                  first_run, tmp_path):
    _, good, _ = archive
    _, _, out = first_run
    rows = read_csv(out / bulk.RESULTS_FILE)
    model, preprocessing = load_trained_model(str(run_dir))
    inputs = np.stack([preprocessing(read_image(path)).numpy() for path in sorted(good)])
    probabilities = np.asarray(model(inputs, training=False))[:, 0]  # the classifier's own pass
    np.testing.assert_allclose([float(row["probability"]) for row in rows], probabilities, rtol=0, atol=1e-6)

    code, stdout, _ = patchnet(capsys, "heatmap", *sorted(good), "--model", str(run_dir),
                               "--out", str(tmp_path / "single"))
    assert code == 0
    for row in rows:  # one line per image, the probability and label of its results.csv row
        line = next(line for line in stdout.splitlines() if line.startswith(row["path"] + ": "))
        printed = float(line.split("probability ")[1].split(",")[0])
        assert abs(printed - float(row["probability"])) < 1e-6
        assert line.endswith(f"label {row['label']} ({row['class_name']})")


def test_the_driver_checks_the_model_file_without_loading_it(capsys, archive, run_dir, monkeypatch, tmp_path):
    def no_load(path):
        raise AssertionError("the driver loaded the model")

    monkeypatch.setattr(bulk, "load_trained_model", no_load)
    bulk.check_model_file(str(run_dir / "model.keras"))  # a good archive passes without a load
    monkeypatch.undo()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "preprocessing.json").write_text((run_dir / "preprocessing.json").read_text())
    with zipfile.ZipFile(bad / "model.keras", "w") as archive_file:
        archive_file.writestr("metadata.json", "{}")  # a zip, but no config or weights
    with zipfile.ZipFile(run_dir / "model.keras") as good:  # the config, but weights that are not HDF5
        config = good.read("config.json")
    with zipfile.ZipFile(bad / "model2.keras", "w") as archive_file:
        archive_file.writestr("config.json", config)
        archive_file.writestr("model.weights.h5", b"garbage")
    for content, message in [(None, "not a loadable Keras model"), ("model2.keras", "is not HDF5"),
                             (b"not a zip", "not a .keras archive")]:
        if isinstance(content, str):
            os.replace(bad / content, bad / "model.keras")
        elif content is not None:
            (bad / "model.keras").write_bytes(content)
        code, _, err = patchnet(capsys, "bulk", archive[1][0], "--model", str(bad), "--out", str(tmp_path / "o"))
        assert code == 2
        (line,) = err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "o").exists()


def test_tf_threads_per_worker_default_to_a_share_of_the_cores_and_follow_the_flag():
    import argparse

    from pipelines.flags import add_bulk_arguments, parse_bulk_arguments

    parser = argparse.ArgumentParser()
    add_bulk_arguments(parser)

    def threads(*flags):
        args = parse_bulk_arguments(parser, ["x.png", "--model", "m", "--out", "o", *flags])
        return bulk.threads_per_worker(bulk.pipeline_options(args), args.tf_threads)

    cores = os.cpu_count() or 1
    assert threads("--workers", "1") == cores
    assert threads("--workers", str(2 * cores)) == 1
    assert threads("--workers", "2", "--tf-threads", "3") == 3
    assert threads("--runner", "FlinkRunner") is None  # each worker machine's own default
    assert threads("--runner", "FlinkRunner", "--tf-threads", "4") == 4


def test_set_tf_threads_sizes_both_pools_of_a_fresh_process():
    import subprocess
    import sys

    code = ("from pipelines.bulk import set_tf_threads; import tensorflow as tf; set_tf_threads(1); "
            "tf.constant(1.0) + 1; set_tf_threads(1); "  # the second call, after the first op: a no-op
            "print(tf.config.threading.get_intra_op_parallelism_threads(), "
            "tf.config.threading.get_inter_op_parallelism_threads())")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split() == ["1", "1"]


def test_the_handler_reads_the_probability_from_the_map_with_no_second_model_call(run_dir, monkeypatch):
    handler = bulk.PatchNetModelHandler(str(run_dir / "model.keras"))
    loaded = handler.load_model()
    images = np.random.default_rng(3).random((3, 32, 32, 3), np.float32)
    inputs = loaded.preprocessing.normalize(images).numpy()
    expected = np.asarray(loaded.model(inputs, training=False))[:, 0]

    def no_call(*args, **kwargs):
        raise AssertionError("the classifier ran beside the map")

    monkeypatch.setattr(loaded.model, "call", no_call)
    results = handler.run_inference([("p", f"s{index}", image) for index, image in enumerate(images)], loaded)
    np.testing.assert_allclose([result.inference[0] for result in results], expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.stack([result.inference[1] for result in results]),
                                  heatmap(loaded.model, inputs))
