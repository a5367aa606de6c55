"""Dense heatmaps equal the subnet on explicitly cut, zero-padded centred patches."""

import os

import cv2
import numpy as np
import pytest

from patchnet_tf import PatchNetError, build_patchnet, filter_heatmaps, heatmap
from patchnet_tf.heatmaps import heatmap_overlay, heatmap_to_gray, write_heatmap_pngs

PATCH = 7


@pytest.fixture(scope="module")
def model():
    return build_patchnet(PATCH, filters=4, conv_layers=2)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).random((2, 13, 10, 3), np.float32)  # odd, non-square


def centred_patches(image, patch_size):
    half = patch_size // 2
    padded = np.pad(image, [(half, half), (half, half), (0, 0)])
    height, width = image.shape[:2]
    return np.stack(
        [padded[r : r + patch_size, c : c + patch_size] for r in range(height) for c in range(width)]
    )


@pytest.fixture(scope="module")
def explicit(model, images):
    subnet = model.get_layer("subnet")
    return np.stack(
        [subnet.predict(centred_patches(image, PATCH), verbose=0).reshape(image.shape[:2]) for image in images]
    )


def test_heatmap_equals_explicit_centred_patches(model, images, explicit):
    maps = heatmap(model, images)
    assert maps.shape == (2, 13, 10) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, explicit, atol=1e-6)
    # The corners see mostly zero padding; they are still the patch centred there.
    for row, col in [(0, 0), (0, 9), (12, 0), (12, 9)]:
        np.testing.assert_allclose(maps[:, row, col], explicit[:, row, col], atol=1e-6)
    assert np.ptp(maps) > 0  # random weights give a non-constant map


def test_chunk_size_does_not_change_the_result(model, images):
    reference = heatmap(model, images)
    for chunk in (1, 7, 37, 10_000):
        np.testing.assert_allclose(heatmap(model, images, chunk_patches=chunk), reference, atol=1e-6)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_progress_reports_each_band_of_rows_as_it_is_done(images, padding):
    """on_rows hears of every band (several per image here), rows adding up to the image
    height, and the map is the one computed without it."""
    model = build_patchnet(PATCH, filters=4, conv_layers=2, padding=padding)
    bands = {"chunk_patches": 30} if padding == "same" else {"band_pixels": 30}  # 3 rows of 10 per band
    for stride in (1, 2):
        rows = []
        maps = heatmap(model, images, stride=stride, on_rows=rows.append, **bands)
        np.testing.assert_array_equal(maps, heatmap(model, images, stride=stride, **bands))
        assert sum(rows) == 2 * 13 and len(rows) >= 4, (stride, rows)
    rows = []
    filter_heatmaps(model, images[:1], on_rows=rows.append, **bands)
    assert rows == [3, 3, 3, 3, 1]


def test_stride_evaluates_a_grid_and_fills_blocks(model, images, explicit):
    maps = heatmap(model, images, stride=3)
    assert maps.shape == (2, 13, 10)
    # Block (i, j) holds the patch centred at (3i + 1, 3j + 1).
    np.testing.assert_allclose(maps[:, 1::3, 1::3], explicit[:, 1::3, 1::3], atol=1e-6)
    np.testing.assert_allclose(maps[:, 0, 0], explicit[:, 1, 1], atol=1e-6)
    np.testing.assert_allclose(maps[:, 5, 8], explicit[:, 4, 7], atol=1e-6)


def test_filter_heatmaps_are_the_subnets_tanh_features(model, images):
    maps = filter_heatmaps(model, images[:1])
    assert maps.shape == (1, 13, 10, 4)
    assert np.all(np.abs(maps) <= 1)
    subnet = model.get_layer("subnet")
    import keras

    features = keras.Model(subnet.input, subnet.get_layer("filter_features").output)
    patch = centred_patches(images[0], PATCH)[5 * 10 + 4]
    np.testing.assert_allclose(maps[0, 5, 4], features.predict(patch[None], verbose=0).ravel(), atol=1e-6)


def test_even_patch_size_and_bad_shapes_are_refused(images):
    with pytest.raises(PatchNetError, match="odd patch size"):
        heatmap(build_patchnet(8, filters=2, conv_layers=1), images)
    with pytest.raises(PatchNetError, match="images must be"):
        heatmap(build_patchnet(7, filters=2, conv_layers=1), images[..., :2])


def test_png_writers(images):
    heat = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    gray = heatmap_to_gray(heat)
    assert gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, [[0, 128], [255, 64]])  # white = class 1
    overlay = heatmap_overlay(images[0, :2, :2], heat)
    assert overlay.shape == (2, 2, 3) and overlay.dtype == np.uint8
    # The hot pixel is redder than the cold one (BGR).
    assert overlay[1, 0, 2] > overlay[0, 0, 2]
    assert cv2.imencode(".png", overlay)[0]


def test_one_writer_names_the_heatmap_pngs_and_leaves_no_temporary_file(images, tmp_path):
    # `patchnet heatmap`, `bulk` and `predict` all write through it: one set of names.
    image = images[0, :4, :4]
    binary = np.random.default_rng(0).random((4, 4), np.float32)
    written = write_heatmap_pngs(str(tmp_path / "a"), binary, ["plain", "inlay"], image)
    assert written == [str(tmp_path / "a-heatmap.png"), str(tmp_path / "a-overlay.png")]
    np.testing.assert_array_equal(cv2.imread(written[0], cv2.IMREAD_UNCHANGED), heatmap_to_gray(binary))
    three = np.random.default_rng(1).dirichlet(np.ones(3), (4, 4)).astype(np.float32)
    written = write_heatmap_pngs(str(tmp_path / "b"), three, ["plain", "brick", "grass"], image)
    assert [path.rsplit("/", 1)[1] for path in written] == [
        "b-heatmap-plain.png", "b-overlay-plain.png", "b-heatmap-brick.png", "b-overlay-brick.png",
        "b-heatmap-grass.png", "b-overlay-grass.png", "b-classes.png"]
    assert cv2.imread(written[-1]).shape == (4, 4, 3)
    # Without an image (bytes sent to a server) there is nothing to draw the overlay on.
    assert write_heatmap_pngs(str(tmp_path / "c"), binary, ["plain", "inlay"]) == [str(tmp_path / "c-heatmap.png")]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
