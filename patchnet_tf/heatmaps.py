"""Dense heatmaps: the subnet on the patch centred at every pixel (paper Appendix B).

Two exact paths, both pure TensorFlow (a `tf.while_loop` over bands of rows,
one band in flight at a time), so the same code runs eagerly behind
`heatmap()` and inside the exported SavedModel's heatmap signature, and peak
memory is bounded by the band size, not by the image size:

- `dense_patch_map`: cut every centred patch and run the subnet on it. The
  only choice for the paper's padding="same" model, whose convs zero-pad
  each patch on its own: about 196 MFLOP per patch at p = 21 with 7 x 64
  convs, so a stride-1 192 x 256 map is 9.6 TFLOP. Stride s costs about
  1/s^2 of that (s = 2: a quarter; s = 4: a sixteenth) and gives an s x s
  blocky map.
- `dense_valid_map`: for padding="valid" models the subnet on the patch
  centred at (i, j) equals the fully convolutional network (conv stack, the
  per-filter linear map as a depthwise conv, tanh, the head as a 1x1 map,
  sigmoid) at (i, j) of the zero-padded image, so one pass over the image
  gives the whole map: every conv output is computed once per pixel instead
  of once per patch that contains it. Bands overlap by a p - 1 row halo.

`dense_heatmap_fn(model)` picks the path from the model's padding; it is what
`heatmap()`, `filter_heatmaps()` and the export code call.
"""

import collections
import itertools
import os
from collections.abc import Callable, Sequence

import cv2
import keras
import numpy as np
import tensorflow as tf

from patchnet_tf.atomic import write_png
from patchnet_tf.errors import PatchNetError
from patchnet_tf.layers import (
    ConvolutionalPatchwiseSubnet,
    ExtractPatches,
    apply_fully_convolutional,
    fully_convolutional_layers,
)
from patchnet_tf.model import patch_geometry
from patchnet_tf.precision import at_precision

# Patches per subnet call on the per-patch path. bench/heatmap.py on 2 cores
# (p = 21, 7 x 64 convs): 256, 1024 and 4096 give the same throughput within
# the run-to-run noise (610 / 550 / 580 patches/s); 1024 keeps one conv
# activation of that subnet near 115 MB.
DEFAULT_CHUNK_PATCHES = 1024
# Output pixels per band on the one-pass path: a 192 x 256 image is one band;
# a 1024 x 1024 image is 8 bands of 128 rows, about 40 MB per activation.
DEFAULT_BAND_PIXELS = 1 << 17


def check_centred_patch_size(patch_size: int) -> None:
    if patch_size % 2 == 0:
        raise PatchNetError(
            f"centred heatmaps need an odd patch size (a patch centred on a pixel), got {patch_size}"
        )


def _centred_padding(image, patch_size, stride):
    """Zero-pad (H, W, C) so that the patch centred at grid point (i, j) starts at (s*i, s*j).

    Grid point (i, j) is pixel (s*i + s//2, s*j + s//2). Returns the padded
    image and the grid's (rows, cols).
    """
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    rows = (height + stride - 1) // stride
    cols = (width + stride - 1) // stride
    half, offset = patch_size // 2, stride // 2
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
    return padded, rows, cols


def _banded_map(band_fn, image, patch_size, stride, band_rows_for, report_rows=None):
    """Run `band_fn(window, count, cols) -> (count, cols, K)` over bands of grid rows.

    Each band's window is the padded rows its patches need (a p - s row halo
    shared with the next band); the bands are concatenated, each grid value
    fills its s x s block, and the map is cropped to (H, W, K).
    `report_rows(rows)`, if given, makes the op that reports each band's rows
    of the map once they are computed (progress on a large image).
    """
    image = tf.convert_to_tensor(image, tf.float32)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    padded, rows, cols = _centred_padding(image, patch_size, stride)
    band_rows = band_rows_for(cols)
    num_bands = (rows + band_rows - 1) // band_rows

    def band(index, maps):
        first = index * band_rows
        count = tf.minimum(band_rows, rows - first)
        window = padded[first * stride : first * stride + (count - 1) * stride + patch_size]
        values = tf.cast(band_fn(window, count, cols), tf.float32)
        if report_rows is not None:
            with tf.control_dependencies([values]):
                reported = report_rows(tf.minimum(count * stride, height - first * stride))
            with tf.control_dependencies([reported]):
                values = tf.identity(values)
        return index + 1, maps.write(index, tf.reshape(values, [count, cols, -1]))

    maps = tf.TensorArray(tf.float32, size=num_bands, infer_shape=False)
    _, maps = tf.while_loop(
        lambda index, _: index < num_bands, band, [0, maps], parallel_iterations=1
    )
    grid = maps.concat()
    if stride > 1:
        grid = tf.repeat(tf.repeat(grid, stride, axis=0), stride, axis=1)
    return grid[:height, :width]


