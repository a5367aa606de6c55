"""The bundled sparse-object dataset: cluttered handwritten digits.

Real handwriting from scikit-learn's bundled 8 x 8 digits
(`sklearn.datasets.load_digits`, 1,797 digits by 43 writers, shipped inside
the package: no download), upscaled and scattered on black. Where the
texture inlays cover a fifth of an image, here the class-1 evidence is a
few thin strokes among strokes of the same kind:

  class 0 ("distractors"): 3 to 5 distractor digits (default: 9s);
  class 1 (the target's name, default "four"): the same number of digits,
          1 or 2 of them the target digit (default: 4), the rest distractors.

Digits are 12 to 20 pixels tall, at random places anywhere in the image
(touching the border included) and never overlapping. The mask is the
target digits' ink (upscaled intensity at or above `INK`), so it is exact.
The source digits are split once per seed into train, val and test (60 /
20 / 20 % of each digit), so no handwritten sample is seen in two splits.

`classes=3`: which of two target digits is present: "distractors", "four"
(1-2 fours among nines) and "seven" (1-2 sevens among nines), with
masks/<class>/<stem>.png per target class as for the three-class textures.

Layout (as pipelines.textures, which other code relies on):
  root/{train,val,test}/<class>/<stem>.png    8-bit grey images
  root/masks/<stem>.png                       uint8 0 / 255 (classes=3: root/masks/<class>/<stem>.png)
  root/dataset.json                           {"class_names": [class 0, class 1, ...]}
Everything is deterministic from `seed`: image i of a split and class depends
only on (seed, split, class, i).

    python -m pipelines.digits OUT [--image-size 64] [--count 160] [--seed 0] [--classes 3]
"""

import functools

import cv2
import numpy as np

from patchnet_tf.errors import PatchNetError
from pipelines.textures import SPLIT_NAMES, generator_parser, write_folder_dataset, write_or_exit

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DISTRACTOR_CLASS = "distractors"
DEFAULT_TARGETS = {2: (4,), 3: (4, 7)}  # the target digit of each class after class 0
DEFAULT_DISTRACTOR = 9
DEFAULT_COUNT = {"train": 160, "val": 48, "test": 48}
SPLIT_SHARES = (0.6, 0.2, 0.2)
DIGITS_PER_IMAGE = (3, 5)  # inclusive
TARGETS_PER_IMAGE = (1, 2)  # inclusive, class 1 and above
DIGIT_HEIGHT = (12, 20)  # pixels, inclusive: 0.6 to 1.0 times a 20-pixel digit
INK = 0.5  # ink in the mask: at least half the full 0..16 intensity (the stroke, not its blur)


def class_names(classes=2, targets=None):
    """Class 0 ("distractors"), then each target digit's name ("four", "seven")."""
    targets = tuple(targets or DEFAULT_TARGETS[classes])
    return (DISTRACTOR_CLASS,) + tuple(DIGIT_NAMES[digit] for digit in targets)


@functools.cache
def _handwriting():
    """load_digits() as (1797, 8, 8) float32 images in [0, 1] (0..16 in the package) and their digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target


@functools.cache
def source_indices(seed):
    """{split: {digit: indices into load_digits()}}: each digit's samples split 60/20/20 by `seed`."""
    labels = _handwriting()[1]
    rng = np.random.default_rng([seed, len(labels)])
    splits = {split: {} for split in SPLIT_NAMES}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        ends = np.round(np.cumsum(SPLIT_SHARES) * len(members)).astype(int)
        for split, start, end in zip(SPLIT_NAMES, (0, *ends[:-1]), ends):
            splits[split][digit] = np.sort(members[start:end])
    return splits


def digit_layout(seed, split, label, index, image_size=(64, 64), *, classes=2, targets=None,
                 distractor=DEFAULT_DISTRACTOR):
    """[(digit, source index, glyph, (top, left))] of image `index` of class `label`, and its rng for rendering.

    Image i of every class has the same number of digits (drawn without the label), so the count
    tells nothing; class 0 holds only distractors, class k > 0 1-2 of target k among them.
    """
    targets = tuple(targets or DEFAULT_TARGETS[classes])
    split_id = SPLIT_NAMES.index(split)
    count = int(np.random.default_rng([seed, 10 + classes, split_id, index]).integers(
        DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1))
    rng = np.random.default_rng([seed, 10 + classes, split_id, int(label), index])
    wanted = int(rng.integers(TARGETS_PER_IMAGE[0], TARGETS_PER_IMAGE[1] + 1)) if label else 0
    digits = [targets[label - 1]] * wanted + [distractor] * (count - wanted)
    pool = source_indices(seed)[split]
    for _ in range(100):  # a layout with no room for the last digit is drawn again
        placed = _layout(rng, [(digit, pool[digit]) for digit in digits], image_size)
        if placed is not None:
            return placed, rng
    raise PatchNetError(f"could not place {count} digits without overlap in a {image_size[0]}x{image_size[1]} "
                        "image; use a larger --image-size")


