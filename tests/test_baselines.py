"""CAM and Grad-CAM maps of tiny models against a direct numpy computation,
and the baselines' contract: (B, 1) float32 probability, .keras round trip."""

import cv2
import keras
import numpy as np
import pytest

import patchnet_tf
from patchnet_tf import baselines
from patchnet_tf.errors import PatchNetError
from patchnet_tf.explain import explain


def _randomize_biases(model, seed=1):
    """Random (positive-leaning) biases so ReLUs and the head bias are really exercised."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if len(weights) == 2:
            layer.set_weights([weights[0], rng.uniform(-0.05, 0.2, weights[1].shape).astype(np.float32)])


def _upsample(small, size):
    """Bilinear with half-pixel centres, as cv2 does it (an implementation independent of TF)."""
    return cv2.resize(small.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def _images(count, size, seed=0):
    return np.random.default_rng(seed).random((count, size, size, 3), dtype=np.float32)


def test_cam_map_is_the_head_weighted_sum_of_the_last_conv_maps():
    model = baselines.build_cam((32, 32, 3), width=2)
    _randomize_biases(model)
    images = _images(2, 32)
    features = keras.Model(model.input, model.get_layer("cam_features").output).predict(images, verbose=0)
    assert features.shape == (2, 4, 4, 16)  # 3 poolings: 32 / 8; last block 8 x width
    kernel, bias = model.get_layer("cam_head").get_weights()
    logits = np.einsum("bhwk,k->bhw", features.astype(np.float64), kernel[:, 0].astype(np.float64)) + bias[0]

    # Global average pooling then the linear head: the image's logit is the mean of the map.
    probabilities = model.predict(images, verbose=0)[:, 0]
    np.testing.assert_allclose(1 / (1 + np.exp(-logits.mean(axis=(1, 2)))), probabilities, atol=1e-5)

    expected = np.stack([1 / (1 + np.exp(-_upsample(logit, (32, 32)))) for logit in logits])
    heat = baselines.heatmap(model, images)
    assert heat.shape == (2, 32, 32) and heat.dtype == np.float32
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    np.testing.assert_allclose(baselines.cam_logit_map(model, images)[0], _upsample(logits[0], (32, 32)), atol=1e-4)


def _numpy_head_logit(pooled_input, dense_weights):
    """VGG-11's head after the last conv, in float64: max-pool 2x2, flatten, 2 x (dense, ReLU), dense."""
    height, width, channels = pooled_input.shape
    pooled = pooled_input.reshape(height // 2, 2, width // 2, 2, channels).max(axis=(1, 3))
    x = pooled.reshape(-1)
    (w1, b1), (w2, b2), (w3, b3) = dense_weights
    x = np.maximum(x @ w1 + b1, 0)
    x = np.maximum(x @ w2 + b2, 0)
    return float((x @ w3 + b3)[0])


def test_gradcam_map_matches_finite_difference_gradients():
    model = baselines.build_vgg11((64, 64, 3), width=1, dense_units=6)
    _randomize_biases(model, seed=2)
    images = _images(2, 64, seed=3)
    # Max-pooling ties (dead ReLUs in one window) have several valid subgradients;
    # a positive kernel and bias on ReLU inputs keep every feature positive, so it is unique.
    last = model.get_layer("gradcam_features")
    last.set_weights([np.abs(last.get_weights()[0]), np.full(8, 0.5, np.float32)])
    features = keras.Model(model.input, last.output).predict(images, verbose=0)
    assert features.shape == (2, 4, 4, 8) and features.min() > 0
    dense_weights = [
        [w.astype(np.float64) for w in model.get_layer(name).get_weights()] for name in ("fc1", "fc2", "logit")
    ]
    # The numpy head reproduces the model (dropout is off at inference).
    logits = [_numpy_head_logit(f.astype(np.float64), dense_weights) for f in features]
    probabilities = model.predict(images, verbose=0)[:, 0]
    np.testing.assert_allclose(1 / (1 + np.exp(-np.array(logits))), probabilities, atol=1e-5)

    expected = []
    for feature in features.astype(np.float64):
        gradient = np.zeros_like(feature)
        step = 1e-4
        for index in np.ndindex(feature.shape):
            plus, minus = feature.copy(), feature.copy()
            plus[index] += step
            minus[index] -= step
            gradient[index] = (
                _numpy_head_logit(plus, dense_weights) - _numpy_head_logit(minus, dense_weights)
            ) / (2 * step)
        alpha = gradient.mean(axis=(0, 1))
        small = np.maximum(np.einsum("hwk,k->hw", feature, alpha), 0)
        big = _upsample(small, (64, 64))
        expected.append(big / big.max() if big.max() > 0 else big)
    expected = np.stack(expected)
    assert expected.max() == pytest.approx(1.0)  # a non-trivial case: some positive evidence

    heat = baselines.heatmap(model, images)
    assert heat.shape == (2, 64, 64) and heat.dtype == np.float32
    np.testing.assert_allclose(heat, expected, atol=2e-4)


def test_gradcam_map_of_no_positive_evidence_stays_black():
    model = baselines.build_vgg11((32, 32, 3), width=1, dense_units=2)
    head = model.get_layer("logit")
    kernel, bias = head.get_weights()
    head.set_weights([np.zeros_like(kernel), bias])  # logit independent of the features
    np.testing.assert_array_equal(baselines.heatmap(model, _images(1, 32)), np.zeros((1, 32, 32)))


@pytest.mark.parametrize("arch", ["cam", "vgg11"])
def test_baseline_contract_and_keras_round_trip(arch, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        mixed = baselines.build(arch, (32, 32, 3), width=2)
    finally:
        keras.config.set_dtype_policy("float32")
    assert mixed.output.dtype == "float32"

    model = baselines.build(arch, (32, 32, 3), width=2)
    assert model.name == arch and baselines.arch_of(model) == arch
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    images = _images(3, 32)
    probabilities = loaded.predict(images, verbose=0)
    assert probabilities.shape == (3, 1) and probabilities.dtype == np.float32
    assert np.all((probabilities > 0) & (probabilities < 1))
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), atol=1e-6)
    heat = explain(loaded, images)
    np.testing.assert_allclose(heat, baselines.heatmap(model, images), atol=1e-6)
    assert heat.min() >= 0 and heat.max() <= 1


def test_explain_dispatches_patchnet_to_its_own_heatmap():
    model = patchnet_tf.build_patchnet(5, filters=3, conv_layers=2)
    images = _images(1, 12)
    assert baselines.arch_of(model) == "patchnet"
    np.testing.assert_array_equal(explain(model, images, stride=2), patchnet_tf.heatmap(model, images, stride=2))
    with pytest.raises(PatchNetError, match="patchnet_tf.heatmap"):
        baselines.heatmap(model, images)


def test_bad_sizes_and_architectures_are_clear_errors():
    with pytest.raises(PatchNetError, match="divisible by 32"):
        baselines.build("vgg11", (48, 48, 3))
    with pytest.raises(PatchNetError, match="divisible by 8"):
        baselines.build("cam", (20, 20, 3))
    with pytest.raises(PatchNetError, match="unknown baseline"):
        baselines.build("resnet", (32, 32, 3))
    model = baselines.build("cam", (32, 32, 3), width=1)
    with pytest.raises(PatchNetError, match="got shape"):
        baselines.heatmap(model, _images(1, 16))
    with pytest.raises(PatchNetError, match="neither"):
        baselines.arch_of(keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]))
