"""The bundled real-image dataset: texture photographs shipped inside scikit-image.

class 0 ("plain"): a crop of a background texture;
class 1 ("inlay"): the same kind of crop with one to three inlays of another
texture at random places, sizes and shapes (ellipses, rectangles,
polygons). The exact inlay masks are written beside the images, so heatmaps
can be scored against ground truth (paper Tables 2 and 7). Like the paper's
DTD experiment, the class-1 feature is local and may appear several times.

Variants (`variant=`), so that a result on one is checked on another:
  "brick" (default)  grass or gravel background (by turns), brick inlays
  "grass"            brick or gravel background (by turns), grass inlays
  classes=3           three classes on gravel: "plain", "brick" (brick inlays),
                      "grass" (grass inlays); docs/k-classes.md
The photographs are grey, and so are the images: only texture tells the
classes apart, as in real data. `tint=True` colours each material (the old
demo data, where colour alone gives the answer), kept for comparison only.

Layout (other code relies on it):
  root/{train,val,test}/{plain,inlay}/<stem>.png   8-bit images: grey, or RGB when tinted
  root/masks/<stem>.png                            uint8 0 / 255, all black for plain
  root/dataset.json                                {"class_names": ["plain", "inlay"]}
With classes=3: root/{train,val,test}/{plain,brick,grass}/<stem>.png, and
root/masks/<class>/<stem>.png for the two inlay classes, one per image of
the dataset (white where that class's texture is, all black on images of
the other classes); dataset.json lists the three classes in that order.
Stems are unique over the dataset (e.g. inlay-train-0003). In sorted order
"inlay" comes first; dataset.json tells `pipelines.data.load_folder_dataset`
that class 1 is "inlay" (other readers: pass positive_class="inlay"). Everything is
deterministic from `seed`: image i of a split and class depends only on
(seed, split, class, i), so asking for more images keeps the first ones.

    python -m pipelines.textures OUT [--image-size 64] [--count 40] [--seed 0] [--classes 3]
"""

import argparse
import json
import os

import cv2
import numpy as np

from patchnet_tf.atomic import atomic_write_text, check_output_path, write_png
from patchnet_tf.errors import PatchNetError
from pipelines.data import DATASET_FILE

# variant -> (background textures, inlay texture)
VARIANTS = {"brick": (("grass", "gravel"), "brick"), "grass": (("brick", "gravel"), "grass")}
CLASS_NAMES = ("plain", "inlay")  # class 0, class 1
# classes=3: (background textures, inlay texture of class 1, of class 2); class names plain + the inlays.
THREE_CLASSES = (("gravel",), ("brick", "grass"))
THREE_CLASS_NAMES = ("plain",) + THREE_CLASSES[1]
SPLIT_NAMES = ("train", "val", "test")
# tint=True only: each material's colour, so colour alone separates the classes.
TINTS = {
    "grass": np.array([0.75, 1.0, 0.6], np.float32),
    "gravel": np.array([0.95, 0.92, 0.88], np.float32),
    "brick": np.array([1.0, 0.62, 0.5], np.float32),
}
DEFAULT_COUNT = {"train": 40, "val": 16, "test": 16}


