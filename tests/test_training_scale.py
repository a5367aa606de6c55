"""Training at scale: augmentation, mixed precision, distribution, TensorBoard, sweep."""

import csv
import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from patchnet_tf import build_patchnet
from patchnet_tf.augment import Augmentation, AugmentedModel, rotate_and_zoom
from patchnet_tf.errors import PatchNetError
from pipelines.textures import write_texture_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(arch="patchnet", patch_size=9, filters=4, conv_layers=2, image_size=(32, 32), batch_size=8)


def tiny_model():
    return build_patchnet(9, filters=4, conv_layers=2)


def images(count=4, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, 32, 32, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    return write_texture_dataset(str(tmp_path_factory.mktemp("tex")), image_size=(32, 32),
                                 count={"train": 12, "val": 4, "test": 2})


def test_rotation_and_zoom_geometry():
    x = images(2)
    same = rotate_and_zoom(x, tf.zeros([2]), tf.ones([2])).numpy()
    np.testing.assert_allclose(same, x, atol=1e-6)
    half_turn = rotate_and_zoom(x, tf.fill([2], np.pi), tf.ones([2])).numpy()
    np.testing.assert_allclose(half_turn, x[:, ::-1, ::-1], atol=1e-4)
    # A 2x zoom-in about the centre c = 15.5: output column o samples input c + (o - c) / 2,
    # which on a horizontal ramp (value = column) is exact under bilinear sampling.
    ramp = np.broadcast_to(np.arange(32, dtype=np.float32)[None, None, :, None], (1, 32, 32, 1)).copy()
    zoomed = rotate_and_zoom(ramp, tf.zeros([1]), tf.fill([1], 2.0)).numpy()
    np.testing.assert_allclose(zoomed[0, 10], 15.5 + (np.arange(32)[:, None] - 15.5) / 2, atol=1e-4)


def test_augmentation_is_active_in_training_and_identity_at_inference():
    model = tiny_model()
    augmentation = Augmentation(rotation=180, zoom=1.2, horizontal_flip=True, vertical_flip=True)
    trainer = AugmentedModel(model, augmentation, seed=0)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    x = images(8)
    plain = model(x).numpy()
    np.testing.assert_allclose(trainer(x, training=False).numpy(), plain, atol=1e-6)
    np.testing.assert_allclose(trainer.predict(x, verbose=0), plain, atol=1e-6)
    assert np.abs(trainer(x, training=True).numpy() - plain).max() > 1e-4
    augmented = augmentation(x, tf.constant([0, 1], tf.int64)).numpy()
    assert augmented.shape == x.shape and np.abs(augmented - x).mean() > 0.05
    assert np.array_equal(augmented, augmentation(x, tf.constant([0, 1], tf.int64)).numpy())  # stateless
    assert not np.array_equal(augmented, augmentation(x, tf.constant([0, 2], tf.int64)).numpy())
    flips = Augmentation(horizontal_flip=True)(x, tf.constant([3, 4], tf.int64)).numpy()
    for original, flipped in zip(x, flips):
        assert np.array_equal(flipped, original) or np.array_equal(flipped, original[:, ::-1])
    assert not Augmentation().active


def test_augmentation_changes_what_the_training_step_sees():
    """Same data, same init: the fitted weights differ only because the step augments."""
    x, y = images(8), np.array([[0], [1]] * 4, np.float32)
    results = []
    for augmentation in (Augmentation(), Augmentation(rotation=90, horizontal_flip=True)):
        keras.utils.set_random_seed(0)
        model = tiny_model()
        trainer = AugmentedModel(model, augmentation)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
        trainer.fit(x, y, epochs=3, batch_size=8, verbose=0, shuffle=False)
        results.append(model.get_weights()[0])
    assert np.abs(results[0] - results[1]).max() > 1e-5


def test_mixed_bfloat16_trains_with_float32_outputs():
    x, y = images(8), np.array([[0], [1]] * 4, np.float32)
    x[1::2, :8, :8] = 1.0  # class 1: a white corner
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        model = tiny_model()
        trainer = AugmentedModel(model)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-2), loss="binary_crossentropy")
        assert model.get_layer("subnet").get_layer("conv1").compute_dtype == "bfloat16"
        losses = trainer.fit(x, y, epochs=8, batch_size=8, verbose=0).history["loss"]
        assert model(x).dtype == "float32" and trainer(x).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.01


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import keras
    from patchnet_tf.augment import AugmentedModel
    from patchnet_tf.preprocessing import Preprocessing
    from pipelines.data import image_dataset, load_folder_dataset
    from pipelines.train import build_model, compile_model, distribution_strategy, train
    config = json.loads(sys.argv[2])
    split = load_folder_dataset(config["data"]).splits["train"]
    results = {}
    for name in ("default", "mirrored"):
        strategy = distribution_strategy(name)
        keras.utils.set_random_seed(0)
        # Fixed order: Keras iterates a dataset a different number of times under
        # a strategy, so a reshuffling pipeline would differ by order, not by strategy.
        data = image_dataset(split, Preprocessing(image_size=(32, 32)), 8)
        with strategy.scope():
            model = build_model(config, 3)
            trainer = compile_model(AugmentedModel(model), 1e-3)
        history = trainer.fit(data, epochs=3, verbose=0)
        results[name] = {"loss": history.history["loss"], "replicas": strategy.num_replicas_in_sync,
                         "weights": [w.ravel().tolist() for w in model.get_weights()]}
    # The command-line path under MirroredStrategy (shuffled, balanced, augmented) runs too.
    history = train({**config, "strategy": "mirrored", "rotation": 90.0, "out": sys.argv[3]})
    results["train_loss"] = history.history["loss"]
    print("RESULT " + json.dumps(results))
