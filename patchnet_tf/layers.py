"""PatchNet's building blocks as serializable Keras layers.

The whole architecture is three ideas: cut the image into patches
(`ExtractPatches`), run one shared subnet on every patch (`PatchwiseSubnet`),
and average the patch probabilities (`MeanPatchProbability`).
"""

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

Shape = tuple[int | None, ...]


def _pair(value, name):
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return value


def central_crop(images: tf.Tensor, region: tuple[int, int] | None) -> tf.Tensor:
    """The central (height, width) window of (B, H, W, C) images; all of them if region is None.

    Args:
        images: (B, H, W, C) images, H >= height and W >= width.
        region: (height, width) of the window, or None for the whole image.

    Returns:
        (B, height, width, C) images; an odd margin leaves the extra row or
        column at the bottom or right.

    Example:

    >>> tuple(central_crop(np.zeros((1, 8, 10, 3)), (4, 4)).shape)
    (1, 4, 4, 3)
    """
    if region is None:
        return images
    height, width = region
    top = (ops.shape(images)[1] - height) // 2
    left = (ops.shape(images)[2] - width) // 2
    return images[:, top : top + height, left : left + width, :]


@keras.saving.register_keras_serializable(package="patchnet_tf")
class ExtractPatches(keras.layers.Layer):
    """(B, H, W, C) images -> (B, L, p, p, C) patches via `tf.image.extract_patches`.

    `padding="SAME"` zero-pads so that every pixel lies in some patch (the
    paper's Appendix A: 128 x 128, p = 17, stride 17 gives 8 x 8 patches).
    `region=(h, w)` first crops the central h x w window (paper Appendix F),
    so only patches from that region vote. Patches are in row-major order.

    Args:
        patch_size: p, the patch height and width in pixels.
        stride: pixels between the top-left corners of neighbouring patches;
            None means p (disjoint patches).
        padding: "SAME" (zero padding, ceil(H / stride) rows of patches) or
            "VALID" (only patches that fit in the image); either case.
        region: an int or (height, width): crop the central window first;
            None for the whole image.
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Call arguments:
        images: (B, H, W, C) images.

    Example:

    >>> images = np.zeros((2, 12, 12, 3), "float32")
    >>> tuple(ExtractPatches(4)(images).shape)  # 3 x 3 disjoint patches
    (2, 9, 4, 4, 3)
    >>> tuple(ExtractPatches(4, stride=2, padding="valid")(images).shape)
    (2, 25, 4, 4, 3)
    >>> tuple(ExtractPatches(4, region=(8, 8))(images).shape)
    (2, 4, 4, 4, 3)
    """

    def __init__(
        self,
        patch_size: int,
        stride: int | None = None,
        padding: str = "SAME",
        region: int | tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.stride = int(stride or patch_size)
        self.padding = padding.upper()
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
        self.region = _pair(region, "region")

    def call(self, images: tf.Tensor) -> tf.Tensor:
        images = central_crop(images, self.region)
        channels = images.shape[-1]
        patches = tf.image.extract_patches(
            images,
            sizes=[1, self.patch_size, self.patch_size, 1],
            strides=[1, self.stride, self.stride, 1],
            rates=[1, 1, 1, 1],
            padding=self.padding,
        )
        # extract_patches flattens each patch in (row, column, channel) order.
        return tf.reshape(
            patches, [tf.shape(images)[0], -1, self.patch_size, self.patch_size, channels]
        )

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[0], None, self.patch_size, self.patch_size, input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "stride": self.stride,
            "padding": self.padding,
            "region": self.region,
        }


