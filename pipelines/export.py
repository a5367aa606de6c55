"""`patchnet export`: a SavedModel for TensorFlow Serving (docs/serving.md).

Written with `keras.export.ExportArchive`, one endpoint per signature, all
with method `tensorflow/serving/predict`:

  classify, serving_default   image_bytes string [B]          -> probability float32 [B], label int64 [B]
  heatmap                     image_bytes string [B]          -> heatmap float32 [B, H, W], probability float32 [B]
  classify_images             images float32 [B, H, W, 3]     -> probability, label
  heatmap_images              images float32 [B, H, W, 3]     -> heatmap, probability

A K-class model (docs/k-classes.md) has the same signatures and inputs with
these outputs (binary exports keep the ones above exactly):

  classify, classify_images   probabilities float32 [B, K], label int64 [B] (the most probable class),
                              class_name string [B] (its name; the names are a constant in the graph)
  heatmap, heatmap_images     heatmap float32 [B, H, W, K] (one map per class), probabilities float32 [B, K]

Decoding and preprocessing are the training code (`patchnet_tf.preprocessing`)
traced into the graph, so the server sees what training saw. `images` inputs
are 0..255 at any size; they are scaled to [0, 1] and resized in the graph.
The heatmap runs one image at a time and, inside each image, bands of
patches (`patchnet_tf.heatmaps.dense_heatmap_fn`), so memory stays bounded
whatever the batch. The heatmap signatures read the probability from the
map (`patchnet_tf.heatmaps.probability_from_map`: the mean of the map at the
patches the classifier averages) wherever the map holds those patches, so
they run the model once, not twice. The graph is float32 (a mixed-precision model is rebuilt
in float32 with the same weights), has no XLA clusters, and uses only ops
registered in core TensorFlow, so the stock `tensorflow_model_server` runs it.
"""

import os
import shutil
import tempfile

import keras
import tensorflow as tf

from patchnet_tf.atomic import check_output_path
from patchnet_tf.errors import PatchNetError
from patchnet_tf.heatmaps import (
    DEFAULT_CHUNK_PATCHES,
    dense_heatmap_fn,
    map_patch_centres,
    probability_from_map,
)
from patchnet_tf.precision import with_compute_dtype
from patchnet_tf.preprocessing import decode_image, encoded_image_size
from patchnet_tf.runs import load_trained_model
from pipelines.flags import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_PIXELS

PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURES = ("classify", "serving_default", "heatmap", "classify_images", "heatmap_images")
IMAGE_BYTES = "image_bytes"
IMAGES = "images"

# Leading bytes of the formats tf.io.decode_image reads; checked in the graph
# so that even the stock server answers "not an image" naming the input.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")

# Decompression-bomb limits, read from the encoded headers before anything is decoded. 64 megapixels
# per image is above a digital mammogram or a large dermoscopy photograph (20-50 megapixels); a
# request may hold four such images. Decoding costs about 16 bytes per pixel at its peak (uint8,
# float32 and the resize), so the request limit bounds a request's memory at about 4 GB.

# Images per model call in the classify and heatmap signatures (see ServingModule.probabilities).
MODEL_CHUNK_IMAGES = 2


def _check_image_bytes(image_bytes):
    """Graph-side checks, so any server rejects bad requests with a named input."""
    tf.debugging.assert_positive(
        tf.size(image_bytes),
        message=f"{IMAGE_BYTES}: empty batch; expected a [B] string tensor with B >= 1 encoded images",
    )
    head = tf.strings.substr(image_bytes, 0, 4)
    known = tf.zeros_like(image_bytes, tf.bool)
    for magic in _MAGIC:
        known = known | tf.equal(tf.strings.substr(head, 0, len(magic)), magic)
    return tf.debugging.Assert(
        tf.reduce_all(known),
        [
            f"{IMAGE_BYTES}: not a JPEG, PNG, GIF or BMP image at batch index",
            tf.where(tf.logical_not(known))[:, 0],
        ],
    )


def _check_pixels(image_bytes, max_image_pixels, max_request_pixels):
    """Graph-side bomb guard: each image's and the whole batch's pixels, from the headers alone."""
    size = encoded_image_size(image_bytes)
    pixels = size[:, 0] * size[:, 1]
    first_over = tf.argmax(tf.cast(pixels > max_image_pixels, tf.int32))
    image_check = tf.debugging.Assert(tf.reduce_all(pixels <= max_image_pixels), [tf.strings.format(
        IMAGE_BYTES + ": image {} of the batch is {}x{} pixels ({}), over the limit of {} pixels per image",
        (first_over, size[first_over, 0], size[first_over, 1], pixels[first_over],
         tf.constant(max_image_pixels, tf.int64)))])
    with tf.control_dependencies([image_check]):  # every image is under its limit: the sum cannot overflow
        total = tf.reduce_sum(pixels)
    return tf.debugging.Assert(total <= max_request_pixels, [tf.strings.format(
        IMAGE_BYTES + ": the {} images of the request hold {} pixels, over the limit of {} pixels per request",
        (tf.size(pixels), total, tf.constant(max_request_pixels, tf.int64)))])