""")


def test_mirrored_strategy_on_two_logical_cpus_matches_default(textures, tmp_path):
    """Tolerance: 1e-5 absolute on losses and weights after 3 epochs (all-reduce summation order)."""
    config = {**TINY, "data": textures, "epochs": 1, "heatmap_every": 0, "image_size": [32, 32],
              "stride": None, "padding": "same", "region": None}
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, ROOT, json.dumps(config), str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULT "):])
    default, mirrored = results["default"], results["mirrored"]
    assert default["replicas"] == 1 and mirrored["replicas"] == 2
    np.testing.assert_allclose(mirrored["loss"], default["loss"], atol=1e-5)
    assert default["loss"][-1] < default["loss"][0]  # it trained
    for a, b in zip(default["weights"], mirrored["weights"]):
        np.testing.assert_allclose(b, a, atol=1e-5)
    assert np.isfinite(results["train_loss"]).all()
    assert os.path.exists(tmp_path / "run" / "model.keras")


def read_events(root):
    """{folder relative to root: EventAccumulator} for every folder holding event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulators = {}
    for path in glob.glob(os.path.join(root, "**", "events.*"), recursive=True):
        folder = os.path.dirname(path)
        if os.path.relpath(folder, root) not in accumulators:
            accumulator = EventAccumulator(folder, size_guidance={"images": 0, "tensors": 0})
            accumulator.Reload()
            accumulators[os.path.relpath(folder, root)] = accumulator
    return accumulators


def test_train_logs_scalars_heatmaps_hparams_and_resumes(textures, tmp_path):
    from pipelines.train import train

    out = str(tmp_path / "run")
    config = {**TINY, "data": textures, "out": out, "epochs": 2, "heatmap_every": 2, "heatmap_images": 2,
              "rotation": 180.0, "zoom": 1.2, "horizontal_flip": True}
    history = train(config)
    assert len(history.history["loss"]) == 2
    with open(os.path.join(out, "history.csv")) as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and float(rows[0]["seconds"]) > 0
    model = keras.models.load_model(os.path.join(out, "model.keras"))
    assert model.get_layer("subnet").name == "subnet"
    assert not any("augment" in layer.name for layer in model.layers)
    logs = read_events(out)
    validation = logs[os.path.join("logs", "validation")].Tensors("epoch_auroc")
    assert len(validation) == 2
    assert {"epoch_loss", "epoch_accuracy", "epoch_auroc"} <= set(logs[os.path.join("logs", "train")].Tags()["tensors"])
    heatmaps = logs[os.path.join("logs", "heatmaps")]
    image_tags = heatmaps.Tags()["tensors"]
    assert len(image_tags) == 2 and all(tag.startswith("heatmaps/") for tag in image_tags)
    picture = tf.image.decode_png(heatmaps.Tensors(image_tags[0])[0].tensor_proto.string_val[2])
    assert picture.shape == (32, 96, 3)  # image | heatmap | overlay
    assert "_hparams_/session_start_info" in logs["logs"].Tags()["tensors"]
    # The same command with more epochs continues; done epochs are not repeated.
    history = train({**config, "epochs": 3})
    assert len(history.history["loss"]) == 1
    with open(os.path.join(out, "history.csv")) as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1", "2"]
    # The same data and run folder, spelled as relative paths, is the same run.
    cwd = os.getcwd()
    try:
        os.chdir(os.path.dirname(out))
        relative = {**config, "out": os.path.join(".", "run"), "data": os.path.relpath(textures), "epochs": 4}
        assert len(train(relative).history["loss"]) == 1
    finally:
        os.chdir(cwd)
    # A run saved before normalization and border patches existed resumes with the flags that
    # reproduce how it was trained, and is refused (naming them) without.
    stored = json.loads(Path(os.path.join(out, "train_config.json")).read_text())
    for key in ("normalize", "border_patches", "stop_at_perfect_accuracy"):
        del stored[key]
    Path(os.path.join(out, "train_config.json")).write_text(json.dumps(stored))
    with pytest.raises(PatchNetError, match="border_patches, normalize, stop_at_perfect_accuracy"):
        train({**config, "epochs": 5})


def test_sweep_writes_the_table_and_hparams(textures, tmp_path):
    from pipelines.sweep import sweep
    from pipelines.train import train_defaults

    out = str(tmp_path / "sweep")
    config = {**train_defaults(), **TINY, "data": textures, "out": out, "epochs": 1, "heatmap_every": 0,
              "patch_sizes": [5, 9], "archs": ["patchnet"], "learning_rates": None}
    rows = sweep(config)
    assert [row["model"] for row in rows] == ["PatchNet-5", "PatchNet-9"]
    with open(os.path.join(out, "sweep.csv")) as file:
        table = list(csv.DictReader(file))
    assert [row["model"] for row in table] == ["PatchNet-5", "PatchNet-9"]
    for row in table:
        assert 0 <= float(row["val_accuracy"]) <= 1 and float(row["seconds_per_epoch"]) > 0
    markdown = Path(os.path.join(out, "sweep.md")).read_text()
    assert "| PatchNet-9 |" in markdown and "Validation Loss" in markdown
    assert json.loads(Path(os.path.join(out, "patchnet-5", "train_config.json")).read_text())["patch_size"] == 5
    assert glob.glob(os.path.join(out, "events.*"))  # the HParams experiment config
