"""Training callbacks: checkpoints that survive kill -9 (every file is written
atomically), the paper's stopping rule, epoch timing, TensorBoard heatmaps."""

import glob
import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from patchnet_tf.atomic import atomic_path, atomic_write_text


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose backup is always one consistent epoch.

    Keras writes the weights and the epoch counter as two files in place, so
    a kill between (or during) the writes can pair weights with the wrong
    epoch or leave a torn file. Here each epoch's weights get their own file,
    written under a temporary name and renamed; the small metadata file that
    names them is renamed last, so it always points at complete weights.
    The metadata also carries the state of `stateful` callbacks (early
    stopping's patience counter, the best checkpoint's score), so a resumed
    run stops when an uninterrupted one would.
    """

    def __init__(self, backup_dir, stateful=(), resume_from=None, **kwargs):
        """`resume_from`: the backup folder to resume from, if not `backup_dir` (a
        multi-worker run's other workers resume from the chief's and write their own)."""
        super().__init__(backup_dir, double_checkpoint=False, **kwargs)
        self.stateful = list(stateful)
        self.resume_from = resume_from or backup_dir

    def _load_model(self):
        metadata_path = os.path.join(self.resume_from, "training_metadata.json")
        if not os.path.exists(metadata_path):
            return
        with open(metadata_path) as file:
            metadata = json.load(file)
        print(f"resuming after epoch {metadata['epoch']} from {self.resume_from}", flush=True)
        for callback, state in zip(self.stateful, metadata.get("callbacks", [])):
            for name, value in state.items():
                setattr(callback, name, value)
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # its state is in the weights file
        self.model.load_weights(os.path.join(self.resume_from, metadata["weights"]))
        self.model._initial_epoch = metadata["epoch"]  # how keras.callbacks.BackupAndRestore resumes fit

    def _save_model(self):
        weights_name = f"epoch-{self._current_epoch:05d}.weights.h5"
        with atomic_path(os.path.join(self.backup_dir, weights_name)) as temporary:
            self.model.save_weights(temporary)
        metadata = {
            "epoch": self._current_epoch,
            "batch": self._last_batch_seen,
            "weights": weights_name,
            "callbacks": [_resumable_state(callback) for callback in self.stateful],
        }
        atomic_write_text(self._training_metadata_path, json.dumps(metadata))
        self._weights_path = os.path.join(self.backup_dir, weights_name)
        for old in glob.glob(os.path.join(self.backup_dir, "epoch-*.weights.h5")):
            if os.path.basename(old) != weights_name:
                os.remove(old)


def _resumable_state(callback):
    names = ("wait", "best", "best_epoch", "stopped_epoch", "left_plateau")
    return {
        name: float(getattr(callback, name)) if name == "best" else getattr(callback, name)
        for name in names
        if isinstance(getattr(callback, name, None), (int, float))
    }


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that renames a complete file over the previous best."""

    def _save_model(self, epoch, batch, logs):
        filepath = self._get_file_path(epoch, batch, logs)
        if not self._should_save_model(epoch, batch, logs, filepath):
            return
        # Under augmentation `self.model` is the training wrapper; the file holds the plain model.
        model = inference_model(self.model)
        with atomic_path(filepath) as temporary:
            if self.save_weights_only:
                model.save_weights(temporary, overwrite=True)
            else:
                model.save(temporary, overwrite=True)


def inference_model(model):
    """The model to save or explain: the plain model inside a training wrapper, if any."""
    return getattr(model, "inference_model", model)


class EarlyStoppingAfterPlateau(keras.callbacks.EarlyStopping):
    """`EarlyStopping` whose patience starts once the training loss has left the ln 2 plateau.

    A PatchNet whose patches all say 0.5 has loss ln 2 = 0.693 on balanced
    data, and it often stays there for tens of epochs before the subnet
    finds the class-1 feature; validation loss wobbles meanwhile, so a
    patience counted from epoch 1 ends the run before it has learned
    anything. Until the training loss first drops below
    `plateau_loss - margin`, no epoch counts; a run that never leaves stops
    at --epochs.
    """

    def __init__(self, monitor="val_loss", *, patience=0, plateau_loss=math.log(2.0), margin=0.1, **kwargs):
        super().__init__(monitor, patience=patience, **kwargs)
        self.plateau_loss = plateau_loss
        self.margin = margin
        self.left_plateau = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.left_plateau = False  # a resumed run gets its state back from the backup after this

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        self.left_plateau = self.left_plateau or (loss is not None and loss < self.plateau_loss - self.margin)
        if self.left_plateau:
            super().on_epoch_end(epoch, logs)


class StopAtPerfectAccuracy(keras.callbacks.Callback):
    """The paper's second stopping rule: training accuracy reached 100 %."""

    def __init__(self, monitor="accuracy"):
        super().__init__()
        self.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        if (logs or {}).get(self.monitor, 0.0) >= 1.0:
            self.model.stop_training = True


