"""One layer test, `run_layer_test`, run on every Keras layer class that patchnet_tf defines.

The classes are discovered (every subclass of `keras.layers.Layer`, models
included, defined in a patchnet_tf module), so a new layer cannot be
forgotten: `test_every_layer_has_a_recipe` fails until it gets a recipe in
`RECIPES`. The behaviour of each layer (what it computes) is tested in
test_model.py and test_one_pass.py; here every layer gets the same checks a
Keras layer must pass to be trained, saved, loaded and run in mixed precision.
"""

import copy
import importlib
import inspect
import pkgutil

import keras
import numpy as np
import pytest
import tensorflow as tf

import patchnet_tf
from patchnet_tf.augment import Augmentation, AugmentedModel
from patchnet_tf.layers import ConvolutionalPatchwiseSubnet, ExtractPatches, MeanPatchProbability, PatchwiseSubnet
from patchnet_tf.model import build_patchnet, build_subnet


def _subnet(patch_size=4, padding="same", classes=1):
    return build_subnet(patch_size, filters=2, conv_layers=1, padding=padding, classes=classes)


# How to build a small instance of each layer, and the input it is called on.
# `make` is called afresh for each check (mixed precision needs layers built
# under the policy); `serializable=False` names a layer that is not meant to
# be saved, with the reason: its config and save checks are skipped.
RECIPES = {
    "ExtractPatches": dict(
        make=lambda: ExtractPatches(4, stride=2, region=(10, 10)),
        input_shape=(2, 12, 12, 3),
        symbolic_shape=(None, None, 3),
    ),
    "PatchwiseSubnet": dict(
        make=lambda: PatchwiseSubnet(_subnet(classes=3)),
        input_shape=(2, 5, 4, 4, 3),
        symbolic_shape=(None, 4, 4, 3),
    ),
    "MeanPatchProbability": dict(make=MeanPatchProbability, input_shape=(2, 5, 3), symbolic_shape=(None, 3)),
    "ConvolutionalPatchwiseSubnet": dict(
        make=lambda: ConvolutionalPatchwiseSubnet(_subnet(5, "valid"), 5, stride=2, region=(9, 10)),
        input_shape=(2, 11, 12, 3),
        symbolic_shape=(None, None, 3),
    ),
    "PatchNet": dict(
        make=lambda: build_patchnet(4, filters=2, conv_layers=1, classes=3),
        input_shape=(2, 9, 8, 3),
        symbolic_shape=(None, None, 3),
    ),
    "AugmentedModel": dict(
        make=lambda: AugmentedModel(build_patchnet(4, filters=2, conv_layers=1), Augmentation(horizontal_flip=True)),
        input_shape=(2, 8, 8, 3),
        symbolic_shape=(None, None, 3),
        serializable=False,  # a training-only wrapper: checkpoints save its inference_model (augment.py)
    ),
}


def _layer_classes():
    """Every keras.layers.Layer subclass defined in a patchnet_tf module, by name."""
    classes = {}
    for info in pkgutil.iter_modules(patchnet_tf.__path__, "patchnet_tf."):
        if info.name.endswith("__main__"):  # runs the command line
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, keras.layers.Layer) and cls.__module__ == module.__name__:
                classes[cls.__name__] = cls
    return classes


LAYER_CLASSES = _layer_classes()


