import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow as `patchnet serve` starts it (patchnet_launcher.py): oneDNN allocates with malloc.
os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")

import keras
import pytest


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whatever ran before it."""
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Two versions of a tiny model as SavedModels, exported once for every serving test module."""
    from test_serving import PREPROCESSING, tiny_model

    from pipelines.export import write_saved_model

    root = tmp_path_factory.mktemp("exports")
    models = [tiny_model(0), tiny_model(1)]
    dirs = [write_saved_model(m, PREPROCESSING, str(root / f"v{i + 1}")) for i, m in enumerate(models)]
    return models, dirs
