"""`patchnet train`: keras fit from a script, resumable, logged to TensorBoard.

A run folder holds everything about one run:
  model.keras          the best model so far (lowest val_loss), written atomically
  preprocessing.json   how images become model input (export and serving reuse it)
  train_config.json    the flags of the run; a resumed run must match them
  history.csv          one row per epoch (with `seconds`, the epoch's wall time)
  logs/                TensorBoard: train/ and validation/ scalars (loss, accuracy,
                       auroc, seconds), heatmaps/ images (one per class for K > 2),
                       confusion_matrix/ (K > 2), the run's HParams
  backup/              per-epoch state; `patchnet train` on the same folder resumes

Scale: the input pipeline is tf.data (pipelines/data.py); augmentation runs
inside the training step on the model's device (patchnet_tf/augment.py);
`--mixed-precision` and `--strategy` (one device, several GPUs, several
machines) choose how the step runs. model.keras is always the plain model.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from patchnet_tf import baselines
from patchnet_tf.atomic import atomic_write_text, check_output_path, remove_stale_temporaries
from patchnet_tf.augment import Augmentation, AugmentedModel
from patchnet_tf.errors import PatchNetError, WorkerLost
from patchnet_tf.heatmaps import check_centred_patch_size
from patchnet_tf.model import build_patchnet, loss_for, output_classes, smallest_patch_size
from patchnet_tf.precision import bfloat16_pays
from patchnet_tf.preprocessing import Preprocessing, channel_statistics
from patchnet_tf.runs import TRAIN_CONFIG_FILE, read_train_config
from pipelines.callbacks import (
    AtomicBackupAndRestore,
    AtomicModelCheckpoint,
    EarlyStoppingAfterPlateau,
    EpochSeconds,
    StopAtPerfectAccuracy,
    TensorBoardConfusionMatrix,
    TensorBoardHeatmaps,
    backed_up_epochs,
    inference_model,
    trim_csv_log,
)
from pipelines.data import Split, image_dataset, load_dataset
from pipelines.settings import PAPER

MODEL_NAME = "model.keras"
CONFIG_NAME = TRAIN_CONFIG_FILE
# Flags that may differ when a run resumes: they change how, not what, it trains.
# "out": a run folder that was moved is still the same run.
RESUMABLE_CHANGES = ("out", "epochs", "cache", "skip_bad", "strategy", "heatmap_every", "heatmap_images")
PATH_KEYS = ("data", "images")  # stored absolute: ./data/x and data/x are the same data
# How runs saved before these settings existed were trained: resuming one takes
# --no-normalize --no-border-patches --stop-at-perfect-accuracy.
BEFORE_NORMALIZATION = {"normalize": False, "border_patches": False, "stop_at_perfect_accuracy": True}
# Flags added later, with the value every run saved before them was trained with.
ADDED_LATER = {"isic_task": "melanoma"}


def build_model(config, channels, class_count=2):
    """The untrained model of a run: one sigmoid output for two classes, a softmax over K for K > 2."""
    classes = output_classes(class_count)
    if config["arch"] == "patchnet":
        return build_patchnet(
            config["patch_size"],
            stride=config["stride"],
            channels=channels,
            filters=config["filters"],
            conv_layers=config["conv_layers"],
            padding=config["padding"],
            region=config["region"],
            classes=classes,
        )
    from patchnet_tf import baselines

    return baselines.build(config["arch"], (*config["image_size"], channels), width=config["width"],
                           classes=classes)


def compile_model(model, learning_rate, optimizer=None):
    """Adam (paper: 1e-4), cross-entropy, accuracy and AUROC; `optimizer` overrides Adam.

    Binary models: binary cross-entropy. K-class models: categorical
    cross-entropy, and "auroc" is the macro one-vs-rest AUROC over the K classes.
    """
    outputs = inference_model(model).output_shape[-1]
    if outputs == 1:
        metrics = [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auroc")]
    else:
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"),
                   keras.metrics.AUC(name="auroc", multi_label=True, num_labels=outputs)]
    model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate), loss=loss_for(outputs),
                  metrics=metrics)
    return model


def _check_resume(out, config):
    stored = read_train_config(out)
    if not stored:
        return
    previous = {**BEFORE_NORMALIZATION, **ADDED_LATER, **stored}
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    for key in PATH_KEYS:  # runs saved before paths were stored absolute
        if isinstance(previous.get(key), str):
            previous[key] = os.path.abspath(previous[key])
    changed = sorted(
        key for key in config if key not in RESUMABLE_CHANGES and previous.get(key) != config[key]
    )
    if changed:
        raise PatchNetError(
            f"{out} holds a run with different settings ({', '.join(changed)}); "
            "use a new --out folder or the same flags to resume"
        )


def check_settings(config):
    """Checks a run's settings against each other and lists its data; returns the dataset.

    Nothing is decoded or written. Commands that train several runs (compare, sweep) call this for
    every run first, so a setting that would fail the third run fails before the first one trains.
    """
    config = check_flags(config)
    return load_dataset(
        config["data"],
        positive_class=config["positive_class"],
        image_dir=config["images"],
        val_fraction=config["val_fraction"],
        seed=config["seed"],
        isic_task=config["isic_task"],
    )


def complete_config(config):
    """`config` with the `patchnet train` defaults for missing keys and its paths absolute."""
    config = {**train_defaults(), **config}
    config.update({key: os.path.abspath(config[key]) for key in PATH_KEYS if config.get(key)})
    return config


def check_flags(config):
    """The part of `check_settings` that reads no data (demo calls it before it writes its dataset):
    the settings against each other and against a run already in --out. Returns the completed config."""
    config = complete_config(config)
    check_output_path(config["out"], "--out")
    height, width = config["image_size"]
    if config["arch"] != "patchnet":
        baselines.check_image_size(config["arch"], (height, width))
    else:
        patch_size = config["patch_size"]
        try:  # checked here, not at the first heatmap epoch or by `patchnet heatmap` after training
            check_centred_patch_size(patch_size)
        except PatchNetError as error:
            raise PatchNetError(f"--patch-size {patch_size}: {error}; use {patch_size + 1}") from None
        smallest = smallest_patch_size(config["conv_layers"], config["padding"])
        if patch_size < smallest:  # build_patchnet's rule, checked before the run folder is written
            raise PatchNetError(
                f"--padding valid needs --patch-size above 2 x --conv-layers ({patch_size} <= "
                f"2 x {config['conv_layers']}: each valid 3x3 conv trims 2 pixels); use --patch-size "
                f"{smallest} or more, fewer --conv-layers, or --padding same"
            )
        if patch_size > min(height, width):
            raise PatchNetError(
                f"--patch-size {patch_size} is larger than the image ({min(height, width)} px after resizing "
                f"to --image-size {height}x{width})"
            )
        if config["stride"] is not None and config["stride"] > patch_size:
            raise PatchNetError(f"--stride {config['stride']} is larger than --patch-size {patch_size}: "
                                "training patches would leave pixels out")
        region = config["region"]
        if region is not None and not (patch_size <= min(region) and region[0] <= height and region[1] <= width):
            raise PatchNetError(f"--region {region[0]}x{region[1]} must fit in the image ({height}x{width}) "
                                f"and hold a patch ({patch_size} px)")
    _check_resume(config["out"], config)  # a run folder that cannot resume: before any run of several trains
    return config


def mixed_precision_policy(choice, config):
    """--mixed-precision -> a Keras dtype policy name.

    auto: float16 on a GPU; on a CPU, bfloat16 for a wide PatchNet subnet where the CPU computes it natively
    (patchnet_tf.precision), else float32. The baselines stay float32 on a CPU, as they were measured."""
    if choice == "auto":
        if tf.config.list_physical_devices("GPU"):
            return "mixed_float16"
        wide = config["arch"] == "patchnet" and bfloat16_pays(config["filters"])
        return "mixed_bfloat16" if wide else "float32"
    return {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[choice]


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3's fit passes it.

    Keras 3's TensorFlow trainer passes it two things the stock class rejects
    with "unsupported type (PerReplica)" or a bad axis (keras-team/keras#20585,
    still so in Keras 3.16): a whole (images, labels) batch in one call, to
    learn its shapes before training and validation; and, on the multi-worker
    path only, every step's scalar logs with axis=0. MirroredStrategy maps over
    nests, and a scalar has no axis to reduce within a replica, so both reduce
    here as they do on one machine: leaf by leaf, and across replicas only.
    """

    def reduce(self, reduce_op, value, axis=None):
        def reduce_one(one):
            scalar = self.experimental_local_results(one)[0].shape.rank == 0
            return super(MultiWorkerMirroredStrategy, self).reduce(reduce_op, one, None if scalar else axis)

        return tf.nest.map_structure(reduce_one, value)


