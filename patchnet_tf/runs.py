"""Loading what `patchnet train` wrote: the model and the preprocessing beside it."""

import json
import os
import zipfile
from typing import Any

import keras

from patchnet_tf.errors import PatchNetError
from patchnet_tf.preprocessing import Preprocessing

MODEL_FILE = "model.keras"
TRAIN_CONFIG_FILE = "train_config.json"


def load_trained_model(model_path: str | os.PathLike) -> tuple[keras.Model, Preprocessing]:
    """(model, preprocessing) from a run folder or a .keras file with preprocessing.json beside it.

    The model is loaded uncompiled. Raises PatchNetError, naming the file,
    for a missing, truncated or unloadable model or preprocessing.json.

    Example:

    >>> import os, pathlib, tempfile
    >>> from patchnet_tf.model import build_patchnet
    >>> with tempfile.TemporaryDirectory() as run:
    ...     build_patchnet(4, filters=2, conv_layers=1).save(os.path.join(run, MODEL_FILE))
    ...     Preprocessing(image_size=(8, 8)).save(run)
    ...     model, preprocessing = load_trained_model(pathlib.Path(run))
    >>> model.name, preprocessing.image_size
    ('patchnet', (8, 8))
    """
    model_path = os.fspath(model_path)
    path = os.path.join(model_path, MODEL_FILE) if os.path.isdir(model_path) else model_path
    if not os.path.isfile(path):
        raise PatchNetError(f"{path}: no such model file (a run folder of `patchnet train` or a .keras file)")
    if path.endswith(".keras") and not zipfile.is_zipfile(path):  # Keras would say "File not found"
        raise PatchNetError(f"{path}: not a .keras archive (truncated or not a zip file); train or copy it again")
    preprocessing = Preprocessing.for_model(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad file
        raise PatchNetError(f"{path}: not a loadable Keras model ({type(error).__name__}: {error})") from None
    return model, preprocessing


def read_train_config(run_dir: str) -> dict[str, Any]:
    """The flags a run was trained with (train_config.json), {} when the folder has none.

    Raises PatchNetError when the file is there but is not a JSON object.

    Example:

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as run:
    ...     read_train_config(run)
    {}
    """
    path = os.path.join(run_dir, TRAIN_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as file:
            config = json.load(file)
    except (OSError, ValueError) as error:
        raise PatchNetError(f"{path}: unreadable ({error}); delete it or train the run again") from None
    if not isinstance(config, dict):
        raise PatchNetError(f"{path}: not a train config (expected a JSON object)")
    return config
