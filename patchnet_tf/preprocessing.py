"""Preprocessing as TensorFlow ops, shared by training and the exported graph.

One implementation on purpose: the SavedModel's signatures call exactly these
functions, so what the server sees is what training saw (no skew).
Images are float32 in [0, 1] after `decode_image`.
"""

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Self

import numpy as np
import tensorflow as tf

from patchnet_tf.errors import PatchNetError

CONFIG_NAME = "preprocessing.json"


def decode_image(image_bytes: bytes | tf.Tensor, channels: int = 3) -> tf.Tensor:
    """Encoded JPEG/PNG/BMP/GIF bytes -> float32 (H, W, channels) in [0, 1].

    Example:

    >>> png = tf.io.encode_png(tf.fill((4, 6, 3), tf.constant(255, tf.uint8)))
    >>> image = decode_image(png)
    >>> tuple(image.shape), image.dtype.name, float(image[0, 0, 0])
    ((4, 6, 3), 'float32', 1.0)
    """
    image = tf.io.decode_image(image_bytes, channels=channels, expand_animations=False)
    return tf.image.convert_image_dtype(image, tf.float32)


# Leading bytes that hold every size field read below (BMP's height ends at byte 26).
_HEADER_BYTES = 26


def _header_integer(head, offset, length, big_endian):
    """The unsigned integer of `length` bytes at `offset` in each row of `head` (int64 [B, N])."""
    positions = list(range(offset, offset + length))
    value = tf.zeros_like(head[:, 0])
    for position in positions if big_endian else reversed(positions):
        value = value * 256 + head[:, position]
    return value


def _jpeg_size(data):
    """(width, height) of one JPEG from its SOFn marker, by libjpeg's own header parser; (0, 0) for other formats."""
    return tf.cond(
        tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff"),
        lambda: tf.reverse(tf.io.extract_jpeg_shape(data, output_type=tf.int64)[:2], [0]),
        lambda: tf.zeros([2], tf.int64),
    )


def encoded_image_size(image_bytes: tf.Tensor) -> tf.Tensor:
    """[B] encoded images -> int64 [B, 2] (width, height) read from each header; nothing is decoded.

    PNG: IHDR, bytes 16-24, big-endian (libpng refuses a file whose first chunk is not IHDR). BMP: the
    info header, bytes 18-26, little-endian and signed (a negative height is a top-down image), as
    TF's BMP decoder reads them. GIF: the logical screen, bytes 6-10, the size TF decodes a frame to.
    JPEG: the SOFn marker (`tf.io.extract_jpeg_shape`, the decoder's parser, so both agree).
    Another format, or a PNG, BMP or GIF header cut short, reads as 0 x 0 and is left to the decoder
    to refuse with its own message.

    Example:

    >>> png = tf.io.encode_png(tf.zeros((4, 6, 3), tf.uint8))
    >>> encoded_image_size(tf.stack([png, b"not an image"])).numpy().tolist()
    [[6, 4], [0, 0]]
    """
    padding = tf.constant(b"\0" * _HEADER_BYTES)
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(image_bytes, 0, _HEADER_BYTES), padding]),
                             0, _HEADER_BYTES)
    head = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
    magic = tf.strings.substr(image_bytes, 0, 4)
    png = tf.stack([_header_integer(head, 16, 4, True), _header_integer(head, 20, 4, True)], axis=1)
    signed = tf.stack([_header_integer(head, 18, 4, False), _header_integer(head, 22, 4, False)], axis=1)
    bmp = tf.abs(tf.where(signed >= 2**31, signed - 2**32, signed))
    gif = tf.stack([_header_integer(head, 6, 2, False), _header_integer(head, 8, 2, False)], axis=1)
    jpeg = tf.map_fn(_jpeg_size, image_bytes, fn_output_signature=tf.TensorSpec([2], tf.int64))
    size = tf.zeros_like(png)
    for prefix, format_size in ((b"\x89PNG", png), (b"BM", bmp), (b"GIF8", gif), (b"\xff\xd8\xff", jpeg)):
        matches = tf.equal(tf.strings.substr(magic, 0, len(prefix)), prefix)
        size = tf.where(matches[:, None], format_size, size)
    return size


