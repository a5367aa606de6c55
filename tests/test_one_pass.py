"""One-pass exact heatmaps and the fully convolutional training path of padding="valid" models.

The reference everywhere is the definition: cut the zero-padded patch
centred at (or starting at) each position with numpy and run the subnet on
it. Random weights, tiny subnets, so every test runs in seconds.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import pytest
import tensorflow as tf

import patchnet_tf.heatmaps as heatmaps
from patchnet_tf.errors import PatchNetError
from patchnet_tf.layers import ConvolutionalPatchwiseSubnet, ExtractPatches, PatchwiseSubnet
from patchnet_tf.model import PatchNet, build_patchnet, build_subnet

TOLERANCE = 1e-5


def _model(patch_size, padding="valid", seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    kwargs.setdefault("filters", 6)
    kwargs.setdefault("conv_layers", 3)
    model = build_patchnet(patch_size, padding=padding, **kwargs)
    # Random biases too, so zero padding and halos are really exercised.
    rng = np.random.default_rng(seed)
    for weight in model.get_layer("subnet").weights:
        if "bias" in weight.path:
            weight.assign(rng.normal(0.0, 0.3, weight.shape).astype("float32"))
    return model


def _centred_reference(subnet_part, image, patch_size, stride=1):
    """Per-patch evaluation by definition: (H, W, K) from patches centred at (s*i + s//2, s*j + s//2)."""
    height, width, _ = image.shape
    half = patch_size // 2
    padded = np.pad(image, ((half, half + stride), (half, half + stride), (0, 0)))
    centres_y = range(stride // 2, height + stride // 2, stride)
    centres_x = range(stride // 2, width + stride // 2, stride)
    patches = np.stack(
        [padded[y : y + patch_size, x : x + patch_size] for y in centres_y for x in centres_x]
    )
    values = np.asarray(subnet_part(patches)).reshape(len(centres_y), len(centres_x), -1)
    values = np.repeat(np.repeat(values, stride, axis=0), stride, axis=1)
    return values[:height, :width]


@pytest.mark.parametrize(
    "patch_size, size",
    [(9, (9, 9)), (9, (13, 13)), (11, (17, 30)), (7, (23, 8)), (9, (40, 33))],
)
def test_valid_heatmap_equals_per_patch_evaluation_at_every_pixel(patch_size, size):
    model = _model(patch_size, conv_layers=3 if patch_size > 7 else 2)
    image = np.random.default_rng(1).random((*size, 3), dtype=np.float32)
    fast = heatmaps.heatmap(model, image)[0]
    reference = _centred_reference(model.get_layer("subnet"), image, patch_size)[..., 0]
    assert fast.shape == size
    assert fast.std() > 1e-3, "random weights should give a non-constant map"
    np.testing.assert_allclose(fast, reference, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("stride", [2, 3, 4])
def test_valid_heatmap_with_stride_matches_per_patch_path(stride):
    model = _model(9)
    image = np.random.default_rng(2).random((19, 26, 3), dtype=np.float32)
    fast = heatmaps.heatmap(model, image, stride=stride)[0]
    reference = _centred_reference(model.get_layer("subnet"), image, 9, stride)[..., 0]
    np.testing.assert_allclose(fast, reference, atol=TOLERANCE, rtol=0)
    # And the same as the generic per-patch TF path with the same stride.
    per_patch = heatmaps.dense_patch_map(model.get_layer("subnet"), image, 9, stride).numpy()
    np.testing.assert_allclose(fast, per_patch[..., 0], atol=TOLERANCE, rtol=0)


def test_valid_filter_heatmaps_equal_per_patch_tanh_features():
    model = _model(11)
    subnet = model.get_layer("subnet")
    features = keras.Model(subnet.input, subnet.get_layer("filter_features").output)
    image = np.random.default_rng(3).random((15, 22, 3), dtype=np.float32)
    fast = heatmaps.filter_heatmaps(model, image)[0]
    reference = _centred_reference(features, image, 11)
    assert fast.shape == (15, 22, 6)
    np.testing.assert_allclose(fast, reference, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("band_pixels", [1, 29 * 3 + 5, 10_000])
def test_bands_with_halo_give_the_same_map(band_pixels):
    """One row per band, a ragged last band, and a single band all agree with the reference."""
    model = _model(9)
    image = np.random.default_rng(4).random((31, 29, 3), dtype=np.float32)
    reference = _centred_reference(model.get_layer("subnet"), image, 9)[..., 0]
    for stride in (1, 2):
        fast = heatmaps.dense_valid_map(
            model.get_layer("subnet"), image, stride, band_pixels=band_pixels
        ).numpy()[..., 0]
        expected = reference if stride == 1 else _centred_reference(
            model.get_layer("subnet"), image, 9, stride
        )[..., 0]
        np.testing.assert_allclose(fast, expected, atol=TOLERANCE, rtol=0)


def test_heatmap_dispatches_on_padding(monkeypatch):
    calls = []
    real_valid, real_patch = heatmaps.dense_valid_map, heatmaps.dense_patch_map
    monkeypatch.setattr(
        heatmaps, "dense_valid_map", lambda *a, **k: calls.append("valid") or real_valid(*a, **k)
    )
    monkeypatch.setattr(
        heatmaps, "dense_patch_map", lambda *a, **k: calls.append("patch") or real_patch(*a, **k)
    )
    heatmaps._TRACED.clear()
    image = np.random.default_rng(5).random((12, 10, 3), dtype=np.float32)
    for padding, path in (("valid", "valid"), ("same", "patch")):
        calls.clear()
        model = _model(9, padding=padding)
        fast = heatmaps.heatmap(model, image)[0]
        assert calls == [path]
        reference = _centred_reference(model.get_layer("subnet"), image, 9)[..., 0]
        np.testing.assert_allclose(fast, reference, atol=TOLERANCE, rtol=0)


def test_dense_heatmap_fn_traces_for_any_size_and_exports():
    model = _model(9)
    function = tf.function(
        heatmaps.dense_heatmap_fn(model), input_signature=[tf.TensorSpec([None, None, 3], tf.float32)]
    )
    graph = function.get_concrete_function().graph
    assert not any(op.get_attr("_XlaMustCompile") for op in graph.get_operations()
                   if "_XlaMustCompile" in op.node_def.attr)
    rng = np.random.default_rng(7)
    images = [rng.random(size, dtype=np.float32) for size in ((9, 9, 3), (14, 21, 3))]
    for image in images:
        reference = _centred_reference(model.get_layer("subnet"), image, 9)[..., 0]
        np.testing.assert_allclose(function(image).numpy(), reference, atol=TOLERANCE, rtol=0)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "heatmap", heatmaps.dense_heatmap_fn(model),
        input_signature=[tf.TensorSpec([None, None, 3], tf.float32)],
    )
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        archive.write_out(directory, verbose=False)
        loaded = tf.saved_model.load(directory)
        for image in images:
            np.testing.assert_allclose(
                loaded.heatmap(tf.constant(image)).numpy(), function(image).numpy(), atol=1e-6
            )


def test_heatmap_reuses_its_traced_function():
    model = _model(9)
    heatmaps._TRACED.clear()
    rng = np.random.default_rng(8)
    heatmaps.heatmap(model, rng.random((10, 10, 3), dtype=np.float32))
    heatmaps.heatmap(model, rng.random((12, 15, 3), dtype=np.float32))
    assert len(heatmaps._TRACED) == 1
    (_, function), = heatmaps._TRACED.values()
    assert len(function._list_all_concrete_functions()) == 1


def test_heatmap_input_errors_still_clear():
    with pytest.raises(PatchNetError, match="odd patch size"):
        heatmaps.heatmap(_model(10), np.zeros((12, 12, 3), np.float32))
    with pytest.raises(PatchNetError, match="stride"):
        heatmaps.heatmap(_model(9), np.zeros((12, 12, 3), np.float32), stride=0)


# --- the fully convolutional training path ------------------------------------------------


def _per_patch_and_convolutional(patch_size, stride, region=None, seed=0):
    model = _model(patch_size, seed=seed, stride=stride, region=region)
    subnet = model.get_layer("subnet")
    images = keras.Input((None, None, 3))
    probabilities = ConvolutionalPatchwiseSubnet(
        subnet, patch_size, stride, region=region, name="patchwise"
    )(images)
    return model, subnet, images, probabilities


@pytest.mark.parametrize(
    "patch_size, stride, size, region",
    [
        (9, 1, (14, 11), None),
        (9, 3, (20, 17), None),
        (9, 9, (30, 25), None),  # the default: disjoint patches, uneven SAME padding
        (7, 2, (16, 16), None),
        (11, 4, (21, 26), (13, 18)),
        (9, 12, (25, 40), None),  # stride larger than the patch
    ],
)
def test_convolutional_patch_probabilities_and_gradients_match_extract_patches(
    patch_size, stride, size, region
):
    model, subnet, _, _ = _per_patch_and_convolutional(patch_size, stride, region)
    def per_patch(x):
        return PatchwiseSubnet(subnet)(ExtractPatches(patch_size, stride, region=region)(x))

    convolutional = ConvolutionalPatchwiseSubnet(subnet, patch_size, stride, region=region)
    rng = np.random.default_rng(9)
    images = tf.constant(rng.random((2, *size, 3), dtype=np.float32))
    labels = tf.constant([[0.0], [1.0]])

    results = []
    for forward in (per_patch, convolutional):
        with tf.GradientTape() as tape:
            tape.watch(images)
            patch_probabilities = forward(images)
            probability = tf.reduce_mean(patch_probabilities, axis=1)
            loss = keras.losses.binary_crossentropy(labels, probability)
        gradients = tape.gradient(loss, [images, *subnet.trainable_weights])
        results.append((patch_probabilities.numpy(), [g.numpy() for g in gradients]))

    (expected, expected_grads), (actual, actual_grads) = results
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)
    assert len(actual_grads) == len(expected_grads) == 1 + len(subnet.trainable_weights)
    for got, want in zip(actual_grads, expected_grads):
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # And the model built by build_patchnet gives the same image probability.
    np.testing.assert_allclose(
        model(images).numpy(), np.mean(actual, axis=1), atol=TOLERANCE, rtol=0
    )


def test_convolutional_patchwise_trains_and_round_trips(tmp_path):
    _, subnet, images, probabilities = _per_patch_and_convolutional(9, 3)
    from patchnet_tf.layers import MeanPatchProbability

    probability = MeanPatchProbability(name="probability")(probabilities)
    model = PatchNet(images, probability, name="patchnet")
    assert model.get_layer("subnet") is subnet
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    rng = np.random.default_rng(10)
    x = rng.random((4, 18, 18, 3), dtype=np.float32)
    y = np.array([[0.0], [1.0], [0.0], [1.0]], np.float32)
    before = [w.numpy().copy() for w in subnet.weights]
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert any(not np.array_equal(b, w.numpy()) for b, w in zip(before, subnet.weights))

    path = tmp_path / "convolutional.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    layer = loaded.get_layer("patchwise")
    assert isinstance(layer, ConvolutionalPatchwiseSubnet)
    assert (layer.patch_size, layer.stride, layer.region) == (9, 3, None)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)


def test_convolutional_patchwise_refuses_same_subnets():
    with pytest.raises(ValueError, match="valid"):
        ConvolutionalPatchwiseSubnet(build_subnet(9, filters=4, conv_layers=2), 9, 3)