def distribution_strategy(choice):
    """--strategy -> a tf.distribute strategy (created once per process)."""
    if choice == "default":
        return tf.distribute.get_strategy()
    if choice == "mirrored":
        return tf.distribute.MirroredStrategy()
    if choice == "multiworker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        return MultiWorkerMirroredStrategy()
    raise PatchNetError(f"--strategy must be default, mirrored or multiworker, got {choice!r}")


TF_CONFIG_FORM = '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": I}}'


def check_tf_config(text):
    """Raises a one-line PatchNetError unless `text` is a TF_CONFIG this run can join.

    Checked before TensorFlow reads it, so a typo in a pod spec is one line
    naming TF_CONFIG rather than an error from inside TensorFlow.
    """
    if not text:
        raise PatchNetError(f"--strategy multiworker needs TF_CONFIG={TF_CONFIG_FORM} in the environment; "
                            "see docs/training.md")
    try:
        tf_config = json.loads(text)
    except ValueError as error:
        raise PatchNetError(f"TF_CONFIG is not JSON ({error}); expected {TF_CONFIG_FORM}") from None
    cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
    task = tf_config.get("task") if isinstance(tf_config, dict) else None
    jobs = ("chief", "worker")
    if not isinstance(cluster, dict) or not any(isinstance(cluster.get(job), list) and cluster[job] for job in jobs):
        raise PatchNetError(f"TF_CONFIG has no \"cluster\" with a list of \"worker\" addresses; expected {TF_CONFIG_FORM}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise PatchNetError(f"TF_CONFIG has no \"task\" with \"type\" and \"index\" (which member of the cluster "
                            f"this process is); expected {TF_CONFIG_FORM}")
    members = cluster.get(task["type"]) if task["type"] in jobs else None
    if not isinstance(members, list) or not isinstance(task["index"], int) or not 0 <= task["index"] < len(members):
        raise PatchNetError(f"TF_CONFIG task {json.dumps(task)} is not a member of its cluster {json.dumps(cluster)}")