def _texture(name):
    """A shipped texture as float32 in [0, 1]; scikit-image ships these in its wheel (no download)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return image.astype(np.float32) / 255.0


def _crop(rng, texture, image_size, scale):
    """A random crop covering image_size * scale texture pixels, resized to image_size."""
    height, width = image_size
    crop_h = min(texture.shape[0], int(round(height * scale)))
    crop_w = min(texture.shape[1], int(round(width * scale)))
    top = rng.integers(0, texture.shape[0] - crop_h + 1)
    left = rng.integers(0, texture.shape[1] - crop_w + 1)
    crop = texture[top : top + crop_h, left : left + crop_w]
    crop = np.rot90(crop, rng.integers(0, 4)) if crop_h == crop_w else crop
    return cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_AREA)


def _shape_mask(rng, image_size):
    """One random ellipse, rectangle or polygon, 20 % to 50 % of the image side across."""
    height, width = image_size
    side = min(height, width)
    mask = np.zeros(image_size, np.uint8)
    radius_y = max(2, int(side * rng.uniform(0.1, 0.25)))
    radius_x = max(2, int(side * rng.uniform(0.1, 0.25)))
    # Centres at least half a radius inside, so most of every inlay is in view.
    centre = (int(rng.integers(radius_x // 2, width - radius_x // 2)),
              int(rng.integers(radius_y // 2, height - radius_y // 2)))
    kind = rng.integers(0, 3)
    if kind == 0:
        cv2.ellipse(mask, centre, (radius_x, radius_y), float(rng.uniform(0, 180)), 0, 360, 255, -1)
    elif kind == 1:
        box = ((float(centre[0]), float(centre[1])), (2.0 * radius_x, 2.0 * radius_y), float(rng.uniform(0, 90)))
        cv2.fillPoly(mask, [np.round(cv2.boxPoints(box)).astype(np.int32)], 255)
    else:
        corners = rng.integers(5, 9)
        angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
        radii = rng.uniform(0.6, 1.0, corners)
        points = np.stack(
            [centre[0] + radii * radius_x * np.cos(angles), centre[1] + radii * radius_y * np.sin(angles)], 1
        )
        cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 255)
    return mask


def texture_example(seed, split, inlay, index, image_size=(64, 64), *, variant="brick", tint=False):
    """One image (H, W, 1) uint8, (H, W, 3) RGB when tinted, and its mask (H, W) uint8 0 / 255.

    Drawn from its own seed, so image i of a split and class never depends on
    how many images are asked for.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    backgrounds, inlay_name = VARIANTS[variant]
    rng = np.random.default_rng([seed, list(VARIANTS).index(variant), SPLIT_NAMES.index(split), int(inlay), index])
    return _example(rng, backgrounds, inlay_name if inlay else None, index, image_size, tint)


def three_class_example(seed, split, label, index, image_size=(64, 64), *, tint=False):
    """Image `index` of class `label` (0 plain, 1 brick inlays, 2 grass inlays) and its inlay mask."""
    backgrounds, inlays = THREE_CLASSES
    rng = np.random.default_rng([seed, len(VARIANTS), SPLIT_NAMES.index(split), int(label), index])
    return _example(rng, backgrounds, inlays[label - 1] if label else None, index, image_size, tint)


def _example(rng, backgrounds, inlay_name, index, image_size, tint):
    """A background crop with, unless `inlay_name` is None, one to three inlays of that texture."""
    scale = rng.uniform(1.5, 2.5)  # texture pixels per image pixel: more structure per patch
    # Backgrounds by turns, not by chance: with 40 images a random draw can give
    # one class more gravel than the other, and a model learns that instead of
    # the inlay (seen: grass variant, 28 vs 19 brick backgrounds in training).
    background = _material(rng, backgrounds[index % len(backgrounds)], image_size, scale, tint)
    image = background
    mask = np.zeros(image_size, np.uint8)
    if inlay_name is not None:
        for _ in range(rng.integers(1, 4)):
            mask = np.maximum(mask, _shape_mask(rng, image_size))
        inlay_texture = _material(rng, inlay_name, image_size, scale, tint)
        image = np.where(mask[..., None] > 0, inlay_texture, background)
    image = np.clip(image * rng.uniform(0.85, 1.15), 0.0, 1.0)  # lighting varies, not the class
    image = np.round(image * 255).astype(np.uint8)
    return image, mask


def _material(rng, name, image_size, scale, tint):
    """A crop of texture `name` as (H, W, 1) grey, or (H, W, 3) in its material's colour."""
    crop = _crop(rng, _textures()[name], image_size, scale)[..., None]
    return crop * TINTS[name] if tint else crop


_TEXTURES = {}


def _textures():
    if not _TEXTURES:
        for name in TINTS:
            _TEXTURES[name] = _texture(name)
    return _TEXTURES


