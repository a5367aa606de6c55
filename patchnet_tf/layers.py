"""PatchNet's building blocks as serializable Keras layers.

The whole architecture is three ideas: cut the image into patches
(`ExtractPatches`), run one shared subnet on every patch (`PatchwiseSubnet`),
and average the patch probabilities (`MeanPatchProbability`).
"""

import keras
import tensorflow as tf
from keras import ops


def _pair(value, name):
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    return value


def central_crop(images, region):
    """The central (height, width) window of (B, H, W, C) images; all of them if region is None."""
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
    so only patches from that region vote.
    """

    def __init__(self, patch_size, stride=None, padding="SAME", region=None, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = int(patch_size)
        self.stride = int(stride or patch_size)
        self.padding = padding.upper()
        if self.padding not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
        self.region = _pair(region, "region")

    def call(self, images):
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

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, self.patch_size, self.patch_size, input_shape[-1])

    def get_config(self):
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

    Keras 3's `TimeDistributed` loops (or vectorizes) over a time axis; the
    number of patches depends on the image size, and one subnet call on
    B * L patches is both exact and what the hardware is good at.
    """

    def call(self, patches, training=None):
        batch, num_patches = ops.shape(patches)[0], ops.shape(patches)[1]
        flat = ops.reshape(patches, (-1, *patches.shape[2:]))
        outputs = self.layer(flat, training=training)
        return ops.reshape(outputs, (batch, num_patches, *outputs.shape[1:]))


@keras.saving.register_keras_serializable(package="patchnet_tf")
class MeanPatchProbability(keras.layers.Layer):
    """(B, L, K) patch probabilities -> (B, K): P(k | I) = mean_j Q(k | patch_j).

    The mean is over probabilities, not logits (paper section 2). Runs in
    float32 under mixed precision so the model's output and loss are float32.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, patch_probabilities):
        return ops.mean(ops.cast(patch_probabilities, "float32"), axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def fully_convolutional_layers(subnet, until="patch_probability"):
    """The subnet's layers from `conv1` through `until`, in order, without `squeeze`.

    Every one of them works on an image larger than a patch: the convs and
    the depthwise "per-filter linear map" slide, tanh, the Dense head and the
    sigmoid act per position. On a valid-padded subnet, position (i, j) of
    the result is exactly the subnet on the patch whose top-left corner is
    (i, j) of the input.
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


def is_valid_subnet(subnet):
    """True when every conv is valid-padded, so the subnet is fully convolutional."""
    convs = [layer for layer in subnet.layers if isinstance(layer, keras.layers.Conv2D)]
    return all(layer.padding == "valid" for layer in convs)


def apply_fully_convolutional(layers, images, stride=1):
    """Run `fully_convolutional_layers` on (B, h, w, C), keeping every `stride`-th patch.

    The per-filter linear map is evaluated at stride 1 and then subsampled:
    it costs a few percent of the conv stack, and the stride-1 result's
    position (s*i, s*j) is the patch that starts at (s*i, s*j).
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
    """

    def __init__(self, layer, patch_size, stride=None, region=None, **kwargs):
        super().__init__(layer, **kwargs)
        self.patch_size = int(patch_size)
        self.stride = int(stride or patch_size)
        self.region = _pair(region, "region")
        if not is_valid_subnet(layer):
            raise ValueError(
                "ConvolutionalPatchwiseSubnet needs a subnet with padding='valid' convs; "
                "a 'same'-padded subnet zero-pads every patch and is not fully convolutional"
            )

    def build(self, input_shape):
        if not self.layer.built:
            self.layer.build((None, self.patch_size, self.patch_size, input_shape[-1]))
        self.built = True

    def call(self, images, training=None):
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

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, self.layer.output_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "patch_size": self.patch_size,
            "stride": self.stride,
            "region": self.region,
        }
