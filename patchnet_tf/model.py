"""Model builders: the subnet S and the global model G of the paper (section 2)."""

import keras

from patchnet_tf.errors import PatchNetError
from patchnet_tf.layers import (
    ConvolutionalPatchwiseSubnet,
    ExtractPatches,
    MeanPatchProbability,
    PatchwiseSubnet,
)

# The subnet's tail after its convs and the average of its patches ("probability" is also the output of the
# CAM and Grad-CAM baselines): a few percent of the FLOPs, kept in float32 when a model is retyped to bfloat16
# (patchnet_tf.precision.with_compute_dtype), so that maps and probabilities keep float32's ranking.
FLOAT32_LAYERS = ("filter_linear", "filter_features", "head", "patch_probability", "squeeze", "probability")


def build_subnet(
    patch_size: int,
    *,
    channels: int = 3,
    filters: int = 64,
    conv_layers: int = 7,
    padding: str = "same",
    classes: int = 1,
) -> keras.Model:
    """S: (N, p, p, C) patches -> (N, classes) probabilities Q(class | patch).

    conv_layers x (3x3 conv, `filters`, ReLU, He-normal); one linear map per
    filter over the remaining positions (a depthwise "valid" conv does exactly
    that dot product), tanh; a linear head and a sigmoid (softmax when
    classes > 1). Every layer except the final reshape also works on a larger
    image, which is what makes the one-pass heatmap of valid models possible.

    Args:
        patch_size: p, the patch height and width in pixels.
        channels: C, the image channels.
        filters: filters of every 3x3 conv.
        conv_layers: how many 3x3 convs.
        padding: "same" (the paper's; every conv keeps p x p) or "valid"
            (each conv trims 2 pixels, so p > 2 * conv_layers; the subnet is
            then fully convolutional and heatmaps take one pass).
        classes: 1 for the binary model (sigmoid), K > 1 for a softmax over K.

    Returns:
        An uncompiled functional model named "subnet".

    Raises:
        PatchNetError: for another padding or a patch too small for valid convs.

    Example:

    >>> subnet = build_subnet(9, filters=4, conv_layers=2)
    >>> subnet.input_shape, subnet.output_shape
    ((None, 9, 9, 3), (None, 1))
    >>> build_subnet(9, filters=2, conv_layers=2, padding="valid").get_layer("filter_linear").kernel_size
    (5, 5)
    """
    padding = padding.lower()
    if padding not in ("same", "valid"):
        raise PatchNetError(f"padding must be 'same' or 'valid', got {padding!r}")
    if patch_size < smallest_patch_size(conv_layers, padding):
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


def smallest_patch_size(conv_layers: int, padding: str) -> int:
    """The smallest patch a subnet of `conv_layers` 3x3 convs takes: each valid conv trims 2 pixels and
    leaves at least one. Commands check their flags with it before they write a run folder.

    Args:
        conv_layers: number of 3x3 convolutions in the subnet.
        padding: "valid" or "same".

    Returns:
        The smallest patch side in pixels.

    Example:
    >>> smallest_patch_size(7, "valid")
    15
    >>> smallest_patch_size(7, "same")
    1
    """
    return 2 * conv_layers + 1 if padding.lower() == "valid" else 1


