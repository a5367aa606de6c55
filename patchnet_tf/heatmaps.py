"""Dense heatmaps: the subnet on the patch centred at every pixel (paper Appendix B).

`dense_patch_map` is pure TensorFlow (a `tf.while_loop` over bands of rows,
one band in flight at a time), so the same code runs eagerly behind
`heatmap()` and inside the exported SavedModel's heatmap signature, and its
peak memory is bounded by `chunk_patches`, not by the image size.
"""

import cv2
import keras
import numpy as np
import tensorflow as tf

from patchnet_tf.errors import PatchNetError
from patchnet_tf.model import patch_geometry

DEFAULT_CHUNK_PATCHES = 1024


def check_centred_patch_size(patch_size):
    if patch_size % 2 == 0:
        raise PatchNetError(
            f"centred heatmaps need an odd patch size (a patch centred on a pixel), got {patch_size}"
        )


def dense_patch_map(patch_fn, image, patch_size, stride=1, chunk_patches=DEFAULT_CHUNK_PATCHES):
    """(H, W, C) image -> (H, W, K): `patch_fn` on the zero-padded patch centred at each pixel.

    With stride s only the patches centred at (s*i + s//2, s*j + s//2) are
    evaluated, and each value fills its s x s block (cost about 1/s^2).
    `patch_fn` maps (N, p, p, C) -> (N, K).
    """
    image = tf.convert_to_tensor(image, tf.float32)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    channels = image.shape[-1]
    rows = (height + stride - 1) // stride
    cols = (width + stride - 1) // stride
    half, offset = patch_size // 2, stride // 2
    # Padded so that the patch centred at grid point (i, j) starts at (s*i, s*j).
    padded_height = (rows - 1) * stride + patch_size
    padded_width = (cols - 1) * stride + patch_size
    padded = tf.pad(
        image,
        [
            [half, tf.maximum(padded_height + offset - half - height, 0)],
            [half, tf.maximum(padded_width + offset - half - width, 0)],
            [0, 0],
        ],
    )[offset : offset + padded_height, offset : offset + padded_width]
    band_rows = tf.maximum(1, chunk_patches // cols)
    num_bands = (rows + band_rows - 1) // band_rows

    def band(index, maps):
        first = index * band_rows
        count = tf.minimum(band_rows, rows - first)
        window = padded[first * stride : first * stride + (count - 1) * stride + patch_size]
        patches = tf.image.extract_patches(
            window[None],
            sizes=[1, patch_size, patch_size, 1],
            strides=[1, stride, stride, 1],
            rates=[1, 1, 1, 1],
            padding="VALID",
        )
        patches = tf.reshape(patches, [-1, patch_size, patch_size, channels])
        values = tf.cast(patch_fn(patches), tf.float32)
        return index + 1, maps.write(index, tf.reshape(values, [count, cols, -1]))

    maps = tf.TensorArray(tf.float32, size=num_bands, infer_shape=False)
    _, maps = tf.while_loop(
        lambda index, _: index < num_bands, band, [0, maps], parallel_iterations=1
    )
    grid = maps.concat()
    if stride > 1:
        grid = tf.repeat(tf.repeat(grid, stride, axis=0), stride, axis=1)
    return grid[:height, :width]


def _as_image_batch(images, channels):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != channels:
        raise PatchNetError(
            f"images must be (B, H, W, {channels}) or (H, W, {channels}), got shape {images.shape}"
        )
    return images


def _patch_maps(model, images, feature_layer, stride, chunk_patches):
    patch_size, _ = patch_geometry(model)
    check_centred_patch_size(patch_size)
    if stride < 1:
        raise PatchNetError(f"stride must be >= 1, got {stride}")
    subnet = model.get_layer("subnet")
    images = _as_image_batch(images, subnet.input_shape[-1])
    if feature_layer is None:
        patch_model = subnet
    else:
        patch_model = keras.Model(subnet.input, subnet.get_layer(feature_layer).output)
    patch_fn = tf.function(
        lambda image: dense_patch_map(
            lambda patches: tf.reshape(patch_model(patches, training=False), [tf.shape(patches)[0], -1]),
            image,
            patch_size,
            stride,
            chunk_patches,
        ),
        input_signature=[tf.TensorSpec([None, None, images.shape[-1]], tf.float32)],
    )
    return np.stack([patch_fn(image).numpy() for image in images])


def heatmap(model, images, *, stride=1, chunk_patches=DEFAULT_CHUNK_PATCHES):
    """(B, H, W) float32 in [0, 1]: Q(class 1 | patch centred at each pixel).

    White (1) is class-1 evidence, black (0) class-0 evidence.
    """
    return _patch_maps(model, images, None, stride, chunk_patches)[..., 0]


def filter_heatmaps(model, images, *, stride=1, chunk_patches=DEFAULT_CHUNK_PATCHES):
    """(B, H, W, filters) float32 in [-1, 1]: the subnet's tanh features per centred patch."""
    return _patch_maps(model, images, "filter_features", stride, chunk_patches)


def heatmap_to_gray(heat):
    """(H, W) map in [0, 1] -> uint8 grayscale, white = class 1."""
    return np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)


def heatmap_overlay(image, heat, alpha=0.45, colormap=cv2.COLORMAP_JET):
    """RGB image in [0, 1] (H, W, 3) + map -> BGR uint8 overlay for cv2.imwrite."""
    colour = cv2.applyColorMap(heatmap_to_gray(heat), colormap)
    base = np.clip(np.asarray(image, np.float32) * 255.0, 0, 255).astype(np.uint8)
    if base.ndim == 2 or base.shape[-1] == 1:
        base = cv2.cvtColor(base.reshape(base.shape[:2]), cv2.COLOR_GRAY2BGR)
    else:
        base = cv2.cvtColor(base, cv2.COLOR_RGB2BGR)
    return cv2.addWeighted(colour, alpha, base, 1.0 - alpha, 0.0)
