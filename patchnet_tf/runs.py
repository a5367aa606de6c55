"""Loading what `patchnet train` wrote: the model and the preprocessing beside it."""

import os

import keras

from patchnet_tf.errors import PatchNetError
from patchnet_tf.preprocessing import Preprocessing

MODEL_FILE = "model.keras"


def load_trained_model(model_path):
    """(model, preprocessing) from a run folder or a .keras file with preprocessing.json beside it."""
    path = os.path.join(model_path, MODEL_FILE) if os.path.isdir(model_path) else model_path
    if not os.path.isfile(path):
        raise PatchNetError(f"{path}: no such model file (a run folder of `patchnet train` or a .keras file)")
    preprocessing = Preprocessing.for_model(path)
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for a bad file
        raise PatchNetError(f"{path}: not a loadable Keras model ({type(error).__name__}: {error})") from None
    return model, preprocessing