def dense_patch_map(
    patch_fn: Callable[[tf.Tensor], tf.Tensor],
    image: tf.Tensor,
    patch_size: int,
    stride: int = 1,
    chunk_patches: int = DEFAULT_CHUNK_PATCHES,
    report_rows: Callable | None = None,
) -> tf.Tensor:
    """(H, W, C) image -> (H, W, K): `patch_fn` on the zero-padded patch centred at each pixel.

    With stride s only the patches centred at (s*i + s//2, s*j + s//2) are
    evaluated, and each value fills its s x s block (cost about 1/s^2).
    `patch_fn` maps (N, p, p, C) -> (N, K). At most about `chunk_patches`
    patches (at least one grid row) go to `patch_fn` at a time.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    channels = image.shape[-1]

    def band_fn(window, count, cols):
        patches = tf.image.extract_patches(
            window[None],
            sizes=[1, patch_size, patch_size, 1],
            strides=[1, stride, stride, 1],
            rates=[1, 1, 1, 1],
            padding="VALID",
        )
        return patch_fn(tf.reshape(patches, [-1, patch_size, patch_size, channels]))

    return _banded_map(
        band_fn, image, patch_size, stride, lambda cols: tf.maximum(1, chunk_patches // cols), report_rows
    )


def dense_valid_map(
    subnet: keras.Model,
    image: tf.Tensor,
    stride: int = 1,
    *,
    until: str = "patch_probability",
    band_pixels: int = DEFAULT_BAND_PIXELS,
    report_rows: Callable | None = None,
) -> tf.Tensor:
    """(H, W, C) image -> (H, W, K) in one fully convolutional pass of a padding="valid" subnet.

    Equal (to float32 rounding) to `dense_patch_map(subnet, image, p, stride)`:
    the padded window of a band is run through the subnet's layers from
    `conv1` to `until` ("patch_probability" for the heatmap,
    "filter_features" for the filter heatmaps). About `band_pixels` grid
    points (at least one row) are computed per band.
    """
    patch_size = subnet.input_shape[1]
    layers = fully_convolutional_layers(subnet, until)

    def band_fn(window, count, cols):
        return apply_fully_convolutional(layers, window[None], stride)[0]

    return _banded_map(
        band_fn, image, patch_size, stride, lambda cols: tf.maximum(1, band_pixels // cols), report_rows
    )


def dense_heatmap_fn(
    model: keras.Model,
    *,
    stride: int = 1,
    feature_layer: str | None = None,
    chunk_patches: int = DEFAULT_CHUNK_PATCHES,
    band_pixels: int = DEFAULT_BAND_PIXELS,
    report_rows: Callable | None = None,
) -> Callable[[tf.Tensor], tf.Tensor]:
    """A graph-mode callable (H, W, C) float32 -> (H, W) heatmap of a binary model,
    (H, W, K) heatmaps of a K-class model (one per class), or (H, W, F) features.

    Pure TensorFlow ops, no XLA, so it can be traced into a SavedModel
    signature as it is. padding="valid" models take the one-pass path
    (`dense_valid_map`), padding="same" models the per-patch path
    (`dense_patch_map`); both are exact. `feature_layer=None` gives the class-1
    heatmap; `"filter_features"` gives the (H, W, filters) filter heatmaps.
    `report_rows` is `_banded_map`'s progress hook.
    """
    patch_size, padding = patch_geometry(model)
    check_centred_patch_size(patch_size)
    if stride < 1:
        raise PatchNetError(f"stride must be >= 1, got {stride}")
    subnet = model.get_layer("subnet")

    if padding == "valid":
        if feature_layer not in (None, "filter_linear", "filter_features", "head", "patch_probability"):
            raise PatchNetError(
                f"feature_layer must be at or after 'filter_linear' (one value per patch), got {feature_layer!r}"
            )

        def dense_map(image):
            return dense_valid_map(
                subnet, image, stride, until=feature_layer or "patch_probability",
                band_pixels=band_pixels, report_rows=report_rows,
            )

    else:
        if feature_layer is None:
            patch_model = subnet
        else:
            patch_model = keras.Model(subnet.input, subnet.get_layer(feature_layer).output)

        def patch_fn(patches):
            return tf.reshape(patch_model(patches, training=False), [tf.shape(patches)[0], -1])

        def dense_map(image):
            return dense_patch_map(patch_fn, image, patch_size, stride, chunk_patches, report_rows)

    if feature_layer is None and subnet.output_shape[-1] == 1:
        return lambda image: dense_map(image)[..., 0]
    return dense_map


def _as_image_batch(images, channels):
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != channels:
        raise PatchNetError(
            f"images must be (B, H, W, {channels}) or (H, W, {channels}), got shape {images.shape}"
        )
    return images


# Traced heatmap functions, so repeated heatmap() calls on one model do not
# retrace. Bounded, and each entry keeps its subnet to check identity (ids of
# collected models can be reused).
_TRACED = collections.OrderedDict()
_TRACED_MAX = 8


# Progress listeners of running heatmap(on_rows=...) calls, by id: the traced
# function takes the id as an input, so one trace serves every call.
_ROW_LISTENERS = {}
_listener_ids = itertools.count()


def _call_row_listener(listener, rows):
    _ROW_LISTENERS[int(listener)](int(rows))
    return np.int32(0)


def _traced_map_fn(model, channels, with_progress, **options):
    """A tf.function (image) -> map, or (image, listener id) -> map that calls the listener per band."""
    subnet = model.get_layer("subnet")
    key = (id(subnet), channels, with_progress, tuple(sorted(options.items())))
    entry = _TRACED.get(key)
    if entry is None or entry[0] is not subnet:
        image_spec = tf.TensorSpec([None, None, channels], tf.float32)
        if with_progress:
            def map_fn(image, listener):
                def report_rows(rows):
                    return tf.py_function(_call_row_listener, [listener, rows], tf.int32)

                return dense_heatmap_fn(model, report_rows=report_rows, **options)(image)

            function = tf.function(map_fn, input_signature=[image_spec, tf.TensorSpec([], tf.int64)])
        else:
            function = tf.function(dense_heatmap_fn(model, **options), input_signature=[image_spec])
        entry = _TRACED[key] = (subnet, function)
        while len(_TRACED) > _TRACED_MAX:
            _TRACED.popitem(last=False)
    _TRACED.move_to_end(key)
    return entry[1]


def _patch_maps(model, images, feature_layer, stride, chunk_patches, band_pixels, on_rows, precision):
    if precision is not None:
        model = at_precision(model, precision)
    # dense_heatmap_fn checks the patch size and stride when the function is first traced.
    images = _as_image_batch(images, model.get_layer("subnet").input_shape[-1])
    map_fn = _traced_map_fn(
        model,
        images.shape[-1],
        on_rows is not None,
        stride=stride,
        feature_layer=feature_layer,
        chunk_patches=chunk_patches,
        band_pixels=band_pixels,
    )
    if on_rows is None:
        return np.stack([map_fn(image).numpy() for image in images]).astype(np.float32, copy=False)
    listener = next(_listener_ids)
    _ROW_LISTENERS[listener] = on_rows
    try:
        return np.stack([map_fn(image, tf.constant(listener, tf.int64)).numpy() for image in images]).astype(
            np.float32, copy=False)
    finally:
        del _ROW_LISTENERS[listener]


def heatmap(
    model: keras.Model,
    images: np.ndarray,
    *,
    stride: int = 1,
    chunk_patches: int = DEFAULT_CHUNK_PATCHES,
    band_pixels: int = DEFAULT_BAND_PIXELS,
    on_rows: Callable[[int], object] | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """(B, H, W) float32 in [0, 1]: Q(class 1 | patch centred at each pixel).

    White (1) is class-1 evidence, black (0) class-0 evidence. A K-class model
    (`build_patchnet(..., classes=K)`) gives (B, H, W, K): Q(k | patch), one
    map per class, summing to 1 at every pixel. padding="valid"
    models are computed in one fully convolutional pass per band (exact, about
    100x faster than per patch); padding="same" models per patch, where stride
    s costs about 1/s^2 of the stride-1 map. `on_rows(n)`, if given, is
    called as each band of n rows of a map is done: progress on large images.
    `precision` ("auto", "float32", "bfloat16"; `patchnet_tf.precision.at_precision`)
    computes the maps in that precision; None, the default, as the model computes.
    The maps are float32 either way.

    Example:
    >>> from patchnet_tf.model import build_patchnet
    >>> images = np.zeros((2, 12, 16, 3), "float32")
    >>> heatmap(build_patchnet(5, filters=2, conv_layers=1), images).shape
    (2, 12, 16)
    >>> heatmap(build_patchnet(5, filters=2, conv_layers=1, classes=3), images, stride=2).shape
    (2, 12, 16, 3)
    """
    return _patch_maps(model, images, None, stride, chunk_patches, band_pixels, on_rows, precision)


def _patch_grid(model):
    """(patch_size, stride, padding, region) of the patches a PatchNet's classifier averages;
    None for a model without them (CAM, VGG-11)."""
    for layer in model.layers:
        if isinstance(layer, ExtractPatches):
            return layer.patch_size, layer.stride, layer.padding, layer.region
        if isinstance(layer, ConvolutionalPatchwiseSubnet):  # tf.image.extract_patches' SAME grid
            return layer.patch_size, layer.stride, "SAME", layer.region
    return None


def _axis_centres(size, patch_size, stride, padding, region, map_stride):
    """The classifier's patch centres along one image axis of `size` pixels; raises PatchNetError."""
    if region is not None and region > size:
        raise PatchNetError(f"the model's region ({region}) is larger than the image ({size})")
    crop = size if region is None else region
    offset = (size - crop) // 2  # layers.central_crop
    if padding == "SAME":  # ceil(n / s) patches, the zero padding split with the smaller half first
        count = -(-crop // stride)
        total = max((count - 1) * stride + patch_size - crop, 0)
        before, after = total // 2, total - total // 2
    else:
        count = (crop - patch_size) // stride + 1 if crop >= patch_size else 0
        before = after = 0
    if count < 1:
        raise PatchNetError(f"the image ({size}) is smaller than a patch ({patch_size}): the model has no patch")
    if (before and offset > 0) or (after and offset + crop < size):
        raise PatchNetError("the model zero-pads patches at the border of its region, where the map sees the "
                            "image's pixels")
    # Patch i covers crop rows i*s - before ... i*s - before + p - 1; p is odd, so it has a centre pixel,
    # and with at most (p - 1) / 2 rows of padding on a side that centre is inside the image.
    centres = offset + np.arange(count) * stride - before + patch_size // 2
    if np.any(centres % map_stride != map_stride // 2):
        raise PatchNetError(f"the map's stride {map_stride} does not evaluate the classifier's patch centres")
    return centres


def map_patch_centres(model: keras.Model, height: int, width: int, *, stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Where the classifier's patches sit in a heatmap: the pixels they are centred on.

    PatchNet's image probability is the mean of the probabilities of the
    patches `ExtractPatches` cuts (stride s, SAME zero padding split with the
    smaller half first, or VALID; after `region`'s central crop), and a
    heatmap holds, at every pixel, the probability of the zero-padded patch
    centred there. So the map holds every classifier patch of a `same` or
    `valid` model at any image size and model stride: patch i along an axis
    is centred at i*s - pad_before + p // 2, always inside the image. A map of
    stride t holds the patch centred at c when c % t == t // 2.

    Args:
        model: a PatchNet (`build_patchnet`).
        height, width: the size of the images the maps are of.
        stride: the maps' stride (`heatmap(..., stride=)`).

    Returns:
        (rows, cols): int arrays; the classifier's patches are centred at
        every (rows[i], cols[j]), in its row-major order.

    Raises:
        PatchNetError, with the reason, where the map does not hold them:
        a model without patches (CAM, VGG-11); a map stride that misses
        patch centres; a `region` whose border patches the model zero-pads
        where the map sees image pixels, or larger than the image; an image
        smaller than a VALID patch (the model has no patch to average).
    """
    grid = _patch_grid(model)
    if grid is None:
        raise PatchNetError("the model is not a PatchNet: it has no patches to read from a map")
    patch_size, model_stride, padding, region = grid
    check_centred_patch_size(patch_size)
    region = region or (None, None)
    return tuple(
        _axis_centres(size, patch_size, model_stride, padding, crop, stride)
        for size, crop in ((height, region[0]), (width, region[1]))
    )


def probability_from_map(
    model: keras.Model, maps: np.ndarray | tf.Tensor, *, stride: int = 1, images: np.ndarray | tf.Tensor | None = None
) -> np.ndarray | tf.Tensor:
    """The model's output on the images, read from their heatmaps: the mean of the map at the
    classifier's patch centres (`map_patch_centres`), with no second model call.

    Equal to `model(images)` to float32 rounding: the map's value at a patch
    centre is the subnet on that very patch (exact on both heatmap paths),
    and the mean is taken over the same (B, L, K) values in the same order
    as `MeanPatchProbability`. Works eagerly and inside a `tf.function`.

    Args:
        model: a PatchNet, or any classifier when `images` is given.
        maps: (B, H, W) maps of a binary model or (B, H, W, K) of a K-class
            model, as `heatmap(model, images, stride=stride)` returns them.
        stride: the maps' stride.
        images: the model inputs the maps are of; where the maps do not hold
            the classifier's patches (see `map_patch_centres`' Raises), the
            probability is `model(images)`, one model call.

    Returns:
        (B, 1) float32 P(class 1 | image) of a binary model, (B, K) of a
        K-class model, like `model(images)`; numpy when run eagerly.

    Raises:
        PatchNetError: the maps do not hold the patches and `images` is None.
    """
    height, width = maps.shape[1], maps.shape[2]
    try:
        rows, cols = map_patch_centres(model, height, width, stride=stride)
    except PatchNetError:
        if images is None:
            raise
        probabilities = tf.cast(model(images, training=False), tf.float32)
    else:
        maps = tf.convert_to_tensor(maps, tf.float32)
        if maps.shape.rank == 3:
            maps = maps[..., None]
        values = tf.gather(tf.gather(maps, rows, axis=1), cols, axis=2)
        probabilities = tf.reduce_mean(tf.reshape(values, [tf.shape(maps)[0], -1, maps.shape[-1]]), axis=1)
    return probabilities.numpy() if tf.executing_eagerly() else probabilities


def filter_heatmaps(
    model: keras.Model,
    images: np.ndarray,
    *,
    stride: int = 1,
    chunk_patches: int = DEFAULT_CHUNK_PATCHES,
    band_pixels: int = DEFAULT_BAND_PIXELS,
    on_rows: Callable[[int], object] | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """(B, H, W, filters) float32 in [-1, 1]: the subnet's tanh features per centred patch
    (`on_rows` and `precision` as in `heatmap`).

    Example:
    >>> from patchnet_tf.model import build_patchnet
    >>> features = filter_heatmaps(build_patchnet(5, filters=2, conv_layers=1), np.zeros((1, 8, 8, 3), "float32"))
    >>> features.shape, bool(np.all(np.abs(features) <= 1))
    ((1, 8, 8, 2), True)
    """
    return _patch_maps(model, images, "filter_features", stride, chunk_patches, band_pixels, on_rows, precision)


def heatmap_to_gray(heat: np.ndarray) -> np.ndarray:
    """(H, W) map in [0, 1] -> uint8 grayscale, white = class 1."""
    return np.round(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)


# Class colours of the combined K-class map (RGB): class 0 black, as in the
# binary map, then red, green, blue, ...; more classes than colours repeat them.
CLASS_COLOURS = np.array(
    [(0, 0, 0), (230, 25, 25), (25, 200, 25), (40, 90, 255), (255, 220, 0), (220, 0, 220), (0, 220, 220),
     (255, 140, 0), (255, 255, 255)],
    np.float32,
)


def class_colour_map(maps: np.ndarray) -> np.ndarray:
    """(H, W, K) class maps summing to 1 -> RGB uint8 (H, W, 3): the probability-weighted
    mix of the class colours (`CLASS_COLOURS`), so a pure colour is one class's certain evidence."""
    maps = np.clip(np.asarray(maps, np.float32), 0.0, 1.0)
    colours = CLASS_COLOURS[np.arange(maps.shape[-1]) % len(CLASS_COLOURS)]
    return np.round(np.clip(maps @ colours, 0, 255)).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """RGB image in [0, 1] (H, W, 3) + map -> BGR uint8 overlay for cv2.imwrite."""
    colour = cv2.applyColorMap(heatmap_to_gray(heat), colormap)
    base = np.clip(np.asarray(image, np.float32) * 255.0, 0, 255).astype(np.uint8)
    if base.ndim == 2 or base.shape[-1] == 1:
        base = cv2.cvtColor(base.reshape(base.shape[:2]), cv2.COLOR_GRAY2BGR)
    else:
        base = cv2.cvtColor(base, cv2.COLOR_RGB2BGR)
    return cv2.addWeighted(colour, alpha, base, 1.0 - alpha, 0.0)


CLASSES_SUFFIX = "-classes.png"  # K classes: the combined colour map


def png_suffixes(class_names: Sequence[str], *, overlays: bool = True) -> list[str]:
    """The file name suffixes of the heatmap PNGs of one image: `-heatmap.png` and `-overlay.png`;
    for K > 2 classes `-heatmap-<class>.png` and `-overlay-<class>.png` per class, then
    `-classes.png`, one colour per class. `overlays=False` (no image to draw on) leaves out the overlays."""
    kinds = ("heatmap", "overlay") if overlays else ("heatmap",)
    if len(class_names) <= 2:
        return [f"-{kind}.png" for kind in kinds]
    return [f"-{kind}-{name}.png" for name in class_names for kind in kinds] + [CLASSES_SUFFIX]


def heatmap_pngs(heat: np.ndarray, class_names: Sequence[str], image: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{file name suffix (`png_suffixes`): uint8 pixels} for one (H, W) or (H, W, K) map; with
    `image` (RGB in [0, 1], the map's size) also the overlays on it."""
    maps = heat[..., None] if heat.ndim == 2 else heat
    pixels = []
    for klass in range(maps.shape[-1]):
        pixels.append(heatmap_to_gray(maps[..., klass]))
        if image is not None:
            pixels.append(heatmap_overlay(image, maps[..., klass]))
    if heat.ndim == 3:
        pixels.append(cv2.cvtColor(class_colour_map(heat), cv2.COLOR_RGB2BGR))
    return dict(zip(png_suffixes(class_names, overlays=image is not None), pixels, strict=True))


def write_heatmap_pngs(
    prefix: str, heat: np.ndarray, class_names: Sequence[str], image: np.ndarray | None = None
) -> list[str]:
    """Writes one image's `heatmap_pngs` to PREFIX + suffix, each atomically; returns the paths.

    The one writer of `patchnet heatmap`, `bulk` and `predict`, so their files have the same names."""
    written = []
    for suffix, pixels in heatmap_pngs(heat, class_names, image).items():
        write_png(prefix + suffix, pixels)
        written.append(prefix + suffix)
    return written


def output_stems(paths: Sequence[str]) -> list[str]:
    """One distinct file stem per input path, for the PNGs written about it.

    The file's own stem; where two inputs share one (a/x.png, b/x.png) their
    folder's name goes in front (a-x, b-x), and a number after if they still clash.
    """
    stems = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    shared = collections.Counter(stems)
    stems = [
        f"{os.path.basename(os.path.dirname(os.path.abspath(path)))}-{stem}" if shared[stem] > 1 else stem
        for path, stem in zip(paths, stems)
    ]
    seen = collections.Counter()
    unique = []
    for stem in stems:
        seen[stem] += 1
        unique.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return unique
