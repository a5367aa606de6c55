"""Preprocessing TF ops against NumPy references on random images."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from patchnet_tf.errors import PatchNetError
from patchnet_tf.preprocessing import (
    Preprocessing,
    decode_image,
    gamma_correct,
    resize,
    shades_of_gray,
)


def random_images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, shape).astype(np.float32)


def numpy_gamma(images, gamma):
    return np.power(images, 1.0 / gamma)


def numpy_shades_of_gray(image, norm):
    """Finlayson and Trezzi: illuminant e_c = (mean I_c^p)^(1/p); scale so e becomes grey."""
    illuminant = np.power(np.mean(np.power(image.astype(np.float64), norm), axis=(0, 1)), 1.0 / norm)
    gain = np.linalg.norm(illuminant) / (np.sqrt(image.shape[-1]) * illuminant)
    return np.clip(image * gain, 0.0, 1.0)


def numpy_resize_axis(array, size, axis):
    """Antialiased bilinear (triangle filter widened by the downscale factor), half-pixel centres."""
    length = array.shape[axis]
    scale = length / size
    width = max(scale, 1.0)
    weights = np.zeros((size, length))
    for out in range(size):
        centre = (out + 0.5) * scale
        taps = np.maximum(0.0, 1.0 - np.abs(np.arange(length) + 0.5 - centre) / width)
        weights[out] = taps / taps.sum()
    return np.moveaxis(np.tensordot(weights, np.moveaxis(array, axis, 0), axes=1), 0, axis)


def numpy_resize(image, size):
    return numpy_resize_axis(numpy_resize_axis(image.astype(np.float64), size[0], 0), size[1], 1)


def test_gamma_matches_numpy():
    images = random_images((2, 9, 7, 3))
    np.testing.assert_allclose(gamma_correct(images, 2.2).numpy(), numpy_gamma(images, 2.2), atol=1e-6)


@pytest.mark.parametrize("norm", [6.0, 1.0, 2.0])
def test_shades_of_gray_matches_numpy(norm):
    images = random_images((3, 16, 12, 3), seed=1) * np.array([0.9, 0.6, 0.3], np.float32)
    got = shades_of_gray(images, norm).numpy()
    for image, result in zip(images, got):
        np.testing.assert_allclose(result, numpy_shades_of_gray(image, norm), atol=1e-5)
    # Single images and batches give the same answer.
    np.testing.assert_allclose(shades_of_gray(images[0], norm).numpy(), got[0], atol=1e-6)


def test_shades_of_gray_removes_a_colour_cast():
    """A scene lit by a coloured illuminant comes out with a neutral p-norm illuminant."""
    scene = random_images((32, 32, 3), seed=2) * 0.5
    cast = scene * np.array([1.0, 0.7, 0.4], np.float32)
    corrected = shades_of_gray(cast, 6.0).numpy()
    illuminant = np.power(np.mean(np.power(corrected, 6.0), axis=(0, 1)), 1 / 6)
    assert np.ptp(illuminant) / illuminant.mean() < 1e-3
    before = np.power(np.mean(np.power(cast, 6.0), axis=(0, 1)), 1 / 6)
    assert np.ptp(before) / before.mean() > 0.3


@pytest.mark.parametrize("size", [(24, 40), (8, 5), (13, 17)])
def test_resize_matches_numpy(size):
    image = random_images((16, 20, 3), seed=3)
    np.testing.assert_allclose(resize(image, size).numpy(), numpy_resize(image, size), atol=2e-5)


def test_preprocessing_applies_each_flag_in_order():
    images = random_images((2, 20, 16, 3), seed=4)
    size = (10, 8)
    plain = Preprocessing(image_size=size)(images).numpy()
    np.testing.assert_allclose(plain, np.stack([numpy_resize(i, size) for i in images]), atol=2e-5)
    full = Preprocessing(image_size=size, gamma=2.2, shades_of_gray_norm=6.0)(images).numpy()
    reference = np.stack([numpy_shades_of_gray(numpy_gamma(numpy_resize(i, size), 2.2), 6.0) for i in images])
    np.testing.assert_allclose(full, reference, atol=5e-5)
    assert full.dtype == np.float32 and full.shape == (2, 10, 8, 3)
    assert not np.allclose(full, plain, atol=1e-2)


def test_decode_image_matches_cv2(tmp_path):
    image = (random_images((9, 11, 3), seed=5) * 255).astype(np.uint8)
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, image)
    decoded = decode_image(tf.io.read_file(path)).numpy()
    np.testing.assert_allclose(decoded, cv2.cvtColor(image, cv2.COLOR_BGR2RGB) / 255.0, atol=1e-6)


def test_preprocessing_round_trips_through_its_json(tmp_path):
    original = Preprocessing(image_size=(192, 256), gamma=2.2, shades_of_gray_norm=6.0, class_names=("a", "b"))
    original.save(str(tmp_path))
    assert Preprocessing.for_model(str(tmp_path / "model.keras")) == original
    with pytest.raises(PatchNetError, match="preprocessing.json"):
        Preprocessing.for_model(str(tmp_path / "elsewhere" / "model.keras"))
