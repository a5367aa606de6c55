"""Training-time augmentation that runs where the model runs (GPU when there is one).

The paper augments dermoscopy with random rotations up to 180 degrees and
zoom-ins up to 120 %, and textures with random flips. Here all of them are
one batched `ImageProjectiveTransformV3` (the op behind `tf.image` and the
Keras random-rotation/zoom layers) plus flips, applied inside the training
step by `AugmentedModel`, never in the saved model: inference, evaluation
and the exported graph see the plain model.

Randomness is stateless, seeded by (seed, optimizer step, replica): no
random-generator variables to mirror across devices or to save, and a
resumed run draws the same transforms an uninterrupted one would.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """What to randomize; all off by default. Training-only, so not in preprocessing.json.

    Example:

    >>> augmentation = Augmentation(rotation=180, zoom=1.2, horizontal_flip=True, border=2)
    >>> images = np.zeros((2, 8, 8, 3), "float32")
    >>> tuple(augmentation(images, seed=tf.constant([1, 2])).shape)  # border rows and columns added
    (2, 10, 10, 3)
    >>> Augmentation().active
    False
    """

    rotation: float = 0.0  # maximum angle in degrees, either direction
    zoom: float = 1.0  # maximum zoom-in factor, e.g. 1.2 for 120 %
    horizontal_flip: bool = False
    vertical_flip: bool = False
    fill_mode: str = "REFLECT"  # what appears in rotated corners: no black wedges to learn
    # Zero rows and columns added around the batch, split at random between the
    # two sides (PatchNet: half a patch). Disjoint training patches then hang
    # over the border by varying amounts, as the centred patches of a heatmap
    # do, so the subnet learns what padding is instead of guessing at the border.
    border: int = 0

    @property
    def active(self) -> bool:
        """True when anything is randomized (else `AugmentedModel` leaves batches alone)."""
        return bool(self.rotation or self.zoom > 1.0 or self.horizontal_flip or self.vertical_flip or self.border)

    def __call__(self, images: np.ndarray | tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """(B, H, W, C) float images -> randomly transformed per image, (B, H + border, W + border, C).

        `seed` is a stateless seed, an int32/int64 tensor of shape (2,): the
        same seed gives the same transforms. The result has the input's dtype.
        """
        images = tf.convert_to_tensor(images)
        dtype = images.dtype
        images = tf.cast(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
        batch = tf.shape(images)[0]
        if self.horizontal_flip:
            flip = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[0]) < 0.5
            images = tf.where(flip, tf.reverse(images, axis=[2]), images)
        if self.vertical_flip:
            flip = tf.random.stateless_uniform([batch, 1, 1, 1], seeds[1]) < 0.5
            images = tf.where(flip, tf.reverse(images, axis=[1]), images)
        if self.rotation or self.zoom > 1.0:
            limit = math.radians(self.rotation)
            angles = tf.random.stateless_uniform([batch], seeds[2], -limit, limit)
            zooms = tf.random.stateless_uniform([batch], seeds[3], 1.0, self.zoom)
            images = rotate_and_zoom(images, angles, zooms, self.fill_mode)
        if self.border:
            top, left = tf.unstack(tf.random.stateless_uniform([2], seeds[4], 0, self.border + 1, tf.int32))
            images = tf.pad(images, [[0, 0], [top, self.border - top], [left, self.border - left], [0, 0]])
        return tf.cast(images, dtype)


def rotate_and_zoom(
    images: tf.Tensor, angles: tf.Tensor, zooms: tf.Tensor, fill_mode: str = "REFLECT"
) -> tf.Tensor:
    """Rotates each image by `angles` (radians) and zooms in by `zooms` (>= 1) about its centre.

    Output pixel (x, y) samples the input at centre + R(angle) (p - centre) / zoom,
    bilinearly; angle 0 and zoom 1 give the image back exactly.

    Args:
        images: float32 (B, H, W, C) images.
        angles: float32 (B,) angles in radians.
        zooms: float32 (B,) zoom-in factors, 1 for none.
        fill_mode: what fills pixels that come from outside the image:
            "REFLECT", "WRAP", "CONSTANT" (zeros) or "NEAREST".

    Returns:
        float32 (B, H, W, C) images.

    Example:

    >>> images = np.random.default_rng(0).random((1, 5, 5, 1), dtype="float32")
    >>> bool(np.array_equal(rotate_and_zoom(images, tf.zeros([1]), tf.ones([1])), images))
    True
    """
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    centre_x, centre_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    cos, sin = tf.cos(angles) / zooms, tf.sin(angles) / zooms
    zeros = tf.zeros_like(angles)
    transforms = tf.stack(
        [
            cos,
            -sin,
            centre_x - cos * centre_x + sin * centre_y,
            sin,
            cos,
            centre_y - sin * centre_x - cos * centre_y,
            zeros,
            zeros,
        ],
        axis=1,
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=fill_mode,
    )


class AugmentedModel(keras.Model):
    """Trains `inference_model` on augmented batches; is `inference_model` otherwise.

    `fit` calls the model with training=True, so only the training step
    augments; `evaluate`, `predict` and validation call it with
    training=False and see the plain model. Save `inference_model` (the
    checkpoint callbacks do), not this wrapper. Outputs are cast to float32
    so the loss and metrics stay float32 under mixed precision.

    Args:
        inference_model: the model to train (a `PatchNet` or baseline).
        augmentation: what each training batch gets.
        seed: with the optimizer step and the replica, seeds each batch's
            transforms.
        **kwargs: `keras.Model` arguments.

    Call arguments:
        images: (B, H, W, C) images.
        training: True augments (when `augmentation.active`).

    Example:

    >>> from patchnet_tf.model import build_patchnet
    >>> model = build_patchnet(4, filters=2, conv_layers=1)
    >>> trainer = AugmentedModel(model, Augmentation(horizontal_flip=True), seed=1)
    >>> images = np.random.default_rng(0).random((2, 8, 8, 3), dtype="float32")
    >>> bool(np.array_equal(trainer(images), model(images)))  # the plain model outside training
    True
    >>> tuple(trainer(images, training=True).shape)
    (2, 1)
    """

    def __init__(
        self, inference_model: keras.Model, augmentation: Augmentation = Augmentation(), seed: int = 0, **kwargs
    ) -> None:
        super().__init__(name=f"augmented_{inference_model.name}", **kwargs)
        self.inference_model = inference_model
        self.augmentation = augmentation
        self.seed = int(seed)

    def call(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
        if training and self.augmentation.active:
            images = self.augmentation(images, self._step_seed())
        return tf.cast(self.inference_model(images, training=training), tf.float32)

    def _step_seed(self):
        # Keras sets `optimizer` in compile(): a custom loop may call an uncompiled model with training=True.
        optimizer = getattr(self, "optimizer", None)
        step = tf.cast(optimizer.iterations, tf.int64) if optimizer else tf.constant(0, tf.int64)
        replica = tf.distribute.get_replica_context()
        replica_id = replica.replica_id_in_sync_group if replica is not None else 0
        # replica_id_in_sync_group counts over all workers under multi-worker training.
        replica_id = tf.cast(replica_id, tf.int64)
        return tf.stack([tf.constant(self.seed, tf.int64) * 65537 + replica_id, step])

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if not self.inference_model.built:
            self.inference_model.build(input_shape)
        self.built = True