def resize(images: np.ndarray | tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Bilinear resize to (height, width); values stay in [0, 1].

    Antialiased, so a shrunk image does not alias. `images` is (H, W, C)
    or (B, H, W, C).

    Example:

    >>> tuple(resize(np.zeros((1, 10, 20, 3), "float32"), (5, 5)).shape)
    (1, 5, 5, 3)
    """
    return tf.clip_by_value(tf.image.resize(images, image_size, antialias=True), 0.0, 1.0)


def gamma_correct(images: np.ndarray | tf.Tensor, gamma: float) -> tf.Tensor:
    """I ** (1 / gamma): gamma 2.2 brightens dark dermoscopy images (paper section 3).

    Example:

    >>> gamma_correct(np.array([0.25, 1.0], "float32"), 0.5).numpy()
    array([0.0625, 1.    ], dtype=float32)
    """
    return tf.pow(tf.maximum(images, 0.0), 1.0 / gamma)


def shades_of_gray(images: np.ndarray | tf.Tensor, norm: float = 6.0, epsilon: float = 1e-6) -> tf.Tensor:
    """Shades of Gray colour constancy (Finlayson and Trezzi 2004; Barata et al. 2015).

    The illuminant per channel is the Minkowski p-norm mean of the pixels;
    each channel is scaled so that the illuminant becomes neutral grey with
    the same overall brightness, then clipped to [0, 1].

    Args:
        images: float (H, W, C) or (B, H, W, C) images in [0, 1]; each image
            gets its own illuminant.
        norm: p of the Minkowski mean (1 is grey world, infinity max-RGB).
        epsilon: keeps a black channel from dividing by zero.

    Example:

    >>> reddish = np.full((1, 2, 2, 3), [0.6, 0.3, 0.3], "float32")
    >>> shades_of_gray(reddish).numpy()[0, 0, 0].round(2)  # grey, |illuminant| / sqrt(3)
    array([0.42, 0.42, 0.42], dtype=float32)
    """
    illuminant = tf.pow(
        tf.reduce_mean(tf.pow(tf.maximum(images, 0.0), norm), axis=[-3, -2], keepdims=True),
        1.0 / norm,
    )
    gain = tf.norm(illuminant, axis=-1, keepdims=True) / (
        tf.sqrt(tf.cast(tf.shape(images)[-1], images.dtype)) * illuminant + epsilon
    )
    return tf.clip_by_value(images * gain, 0.0, 1.0)


def channel_statistics(
    batches: Iterable[np.ndarray | tf.Tensor],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, standard deviation) over every pixel of an iterable of (B, H, W, C) batches.

    Accumulated in float64 one batch at a time, so a dataset need not fit in
    memory. A constant channel gets standard deviation 1, not 0. Raises
    PatchNetError when there are no images.

    Example:

    >>> channel_statistics([np.full((2, 4, 4, 1), 0.5, "float32"), np.zeros((2, 4, 4, 1), "float32")])
    ((0.25,), (0.25,))
    """
    count, total, squares = 0, 0.0, 0.0
    for images in batches:
        images = tf.cast(images, tf.float64)
        count += tf.reduce_prod(tf.shape(images)[:-1]).numpy()
        total += tf.reduce_sum(images, axis=[0, 1, 2]).numpy()
        squares += tf.reduce_sum(tf.square(images), axis=[0, 1, 2]).numpy()
    if not count:
        raise PatchNetError("no images to compute the normalization statistics from")
    mean = total / count
    std = (squares / count - mean**2).clip(min=0.0) ** 0.5
    # A constant channel would divide by zero; leave its scale alone.
    return tuple(float(value) for value in mean), tuple(float(value) if value > 1e-6 else 1.0 for value in std)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What turns a decoded image into model input; saved beside every model.

    `prepare` gives the image a person looks at (resized, gamma, colour
    constancy; [0, 1]); `normalize` then standardizes each channel with the
    training split's `mean` and `std`, which is what the model sees. Runs
    saved before normalization existed have no statistics and skip it.

    Args:
        image_size: (height, width) of the model input.
        channels: channels images are decoded to.
        gamma: `gamma_correct` with this gamma; None to skip.
        shades_of_gray_norm: `shades_of_gray` with this norm; None to skip.
        class_names: the dataset's classes, in the model's output order.
        mean, std: per-channel statistics of the training split
            (`channel_statistics`); None to skip normalization.

    Example:

    >>> preprocessing = Preprocessing(image_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    >>> inputs = preprocessing(np.full((20, 30, 3), 0.75, "float32"))
    >>> tuple(inputs.shape), round(float(inputs[0, 0, 0]), 4)
    ((8, 8, 3), 1.0)
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     preprocessing.save(folder)
    ...     Preprocessing.for_model(folder) == preprocessing
    True
    """

    image_size: tuple[int, int] = (128, 128)
    channels: int = 3
    gamma: float | None = None
    shades_of_gray_norm: float | None = None
    class_names: tuple[str, ...] = ("0", "1")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __call__(self, images: np.ndarray | tf.Tensor) -> tf.Tensor:
        """float32 [0, 1] images, (H, W, C) or (B, H, W, C), any size -> model input."""
        return self.normalize(self.prepare(images))

    def prepare(self, images: np.ndarray | tf.Tensor) -> tf.Tensor:
        """float32 [0, 1] images of any size -> [0, 1] images at `image_size`, before normalization."""
        images = resize(images, self.image_size)
        if self.gamma:
            images = gamma_correct(images, self.gamma)
        if self.shades_of_gray_norm:
            images = shades_of_gray(images, self.shades_of_gray_norm)
        return images

    def normalize(self, images: np.ndarray | tf.Tensor) -> tf.Tensor:
        """[0, 1] images -> model input (a float32 tensor)."""
        images = tf.convert_to_tensor(images, tf.float32)
        if self.mean is None:
            return images
        return (images - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def denormalize(self, model_inputs: np.ndarray | tf.Tensor) -> tf.Tensor:
        """Model inputs -> the [0, 1] images they came from (for display; a float32 tensor)."""
        model_inputs = tf.convert_to_tensor(model_inputs, tf.float32)
        if self.mean is None:
            return model_inputs
        return model_inputs * tf.constant(self.std, tf.float32) + tf.constant(self.mean, tf.float32)

    def save(self, directory: str) -> None:
        """Writes `preprocessing.json` into `directory` (atomically), where `for_model` finds it."""
        from patchnet_tf.atomic import atomic_write_text

        atomic_write_text(
            os.path.join(directory, CONFIG_NAME), json.dumps(dataclasses.asdict(self), indent=2)
        )

    @classmethod
    def for_model(cls, model_path: str) -> Self:
        """The preprocessing saved beside a model file (or in a run folder).

        Raises PatchNetError, naming the file, when it is missing or is not
        what `save` writes.
        """
        directory = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(path) as file:
                fields = json.load(file)
        except FileNotFoundError:
            raise PatchNetError(
                f"{path}: missing; a model needs the {CONFIG_NAME} that `patchnet train` writes beside it"
            ) from None
        except (json.JSONDecodeError, OSError) as error:
            raise PatchNetError(f"{path}: unreadable ({error})") from None
        try:  # JSON, but not what `save` writes (edited by hand, or another tool's file)
            fields["image_size"] = tuple(fields["image_size"])
            fields["class_names"] = tuple(fields["class_names"])
            for name in ("mean", "std"):
                if fields.get(name) is not None:
                    fields[name] = tuple(fields[name])
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as error:
            raise PatchNetError(
                f"{path}: not a {CONFIG_NAME} of `patchnet train` ({type(error).__name__}: {error}); "
                "copy it from the run folder or train again"
            ) from None
