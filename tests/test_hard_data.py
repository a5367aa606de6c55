"""Training that works on grey photographs: input normalization end to end, stopping
rules that wait out the ln 2 plateau, and maps as right at the border as inside."""

import json
import math
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from patchnet_tf import heatmap
from patchnet_tf.augment import Augmentation
from patchnet_tf.metrics import border_band, mask_metrics
from patchnet_tf.preprocessing import CONFIG_NAME, Preprocessing, channel_statistics, decode_image
from patchnet_tf.runs import load_trained_model
from pipelines.callbacks import EarlyStoppingAfterPlateau
from pipelines.data import image_dataset, load_folder_dataset
from pipelines.evaluate import evaluate
from pipelines.export import export_saved_model
from pipelines.settings import CPU
from pipelines.textures import write_texture_dataset
from pipelines.train import train
from serving.loader import LoadedModel

# `patchnet compare`'s CPU-sized PatchNet on the bundled grey data, with `patchnet train`'s stopping,
# normalization and border defaults, on disjoint training patches: the setting whose border behaviour
# these tests pin down. (compare's overlapping default leaves a brighter outer ring of 1-2 pixels,
# border band 61 % against 85 % inside on this data: docs/results/comparison.md.)
SMALL = dict(CPU, stride=None, image_size=(64, 64), heatmap_every=0)


@pytest.fixture(scope="module")
def grey_textures(tmp_path_factory):
    return write_texture_dataset(str(tmp_path_factory.mktemp("grey")), image_size=(64, 64),
                                 count={"train": 40, "val": 16, "test": 2})


