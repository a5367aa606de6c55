"""`patchnet compare` on a tiny masked dataset: both tables, the figure, TensorBoard."""

import csv
import glob
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
from test_evaluate import SIZE, write_masked_dataset

from patchnet_tf.cli import main
from pipelines import compare as comparison
from pipelines import evaluate as evaluation

CELL = 40


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    data = write_masked_dataset(str(root / "data"), per_class=4)
    out = str(root / "out")
    code = main([
        "compare", data, "--out", out, "--image-size", str(SIZE), "--epochs", "1",
        "--patch-size", "7", "--filters", "4", "--conv-layers", "2", "--padding", "valid",
        "--samples", "4", "--cell", str(CELL),
    ])
    assert code == 0
    return data, out


def _read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def test_writes_both_tables_with_the_numbers_evaluate_gives(compared):
    data, out = compared
    table1 = _read_csv(os.path.join(out, "table1.csv"))
    table2 = _read_csv(os.path.join(out, "table2.csv"))
    assert [row["model"] for row in table1] == ["PatchNet-7", "CAM", "VGG-11"]
    assert [row["model"] for row in table2] == ["PatchNet-7", "CAM", "Grad-CAM"]
    assert set(table1[0]) == {"model", "val_loss", "val_accuracy", "test_loss", "test_accuracy"}
    markdown = Path(os.path.join(out, "table1.md")).read_text()
    assert "| Model | Validation Loss | Validation Accuracy | Test Loss | Test Accuracy |" in markdown
    markdown = Path(os.path.join(out, "table2.md")).read_text()
    assert ("| Model | Average Exact Match | Average Recall | Average AUROC "
            "| Exact Match, Border Band | Exact Match, Interior |") in markdown
    assert "recall over the 4 with a non-empty mask" in markdown
    # The numbers are those `patchnet evaluate --masks` gives for the saved runs.
    for row1, row2, arch in zip(table1, table2, ("patchnet", "cam", "vgg11")):
        results = evaluation.evaluate(os.path.join(out, arch), data, masks_dir=os.path.join(data, "masks"))
        assert float(row1["val_loss"]) == pytest.approx(results["loss"], abs=1e-5)
        assert float(row1["val_accuracy"]) == pytest.approx(results["accuracy"])
        for key in ("exact_match", "recall", "auroc"):
            assert float(row2[key]) == pytest.approx(results["masks"][key], abs=1e-5)
        assert (int(row2["images"]), int(row2["recall_images"]), int(row2["auroc_images"])) == (8, 4, 4)


def test_writes_the_figure_grid_and_logs_it(compared):
    data, out = compared
    figure = cv2.imread(os.path.join(out, "comparison.png"))
    assert figure is not None
    columns, rows = 5, 4
    assert figure.shape[1] == columns * (CELL + 4) - 4
    assert figure.shape[0] == 24 + rows * (CELL + 4)
    with open(os.path.join(out, "results.json")) as file:
        picks = json.load(file)["figure_images"]
    assert len(picks) == 4
    # Class 1 first: the first row's mask cell is the sampled image's mask, upscaled.
    stem = sorted(os.listdir(os.path.join(data, "val", "square")))[picks[0] - 4]
    mask = cv2.imread(os.path.join(data, "masks", stem), cv2.IMREAD_GRAYSCALE)
    cell = figure[24 : 24 + CELL, CELL + 4 : 2 * CELL + 4, 0]
    np.testing.assert_array_equal(cell, cv2.resize(mask, (CELL, CELL), interpolation=cv2.INTER_NEAREST))

    events = glob.glob(os.path.join(out, "logs", "events.out.tfevents.*"))
    tags = [
        value.tag
        for path in events
        for record in tf.compat.v1.train.summary_iterator(path)
        for value in record.summary.value
    ]
    assert "comparison" in tags


def test_no_train_loads_the_runs_and_needs_them(compared, tmp_path, capsys):
    data, out = compared
    before = Path(os.path.join(out, "table2.csv")).read_text()
    assert main(["compare", data, "--out", out, "--no-train", "--image-size", str(SIZE),
                 "--patch-size", "7", "--samples", "4", "--cell", str(CELL)]) == 0
    assert Path(os.path.join(out, "table2.csv")).read_text() == before
    capsys.readouterr()
    assert main(["compare", data, "--out", str(tmp_path / "empty"), "--no-train"]) == 2
    assert "no such model file" in capsys.readouterr().err


def test_a_missing_mask_split_is_refused_before_training(compared, tmp_path, capsys):
    import shutil

    data, _ = compared
    data = shutil.copytree(data, tmp_path / "data", ignore=shutil.ignore_patterns("test"))
    out = tmp_path / "out"
    assert main(["compare", str(data), "--out", str(out), "--mask-split", "test"]) == 2
    assert "no test split for --mask-split test (it has train, val)" in capsys.readouterr().err
    assert not out.exists()


def test_the_three_run_configs_come_from_the_flags_and_the_settings():
    from patchnet_tf.cli import command_parser
    from pipelines.settings import CPU, PAPER

    def configs(*flags):
        return comparison.run_configs(command_parser("compare").parse_args(["DATA", "--out", "OUT", *flags]))

    runs = configs("--filters", "8", "--seed", "3", "--no-border-patches", "--baseline-batch-size", "32")
    for arch, config in runs.items():
        assert set(config) == set(PAPER) | {"data", "out"}, arch  # train_config.json's keys
        assert (config["arch"], config["out"], config["seed"]) == (arch, os.path.join("OUT", arch), 3)
        assert config["heatmap_every"] == 0 and config["skip_bad"] is None and config["image_size"] == (64, 64)
    patchnet = runs["patchnet"]
    assert (patchnet["filters"], patchnet["stride"], patchnet["border_patches"]) == (8, CPU["stride"], False)
    assert (patchnet["batch_size"], patchnet["learning_rate"]) == (CPU["batch_size"], CPU["learning_rate"])
    for arch in ("cam", "vgg11"):  # PatchNet's flags leave the baselines at train's defaults
        assert (runs[arch]["batch_size"], runs[arch]["learning_rate"]) == (32, 3e-4)
        assert all(runs[arch][key] == PAPER[key] for key in ("patch_size", "filters", "padding", "border_patches"))
    assert configs("--padding", "same")["patchnet"]["stride"] is None  # disjoint patches for a same subnet


def test_sample_indices_put_class_1_first_and_fill_from_the_other_class():
    labels = np.array([0, 0, 0, 0, 1, 1])
    picks = comparison.sample_indices(labels, 4)
    assert sorted(picks[:2]) == [4, 5] and set(picks[2:]) <= {0, 1, 2, 3}
    picks = comparison.sample_indices(np.array([0, 0, 0, 1]), 4)
    assert picks[0] == 3 and len(picks) == 4
