"""The paper's baselines: CAM and Grad-CAM (paper section 3, Appendix C).

Both are plain Keras functional models trained from scratch with the same
loss, optimizer and pipelines as PatchNet; both output (B, 1) P(class 1 | image).

- CAM (Zhou et al. 2016): a VGG-19-style conv stack (2, 2, 4, 4, 4 convs per
  block) with only 3 pooling layers, global average pooling and one linear
  head. The class-1 map is the head-weighted sum of the last conv maps.
- Grad-CAM (Selvaraju et al. 2017) on VGG-11 (1, 1, 2, 2, 2 convs per block,
  5 poolings) with its dense head (two hidden dense layers, dropout). The map
  is ReLU(sum_k alpha_k A_k), alpha_k the spatial mean of the gradient of the
  class-1 logit with respect to the last conv map A_k.

Maps are upsampled bilinearly to the input size and put in [0, 1] with
white (1) = class 1, like PatchNet's heatmaps. Normalisation:

- CAM: sigmoid(head bias + sum_k w_k A_k(x, y)), computed on the upsampled
  logit map. Because the head sits after global average pooling, the image's
  logit is the spatial mean of this logit map, so 0.5 means "as much class-1
  as class-0 evidence here", the same meaning as PatchNet's Q = 0.5, and no
  per-image rescaling is needed (a plain image can stay black).
- Grad-CAM: the ReLU map divided by its maximum over the image (the usual
  Grad-CAM convention; the map's scale, a product of gradients and
  activations, has no absolute meaning). An all-zero map stays all zero. So
  every image with any positive evidence has a pixel at 1.

K classes (`classes=K > 1`, docs/k-classes.md): the head has K outputs and a
softmax; CAM's map of class k is the per-pixel softmax of the K class logit
maps (the image's probabilities are the softmax of their spatial means), and
Grad-CAM's map of class k uses the gradient of logit k. Both give
(B, H, W, K), one map per class.

Widths: `build_cam` / `build_vgg11` default to the paper's sizes (64 filters
in the first block, 4096-unit dense layers); `build(arch, input_shape)`, what
`patchnet train --arch cam|vgg11` calls, defaults to a demo size (width 16)
that trains on 2 CPU cores in a minute or two on 64 x 64 images.
"""

import keras
import numpy as np
import tensorflow as tf

from patchnet_tf.errors import PatchNetError

ARCHS = ("cam", "vgg11")
# Width of the first conv block when `build` is not told otherwise.
DEMO_WIDTH = 16
# Layer names the heatmap code relies on.
CAM_FEATURES = "cam_features"
CAM_HEAD = "cam_head"
GRADCAM_FEATURES = "gradcam_features"
LOGIT = "logit"
PROBABILITY = "probability"

# Convs per block; "M" marks a 2 x 2 max pooling.
_VGG19_THREE_POOLS = ((2, 1), "M", (2, 2), "M", (4, 4), "M", (4, 8), (4, 8))
_VGG11 = ((1, 1), "M", (1, 2), "M", (2, 4), "M", (2, 8), "M", (2, 8), "M")


def _conv_stack(x, layout, width, last_name):
    """VGG blocks: (convs, width multiplier) tuples and "M" poolings."""
    blocks = [item for item in layout if item != "M"]
    block = 0
    for item in layout:
        if item == "M":
            x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
            continue
        block += 1
        convs, multiplier = item
        for index in range(convs):
            last = block == len(blocks) and index == convs - 1
            x = keras.layers.Conv2D(
                width * multiplier,
                3,
                padding="same",
                activation="relu",
                kernel_initializer="he_normal",  # paper Appendix C, all conv layers
                name=last_name if last else f"block{block}_conv{index + 1}",
            )(x)
    return x


def _probability(logit):
    # float32 even under mixed precision: probabilities near 0 and 1 matter.
    activation = "sigmoid" if logit.shape[-1] == 1 else "softmax"
    return keras.layers.Activation(activation, dtype="float32", name=PROBABILITY)(logit)


def build_cam(input_shape: tuple[int, int, int], *, width: int = 64, classes: int = 1) -> keras.Model:
    """CAM: VGG-19 conv layout with 3 poolings, global average pooling, linear head.

    (B, H, W, C) images in [0, 1] -> (B, 1) probability of class 1. The class-1
    map lives at 1/8 of the input resolution.

    Args:
        input_shape: (height, width, channels); height and width divisible by 8.
        width: filters of the first conv block (the paper: 64); the last
            blocks have 8 times as many.
        classes: 1 for the binary model (sigmoid), K > 1 for a softmax over K.

    Returns:
        An uncompiled functional model named "cam".

    Example:

    >>> model = build_cam((32, 32, 3), width=2)
    >>> model.output_shape, model.get_layer("cam_features").output.shape  # the map at 1/8 of the input
    ((None, 1), (None, 4, 4, 16))
    """
    _check_input_shape(input_shape, "cam")
    images = keras.Input(tuple(input_shape), name="image")
    features = _conv_stack(images, _VGG19_THREE_POOLS, width, CAM_FEATURES)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(features)
    logit = keras.layers.Dense(classes, name=CAM_HEAD)(pooled)
    return keras.Model(images, _probability(logit), name="cam")


