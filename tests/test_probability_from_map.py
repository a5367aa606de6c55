"""The image probability read from the stride-1 heatmap: the mean of the map at the centres of the
patches the classifier averages equals the model's output (and the exported classify signature)."""

import keras
import numpy as np
import pytest

from patchnet_tf import build_patchnet, heatmap
from patchnet_tf.errors import PatchNetError
from patchnet_tf.heatmaps import map_patch_centres, probability_from_map
from patchnet_tf.layers import ExtractPatches, MeanPatchProbability, PatchwiseSubnet
from patchnet_tf.model import PatchNet
from patchnet_tf.preprocessing import Preprocessing
from pipelines.export import write_saved_model
from serving.loader import LoadedModel

TOLERANCE = 1e-6  # float32


def _model(patch_size, seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    kwargs.setdefault("filters", 4)
    kwargs.setdefault("conv_layers", 2)
    model = build_patchnet(patch_size, **kwargs)
    rng = np.random.default_rng(seed)  # random biases: zero padding at the border matters
    for weight in model.get_layer("subnet").weights:
        if "bias" in weight.path:
            weight.assign(rng.normal(0.0, 0.3, weight.shape).astype("float32"))
    return model


def _images(height, width, count=2, seed=1):
    return np.random.default_rng(seed).normal(0.0, 1.0, (count, height, width, 3)).astype(np.float32)


def _check(model, images, stride=1):
    maps = heatmap(model, images, stride=stride)
    ours = probability_from_map(model, maps, stride=stride)
    expected = np.asarray(model(images, training=False))
    assert ours.shape == expected.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOLERANCE)


# (patch, model options, image size): sizes that are and are not multiples of the patch (and stride).
CASES = [
    (9, {}, (27, 36)),
    (9, {}, (31, 40)),
    (9, {}, (5, 12)),                    # smaller than a patch: one zero-padded patch per row
    (7, {"stride": 5}, (19, 23)),        # overlapping grid, uneven padding
    (7, {"stride": 3}, (24, 22)),
    (7, {"stride": 3}, (25, 23)),
    (9, {"stride": 12}, (40, 30)),       # a stride above the patch: gaps between patches
]


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("patch_size, options, size", CASES)
def test_binary_probability_from_the_map_equals_the_model(padding, patch_size, options, size):
    _check(_model(patch_size, padding=padding, **options), _images(*size))


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("patch_size, options, size", [CASES[0], CASES[1], CASES[3], CASES[5]])
def test_k_class_probabilities_from_the_map_equal_the_model(padding, patch_size, options, size):
    _check(_model(patch_size, padding=padding, classes=3, **options), _images(*size))


def test_centres_follow_extract_patches_same_padding():
    model = _model(7, stride=5)
    # 19 rows: ceil(19 / 5) = 4 patches, padding 3 * 5 + 7 - 19 = 3, one row above: centres 2, 7, 12, 17.
    rows, cols = map_patch_centres(model, 19, 10)
    assert rows.tolist() == [2, 7, 12, 17] and cols.tolist() == [2, 7]
    assert map_patch_centres(_model(9), 27, 9)[0].tolist() == [4, 13, 22]


def test_a_region_without_border_padding_reads_the_map():
    # 28 x 28 central crop of 36 x 32, p = 7 stride 7: four patches a side, none padded.
    model = _model(7, region=(28, 28))
    rows, cols = map_patch_centres(model, 36, 32)
    assert rows.tolist() == [7, 14, 21, 28] and cols.tolist() == [5, 12, 19, 26]
    _check(model, _images(36, 32))


@pytest.mark.parametrize("model, size, stride, reason", [
    (lambda: _model(7, region=(24, 24)), (36, 32), 1, "border of its region"),  # crop padded, map sees pixels
    (lambda: _model(9, padding="valid", region=(50, 50)), (36, 32), 1, "larger than the image"),
    (lambda: _model(9, padding="valid"), (27, 36), 2, "stride 2 does not evaluate"),
    (lambda: _model(9, padding="valid"), (27, 36), 4, "stride 4 does not evaluate"),
])
def test_where_the_map_misses_the_patches_the_model_is_called(model, size, stride, reason):
    model = model()
    images = _images(*size)
    maps = heatmap(model, images, stride=stride)
    with pytest.raises(PatchNetError, match=reason):
        probability_from_map(model, maps, stride=stride)
    ours = probability_from_map(model, maps, stride=stride, images=images)  # the fallback: one model call
    np.testing.assert_array_equal(ours, np.asarray(model(images, training=False)))


def _valid_grid_model(patch_size, stride):
    """A PatchNet whose ExtractPatches cuts only whole patches (padding="VALID", no zero padding)."""
    subnet = _model(patch_size).get_layer("subnet")
    images = keras.Input((None, None, 3))
    patches = ExtractPatches(patch_size, stride, padding="VALID")(images)
    return PatchNet(images, MeanPatchProbability()(PatchwiseSubnet(subnet)(patches)))


def test_a_valid_patch_grid_reads_the_map_and_an_image_below_a_patch_calls_the_model():
    model = _valid_grid_model(7, 4)
    rows, cols = map_patch_centres(model, 20, 17)  # (20 - 7) // 4 + 1 = 4 whole patches from row 0
    assert rows.tolist() == [3, 7, 11, 15] and cols.tolist() == [3, 7, 11]
    _check(model, _images(20, 17))
    with pytest.raises(PatchNetError, match="smaller than a patch"):
        map_patch_centres(model, 6, 17)


def test_a_strided_map_that_hits_every_patch_centre_reads_it():
    # p = 9 at stride 9 on 27 rows: centres 4, 13, 22 = 3 * i + 1, the stride-3 map's grid points.
    _check(_model(9, padding="valid"), _images(27, 36), stride=3)


def test_it_runs_inside_a_tf_function():
    import tensorflow as tf

    model = _model(9, padding="valid", classes=3)
    images = _images(31, 40)
    maps = heatmap(model, images)
    traced = tf.function(lambda maps: probability_from_map(model, maps))
    np.testing.assert_allclose(traced(tf.constant(maps)).numpy(), model(images).numpy(), atol=TOLERANCE)


@pytest.mark.parametrize("padding, classes", [("same", 1), ("valid", 1), ("valid", 3)])
def test_exported_heatmap_probability_equals_the_classify_signature(tmp_path, padding, classes):
    model = _model(9, padding=padding, classes=classes)
    names = ("a", "b", "c") if classes == 3 else ("benign", "malignant")
    preprocessing = Preprocessing(image_size=(31, 40), class_names=names)
    loaded = LoadedModel(write_saved_model(model, preprocessing, str(tmp_path / "export")))
    try:
        pixels = np.random.default_rng(3).integers(0, 256, (3, 31, 40, 3)).astype(np.float32)
        key = "probability" if classes == 1 else "probabilities"
        classify = loaded.run("classify_images", {"images": pixels})[key]
        maps = loaded.run("heatmap_images", {"images": pixels})
        np.testing.assert_allclose(maps[key], classify, rtol=0, atol=TOLERANCE)
        ours = probability_from_map(model, maps["heatmap"])
        np.testing.assert_allclose(ours[:, 0] if classes == 1 else ours, classify, rtol=0, atol=TOLERANCE)
    finally:
        loaded.close()
