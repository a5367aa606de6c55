"""Model builders: the subnet S and the global model G of the paper (section 2)."""

import keras

from patchnet_tf.errors import PatchNetError
from patchnet_tf.layers import (
    ConvolutionalPatchwiseSubnet,
    ExtractPatches,
    MeanPatchProbability,
    PatchwiseSubnet,
)


def build_subnet(
    patch_size, *, channels=3, filters=64, conv_layers=7, padding="same", classes=1
):
    """S: (N, p, p, C) patches -> (N, classes) probabilities Q(class | patch).

    conv_layers x (3x3 conv, `filters`, ReLU, He-normal); one linear map per
    filter over the remaining positions (a depthwise "valid" conv does exactly
    that dot product), tanh; a linear head and a sigmoid (softmax when
    classes > 1). Every layer except the final reshape also works on a larger
    image, which is what makes the one-pass heatmap of valid models possible.
    """
    padding = padding.lower()
    if padding not in ("same", "valid"):
        raise PatchNetError(f"padding must be 'same' or 'valid', got {padding!r}")
    if padding == "valid" and patch_size <= 2 * conv_layers:
        raise PatchNetError(
            f"padding='valid' needs patch_size > 2 * conv_layers "
            f"({patch_size} <= {2 * conv_layers}): each valid 3x3 conv trims 2 pixels"
        )
    positions = patch_size if padding == "same" else patch_size - 2 * conv_layers
    patches = keras.Input((patch_size, patch_size, channels), name="patch")
    x = patches
    for index in range(conv_layers):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding=padding,
            activation="relu",
            kernel_initializer="he_normal",
            name=f"conv{index + 1}",
        )(x)
    x = keras.layers.DepthwiseConv2D(positions, padding="valid", name="filter_linear")(x)
    x = keras.layers.Activation("tanh", name="filter_features")(x)
    x = keras.layers.Dense(classes, name="head")(x)
    # float32 even under mixed precision: probabilities near 0 and 1 matter.
    x = keras.layers.Activation(
        "sigmoid" if classes == 1 else "softmax", dtype="float32", name="patch_probability"
    )(x)
    probabilities = keras.layers.Reshape((classes,), name="squeeze")(x)
    return keras.Model(patches, probabilities, name="subnet")


def build_patchnet(
    patch_size,
    *,
    stride=None,
    channels=3,
    filters=64,
    conv_layers=7,
    padding="same",
    region=None,
):
    """G: (B, H, W, C) images in [0, 1] -> (B, 1) P(class 1 | image).

    The image is cut into p x p patches at `stride` (default p, disjoint, with
    zero padding at the border), the shared subnet scores every patch, and the
    image's probability is the mean patch probability.
    """
    if patch_size < 1 or (stride is not None and stride < 1):
        raise PatchNetError(f"patch_size and stride must be positive, got {patch_size}, {stride}")
    subnet = build_subnet(
        patch_size, channels=channels, filters=filters, conv_layers=conv_layers, padding=padding
    )
    images = keras.Input((None, None, channels), name="image")
    if padding == "valid" and (stride or patch_size) < patch_size:
        # Overlapping patches of a valid subnet: the same outputs and gradients,
        # each conv computed once per pixel instead of once per patch.
        patch_probabilities = ConvolutionalPatchwiseSubnet(
            subnet, patch_size, stride, region=region, name="patchwise"
        )(images)
    else:
        patches = ExtractPatches(patch_size, stride, region=region, name="patches")(images)
        patch_probabilities = PatchwiseSubnet(subnet, name="patchwise")(patches)
    probability = MeanPatchProbability(name="probability")(patch_probabilities)
    return PatchNet(images, probability, name="patchnet")


@keras.saving.register_keras_serializable(package="patchnet_tf")
class PatchNet(keras.Model):
    """A functional model whose `get_layer` also finds the wrapped subnet.

    The subnet lives inside the `TimeDistributed`-style wrapper; users (and
    the SPEC) reach it as `model.get_layer("subnet")`.
    """

    def get_layer(self, name=None, index=None):
        for layer in self.layers:
            if isinstance(layer, PatchwiseSubnet) and name == layer.layer.name:
                return layer.layer
        return super().get_layer(name, index)


def patch_geometry(model):
    """(patch_size, padding) of a PatchNet model, read from its subnet."""
    subnet = model.get_layer("subnet")
    patch_size = subnet.input_shape[1]
    padding = subnet.get_layer("conv1").padding if _has_layer(subnet, "conv1") else "same"
    return patch_size, padding


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)