def _is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )


def _worker_count(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return sum(len(cluster.get(job, [])) for job in ("chief", "worker")) or 1


def _worker_scratch(out, strategy):
    """The folder a non-chief worker writes to: local, emptied, removed after training.

    Every worker makes the same saves (a save may read variables through
    collectives, which every worker must join), but only the chief's go to the
    run folder, as TensorFlow's multi-worker Keras guide does it. The name is fixed per run and task, so a restart after kill -9
    clears what the killed process left.
    """
    resolver = strategy.cluster_resolver
    digest = hashlib.sha1(out.encode()).hexdigest()[:12]
    scratch = os.path.join(tempfile.gettempdir(), f"patchnet-{digest}-{resolver.task_type}-{resolver.task_id}")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    return scratch


def augmentation_from(config):
    return Augmentation(
        rotation=config["rotation"],
        zoom=config["zoom"],
        horizontal_flip=config["horizontal_flip"],
        vertical_flip=config["vertical_flip"],
        border=config["patch_size"] // 2 if config["arch"] == "patchnet" and config["border_patches"] else 0,
    )


def _hparams(config):
    """The run's settings for TensorBoard's HParams dashboard (scalars and strings only)."""
    skip = ("data", "out", "images", "heatmap_every", "heatmap_images", "cache", "skip_bad")
    values = {}
    for key, value in sorted(config.items()):
        if key in skip or value is None:
            continue
        values[key] = value if isinstance(value, (bool, int, float, str)) else "x".join(map(str, value))
    return values


def _write_hparams(log_dir, config):
    from tensorboard.plugins.hparams import api as hparams_api

    with tf.summary.create_file_writer(log_dir).as_default():
        hparams_api.hparams(_hparams(config), trial_id=os.path.basename(os.path.abspath(config["out"])))


def _heatmap_examples(split, preprocessing, count):
    """A fixed set of validation images, spread over the classes: the same ones every epoch."""
    picks = []
    classes = len(preprocessing.class_names)
    for label in range(classes):
        members = [index for index, value in enumerate(split.labels) if value == label]
        picks += members[: count // classes + (label < count % classes)]
    if not picks:
        return None, None
    subset = Split([split.paths[index] for index in picks], split.labels[picks])
    try:
        batches = list(image_dataset(subset, preprocessing, max(1, len(subset)), cache="memory",
                                     skip_bad=True, on_skip=lambda *_: None, name="heatmap images"))
    except PatchNetError:  # every pick of a class was skipped as bad: no example images, training goes on
        return None, None
    if not batches:
        return None, None
    images, labels = batches[0]
    labels = np.asarray(labels)
    return images, labels.reshape(-1) if labels.shape[-1] == 1 else labels.argmax(axis=-1)


def train(config):
    """Trains per `config` (the flags as a dict); returns the fit History.

    Missing keys take the `patchnet train` defaults, so callers can pass
    only what they change (plus data and out).
    """
    config = complete_config(config)
    out = config["out"]
    previous_policy = keras.mixed_precision.global_policy()
    strategy = distribution_strategy(config["strategy"])
    keras.utils.set_random_seed(config["seed"])
    dataset = check_settings(config)
    preprocessing = Preprocessing(
        image_size=tuple(config["image_size"]),
        gamma=config["gamma"],
        shades_of_gray_norm=config["shades_of_gray"],
        class_names=dataset.class_names,
    )
    data_options = dict(skip_bad=config["skip_bad"], cache=config["cache"], seed=config["seed"])
    if config["normalize"]:
        preprocessing = fit_normalization(preprocessing, dataset.splits["train"], config["seed"])
    chief = _is_chief(strategy)
    run_dir = out if chief else _worker_scratch(out, strategy)
    # The epochs still to train, each in the order an uninterrupted run gives it (resume is exact);
    # every worker resumes from the chief's backup.
    first_epoch = backed_up_epochs(os.path.join(out, "backup"))
    epochs = (first_epoch, max(config["epochs"], first_epoch + 1))
    # Every file is decoded here, before anything is written: a bad image leaves no run behind.
    train_data = image_dataset(
        dataset.splits["train"], preprocessing, config["batch_size"], shuffle=True,
        balance=config["balance"], name="train", epochs=epochs, **data_options,
    )
    val_data = image_dataset(dataset.splits["val"], preprocessing, config["batch_size"], name="val", **data_options)
    os.makedirs(run_dir, exist_ok=True)
    if chief:
        for folder in (out, os.path.join(out, "backup")):  # what a kill -9 of an earlier try left
            remove_stale_temporaries(folder)
        atomic_write_text(os.path.join(out, CONFIG_NAME), json.dumps(config, indent=2))
        preprocessing.save(out)

    keras.mixed_precision.set_global_policy(mixed_precision_policy(config["mixed_precision"], config))
    try:
        with strategy.scope():
            model = build_model(config, preprocessing.channels, len(dataset.class_names))
            trainer = AugmentedModel(model, augmentation_from(config), seed=config["seed"])
            compile_model(trainer, config["learning_rate"])
            # The saved model shares the trainer's optimizer, so model.keras holds its state too.
            compile_model(model, config["learning_rate"], optimizer=trainer.optimizer)
            # Built before fit, so a backup can be restored into it.
            trainer(tf.zeros((1, *preprocessing.image_size, preprocessing.channels)))
        if not chief and not os.path.isfile(os.path.join(out, CONFIG_NAME)):
            # Creating the variables waited for the chief's initial values, so it has written the config by now.
            raise PatchNetError(f"{out}: this worker does not see the run folder the chief writes; "
                                "--out must be a folder every worker shares")
        callbacks = _callbacks(config, run_dir, dataset, preprocessing, val_data,
                               resume_from=os.path.join(out, "backup"))
        history = trainer.fit(
            train_data,
            steps_per_epoch=int(train_data.cardinality()) // (epochs[1] - epochs[0]),
            validation_data=val_data,
            epochs=config["epochs"],
            callbacks=callbacks,
            shuffle=False,  # the tf.data pipeline shuffles
            verbose=1 if sys.stdout.isatty() else 2,
        )
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError) as error:
        if _worker_count(strategy) == 1:
            raise  # not a lost peer
        raise _lost_worker(error, out, strategy) from None
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if not chief:
            shutil.rmtree(run_dir, ignore_errors=True)
    return history


def _lost_worker(error, out, strategy):
    """A collective failed because another worker of the cluster stopped: what to do, in one line."""
    # TensorFlow's coordination service notices a dead peer by its missing heartbeats
    # (or the chief's by its closed connection); the message names the lost task.
    resolver = strategy.cluster_resolver
    named = sorted(set(re.findall(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", error.message)))
    others = [f"{job} {index}" for job, index in named if (job, int(index)) != (resolver.task_type, resolver.task_id)]
    finished = backed_up_epochs(os.path.join(out, "backup"))
    resume = f"resumes after epoch {finished}" if finished else "starts again at epoch 1 (none had finished)"
    return WorkerLost(f"lost {', '.join(others) or 'another worker'} of the cluster ({type(error).__name__}); "
                      f"restart every worker with the same command and the run {resume}")


def fit_normalization(preprocessing, split, seed, max_images=512):
    """`preprocessing` with the per-channel mean and std of (a seeded sample of) the training split.

    Standardized inputs are what lets PatchNet leave the ln 2 plateau early
    on grey photographs (docs/results/training.md, "Input normalization"). 512 images pin the
    statistics to about 1 % and bound the cost on a large dataset.
    """
    if len(split) > max_images:
        picks = np.sort(np.random.default_rng(seed).choice(len(split), max_images, replace=False))
        split = Split([split.paths[index] for index in picks], split.labels[picks])
    batches = image_dataset(split, preprocessing, 64, cache="off", skip_bad=True, on_skip=lambda *_: None,
                            name="normalization statistics")
    mean, std = channel_statistics(images for images, _ in batches)
    return dataclasses.replace(preprocessing, mean=mean, std=std)


def _callbacks(config, run_dir, dataset, preprocessing, val_data, resume_from=None):
    """The run's callbacks, writing under `run_dir`; the backup resumes from `resume_from` (default: run_dir's)."""
    log_dir = os.path.join(run_dir, "logs")
    # Uniform patches give loss ln K on balanced data (ln 2 for the binary model).
    early_stopping = EarlyStoppingAfterPlateau("val_loss", patience=config["patience"],
                                               plateau_loss=math.log(len(dataset.class_names)))
    checkpoint = AtomicModelCheckpoint(os.path.join(run_dir, MODEL_NAME), "val_loss", save_best_only=True)
    _write_hparams(log_dir, config)
    trim_csv_log(os.path.join(run_dir, "history.csv"), os.path.join(run_dir, "backup"))
    callbacks = [
        EpochSeconds(),  # first, so the loggers below record its `seconds`
        checkpoint,
        early_stopping,
        *([StopAtPerfectAccuracy()] if config["stop_at_perfect_accuracy"] else []),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=True),
        keras.callbacks.TensorBoard(log_dir),
    ]
    if config["arch"] == "patchnet" and config["heatmap_every"] > 0 and config["heatmap_images"] > 0:
        images, labels = _heatmap_examples(dataset.splits["val"], preprocessing, config["heatmap_images"])
        if images is not None:
            # Stride 1 for exact one-pass valid models; per-patch "same" models at a
            # stride that keeps the cost to about 1,000 patches per image.
            height, width = preprocessing.image_size
            stride = 1 if config["padding"] == "valid" else max(1, int((height * width / 1000) ** 0.5))
            callbacks.append(TensorBoardHeatmaps(os.path.join(log_dir, "heatmaps"), images, labels,
                                                 every=config["heatmap_every"], stride=stride,
                                                 display_images=preprocessing.denormalize(images),
                                                 class_names=dataset.class_names))
    if len(dataset.class_names) > 2 and config["heatmap_every"] > 0:
        callbacks.append(TensorBoardConfusionMatrix(os.path.join(log_dir, "confusion_matrix"), val_data,
                                                    dataset.class_names, every=config["heatmap_every"]))
    # Last, so it records the other callbacks' state after each epoch.
    # Kept after the run, so the same command with more --epochs continues it.
    callbacks.append(AtomicBackupAndRestore(
        os.path.join(run_dir, "backup"), stateful=[early_stopping, checkpoint], delete_checkpoint=False,
        resume_from=resume_from,
    ))
    return callbacks


def train_defaults():
    """The `patchnet train` flag defaults as a config dict (without data and out): the PAPER preset."""
    return dict(PAPER)


def run(args):
    config = {key: value for key, value in vars(args).items()}
    history = train(config)
    epochs = len(history.history.get("loss", []))
    print(f"trained {epochs} epoch(s); best model: {os.path.join(args.out, MODEL_NAME)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'logs')}")