@pytest.fixture(autouse=True)
def _float32_policy():
    """A failing mixed-precision check must not leave the policy set for the next test."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def _defines(layer, method):
    """True when a class between `layer`'s and keras' Layer overrides `method`."""
    for cls in type(layer).__mro__:
        if cls is keras.layers.Layer:
            return False
        if method in vars(cls):
            return True
    return False


def _assert_shapes_match(actual, expected):
    assert len(actual) == len(expected), (actual, expected)
    for got, want in zip(actual, expected):
        assert want is None or got == want, (actual, expected)


def _outputs(model, inputs):
    return [np.asarray(tf.cast(output, tf.float32)) for output in tf.nest.flatten(model(inputs))]


def run_layer_test(cls, make, input_shape, *, symbolic_shape=None, serializable=True, tmp_path):
    """The checks every patchnet_tf layer must pass; `make()` builds a fresh small instance.

    1. `get_config` -> `from_config` gives back an equal config.
    2. Called on an input of `input_shape`, the output's shape matches
       `compute_output_shape` (where the layer defines it).
    3. Inside a small functional model (input `symbolic_shape`, no batch
       axis; None sizes as in build_patchnet), it survives `.keras` save and
       `keras.models.load_model` (no custom_objects) with identical outputs.
    4. One training step: every gradient (weights and input) is finite,
       and an SGD step changes the weights where there are any.
    5. Built and run under the mixed_bfloat16 policy, its outputs are finite.
    """
    rng = np.random.default_rng(0)
    inputs = rng.random(input_shape, dtype=np.float32)

    layer = make()
    assert type(layer) is cls
    outputs = layer(inputs)
    if serializable:
        config = layer.get_config()
        revived = cls.from_config(copy.deepcopy(config))  # from_config may consume its argument
        assert type(revived) is cls and revived.get_config() == config
        assert revived(inputs).shape == outputs.shape

    if _defines(layer, "compute_output_shape"):
        _assert_shapes_match(tuple(outputs.shape), layer.compute_output_shape(input_shape))

    symbolic = keras.Input(symbolic_shape or input_shape[1:], name="input")
    model = keras.Model(symbolic, make()(symbolic), name="host")
    expected = _outputs(model, inputs)
    if serializable:
        path = str(tmp_path / f"{cls.__name__}.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        assert type(loaded.layers[-1]) is cls
        for got, want in zip(_outputs(loaded, inputs), expected, strict=True):
            np.testing.assert_array_equal(got, want)

    tensor = tf.constant(inputs)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        loss = sum(tf.reduce_mean(tf.square(tf.cast(output, tf.float32)))
                   for output in tf.nest.flatten(model(tensor, training=True)))
    weights = model.trainable_weights
    gradients = tape.gradient(loss, [tensor, *weights])
    assert gradients[0] is not None, "no gradient flows through the layer to its input"
    for gradient in gradients:
        assert gradient is not None and np.all(np.isfinite(gradient)), "a missing or non-finite gradient"
    if weights:
        before = [weight.numpy().copy() for weight in weights]
        keras.optimizers.SGD(0.1).apply_gradients(zip(gradients[1:], weights))
        assert any(not np.array_equal(old, new.numpy()) for old, new in zip(before, weights))

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = make()
        for output in tf.nest.flatten(mixed(inputs)):
            assert np.all(np.isfinite(np.asarray(tf.cast(output, tf.float32))))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_every_layer_has_a_recipe():
    assert {"ExtractPatches", "PatchwiseSubnet", "MeanPatchProbability"} <= set(LAYER_CLASSES)
    missing = sorted(set(LAYER_CLASSES) - set(RECIPES))
    assert not missing, f"add a recipe to RECIPES in tests/test_layers.py for {missing}"
    assert not set(RECIPES) - set(LAYER_CLASSES), "a recipe for a layer that no longer exists"


def test_every_saved_layer_is_registered():
    """Registered, so `keras.models.load_model` needs no custom_objects."""
    for name, cls in LAYER_CLASSES.items():
        if RECIPES.get(name, {}).get("serializable", True):
            assert keras.saving.get_registered_object(keras.saving.get_registered_name(cls)) is cls, name


@pytest.mark.parametrize("name", sorted(LAYER_CLASSES))
def test_layer(name, tmp_path):
    if name not in RECIPES:
        pytest.fail(f"no recipe for {name} (test_every_layer_has_a_recipe)")
    run_layer_test(LAYER_CLASSES[name], tmp_path=tmp_path, **RECIPES[name])
