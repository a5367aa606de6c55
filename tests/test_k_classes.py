"""K classes: a softmax per patch, the image's probabilities the mean patch vector,
one heatmap per class (issue 12; docs/k-classes.md). The binary model is tested
unchanged elsewhere; here every model has classes=3."""

import keras
import numpy as np
import pytest

from patchnet_tf import build_patchnet, heatmap
from patchnet_tf.errors import PatchNetError
from patchnet_tf.layers import ExtractPatches
from patchnet_tf.model import class_count, loss_for, output_classes

CLASSES = 3


def _random_biases(model, seed=0):
    rng = np.random.default_rng(seed)
    for weight in model.get_layer("subnet").weights:
        if "bias" in weight.path:
            weight.assign(rng.normal(0.0, 0.3, weight.shape).astype("float32"))
    return model


def test_k_class_model_averages_patch_softmax_vectors():
    model = build_patchnet(7, stride=5, filters=4, conv_layers=2, classes=CLASSES)
    subnet = model.get_layer("subnet")
    assert subnet.get_layer("patch_probability").get_config()["activation"] == "softmax"
    images = np.random.default_rng(0).random((2, 19, 23, 3), np.float32)
    probabilities = model.predict(images, verbose=0)
    assert probabilities.shape == (2, CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    patches = ExtractPatches(7, 5)(images).numpy()
    per_patch = subnet.predict(patches.reshape(-1, 7, 7, 3), verbose=0).reshape(2, -1, CLASSES)
    np.testing.assert_allclose(probabilities, per_patch.mean(axis=1), atol=1e-6)
    assert class_count(model) == CLASSES and class_count(build_patchnet(7, filters=2, conv_layers=1)) == 2


def test_two_classes_stay_the_binary_sigmoid_model():
    assert output_classes(2) == 1 and output_classes(3) == 3
    assert isinstance(loss_for(1), keras.losses.BinaryCrossentropy)
    assert isinstance(loss_for(3), keras.losses.CategoricalCrossentropy)
    with pytest.raises(PatchNetError, match="two classes"):
        output_classes(1)
    with pytest.raises(PatchNetError, match="classes"):
        build_patchnet(7, classes=0)


def test_k_class_keras_round_trip(tmp_path):
    model = build_patchnet(9, stride=4, filters=4, conv_layers=2, padding="valid", classes=CLASSES)
    _random_biases(model)
    images = np.random.default_rng(2).random((2, 24, 22, 3), np.float32)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    np.testing.assert_array_equal(heatmap(loaded, images), heatmap(model, images))


@pytest.mark.parametrize("stride", [1, 3])
def test_one_pass_k_class_heatmaps_equal_per_patch_evaluation(stride):
    patch_size = 9
    model = _random_biases(build_patchnet(patch_size, filters=5, conv_layers=3, padding="valid", classes=CLASSES))
    image = np.random.default_rng(1).random((17, 22, 3)).astype(np.float32)
    maps = heatmap(model, image, stride=stride)[0]
    assert maps.shape == (17, 22, CLASSES)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
    # The definition: the subnet on the zero-padded patch centred at each grid point.
    half = patch_size // 2
    padded = np.pad(image, ((half, half + stride), (half, half + stride), (0, 0)))
    rows, cols = range(stride // 2, 17 + stride // 2, stride), range(stride // 2, 22 + stride // 2, stride)
    patches = np.stack([padded[y : y + patch_size, x : x + patch_size] for y in rows for x in cols])
    expected = model.get_layer("subnet").predict(patches, verbose=0).reshape(len(rows), len(cols), CLASSES)
    expected = np.repeat(np.repeat(expected, stride, axis=0), stride, axis=1)[:17, :22]
    np.testing.assert_allclose(maps, expected, atol=1e-5)


def test_same_padded_k_class_heatmap_is_per_patch_too():
    model = build_patchnet(7, filters=3, conv_layers=2, classes=CLASSES)
    image = np.random.default_rng(3).random((9, 10, 3)).astype(np.float32)
    maps = heatmap(model, image, stride=2)
    assert maps.shape == (1, 9, 10, CLASSES)
    np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)


def test_cam_and_gradcam_give_one_map_per_class():
    import tensorflow as tf

    from patchnet_tf import baselines

    images = np.random.default_rng(5).random((2, 32, 32, 3), np.float32)
    cam = baselines.build_cam((32, 32, 3), width=4, classes=CLASSES)
    maps = baselines.heatmap(cam, images)
    assert maps.shape == (2, 32, 32, CLASSES)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # a softmax of the class logit maps per pixel
    # The image's probabilities are the softmax of the logit maps' spatial means (at feature resolution).
    features = keras.Model(cam.input, cam.get_layer(baselines.CAM_FEATURES).output)(images).numpy()
    kernel, bias = cam.get_layer(baselines.CAM_HEAD).get_weights()
    logits = (features @ kernel + bias).mean(axis=(1, 2))
    np.testing.assert_allclose(cam.predict(images, verbose=0), tf.nn.softmax(logits).numpy(), atol=1e-5)

    vgg = baselines.build_vgg11((32, 32, 3), width=4, classes=CLASSES)
    maps = baselines.heatmap(vgg, images)
    assert maps.shape == (2, 32, 32, CLASSES) and maps.min() >= 0 and maps.max() <= 1
    gradient_model = keras.Model(vgg.input, [vgg.get_layer(baselines.GRADCAM_FEATURES).output,
                                             vgg.get_layer(baselines.LOGIT).output])
    for klass in range(CLASSES):  # Grad-CAM of class k: the gradient of logit k, by hand
        with tf.GradientTape() as tape:
            features, logits = gradient_model(tf.constant(images))
            target = logits[:, klass]
        weights = tf.reduce_mean(tape.gradient(target, features), axis=(1, 2), keepdims=True)
        small = tf.nn.relu(tf.reduce_sum(weights * features, -1))[..., None]
        big = tf.image.resize(small, (32, 32))[..., 0].numpy()
        peak = big.max(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(maps[..., klass], np.where(peak > 0, big / np.maximum(peak, 1e-30), 0), atol=1e-5)
