"""K classes on disk and through training (issue 12): class folders ordered by
dataset.json or by name, the ISIC diagnosis task, class balance over K, the
bundled three-class textures with masks per class, and one tiny run through
train, evaluate (confusion matrix, per-class mask metrics) and heatmap."""

import json
import os

import cv2
import numpy as np
import pytest

from patchnet_tf.cli import main as cli_main
from patchnet_tf.errors import PatchNetError
from patchnet_tf.preprocessing import Preprocessing
from pipelines.data import image_dataset, load_dataset, load_folder_dataset
from pipelines.evaluate import classification_metrics
from pipelines.textures import THREE_CLASS_NAMES, write_texture_dataset


def _write(path, value, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((*size, 3), value, np.uint8))


def _folder(root, counts):
    for label, (name, count) in enumerate(counts.items()):
        for index in range(count):
            _write(os.path.join(root, name, f"{name}-{index:03d}.png"), 10 + 60 * label)
    return root


def test_class_folders_in_sorted_or_declared_order_with_one_hot_labels(tmp_path):
    root = _folder(str(tmp_path), {"c": 4, "a": 4, "b": 8})
    assert load_folder_dataset(root).class_names == ("a", "b", "c")
    (tmp_path / "dataset.json").write_text(json.dumps({"class_names": ["c", "a", "b"]}))
    dataset = load_folder_dataset(root)
    assert dataset.class_names == ("c", "a", "b")
    preprocessing = Preprocessing(image_size=(8, 8), class_names=dataset.class_names)
    train = dataset.splits["train"]
    images, labels = next(iter(image_dataset(train, preprocessing, len(train))))
    assert labels.shape == (len(train), 3)
    np.testing.assert_array_equal(labels.numpy().argmax(1), train.labels)
    # Pixel value 10 + 60 * the folder's place in `counts` (c, a, b): label 1 ("a") holds the value-70 images.
    assert np.allclose(images.numpy()[train.labels == 1], 70 / 255, atol=0.01)
    # Balance: every class drawn equally often over an epoch, whatever the 4 : 4 : 8 on disk.
    balanced = image_dataset(train, preprocessing, 3, balance=True, shuffle=True)
    drawn = np.concatenate([batch[1].numpy().argmax(1) for batch in balanced])
    assert np.bincount(drawn, minlength=3).tolist() == [len(drawn) // 3] * 3
    with pytest.raises(PatchNetError, match="--positive-class applies to two classes"):
        load_folder_dataset(root, positive_class="a")
    (tmp_path / "dataset.json").write_text(json.dumps({"class_names": ["c", "a", "x"]}))
    with pytest.raises(PatchNetError, match="dataset.json"):
        load_folder_dataset(root)


def test_isic_csv_as_three_diagnoses_or_the_binary_melanoma_task(tmp_path):
    images = tmp_path / "images"
    rows = ["image_id,melanoma,seborrheic_keratosis"]
    flags = [(0, 0), (1, 0), (0, 1)] * 4
    for index, (melanoma, keratosis) in enumerate(flags):
        _write(str(images / f"ISIC_{index:07d}.jpg"), 50)
        rows.append(f"ISIC_{index:07d},{float(melanoma)},{float(keratosis)}")
    csv_path = tmp_path / "truth.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    three = load_dataset(str(csv_path), image_dir=str(images), val_fraction=0.25, isic_task="diagnosis")
    assert three.class_names == ("nevus", "melanoma", "seborrheic_keratosis")
    every = {path: label for split in three.splits.values() for path, label in zip(split.paths, split.labels)}
    assert [every[str(images / f"ISIC_{index:07d}.jpg")] for index in range(3)] == [0, 1, 2]
    assert sorted(np.bincount(three.splits["val"].labels).tolist()) == [1, 1, 1]
    binary = load_dataset(str(csv_path), image_dir=str(images), val_fraction=0.25)  # the default: the paper's
    assert binary.class_names == ("benign", "melanoma")
    labels = {path: label for split in binary.splits.values() for path, label in zip(split.paths, split.labels)}
    assert [labels[str(images / f"ISIC_{index:07d}.jpg")] for index in range(3)] == [0, 1, 0]
    csv_path.write_text("\n".join(rows + ["ISIC_0000000,1.0,1.0"]) + "\n")
    with pytest.raises(PatchNetError, match="line 14: both melanoma and seborrheic_keratosis"):
        load_dataset(str(csv_path), image_dir=str(images), isic_task="diagnosis")


def test_k_class_metrics_match_their_definitions():
    from sklearn.metrics import roc_auc_score

    labels = np.array([0, 1, 2, 2, 1, 0])
    probabilities = np.array([[.6, .3, .1], [.2, .5, .3], [.1, .2, .7], [.4, .4, .2], [.3, .3, .4], [.5, .1, .4]],
                             np.float32)
    metrics = classification_metrics(labels, probabilities)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    per_class = [roc_auc_score(labels == k, probabilities[:, k]) for k in range(3)]
    np.testing.assert_allclose(metrics["auroc_per_class"], per_class)
    assert metrics["auroc"] == pytest.approx(np.mean(per_class))
    assert metrics["loss"] == pytest.approx(-np.mean(np.log(probabilities[np.arange(6), labels])), rel=1e-5)
    assert metrics["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [1, 0, 1]]


def test_three_class_textures_train_evaluate_and_heatmap(tmp_path, capsys):
    data = str(tmp_path / "data")
    write_texture_dataset(data, image_size=(24, 24), count=3, classes=3)
    dataset = load_folder_dataset(data)
    assert dataset.class_names == THREE_CLASS_NAMES == ("plain", "brick", "grass")
    assert sorted(os.listdir(os.path.join(data, "masks"))) == ["brick", "grass"]
    for name in ("brick", "grass"):
        for split in ("train", "val", "test"):
            for klass in THREE_CLASS_NAMES:
                stem = f"{klass}-{split}-0001.png"
                mask = cv2.imread(os.path.join(data, "masks", name, stem), cv2.IMREAD_GRAYSCALE)
                assert (mask.max() == 255) == (klass == name), (name, stem)  # only that class's inlays are white

    run = str(tmp_path / "run")
    assert cli_main(["train", data, "--out", run, "--image-size", "24x24", "--patch-size", "7", "--padding", "valid",
                     "--filters", "3", "--conv-layers", "2", "--epochs", "1", "--heatmap-every", "1",
                     "--heatmap-images", "3"]) == 0
    assert os.listdir(os.path.join(run, "logs", "confusion_matrix"))
    heatmap_tags = _summary_tags(os.path.join(run, "logs", "heatmaps"))
    assert {tag.split("/")[1] for tag in heatmap_tags} == set(THREE_CLASS_NAMES)
    capsys.readouterr()
    assert cli_main(["evaluate", run, data, "--split", "test", "--masks", os.path.join(data, "masks"),
                     "--json", str(tmp_path / "results.json")]) == 0
    out = capsys.readouterr().out
    assert "macro AUROC" in out and "confusion matrix" in out and "masks of brick" in out and "masks of grass" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert np.sum(results["confusion_matrix"]) == 9 and set(results["class_masks"]) == {"brick", "grass"}
    assert results["class_masks"]["brick"]["images"] == 9
    assert cli_main(["heatmap", os.path.join(data, "test", "brick"), "--model", run,
                     "--out", str(tmp_path / "maps")]) == 0
    written = set(os.listdir(tmp_path / "maps"))
    stem = "brick-test-0000"
    assert {f"{stem}-heatmap-{name}.png" for name in THREE_CLASS_NAMES} <= written
    assert f"{stem}-classes.png" in written
    grays = np.stack([cv2.imread(str(tmp_path / "maps" / f"{stem}-heatmap-{name}.png"), cv2.IMREAD_GRAYSCALE)
                      for name in THREE_CLASS_NAMES], -1).astype(np.float32)
    np.testing.assert_allclose(grays.sum(-1), 255, atol=2)  # the class maps sum to 1 at every pixel


def _summary_tags(log_dir):
    import tensorflow as tf

    tags = set()
    for name in os.listdir(log_dir):
        for record in tf.data.TFRecordDataset(os.path.join(log_dir, name)).as_numpy_iterator():
            event = tf.compat.v1.Event.FromString(record)
            tags |= {value.tag for value in event.summary.value}
    return tags


def test_compare_reports_each_class(tmp_path):
    import csv

    from pipelines import evaluate as evaluation

    data = str(tmp_path / "data")
    write_texture_dataset(data, image_size=(32, 32), count=2, classes=3)
    out = str(tmp_path / "out")
    assert cli_main(["compare", data, "--out", out, "--image-size", "32x32", "--epochs", "1", "--patch-size", "7",
                     "--filters", "3", "--conv-layers", "2", "--samples", "3", "--cell", "32"]) == 0
    with open(os.path.join(out, "table2.csv")) as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["class"]) for row in rows] == [
        (model, name) for model in ("PatchNet-7", "CAM", "Grad-CAM") for name in ("brick", "grass")]
    with open(os.path.join(out, "table1.csv")) as file:
        table1 = list(csv.DictReader(file))
    assert {"macro_auroc", "auroc_plain", "auroc_brick", "auroc_grass"} <= set(table1[0])
    # The numbers are those `patchnet evaluate --masks` gives for the saved runs.
    for row, arch in zip(rows[::2], ("patchnet", "cam", "vgg11")):
        results = evaluation.evaluate(os.path.join(out, arch), data, masks_dir=os.path.join(data, "masks"))
        assert float(row["auroc"]) == pytest.approx(results["class_masks"]["brick"]["auroc"], abs=1e-5)
        assert float(table1[2 * ("patchnet", "cam", "vgg11").index(arch)]["macro_auroc"]) == pytest.approx(
            results["auroc"], abs=1e-5)
    assert cv2.imread(os.path.join(out, "comparison.png")) is not None