@pytest.fixture(scope="module")
def trained(grey_textures, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    keras.utils.set_random_seed(0)
    history = train({**SMALL, "data": grey_textures, "out": out})
    return out, history.history


def test_channel_statistics_are_per_channel_mean_and_std():
    rng = np.random.default_rng(0)
    images = rng.normal([0.2, 0.5, 0.8], [0.1, 0.2, 0.0], (10, 8, 8, 3)).astype(np.float32)
    mean, std = channel_statistics([images[:4], images[4:]])
    np.testing.assert_allclose(mean, images.reshape(-1, 3).astype(np.float64).mean(0), atol=1e-6)
    np.testing.assert_allclose(std[:2], images.reshape(-1, 3).astype(np.float64).std(0)[:2], atol=1e-6)
    assert std[2] == 1.0  # a constant channel keeps its scale instead of dividing by zero


def test_normalization_is_fitted_on_the_training_split_and_saved(trained, grey_textures):
    out, _ = trained
    _, preprocessing = load_trained_model(out)
    train_split = load_folder_dataset(grey_textures).splits["train"]
    plain = Preprocessing(image_size=(64, 64), class_names=preprocessing.class_names)
    pixels = np.concatenate([images.numpy() for images, _ in image_dataset(train_split, plain, 64)])
    pixels64 = pixels.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(preprocessing.mean, pixels64.mean(0), atol=1e-6)
    np.testing.assert_allclose(preprocessing.std, pixels64.std(0), atol=1e-6)
    # What the model sees is standardized; what a person sees is the [0, 1] picture.
    model_input = preprocessing(pixels[:4])
    assert abs(float(tf.reduce_mean(model_input))) < 0.5
    np.testing.assert_allclose(preprocessing.denormalize(model_input), pixels[:4], atol=1e-5)


def test_normalized_run_exports_and_serves_what_it_computes_in_process(trained, grey_textures, tmp_path):
    out, _ = trained
    model, preprocessing = load_trained_model(out)
    export_dir = str(tmp_path / "export")
    export_saved_model(out, export_dir)
    paths = sorted(load_folder_dataset(grey_textures).splits["val"].paths)[:3]
    image_bytes = [Path(path).read_bytes() for path in paths]
    inputs = np.stack([preprocessing(decode_image(data)).numpy() for data in image_bytes])
    loaded = LoadedModel(export_dir)
    try:
        feed = {"image_bytes": np.array(image_bytes, dtype=object)}
        served = loaded.run("classify", feed)
        np.testing.assert_allclose(served["probability"], model(inputs).numpy()[:, 0], atol=1e-5)
        np.testing.assert_allclose(loaded.run("heatmap", feed)["heatmap"], heatmap(model, inputs), atol=1e-5)
    finally:
        loaded.close()


def test_a_run_saved_without_statistics_still_loads_evaluates_and_exports(trained, grey_textures, tmp_path):
    """Runs written before normalization existed have no mean / std in preprocessing.json."""
    out, _ = trained
    old = tmp_path / "old-run"
    old.mkdir()
    for name in ("model.keras", "train_config.json"):
        (old / name).write_bytes(Path(os.path.join(out, name)).read_bytes())
    fields = json.loads(Path(os.path.join(out, CONFIG_NAME)).read_text())
    del fields["mean"], fields["std"]
    (old / CONFIG_NAME).write_text(json.dumps(fields))
    model, preprocessing = load_trained_model(str(old))
    assert preprocessing.mean is None
    image = np.random.default_rng(0).uniform(0, 1, (64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(preprocessing(image), image, atol=1e-6)  # no statistics: no normalization
    assert evaluate(str(old), grey_textures)["count"] == 32
    export_saved_model(str(old), str(tmp_path / "export"))
    loaded = LoadedModel(str(tmp_path / "export"))
    try:
        probability = loaded.run("classify_images", {"images": image[None] * 255.0})["probability"]
        np.testing.assert_allclose(probability, model(image[None]).numpy()[:, 0], atol=1e-5)
    finally:
        loaded.close()


def test_patience_waits_until_the_loss_leaves_the_ln2_plateau():
    stopping = EarlyStoppingAfterPlateau("val_loss", patience=2)
    stopping.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    stopping.model.stop_training = False  # as fit() sets it
    stopping.on_train_begin()
    plateau = math.log(2.0)
    for epoch in range(30):  # val_loss never improves while the loss sits on the plateau: no epoch counts
        stopping.on_epoch_end(epoch, {"loss": plateau - 0.05, "val_loss": plateau + 0.01})
    assert not stopping.model.stop_training and not stopping.left_plateau
    for epoch in range(30, 34):
        stopping.on_epoch_end(epoch, {"loss": 0.5, "val_loss": 0.6})
    assert stopping.left_plateau and stopping.model.stop_training and stopping.stopped_epoch == 33


def test_default_training_leaves_the_plateau_before_it_stops(trained):
    """On grey textures the loss sits near ln 2 for a while; the run must not end there."""
    _, history = trained
    losses = history["loss"]
    left = next((epoch for epoch, loss in enumerate(losses) if loss < math.log(2.0) - 0.1), None)
    assert left is not None, f"training stopped on the plateau: losses {np.round(losses, 3).tolist()}"
    assert min(history["val_loss"]) < math.log(2.0) - 0.05


def test_border_patches_hang_over_the_border_by_random_amounts():
    augmentation = Augmentation(border=7)
    images = tf.ones((2, 20, 20, 1))
    tops = set()
    for step in range(12):
        padded = augmentation(images, tf.constant([0, step], tf.int64)).numpy()
        assert padded.shape == (2, 27, 27, 1)  # one shape for every step: no retracing
        rows = np.flatnonzero(padded[0, :, 10, 0])
        tops.add(int(rows[0]))
        assert len(rows) == 20 and padded.sum() == images.numpy().sum()
    assert len(tops) > 3


def test_border_band_is_as_right_as_the_interior(trained, grey_textures):
    out, _ = trained
    results = evaluate(out, grey_textures, masks_dir=os.path.join(grey_textures, "masks"))
    model, preprocessing = load_trained_model(out)
    split = load_folder_dataset(grey_textures).splits["val"]
    from pipelines.evaluate import mask_pairs, masked_heatmaps

    _, maps, masks = masked_heatmaps(model, preprocessing, mask_pairs(split.paths, os.path.join(grey_textures, "masks")))
    metrics = mask_metrics(maps, masks, border=7)
    assert results["masks"]["auroc"] > 0.8
    # With these settings on training seeds 0-5 the border band trailed the interior by -0.03 to 0.18 (band
    # 0.66-0.82); a model that never learnt the border (band near chance, interior near 0.8) fails.
    assert metrics["exact_match_border"] >= metrics["exact_match_interior"] - 0.2, metrics
    assert border_band((64, 64), 7).sum() == 64 * 64 - 50 * 50


def test_normalization_statistics_come_from_a_seeded_sample_of_a_large_split(grey_textures):
    from pipelines.train import fit_normalization

    split = load_folder_dataset(grey_textures).splits["train"]
    plain = Preprocessing(image_size=(64, 64))
    full = fit_normalization(plain, split, seed=0)
    sample = fit_normalization(plain, split, seed=0, max_images=10)
    assert sample == fit_normalization(plain, split, seed=0, max_images=10)  # the same sample each time
    assert sample.mean != full.mean and sample.mean != fit_normalization(plain, split, seed=1, max_images=10).mean
    np.testing.assert_allclose(sample.mean, full.mean, rtol=0.2)  # a sample, of the same images