def digit_example(seed, split, label, index, image_size=(64, 64), *, classes=2, targets=None,
                  distractor=DEFAULT_DISTRACTOR):
    """Image `index` of class `label` of a split: (H, W, 1) uint8 and its target-ink mask (H, W) uint8 0 / 255."""
    placed, rng = digit_layout(seed, split, label, index, image_size, classes=classes, targets=targets,
                               distractor=distractor)
    image = np.zeros(image_size, np.float32)
    mask = np.zeros(image_size, np.uint8)
    for digit, _, glyph, (top, left) in placed:
        rows, cols = slice(top, top + glyph.shape[0]), slice(left, left + glyph.shape[1])
        image[rows, cols] = glyph * rng.uniform(0.7, 1.0)  # pen pressure varies
        if digit != distractor:
            mask[rows, cols] = target_ink(glyph)
    image = np.clip(image + rng.normal(0.0, 0.03, image_size), 0.0, 1.0)  # sensor noise: no exact zeros to key on
    return np.round(image * 255).astype(np.uint8)[..., None], mask


def target_ink(glyph):
    """The mask of an upscaled digit: 255 where its intensity is at least INK."""
    return np.where(glyph >= INK, 255, 0).astype(np.uint8)


def _upscale(glyph, rng):
    """An 8 x 8 digit at a random height of 12-20 pixels, the width following its aspect, bilinear."""
    height = int(rng.integers(DIGIT_HEIGHT[0], DIGIT_HEIGHT[1] + 1))
    width = max(4, int(round(height * rng.uniform(0.75, 1.0))))
    return np.clip(cv2.resize(glyph, (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _layout(rng, digits, image_size):
    """[(digit, source, glyph, (top, left))]: each (digit, source indices) drawn, upscaled and put where it overlaps no
    digit before it (a 1-pixel gap between boxes); None when one finds no room."""
    taken = np.zeros(image_size, np.int32)
    placed = []
    for digit, sources in digits:
        source = int(sources[rng.integers(len(sources))])
        glyph = _upscale(_handwriting()[0][source], rng)
        height, width = glyph.shape
        # Boxes grown by the gap; a corner is free when its grown box sums to 0 (an integral image).
        grown = np.pad(taken, 1)
        sums = np.pad(grown.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        box = (sums[height + 2 :, width + 2 :] - sums[: -height - 2, width + 2 :]
               - sums[height + 2 :, : -width - 2] + sums[: -height - 2, : -width - 2])
        free = np.argwhere(box == 0)
        if not len(free):
            return None
        top, left = free[rng.integers(len(free))]
        taken[top : top + height, left : left + width] = 1
        placed.append((digit, source, glyph, (int(top), int(left))))
    return placed


def write_digit_dataset(root, *, image_size=(64, 64), count=None, seed=0, classes=2):
    """Writes the dataset under `root` (layout in the module docstring); returns root.

    `count`: images per class per split, an int or a dict such as
    {"train": 160, "val": 48, "test": 48} (the default). Files already present
    are rewritten (each atomically).
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = tuple(int(size) for size in image_size)
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes!r}")
    if min(image_size) < 2 * DIGIT_HEIGHT[1]:
        raise PatchNetError(f"--image-size {image_size[0]}x{image_size[1]}: the digits need images of "
                            f"{2 * DIGIT_HEIGHT[1]} pixels or more a side")
    counts = count if isinstance(count, dict) else {split: int(count or DEFAULT_COUNT[split]) for split in SPLIT_NAMES}
    return write_folder_dataset(root, class_names(classes), counts, lambda split, label, index: digit_example(
        seed, split, label, index, image_size, classes=classes))


def main(argv=None):
    parser = generator_parser("pipelines.digits", __doc__, "default: 160 train, 48 val, 48 test",
                              "seeds the split of the handwriting and the placement")
    parser.add_argument("--classes", type=int, choices=(2, 3), default=2,
                        help="3: distractors, four and seven, masks per class")
    args = parser.parse_args(argv)
    write_or_exit(parser, args.root, lambda: write_digit_dataset(
        args.root, image_size=args.image_size, count=args.count, seed=args.seed, classes=args.classes))


if __name__ == "__main__":
    main()
