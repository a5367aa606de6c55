"""`patchnet evaluate`: classification metrics and mask metrics of a saved run,
checked against numbers computed here from the same model."""

import json
import os
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from patchnet_tf import baselines, build_patchnet
from patchnet_tf.cli import main
from patchnet_tf.errors import PatchNetError
from patchnet_tf.metrics import mask_metrics
from patchnet_tf.preprocessing import Preprocessing
from pipelines import evaluate as evaluation

SIZE = 32


def write_masked_dataset(root, per_class=4, size=SIZE, seed=0):
    """root/{train,val,test}/{blank,square}/<stem>.png and root/masks/<stem>.png.

    Class 1 ("square") holds one white square at a random place on black,
    class 0 is black; the mask is the square (empty for class 0). Stems are
    unique over the dataset.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for split in ("train", "val", "test"):
        for label, name in enumerate(("blank", "square")):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for index in range(per_class):
                image = np.zeros((size, size, 3), np.uint8)
                mask = np.zeros((size, size), np.uint8)
                if label:
                    side = int(rng.integers(size // 4, size // 2))
                    top, left = rng.integers(0, size - side, 2)
                    image[top : top + side, left : left + side] = 255
                    mask[top : top + side, left : left + side] = 255
                stem = f"{name}-{split}-{index}"
                cv2.imwrite(os.path.join(folder, stem + ".png"), image)
                cv2.imwrite(os.path.join(root, "masks", stem + ".png"), mask)
    return root


def _save_run(model, run_dir, class_names=("blank", "square")):
    os.makedirs(run_dir, exist_ok=True)
    model.save(os.path.join(run_dir, "model.keras"))
    Preprocessing(image_size=(SIZE, SIZE), class_names=class_names).save(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_masked_dataset(str(tmp_path_factory.mktemp("masked")))


def _reference(model, data, split):
    """Metrics computed directly: decode with cv2, run the model, heatmap by hand."""
    paths, labels, images, masks = [], [], [], []
    for label, name in enumerate(("blank", "square")):
        folder = os.path.join(data, split, name)
        for file in sorted(os.listdir(folder)):
            paths.append(os.path.join(folder, file))
            labels.append(label)
            images.append(cv2.cvtColor(cv2.imread(paths[-1]), cv2.COLOR_BGR2RGB).astype(np.float32) / 255)
            masks.append(cv2.imread(os.path.join(data, "masks", file), cv2.IMREAD_GRAYSCALE) > 127)
    images, labels = np.stack(images), np.array(labels)
    probabilities = model.predict(images, verbose=0)[:, 0].astype(np.float64)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    accuracy = np.mean((probabilities > 0.5) == labels)
    return images, masks, loss, accuracy, roc_auc_score(labels, probabilities)


@pytest.mark.parametrize("arch", ["patchnet", "cam"])
def test_evaluate_matches_a_direct_computation(arch, dataset, tmp_path):
    if arch == "patchnet":
        model = build_patchnet(7, filters=4, conv_layers=2, padding="valid")
    else:
        model = baselines.build("cam", (SIZE, SIZE, 3), width=2)
    run = _save_run(model, str(tmp_path / arch))
    results = evaluation.evaluate(run, dataset, split="test", masks_dir=os.path.join(dataset, "masks"),
                                  threshold=0.4, heatmap_stride=1)
    images, masks, loss, accuracy, auroc = _reference(model, dataset, "test")
    assert results["count"] == 8 and results["split"] == "test"
    assert results["loss"] == pytest.approx(loss, abs=1e-5)
    assert results["accuracy"] == pytest.approx(accuracy)
    assert results["auroc"] == pytest.approx(auroc)

    from patchnet_tf.explain import explain

    expected = mask_metrics(explain(model, images), masks, threshold=0.4)
    for key in ("exact_match", "recall", "auroc"):
        assert results["masks"][key] == pytest.approx(expected[key], abs=1e-6)
    assert results["masks"]["images"] == 8
    assert results["masks"]["recall_images"] == 4  # the blank images have empty masks
    assert results["masks"]["auroc_images"] == 4


def test_evaluate_command_prints_and_writes_json(dataset, tmp_path, capsys):
    run = _save_run(baselines.build("vgg11", (SIZE, SIZE, 3), width=1, dense_units=4), str(tmp_path / "vgg"))
    out = str(tmp_path / "results.json")
    code = main(["evaluate", run, dataset, "--masks", os.path.join(dataset, "masks"), "--json", out])
    printed = capsys.readouterr().out
    assert code == 0
    assert "val: 8 images" in printed and "exact match" in printed and "recall" in printed
    with open(out) as file:
        stored = json.load(file)
    assert stored["split"] == "val" and stored["masks"]["images"] == 8
    assert 0.0 <= stored["masks"]["exact_match"] <= 1.0


def test_missing_mask_is_a_clear_error_unless_skipped(dataset, tmp_path, capsys):
    masks = tmp_path / "some_masks"
    masks.mkdir()
    kept = "square-val-0.png"
    (masks / kept).write_bytes(Path(os.path.join(dataset, "masks", kept)).read_bytes())
    run = _save_run(baselines.build("cam", (SIZE, SIZE, 3), width=1), str(tmp_path / "cam"))

    code = main(["evaluate", run, dataset, "--masks", str(masks)])
    error = capsys.readouterr().err
    assert code == 2
    assert "blank-val-0.png: no mask" in error and "Traceback" not in error

    results = evaluation.evaluate(run, dataset, masks_dir=str(masks), skip_unmasked=True)
    assert results["masks"]["images"] == 1 and results["count"] == 8


def test_bad_inputs_are_clear_errors(dataset, tmp_path):
    run = _save_run(baselines.build("cam", (SIZE, SIZE, 3), width=1), str(tmp_path / "cam"))
    with pytest.raises(PatchNetError, match="no such model file"):
        evaluation.evaluate(str(tmp_path / "nothing"), dataset)
    with pytest.raises(PatchNetError, match="no such mask folder"):
        evaluation.evaluate(run, dataset, masks_dir=str(tmp_path / "nowhere"))
    other = _save_run(baselines.build("cam", (SIZE, SIZE, 3), width=1), str(tmp_path / "other"),
                      class_names=("cats", "dogs"))
    with pytest.raises(PatchNetError, match="cats"):
        evaluation.evaluate(other, dataset)
    wrong_size = tmp_path / "wrong_size"
    wrong_size.mkdir()
    for file in os.listdir(os.path.join(dataset, "masks")):
        cv2.imwrite(str(wrong_size / file), np.zeros((SIZE // 2, SIZE // 2), np.uint8))
    with pytest.raises(PatchNetError, match="must have the image's size"):
        evaluation.evaluate(run, dataset, masks_dir=str(wrong_size))
    assert keras.models.load_model(os.path.join(run, "model.keras")).name == "cam"


def test_a_corrupt_train_config_is_one_line_naming_it(dataset, tmp_path, capsys):
    run = _save_run(baselines.build("cam", (SIZE, SIZE, 3), width=1), str(tmp_path / "cam"))
    config = os.path.join(run, "train_config.json")
    with open(config, "w") as file:
        file.write('{"arch": "cam", "seed"')  # cut off mid-write by hand
    code = main(["evaluate", run, dataset])
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error
    assert error.strip().splitlines()[-1].startswith(f"patchnet evaluate: error: {config}: unreadable")