def build_vgg11(
    input_shape: tuple[int, int, int] = (224, 224, 3),
    *,
    width: int = 64,
    dense_units: int | None = None,
    dropout: float = 0.5,
    classes: int = 1,
) -> keras.Model:
    """VGG-11 (configuration A) for Grad-CAM: 8 convs, 5 poolings, dense head.

    `dense_units` defaults to 64 * width (the paper's 4096 at width 64). The
    paper runs it at 224 x 224; any size divisible by 32 works.

    Args:
        input_shape: (height, width, channels); height and width divisible by 32.
        width: filters of the first conv block (the paper: 64).
        dense_units: units of each of the two hidden dense layers.
        dropout: dropout rate after each hidden dense layer.
        classes: 1 for the binary model (sigmoid), K > 1 for a softmax over K.

    Returns:
        An uncompiled functional model named "vgg11".

    Example:

    >>> model = build_vgg11((32, 32, 3), width=2, dense_units=8, classes=3)
    >>> model.output_shape, model.get_layer("gradcam_features").output.shape
    ((None, 3), (None, 2, 2, 16))
    """
    _check_input_shape(input_shape, "vgg11")
    dense_units = dense_units or 64 * width
    images = keras.Input(tuple(input_shape), name="image")
    features = _conv_stack(images, _VGG11[:-1], width, GRADCAM_FEATURES)
    x = keras.layers.MaxPooling2D(2, name="pool5")(features)
    x = keras.layers.Flatten(name="flatten")(x)
    for index in (1, 2):
        x = keras.layers.Dense(dense_units, activation="relu", name=f"fc{index}")(x)
        x = keras.layers.Dropout(dropout, name=f"dropout{index}")(x)
    logit = keras.layers.Dense(classes, name=LOGIT)(x)
    return keras.Model(images, _probability(logit), name="vgg11")


def build(arch: str, input_shape: tuple[int, int, int], *, width: int | None = None, **kwargs) -> keras.Model:
    """`patchnet train --arch cam|vgg11`: the baseline model, uncompiled.

    `width` is the first block's filter count (the paper: 64); None means
    DEMO_WIDTH.

    Args:
        arch: "cam" or "vgg11" (`ARCHS`); PatchNetError for another.
        input_shape: (height, width, channels).
        width: the first conv block's filters; None for DEMO_WIDTH (16).
        **kwargs: passed to `build_cam` or `build_vgg11` (classes, ...).

    Example:

    >>> build("cam", (16, 16, 3)).name, build("vgg11", (32, 32, 3), width=2).name
    ('cam', 'vgg11')
    """
    width = DEMO_WIDTH if width is None else int(width)
    if arch == "cam":
        return build_cam(input_shape, width=width, **kwargs)
    if arch == "vgg11":
        return build_vgg11(input_shape, width=width, **kwargs)
    raise PatchNetError(f"unknown baseline architecture {arch!r}; expected one of {', '.join(ARCHS)}")


# What each baseline's poolings divide the image by: its height and width must be multiples of it.
SIZE_MULTIPLE = {"cam": 8, "vgg11": 32}


def check_image_size(arch: str, image_size: tuple[int, int]) -> None:
    """Refuses an image size the baseline's poolings cannot halve evenly (before any work starts).

    Example:

    >>> check_image_size("cam", (64, 48))
    >>> check_image_size("vgg11", (64, 48))
    Traceback (most recent call last):
    ...
    patchnet_tf.errors.PatchNetError: vgg11: image size 64x48 must be divisible by 32 (its poolings halve it 5 times)
    """
    multiple = SIZE_MULTIPLE[arch]
    height, width = image_size
    if height % multiple or width % multiple:
        raise PatchNetError(
            f"{arch}: image size {height}x{width} must be divisible by {multiple} "
            f"(its poolings halve it {multiple.bit_length() - 1} times)"
        )


def _check_input_shape(input_shape, arch):
    if len(input_shape) != 3 or any(size is None for size in input_shape[:2]):
        raise PatchNetError(f"{arch}: input_shape must be (height, width, channels), got {input_shape}")
    check_image_size(arch, input_shape[:2])


def _layer_names(model):
    return {layer.name for layer in model.layers}


def arch_of(model: keras.Model) -> str:
    """'patchnet', 'cam' or 'vgg11', from the model's layer names.

    Raises PatchNetError for a model built otherwise.

    Example:

    >>> from patchnet_tf.model import build_patchnet
    >>> arch_of(build("cam", (16, 16, 3), width=2)), arch_of(build_patchnet(5, filters=2, conv_layers=1))
    ('cam', 'patchnet')
    """
    names = _layer_names(model)
    if CAM_FEATURES in names and CAM_HEAD in names:
        return "cam"
    if GRADCAM_FEATURES in names and LOGIT in names:
        return "vgg11"
    if "patchwise" in names or "subnet" in names:
        return "patchnet"
    raise PatchNetError(
        f"model {model.name!r} is neither a PatchNet nor a baseline built by patchnet_tf.baselines"
    )