class ServingModule:
    """The four signature functions of one model; traced by `build_export_archive`."""

    def __init__(self, model, preprocessing, *, heatmap_stride=1, chunk_patches=DEFAULT_CHUNK_PATCHES,
                 max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_request_pixels=DEFAULT_MAX_REQUEST_PIXELS):
        # Mixed-precision training computes in float16/bfloat16; serving answers in float32 (docs/serving.md).
        self.model = with_compute_dtype(model, "float32")
        self.preprocessing = preprocessing
        self.max_image_pixels = max_image_pixels
        self.max_request_pixels = max_request_pixels
        self.heatmap_fn = dense_heatmap_fn(
            self.model, stride=heatmap_stride, chunk_patches=chunk_patches
        )
        height, width = preprocessing.image_size
        self._input_spec = tf.TensorSpec([height, width, preprocessing.channels], tf.float32)
        self.classes = self.model.output_shape[-1]  # 1: the binary model
        if self.classes > 1 and len(preprocessing.class_names) != self.classes:
            raise PatchNetError(
                f"the model has {self.classes} classes but preprocessing.json names "
                f"{len(preprocessing.class_names)}: {', '.join(preprocessing.class_names)}"
            )
        self._map_shape = [height, width] + ([self.classes] if self.classes > 1 else [])
        # Every input is resized to (height, width), so whether the map holds the patches the classifier
        # averages is known here; where it does not (map_patch_centres says why), the model is called.
        self.heatmap_stride = heatmap_stride
        try:
            map_patch_centres(self.model, height, width, stride=heatmap_stride)
            self.probability_in_map = True
        except PatchNetError:
            self.probability_in_map = False

    # -- shared pieces -------------------------------------------------------
    def decode(self, image_bytes):
        """[B] encoded images -> [B, H, W, C] model input (decode, resize, gamma, colour)."""
        with tf.control_dependencies([_check_image_bytes(image_bytes)]):
            image_bytes = tf.identity(image_bytes)
        # Only once the sizes are known to be within the limits does any decoding start.
        with tf.control_dependencies([_check_pixels(image_bytes, self.max_image_pixels, self.max_request_pixels)]):
            image_bytes = tf.identity(image_bytes)
        return tf.map_fn(
            lambda data: self.preprocessing(decode_image(data, self.preprocessing.channels)),
            image_bytes,
            fn_output_signature=self._input_spec,
        )

    def scale(self, images):
        """[B, H, W, C] 0..255 at any size -> model input."""
        tf.debugging.assert_positive(
            tf.shape(images)[0],
            message=f"{IMAGES}: empty batch; expected [B, H, W, {self.preprocessing.channels}] with B >= 1",
        )
        images = tf.clip_by_value(tf.cast(images, tf.float32) / 255.0, 0.0, 1.0)
        return self.preprocessing(images)

    def probability(self, inputs):
        return self.probabilities(inputs)[:, 0]

    def probabilities(self, inputs):
        """The model on [B, H, W, C], MODEL_CHUNK_IMAGES images per call, two calls at a time.

        One call on a merged batch costs more CPU per image than calls on a few images (its activations
        leave the cache, and above glibc's mmap threshold every buffer is fresh pages): 62 ms against
        46 for the paper's subnet at 128 x 128, 16 images in one call. In chunks of two, server-side
        batching costs what single requests cost per image (measured equal within 5 %)."""
        count = tf.shape(inputs)[0]
        chunks = tf.math.floordiv(count + MODEL_CHUNK_IMAGES - 1, MODEL_CHUNK_IMAGES)

        def chunk(index, outputs):
            start = index * MODEL_CHUNK_IMAGES
            part = inputs[start:tf.minimum(start + MODEL_CHUNK_IMAGES, count)]
            return index + 1, outputs.write(index, tf.cast(self.model(part, training=False), tf.float32))

        outputs = tf.TensorArray(tf.float32, size=chunks, infer_shape=False,
                                 element_shape=tf.TensorShape([None, self.model.output_shape[-1]]))
        _, outputs = tf.while_loop(lambda index, _: index < chunks, chunk, (0, outputs), parallel_iterations=2)
        return outputs.concat()

    def heatmaps(self, inputs):
        # One image at a time: memory is bounded by the heatmap's chunk, not the batch.
        height, width = self.preprocessing.image_size
        return tf.map_fn(
            self.heatmap_fn,
            inputs,
            fn_output_signature=tf.TensorSpec(self._map_shape, tf.float32),
            parallel_iterations=1,
        )

    def classify_outputs(self, inputs):
        if self.classes > 1:
            probabilities = self.probabilities(inputs)
            label = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
            class_names = tf.constant(list(self.preprocessing.class_names), tf.string)
            return {"probabilities": probabilities, "label": label, "class_name": tf.gather(class_names, label)}
        probability = self.probability(inputs)
        label = tf.cast(probability >= 0.5, tf.int64)
        return {"probability": probability, "label": label}

    def heatmap_outputs(self, inputs):
        maps = self.heatmaps(inputs)
        if self.probability_in_map:  # the mean of the map at the classifier's patch centres: no model call
            probabilities = probability_from_map(self.model, maps, stride=self.heatmap_stride)
        else:
            probabilities = self.probabilities(inputs)
        if self.classes > 1:
            return {"heatmap": maps, "probabilities": probabilities}
        return {"heatmap": maps, "probability": probabilities[:, 0]}

    # -- the signatures ------------------------------------------------------
    def classify(self, image_bytes):
        return self.classify_outputs(self.decode(image_bytes))

    def heatmap(self, image_bytes):
        return self.heatmap_outputs(self.decode(image_bytes))

    def classify_images(self, images):
        return self.classify_outputs(self.scale(images))

    def heatmap_images(self, images):
        return self.heatmap_outputs(self.scale(images))


