"""The PatchNet architecture (README.md, "How PatchNet works"): layers, builder, serialization."""

import keras
import numpy as np
import pytest

from patchnet_tf import (
    ExtractPatches,
    MeanPatchProbability,
    PatchNetError,
    PatchwiseSubnet,
    build_patchnet,
    build_subnet,
)


def test_mean_is_over_probabilities_not_logits():
    probabilities = np.array([[[0.99], [0.01], [0.01]], [[0.5], [0.25], [0.0]]], np.float32)
    mean = MeanPatchProbability()(probabilities)
    assert mean.shape == (2, 1)
    np.testing.assert_allclose(np.asarray(mean), [[1.01 / 3], [0.25]], atol=1e-7)
    # Averaging logits instead would give sigmoid(-4.595 / 3) = 0.178 for the first image.


def test_model_output_is_mean_of_subnet_on_explicit_patches():
    model = build_patchnet(5, filters=4, conv_layers=2)
    images = np.random.default_rng(1).random((2, 10, 15, 3), np.float32)
    subnet = model.get_layer("subnet")
    patches = np.stack(
        [images[:, r : r + 5, c : c + 5] for r in range(0, 10, 5) for c in range(0, 15, 5)], axis=1
    )
    expected = np.stack([subnet.predict(batch, verbose=0).mean() for batch in patches])
    np.testing.assert_allclose(model.predict(images, verbose=0)[:, 0], expected, atol=1e-6)


def test_extract_patches_same_padding_matches_appendix_a_grid():
    images = np.random.default_rng(0).random((1, 128, 128, 1), np.float32)
    patches = np.asarray(ExtractPatches(17)(images))
    assert patches.shape == (1, 64, 17, 17, 1)  # 8 x 8 patches, as in the paper
    # SAME pads (8 * 17 - 128) = 8 rows: 4 on top, 4 at the bottom.
    padded = np.pad(images[0], [(4, 4), (4, 4), (0, 0)])
    np.testing.assert_array_equal(patches[0, 0], padded[:17, :17])
    np.testing.assert_array_equal(patches[0, 9], padded[17:34, 17:34])
    np.testing.assert_array_equal(patches[0, 63], padded[119:136, 119:136])


def test_extract_patches_overlapping_stride_and_central_region():
    images = np.arange(2 * 12 * 12 * 2, dtype=np.float32).reshape(2, 12, 12, 2)
    overlapping = np.asarray(ExtractPatches(4, stride=2, padding="VALID")(images))
    assert overlapping.shape == (2, 25, 4, 4, 2)
    np.testing.assert_array_equal(overlapping[1, 6], images[1, 2:6, 2:6])
    central = np.asarray(ExtractPatches(4, region=(8, 8))(images))
    assert central.shape == (2, 4, 4, 4, 2)
    np.testing.assert_array_equal(central[0, 0], images[0, 2:6, 2:6])


def test_full_subnet_has_the_papers_structure():
    subnet = build_subnet(21)
    convs = [layer for layer in subnet.layers if isinstance(layer, keras.layers.Conv2D)
             and not isinstance(layer, keras.layers.DepthwiseConv2D)]
    assert len(convs) == 7
    for conv in convs:
        assert conv.filters == 64 and conv.kernel_size == (3, 3) and conv.padding == "same"
        assert conv.activation.__name__ == "relu"
        assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)
    linear = subnet.get_layer("filter_linear")
    assert linear.kernel_size == (21, 21) and linear.padding == "valid"
    assert subnet.get_layer("filter_features").activation.__name__ == "tanh"
    assert subnet.get_layer("head").units == 1
    assert subnet.get_layer("patch_probability").activation.__name__ == "sigmoid"
    assert not any(isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.BatchNormalization))
                   for layer in subnet.layers)
    conv_params = (3 * 9 * 64 + 64) + 6 * (64 * 9 * 64 + 64)
    assert subnet.count_params() == conv_params + (21 * 21 * 64 + 64) + (64 + 1)
    assert subnet.output_shape == (None, 1)


def test_model_takes_any_image_size_and_exposes_the_subnet():
    model = build_patchnet(9, filters=4, conv_layers=2)
    for shape in [(1, 9, 9, 3), (3, 31, 20, 3)]:
        output = model.predict(np.zeros(shape, np.float32), verbose=0)
        assert output.shape == (shape[0], 1)
        assert np.all((output >= 0) & (output <= 1))
    assert model.get_layer("subnet").input_shape == (None, 9, 9, 3)


def test_valid_padding_shapes_and_refusal():
    subnet = build_subnet(21, padding="valid")
    assert subnet.get_layer("conv7").output.shape == (None, 7, 7, 64)
    assert subnet.get_layer("filter_linear").kernel_size == (7, 7)
    assert subnet.output_shape == (None, 1)
    model = build_patchnet(9, filters=4, conv_layers=3, padding="valid")
    assert model.predict(np.zeros((2, 18, 27, 3), np.float32), verbose=0).shape == (2, 1)
    with pytest.raises(PatchNetError, match="patch_size > 2 \\* conv_layers"):
        build_patchnet(14, padding="valid")
    with pytest.raises(PatchNetError, match="padding"):
        build_patchnet(15, padding="reflect")


def test_keras_round_trip_without_custom_objects(tmp_path):
    model = build_patchnet(7, stride=3, filters=4, conv_layers=2, region=(20, 18))
    images = np.random.default_rng(2).random((2, 24, 22, 3), np.float32)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), model.predict(images, verbose=0))
    assert loaded.get_layer("patches").get_config()["region"] == (20, 18)
    assert loaded.get_layer("subnet").name == "subnet"


def test_overlapping_valid_model_trains_fully_convolutionally_with_the_same_outputs():
    fast = build_patchnet(11, stride=3, filters=4, conv_layers=2, padding="valid")
    assert type(fast.get_layer("patchwise")).__name__ == "ConvolutionalPatchwiseSubnet"
    per_patch = keras.Sequential([ExtractPatches(11, 3), PatchwiseSubnet(fast.get_layer("subnet"))])
    images = np.random.default_rng(4).random((2, 23, 30, 3), np.float32)
    np.testing.assert_allclose(
        fast.predict(images, verbose=0), per_patch.predict(images, verbose=0).mean(axis=1), atol=1e-6
    )