def _as_batch(model, images):
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        images = images[None]
    expected = tuple(model.input_shape[1:])
    if images.ndim != 4 or any(e is not None and e != got for e, got in zip(expected, images.shape[1:])):
        raise PatchNetError(
            f"{model.name}: images must be (B, {', '.join(str(e) for e in expected)}), got shape {images.shape}"
        )
    return images


def _upsample(maps, size):
    """(B, h, w) -> (B, H, W), bilinear (half-pixel centres)."""
    return tf.image.resize(maps[..., None], size, method="bilinear")[..., 0]


def cam_logit_map(model: keras.Model, images: np.ndarray | tf.Tensor) -> np.ndarray:
    """(B, H, W) float32: head bias + head-weighted sum of the last conv maps, upsampled.

    (B, H, W, K), one logit map per class, for a K-class model. `images` is
    (B, H, W, C) or one (H, W, C) image, at the model's input size.

    Example:

    >>> cam_logit_map(build("cam", (16, 16, 3), width=2, classes=3), np.zeros((16, 16, 3), "float32")).shape
    (1, 16, 16, 3)
    """
    images = _as_batch(model, images)
    features_model = keras.Model(model.input, model.get_layer(CAM_FEATURES).output)
    kernel, bias = model.get_layer(CAM_HEAD).get_weights()
    features = tf.cast(features_model(images, training=False), tf.float32)
    logits = tf.tensordot(features, tf.constant(kernel, tf.float32), axes=1) + tf.constant(bias, tf.float32)
    logits = tf.image.resize(logits, images.shape[1:3], method="bilinear").numpy()
    return logits[..., 0] if logits.shape[-1] == 1 else logits


def cam_heatmap(model: keras.Model, images: np.ndarray | tf.Tensor) -> np.ndarray:
    """(B, H, W) in [0, 1]: sigmoid of `cam_logit_map` (see the module docstring).

    (B, H, W, K), the per-pixel softmax, for a K-class model.

    Example:

    >>> cam_heatmap(build("cam", (16, 16, 3), width=2), np.zeros((2, 16, 16, 3), "float32")).shape
    (2, 16, 16)
    """
    logits = cam_logit_map(model, images)
    if model.get_layer(CAM_HEAD).units == 1:
        return tf.sigmoid(logits).numpy()
    return tf.nn.softmax(logits, axis=-1).numpy()


def gradcam_heatmap(model: keras.Model, images: np.ndarray | tf.Tensor) -> np.ndarray:
    """(B, H, W) in [0, 1]: Grad-CAM of the class-1 logit at the last conv layer.

    (B, H, W, K), Grad-CAM of each class's logit, for a K-class model.

    Example:

    >>> model = build("vgg11", (32, 32, 3), width=2, dense_units=4)
    >>> gradcam_heatmap(model, np.zeros((1, 32, 32, 3), "float32")).shape
    (1, 32, 32)
    """
    images = _as_batch(model, images)
    gradient_model = keras.Model(
        model.input, [model.get_layer(GRADCAM_FEATURES).output, model.get_layer(LOGIT).output]
    )
    images = tf.constant(images)
    classes = model.get_layer(LOGIT).units
    maps = [_gradcam_of(gradient_model, images, klass) for klass in range(classes)]
    return maps[0] if classes == 1 else np.stack(maps, axis=-1)


def _gradcam_of(gradient_model, images, klass):
    with tf.GradientTape() as tape:
        features, logits = gradient_model(images, training=False)
        logit = logits[:, klass]
    # Each image's logit depends only on its own features, so the gradient of
    # the batch sum is the per-image gradient.
    gradients = tf.cast(tape.gradient(logit, features), tf.float32)
    features = tf.cast(features, tf.float32)
    weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)  # alpha_k
    maps = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
    maps = _upsample(maps, images.shape[1:3])
    peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
    return tf.math.divide_no_nan(maps, peak).numpy()


def heatmap(model: keras.Model, images: np.ndarray | tf.Tensor, *, batch_size: int = 32) -> np.ndarray:
    """(B, H, W) float32 in [0, 1], white = class 1, for a CAM or VGG-11 model.

    (B, H, W, K), one map per class, for a K-class one. Computed
    `batch_size` images at a time. A PatchNet model is refused
    (PatchNetError): `patchnet_tf.heatmap` or `patchnet_tf.explain.explain`.

    Example:

    >>> maps = heatmap(build("cam", (16, 16, 3), width=2), np.zeros((3, 16, 16, 3), "float32"), batch_size=2)
    >>> maps.shape, maps.dtype.name
    ((3, 16, 16), 'float32')
    """
    arch = arch_of(model)
    if arch == "patchnet":
        raise PatchNetError("a PatchNet model: use patchnet_tf.heatmap (or patchnet_tf.explain.explain)")
    images = _as_batch(model, images)
    function = cam_heatmap if arch == "cam" else gradcam_heatmap
    maps = [function(model, images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    if not maps:
        classes = model.output_shape[-1]
        return np.zeros((0, *images.shape[1:3], *((classes,) if classes > 1 else ())), np.float32)
    return np.clip(np.concatenate(maps), 0.0, 1.0).astype(np.float32)
