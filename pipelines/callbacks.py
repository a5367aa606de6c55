"""Training callbacks that survive kill -9: every file is written atomically."""

import glob
import json
import os

import keras

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

    def __init__(self, backup_dir, stateful=(), **kwargs):
        super().__init__(backup_dir, double_checkpoint=False, **kwargs)
        self.stateful = list(stateful)

    def _load_model(self):
        if os.path.exists(self._training_metadata_path):
            with open(self._training_metadata_path) as file:
                metadata = json.load(file)
            self._weights_path = os.path.join(self.backup_dir, metadata["weights"])
            for callback, state in zip(self.stateful, metadata.get("callbacks", [])):
                for name, value in state.items():
                    setattr(callback, name, value)
        super()._load_model()

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
    names = ("wait", "best", "best_epoch", "stopped_epoch")
    return {
        name: float(getattr(callback, name)) if "best" == name else getattr(callback, name)
        for name in names
        if isinstance(getattr(callback, name, None), (int, float))
    }


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that renames a complete file over the previous best."""

    def _save_model(self, epoch, batch, logs):
        filepath = self._get_file_path(epoch, batch, logs)
        if not self._should_save_model(epoch, batch, logs, filepath):
            return
        with atomic_path(filepath) as temporary:
            if self.save_weights_only:
                self.model.save_weights(temporary, overwrite=True)
            else:
                self.model.save(temporary, overwrite=True)


class StopAtPerfectAccuracy(keras.callbacks.Callback):
    """The paper's second stopping rule: training accuracy reached 100 %."""

    def __init__(self, monitor="accuracy"):
        super().__init__()
        self.monitor = monitor

    def on_epoch_end(self, epoch, logs=None):
        if (logs or {}).get(self.monitor, 0.0) >= 1.0:
            self.model.stop_training = True