def write_texture_dataset(root, *, image_size=(64, 64), count=None, seed=0, variant="brick", tint=False,
                          classes=2):
    """Writes the dataset under `root` (layout and variants in the module docstring); returns root.

    `classes=3` writes the three-class dataset (`variant` does not apply).

    `count`: images per class per split, an int or a dict such as
    {"train": 40, "val": 16, "test": 16} (the default). Files already
    present are rewritten (each atomically), so a rerun repairs a torn one.
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    image_size = tuple(int(size) for size in image_size)
    if count is None:
        count = DEFAULT_COUNT
    counts = count if isinstance(count, dict) else {split: int(count) for split in SPLIT_NAMES}
    if classes not in (2, 3):
        raise ValueError(f"classes must be 2 or 3, got {classes!r}")
    if min(image_size) < 3:  # _shape_mask's smallest inlay (radius 2) needs a centre 1 pixel inside
        raise PatchNetError(f"--image-size {image_size[0]}x{image_size[1]}: the textures need images of "
                            "3 pixels or more a side")
    if classes == 3:
        names = THREE_CLASS_NAMES
        example = lambda split, label, index: three_class_example(seed, split, label, index, image_size, tint=tint)  # noqa: E731
    else:
        names = CLASS_NAMES
        example = lambda split, label, index: texture_example(  # noqa: E731
            seed, split, bool(label), index, image_size, variant=variant, tint=tint)
    return write_folder_dataset(root, names, counts, example)


def write_folder_dataset(root, class_names, counts, example):
    """Writes a bundled dataset's layout (module docstring); returns root.

    `example(split, label, index)` gives an (H, W, C) uint8 image (RGB, or grey) and its mask.
    Two classes: root/masks/<stem>.png for every image. More: root/masks/<class>/<stem>.png for
    every image and every class after class 0, black unless the image is of that class.
    """
    atomic_write_text(os.path.join(root, DATASET_FILE), json.dumps({"class_names": list(class_names)}))
    masked = class_names[1:]
    mask_folders = {name: os.path.join(root, "masks", *([name] if len(class_names) > 2 else [])) for name in masked}
    for folder in mask_folders.values():
        os.makedirs(folder, exist_ok=True)
    for split in SPLIT_NAMES:
        for label, class_name in enumerate(class_names):
            folder = os.path.join(root, split, class_name)
            os.makedirs(folder, exist_ok=True)
            for index in range(counts.get(split, 0)):
                image, mask = example(split, label, index)
                stem = f"{class_name}-{split}-{index:04d}"
                write_png(os.path.join(folder, stem + ".png"), image[..., ::-1])  # RGB -> BGR; grey stays
                for name in masked:
                    own = len(masked) == 1 or name == class_name
                    write_png(os.path.join(mask_folders[name], stem + ".png"), mask if own else np.zeros_like(mask))
    return root


def generator_parser(module, docstring, count_help, seed_help):
    """The command line every bundled dataset generator shares: ROOT, --image-size, --count, --seed."""
    from patchnet_launcher import image_size, nonnegative_int, positive_int

    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=docstring.split("\n")[0])
    parser.add_argument("root", help="output folder")
    parser.add_argument("--image-size", type=image_size, default=(64, 64), help="HEIGHTxWIDTH")
    parser.add_argument("--count", type=positive_int, default=None, help=f"images per class per split ({count_help})")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help=seed_help)
    return parser


def write_or_exit(parser, root, write):
    """Calls `write()` for ROOT; a bad path or a failed write is one line and exit status 2."""
    try:
        check_output_path(root, "root")
        write()
    except (PatchNetError, OSError) as error:
        where = f"{error.filename}: " if isinstance(error, OSError) and error.filename else ""
        parser.exit(2, f"{parser.prog}: error: {where}{getattr(error, 'strerror', None) or error}\n")
    print(f"wrote {root}")


def main(argv=None):
    parser = generator_parser("pipelines.textures", __doc__, "default: 40 train, 16 val, 16 test",
                              "seeds crops and inlay placement")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="brick",
                        help="brick: brick inlays on grass or gravel; grass: grass inlays on brick or gravel")
    parser.add_argument("--tint", action="store_true",
                        help="colour each material (colour alone then separates the classes; not the default)")
    parser.add_argument("--classes", type=int, choices=(2, 3), default=2,
                        help="3: plain, brick and grass inlays on gravel, masks per class (--variant does not apply)")
    args = parser.parse_args(argv)
    write_or_exit(parser, args.root, lambda: write_texture_dataset(
        args.root, image_size=args.image_size, count=args.count, seed=args.seed, variant=args.variant,
        tint=args.tint, classes=args.classes))


if __name__ == "__main__":
    main()