def build_patchnet(
    patch_size: int,
    *,
    stride: int | None = None,
    channels: int = 3,
    filters: int = 64,
    conv_layers: int = 7,
    padding: str = "same",
    region: int | tuple[int, int] | None = None,
    classes: int = 1,
) -> "PatchNet":
    """G: (B, H, W, C) images in [0, 1] -> (B, classes) probabilities.

    The image is cut into p x p patches at `stride` (default p, disjoint, with
    zero padding at the border), the shared subnet scores every patch, and the
    image's probability is the mean patch probability. `classes=1` is the
    paper's binary model: a sigmoid per patch, output (B, 1) P(class 1 | image),
    trained with binary cross-entropy. `classes=K > 1`: a softmax over K per
    patch, output (B, K) the mean of the patch probability vectors (each row
    sums to 1), trained with categorical cross-entropy (`loss_for`).

    Args:
        patch_size: p, the patch height and width in pixels.
        stride: pixels between neighbouring patches; None means p. A valid
            model with stride < p runs the subnet fully convolutionally
            (`ConvolutionalPatchwiseSubnet`, same outputs, less work).
        channels, filters, conv_layers, padding, classes: as in `build_subnet`.
        region: an int or (height, width): only the central window's patches
            vote (paper Appendix F); None for the whole image.

    Returns:
        An uncompiled `PatchNet` that takes images of any size H, W.

    Raises:
        PatchNetError: for a non-positive patch size, stride or class count,
            and the refusals of `build_subnet`.

    Example:

    >>> model = build_patchnet(5, filters=4, conv_layers=2)
    >>> tuple(model(np.zeros((2, 20, 15, 3), "float32")).shape)
    (2, 1)
    >>> model.get_layer("subnet").output_shape
    (None, 1)
    >>> three = build_patchnet(5, filters=4, conv_layers=2, classes=3)
    >>> tuple(three(np.zeros((1, 10, 10, 3), "float32")).shape)
    (1, 3)
    """
    if patch_size < 1 or (stride is not None and stride < 1):
        raise PatchNetError(f"patch_size and stride must be positive, got {patch_size}, {stride}")
    if classes < 1:
        raise PatchNetError(f"classes must be 1 (binary, sigmoid) or K > 1 (softmax), got {classes}")
    subnet = build_subnet(
        patch_size, channels=channels, filters=filters, conv_layers=conv_layers, padding=padding,
        classes=classes,
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
    docs/python-api.md) reach it as `model.get_layer("subnet")`. Built by
    `build_patchnet`; takes the arguments of a functional `keras.Model`.

    Example:

    >>> model = build_patchnet(5, filters=2, conv_layers=1)
    >>> isinstance(model, PatchNet), model.get_layer("subnet").name
    (True, 'subnet')
    """

    def get_layer(self, name: str | None = None, index: int | None = None) -> keras.layers.Layer:
        """The layer called `name` (the subnet too) or at `index`, as `keras.Model.get_layer`."""
        for layer in self.layers:
            if isinstance(layer, PatchwiseSubnet) and name == layer.layer.name:
                return layer.layer
        return super().get_layer(name, index)


def output_classes(class_count: int) -> int:
    """Model outputs for a dataset of `class_count` classes.

    Two classes are the paper's binary model (one sigmoid output), K > 2 a
    softmax over K. Raises PatchNetError for fewer than two.

    Example:

    >>> output_classes(2), output_classes(5)
    (1, 5)
    """
    if class_count < 2:
        raise PatchNetError(f"a classifier needs at least two classes, got {class_count}")
    return 1 if class_count == 2 else class_count


def class_count(model: keras.Model) -> int:
    """How many classes a model (PatchNet or baseline) tells apart: 2 for a binary model.

    Example:

    >>> [class_count(build_patchnet(5, filters=2, conv_layers=1, classes=k)) for k in (1, 3)]
    [2, 3]
    """
    outputs = model.output_shape[-1]
    return 2 if outputs == 1 else outputs


def loss_for(outputs: int) -> keras.losses.Loss:
    """The training loss of a model with `outputs` probabilities per image.

    Binary cross-entropy on (B, 1) labels for one output, categorical on
    one-hot (B, K) labels for K.

    Example:

    >>> type(loss_for(1)).__name__, type(loss_for(3)).__name__
    ('BinaryCrossentropy', 'CategoricalCrossentropy')
    """
    if outputs == 1:
        return keras.losses.BinaryCrossentropy()
    return keras.losses.CategoricalCrossentropy()


def patch_geometry(model: keras.Model) -> tuple[int, str]:
    """(patch_size, padding) of a PatchNet model, read from its subnet.

    Example:

    >>> patch_geometry(build_patchnet(9, filters=2, conv_layers=2, padding="valid"))
    (9, 'valid')
    """
    subnet = model.get_layer("subnet")
    patch_size = subnet.input_shape[1]
    padding = subnet.get_layer("conv1").padding if _has_layer(subnet, "conv1") else "same"
    return patch_size, padding


def _has_layer(model, name):
    return any(layer.name == name for layer in model.layers)