def build_export_archive(model, preprocessing, *, heatmap_stride=1, chunk_patches=DEFAULT_CHUNK_PATCHES,
                         max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_request_pixels=DEFAULT_MAX_REQUEST_PIXELS):
    """An ExportArchive holding the five serving signatures (docs/serving.md, "The SavedModel")."""
    module = ServingModule(
        model, preprocessing, heatmap_stride=heatmap_stride, chunk_patches=chunk_patches,
        max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
    )
    bytes_spec = [tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)]
    images_spec = [tf.TensorSpec([None, None, None, preprocessing.channels], tf.float32, name=IMAGES)]

    # Named functions: the argument name becomes the signature's input key.
    def classify(image_bytes):
        return module.classify(image_bytes)

    def heatmap(image_bytes):
        return module.heatmap(image_bytes)

    def classify_images(images):
        return module.classify_images(images)

    def heatmap_images(images):
        return module.heatmap_images(images)

    archive = keras.export.ExportArchive()
    archive.track(module.model)
    classify_function = archive.add_endpoint("classify", classify, bytes_spec)
    archive.add_endpoint("serving_default", classify_function)
    archive.add_endpoint("heatmap", heatmap, bytes_spec)
    archive.add_endpoint("classify_images", classify_images, images_spec)
    archive.add_endpoint("heatmap_images", heatmap_images, images_spec)
    return archive


def write_saved_model(model, preprocessing, export_dir, *, heatmap_stride=1,
                      chunk_patches=DEFAULT_CHUNK_PATCHES, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
                      max_request_pixels=DEFAULT_MAX_REQUEST_PIXELS):
    """Writes the SavedModel to `export_dir` (which must not exist) atomically."""
    check_pixel_limits(max_image_pixels, max_request_pixels)
    export_dir = os.path.abspath(export_dir)
    if os.path.exists(export_dir):
        raise PatchNetError(f"{export_dir}: already exists; export into a new folder")
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    archive = build_export_archive(
        model, preprocessing, heatmap_stride=heatmap_stride, chunk_patches=chunk_patches,
        max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
    )
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        archive.write_out(staging, verbose=False)
        os.replace(staging, export_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export_dir


def export_saved_model(model_path, export_dir, *, heatmap_stride=1, chunk_patches=DEFAULT_CHUNK_PATCHES,
                       max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS, max_request_pixels=DEFAULT_MAX_REQUEST_PIXELS):
    """Run folder (or model.keras beside preprocessing.json) -> SavedModel at `export_dir`."""
    model, preprocessing = load_trained_model(model_path)
    if not _has_subnet(model):
        raise PatchNetError(f"{model_path}: not a PatchNet model (no 'subnet'); only PatchNet exports")
    return write_saved_model(
        model, preprocessing, export_dir, heatmap_stride=heatmap_stride, chunk_patches=chunk_patches,
        max_image_pixels=max_image_pixels, max_request_pixels=max_request_pixels,
    )


def check_pixel_limits(max_image_pixels, max_request_pixels):
    """A request limit below the image limit would refuse, as a request, an image its own limit allows."""
    if max_request_pixels < max_image_pixels:
        raise PatchNetError(f"--max-request-pixels {max_request_pixels} is below --max-image-pixels "
                            f"{max_image_pixels}; a request must be able to hold one image of the largest size")


def _has_subnet(model):
    try:
        model.get_layer("subnet")
        return True
    except ValueError:
        return False


def run(args):
    check_output_path(args.out, "--out")
    check_pixel_limits(args.max_image_pixels, args.max_request_pixels)  # before the model loads
    path = export_saved_model(
        args.model, args.out, heatmap_stride=args.heatmap_stride, chunk_patches=args.chunk_patches,
        max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels,
    )
    print(f"exported SavedModel to {path} (signatures: {', '.join(SIGNATURES)})")
    print(f"inspect: saved_model_cli show --dir {path} --all")
