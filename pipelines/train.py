"""`patchnet train`: keras fit from a script, resumable, logged to TensorBoard.

A run folder holds everything about one run:
  model.keras          the best model so far (lowest val_loss), written atomically
  preprocessing.json   how images become model input (export and serving reuse it)
  train_config.json    the flags of the run; a resumed run must match them
  history.csv          one row per epoch
  logs/                TensorBoard event files
  backup/              per-epoch state; `patchnet train` on the same folder resumes
"""

import json
import os
import sys

import keras
import tensorflow as tf

from patchnet_tf.atomic import atomic_write_text
from patchnet_tf.cli import image_size, positive_float, positive_int
from patchnet_tf.errors import PatchNetError
from patchnet_tf.model import build_patchnet
from patchnet_tf.preprocessing import Preprocessing
from pipelines.callbacks import AtomicBackupAndRestore, AtomicModelCheckpoint, StopAtPerfectAccuracy
from pipelines.data import image_dataset, load_folder_dataset

MODEL_NAME = "model.keras"
CONFIG_NAME = "train_config.json"


def add_arguments(parser):
    parser.add_argument("data", help="dataset folder: DATA/<class>/*.png (or DATA/train, DATA/val)")
    parser.add_argument("--out", required=True, help="run folder; an existing run there resumes")
    add_model_arguments(parser)
    parser.add_argument("--image-size", type=image_size, default=(128, 128), help="HEIGHTxWIDTH")
    parser.add_argument("--gamma", type=positive_float, default=None, help="gamma correction, e.g. 2.2")
    parser.add_argument("--shades-of-gray", type=positive_float, default=None, metavar="NORM",
                        help="Shades of Gray colour constancy with this Minkowski norm, e.g. 6")
    parser.add_argument("--positive-class", default=None, help="class folder that is class 1")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--batch-size", type=positive_int, default=4)
    parser.add_argument("--epochs", type=positive_int, default=100)
    parser.add_argument("--learning-rate", type=positive_float, default=1e-4)
    parser.add_argument("--patience", type=positive_int, default=20,
                        help="epochs without a better val_loss before stopping (paper: 1000)")
    parser.add_argument("--seed", type=int, default=0)


def add_model_arguments(parser):
    parser.add_argument("--arch", choices=("patchnet", "cam", "vgg11"), default="patchnet")
    parser.add_argument("--patch-size", type=positive_int, default=21)
    parser.add_argument("--stride", type=positive_int, default=None, help="default: patch size")
    parser.add_argument("--padding", choices=("same", "valid"), default="same")
    parser.add_argument("--filters", type=positive_int, default=64)
    parser.add_argument("--conv-layers", type=positive_int, default=7)
    parser.add_argument("--region", type=image_size, default=None,
                        help="only patches from the central HEIGHTxWIDTH vote (paper Appendix F)")


def build_model(config, channels):
    if config["arch"] == "patchnet":
        return build_patchnet(
            config["patch_size"],
            stride=config["stride"],
            channels=channels,
            filters=config["filters"],
            conv_layers=config["conv_layers"],
            padding=config["padding"],
            region=config["region"],
        )
    from patchnet_tf import baselines

    return baselines.build(config["arch"], (*config["image_size"], channels))


def compile_model(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auroc")],
    )
    return model


def _check_resume(out, config):
    path = os.path.join(out, CONFIG_NAME)
    if not os.path.exists(path):
        return
    with open(path) as file:
        previous = json.load(file)
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    changed = sorted(
        key for key in config if key not in ("epochs",) and previous.get(key) != config[key]
    )
    if changed:
        raise PatchNetError(
            f"{out} holds a run with different settings ({', '.join(changed)}); "
            "use a new --out folder or the same flags to resume"
        )


def train(config):
    """Trains per `config` (the flags as a dict); returns the fit History."""
    out = config["out"]
    keras.utils.set_random_seed(config["seed"])
    dataset = load_folder_dataset(
        config["data"],
        positive_class=config["positive_class"],
        val_fraction=config["val_fraction"],
        seed=config["seed"],
    )
    preprocessing = Preprocessing(
        image_size=tuple(config["image_size"]),
        gamma=config["gamma"],
        shades_of_gray_norm=config["shades_of_gray"],
        class_names=dataset.class_names,
    )
    smallest = min(preprocessing.image_size)
    if config["arch"] == "patchnet" and config["patch_size"] > smallest:
        raise PatchNetError(
            f"--patch-size {config['patch_size']} is larger than the image ({smallest} px after resizing)"
        )
    _check_resume(out, config)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, CONFIG_NAME), json.dumps(config, indent=2))
    preprocessing.save(out)

    train_data = image_dataset(
        dataset.splits["train"], preprocessing, config["batch_size"], shuffle=True, seed=config["seed"]
    )
    val_data = image_dataset(dataset.splits["val"], preprocessing, config["batch_size"])
    model = compile_model(build_model(config, preprocessing.channels), config["learning_rate"])

    early_stopping = keras.callbacks.EarlyStopping("val_loss", patience=config["patience"])
    checkpoint = AtomicModelCheckpoint(os.path.join(out, MODEL_NAME), "val_loss", save_best_only=True)
    callbacks = [
        checkpoint,
        early_stopping,
        StopAtPerfectAccuracy(),
        keras.callbacks.CSVLogger(os.path.join(out, "history.csv"), append=True),
        keras.callbacks.TensorBoard(os.path.join(out, "logs")),
        # Last, so it records the other callbacks' state after each epoch.
        # Kept after the run, so the same command with more --epochs continues it.
        AtomicBackupAndRestore(
            os.path.join(out, "backup"), stateful=[early_stopping, checkpoint], delete_checkpoint=False
        ),
    ]
    history = model.fit(
        train_data,
        validation_data=val_data,
        epochs=config["epochs"],
        callbacks=callbacks,
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return history


def run(args):
    config = {key: value for key, value in vars(args).items()}
    history = train(config)
    epochs = len(history.history.get("loss", []))
    print(f"trained {epochs} epoch(s); best model: {os.path.join(args.out, MODEL_NAME)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'logs')}")