class EpochSeconds(keras.callbacks.Callback):
    """Adds `seconds` (wall time of the epoch, validation included) to the epoch logs.

    Put it first in the callback list so that CSVLogger and TensorBoard record it.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["seconds"] = time.perf_counter() - self._start


class PeriodicImageSummaries(keras.callbacks.Callback):
    """Every `every` epochs (0: never), `write(epoch)` logs images into `log_dir` with tf.summary;
    the file writer is opened on first use and closed when training ends."""

    def __init__(self, log_dir, every):
        super().__init__()
        self.log_dir = log_dir
        self.every = int(every)
        self._writer = None

    def write(self, epoch):
        raise NotImplementedError

    def on_epoch_end(self, epoch, logs=None):
        if self.every < 1 or (epoch + 1) % self.every:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            self.write(epoch)  # step = epoch, the step Keras' TensorBoard uses
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TensorBoardHeatmaps(PeriodicImageSummaries):
    """Every `every` epochs, logs a fixed set of images with their heatmaps (tf.summary.image).

    Each logged picture is [image | heatmap (white = class 1) | overlay], so
    TensorBoard's step slider shows the evidence maps sharpen during training.
    A K-class model logs one such picture per image and class (white = that
    class), under `<name>/<class name>/`.
    """

    def __init__(self, log_dir, images, labels=None, *, every=5, stride=1, name="heatmaps", display_images=None,
                 class_names=None):
        """`images` are model inputs; `display_images` the [0, 1] pictures they come from (default: the same)."""
        super().__init__(log_dir, every)
        self.class_names = None if class_names is None else list(class_names)
        self.images = np.asarray(images, np.float32)
        self.display_images = self.images if display_images is None else np.asarray(display_images, np.float32)
        self.labels = None if labels is None else np.asarray(labels).reshape(-1)
        self.stride = int(stride)
        self.name = name

    def write(self, epoch):
        import cv2

        from patchnet_tf.heatmaps import heatmap, heatmap_overlay, heatmap_to_gray

        model = inference_model(self.model)
        maps = heatmap(model, self.images, stride=self.stride)
        per_class = maps.ndim == 4  # (B, H, W, K) of a K-class model
        if not per_class:
            maps = maps[..., None]
        class_names = self.class_names or [str(index) for index in range(maps.shape[-1])]

        def picture(image, heat):
            rgb = image if image.shape[-1] == 3 else np.repeat(image[..., :1], 3, axis=-1)
            gray = np.repeat(heatmap_to_gray(heat)[..., None], 3, axis=-1) / 255.0
            overlay = cv2.cvtColor(heatmap_overlay(rgb, heat), cv2.COLOR_BGR2RGB) / 255.0
            return np.concatenate([rgb, gray, overlay], axis=1)[None].astype(np.float32)

        for index, (image, image_maps) in enumerate(zip(self.display_images, maps)):
            label = "" if self.labels is None else f"-class{int(self.labels[index])}"
            for klass in range(image_maps.shape[-1]):
                folder = f"{self.name}/{class_names[klass]}" if per_class else self.name
                tf.summary.image(f"{folder}/{index:02d}{label}", picture(image, image_maps[..., klass]), step=epoch)


class TensorBoardConfusionMatrix(PeriodicImageSummaries):
    """Every `every` epochs, the validation confusion matrix as a TensorBoard image (K-class runs)."""

    def __init__(self, log_dir, val_data, class_names, *, every=5):
        super().__init__(log_dir, every)
        self.val_data = val_data
        self.class_names = list(class_names)
        self._labels = None

    def write(self, epoch):
        from patchnet_tf.metrics import confusion_matrix, confusion_matrix_image

        if self._labels is None:
            self._labels = np.concatenate([labels for _, labels in self.val_data.as_numpy_iterator()]).argmax(-1)
        probabilities = inference_model(self.model).predict(self.val_data.map(lambda images, _: images), verbose=0)
        matrix = confusion_matrix(self._labels, probabilities.argmax(-1), len(self.class_names))
        names = ", ".join(f"{index} {name}" for index, name in enumerate(self.class_names))
        tf.summary.image("confusion_matrix", confusion_matrix_image(matrix, self.class_names)[None], step=epoch,
                         description=f"validation; rows true, columns predicted class: {names}")


def backed_up_epochs(backup_dir):
    """How many epochs the backup in `backup_dir` holds (0: none, a fresh run)."""
    try:
        with open(os.path.join(backup_dir, "training_metadata.json")) as file:
            return int(json.load(file)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def trim_csv_log(csv_path, backup_dir):
    """Drops history rows of epochs the backup does not hold.

    A kill after `CSVLogger` wrote an epoch's row but before that epoch's
    backup landed makes the resumed run train (and log) that epoch again.
    """
    finished = backed_up_epochs(backup_dir)
    try:
        with open(csv_path) as file:
            lines = file.read().splitlines(keepends=True)
    except OSError:
        return
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < finished]
    if kept != lines:
        atomic_write_text(csv_path, "".join(kept))