@keras.saving.register_keras_serializable(package="patchnet_tf")
class PatchwiseSubnet(keras.layers.TimeDistributed):
    """`TimeDistributed` over the patch axis, with the patches folded into the batch.

    (B, L, p, p, C) patches -> (B, L, K): the subnet on every patch. Keras 3's
    `TimeDistributed` loops (or vectorizes) over a time axis; the number of
    patches depends on the image size, and one subnet call on B * L patches
    is both exact and what the hardware is good at.

    Args:
        layer: the subnet, (N, p, p, C) patches -> (N, K) probabilities
            (`patchnet_tf.build_subnet`); its weights are shared by all patches.
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Call arguments:
        patches: (B, L, p, p, C) patches, as `ExtractPatches` gives them.
        training: passed on to the subnet.

    Example:

    >>> from patchnet_tf.model import build_subnet
    >>> subnet = build_subnet(4, filters=2, conv_layers=1)
    >>> patches = np.zeros((2, 9, 4, 4, 3), "float32")
    >>> tuple(PatchwiseSubnet(subnet)(patches).shape)
    (2, 9, 1)
    """

    def call(self, patches: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        batch, num_patches = ops.shape(patches)[0], ops.shape(patches)[1]
        flat = ops.reshape(patches, (-1, *patches.shape[2:]))
        outputs = self.layer(flat, training=training)
        return ops.reshape(outputs, (batch, num_patches, *outputs.shape[1:]))


@keras.saving.register_keras_serializable(package="patchnet_tf")
class MeanPatchProbability(keras.layers.Layer):
    """(B, L, K) patch probabilities -> (B, K): P(k | I) = mean_j Q(k | patch_j).

    The mean is over probabilities, not logits (paper section 2). Runs in
    float32 under mixed precision so the model's output and loss are float32.

    Args:
        **kwargs: `keras.layers.Layer` arguments (name, ...); dtype
            defaults to float32 whatever the global policy.

    Call arguments:
        patch_probabilities: (B, L, K) probabilities, one row per patch.

    Example:

    >>> probabilities = np.array([[[0.75], [0.25], [0.5]]], "float32")  # 1 image, 3 patches
    >>> MeanPatchProbability()(probabilities).numpy()
    array([[0.5]], dtype=float32)
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, patch_probabilities: tf.Tensor) -> tf.Tensor:
        return ops.mean(ops.cast(patch_probabilities, "float32"), axis=1)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[0], input_shape[2])


def fully_convolutional_layers(subnet: keras.Model, until: str = "patch_probability") -> list[keras.layers.Layer]:
    """The subnet's layers from `conv1` through `until`, in order, without `squeeze`.

    Every one of them works on an image larger than a patch: the convs and
    the depthwise "per-filter linear map" slide, tanh, the Dense head and the
    sigmoid act per position. On a valid-padded subnet, position (i, j) of
    the result is exactly the subnet on the patch whose top-left corner is
    (i, j) of the input.

    Args:
        subnet: a subnet of `patchnet_tf.build_subnet`.
        until: the name of the last layer to keep ("filter_features" for
            the tanh features).

    Returns:
        The layers, to be applied in order (`apply_fully_convolutional`).

    Example:

    >>> from patchnet_tf.model import build_subnet
    >>> subnet = build_subnet(5, filters=2, conv_layers=1, padding="valid")
    >>> [layer.name for layer in fully_convolutional_layers(subnet)]
    ['conv1', 'filter_linear', 'filter_features', 'head', 'patch_probability']
    """
    layers = [
        layer
        for layer in subnet.layers
        if not isinstance(layer, keras.layers.InputLayer) and layer.name != "squeeze"
    ]
    names = [layer.name for layer in layers]
    if until not in names:
        raise ValueError(f"the subnet has no layer {until!r}; it has {names}")
    return layers[: names.index(until) + 1]


def is_valid_subnet(subnet: keras.Model) -> bool:
    """True when every conv is valid-padded, so the subnet is fully convolutional.

    Example:

    >>> from patchnet_tf.model import build_subnet
    >>> is_valid_subnet(build_subnet(5, conv_layers=1, padding="valid")), is_valid_subnet(build_subnet(5, conv_layers=1))
    (True, False)
    """
    convs = [layer for layer in subnet.layers if isinstance(layer, keras.layers.Conv2D)]
    return all(layer.padding == "valid" for layer in convs)


def apply_fully_convolutional(
    layers: Sequence[keras.layers.Layer], images: tf.Tensor, stride: int = 1
) -> tf.Tensor:
    """Run `fully_convolutional_layers` on (B, h, w, C), keeping every `stride`-th patch.

    The per-filter linear map is evaluated at stride 1 and then subsampled:
    it costs a few percent of the conv stack, and the stride-1 result's
    position (s*i, s*j) is the patch that starts at (s*i, s*j).

    Args:
        layers: `fully_convolutional_layers` of a valid-padded subnet.
        images: (B, h, w, C) images, h and w at least the patch size p.
        stride: keep the patches whose top-left corners are `stride` apart.

    Returns:
        (B, (h - p) // stride + 1, (w - p) // stride + 1, K): the last
        layer's output for the patch starting at each kept position.

    Example:

    >>> from patchnet_tf.model import build_subnet
    >>> subnet = build_subnet(5, filters=2, conv_layers=1, padding="valid")
    >>> maps = apply_fully_convolutional(fully_convolutional_layers(subnet), np.zeros((1, 9, 9, 3), "float32"))
    >>> tuple(maps.shape)  # one probability per 5 x 5 patch
    (1, 5, 5, 1)
    """
    x = images
    for layer in layers:
        x = layer(x)
        if layer.name == "filter_linear" and stride > 1:
            x = x[:, ::stride, ::stride, :]
    return x


@keras.saving.register_keras_serializable(package="patchnet_tf")
class ConvolutionalPatchwiseSubnet(PatchwiseSubnet):
    """(B, H, W, C) images -> (B, L, K): a valid subnet run fully convolutionally.

    Exactly `PatchwiseSubnet(subnet)(ExtractPatches(p, stride, region=region)(images))`
    for a subnet whose convs are all valid-padded (same SAME zero padding,
    same row-major patch order), but every conv output is computed once per
    pixel instead of once per overlapping patch. It pays off when patches
    overlap (stride well below the patch size); at stride = p it computes
    conv outputs on the full image where per-patch evaluation shrinks each
    patch, so it is then slower (bench/train.py measures both).

    Args:
        layer: a subnet whose convs are all padding="valid"
            (`build_subnet(..., padding="valid")`); ValueError otherwise.
        patch_size: p, the subnet's patch size.
        stride: pixels between neighbouring patches; None means p.
        region: an int or (height, width): only the central window's
            patches; None for the whole image.
        **kwargs: `keras.layers.Layer` arguments (name, dtype, ...).

    Call arguments:
        images: (B, H, W, C) images.
        training: accepted for Keras and not used: the subnet's layers
            (convs, tanh, dense) act the same in training and inference.

    Example:

    >>> from patchnet_tf.model import build_subnet
    >>> subnet = build_subnet(5, filters=2, conv_layers=1, padding="valid")
    >>> images = np.random.default_rng(0).random((1, 10, 10, 3), dtype="float32")
    >>> fast = ConvolutionalPatchwiseSubnet(subnet, 5, stride=2)(images)
    >>> per_patch = PatchwiseSubnet(subnet)(ExtractPatches(5, stride=2)(images))
    >>> tuple(fast.shape), bool(np.allclose(fast, per_patch, atol=1e-6))
    ((1, 25, 1), True)
    """

    def __init__(
        self,
        layer: keras.Model,
        patch_size: int,
        stride: int | None = None,
        region: int | tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(layer, **kwargs)
        self.patch_size = int(patch_size)
        self.stride = int(stride or patch_size)
        self.region = _pair(region, "region")
        if not is_valid_subnet(layer):
            raise ValueError(
                "ConvolutionalPatchwiseSubnet needs a subnet with padding='valid' convs; "
                "a 'same'-padded subnet zero-pads every patch and is not fully convolutional"
            )

    def build(self, input_shape: Shape) -> None:
        if not self.layer.built:
            self.layer.build((None, self.patch_size, self.patch_size, input_shape[-1]))
        self.built = True

    def call(self, images: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        images = central_crop(images, self.region)
        # tf.image.extract_patches' SAME rule: ceil(n / s) patches, the padding
        # split with the smaller half first.
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        padded = []
        for size in (height, width):
            count = (size + self.stride - 1) // self.stride
            extent = (count - 1) * self.stride + self.patch_size
            total = tf.maximum(extent - size, 0)
            padded.append((total // 2, total - total // 2, extent))
        (top, bottom, rows), (left, right, cols) = padded
        images = tf.pad(images, [[0, 0], [top, bottom], [left, right], [0, 0]])
        images = images[:, :rows, :cols, :]
        outputs = apply_fully_convolutional(
            fully_convolutional_layers(self.layer), images, self.stride
        )
        return ops.reshape(outputs, (ops.shape(outputs)[0], -1, outputs.shape[-1]))

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return (input_shape[0], None, self.layer.output_shape[-1])

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "stride": self.stride,
            "region": self.region,
        }
