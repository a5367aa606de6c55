"""The bundled real-image dataset: texture photographs shipped inside scikit-image.

class 0 ("plain"): a crop of a background texture (grass or gravel);
class 1 ("inlay"): the same kind of crop with one to three inlays of another
texture (brick) at random places, sizes and shapes (ellipses, rectangles,
polygons). The exact inlay masks are written beside the images, so heatmaps
can be scored against ground truth (paper Tables 2 and 7). Like the paper's
DTD experiment, the class-1 feature is local and may appear several times.

Layout (other code relies on it):
  root/{train,val,test}/{plain,inlay}/<stem>.png   3-channel 8-bit images
  root/masks/<stem>.png                            uint8 0 / 255, all black for plain
  root/dataset.json                                {"class_names": ["plain", "inlay"]}
Stems are unique over the dataset (e.g. inlay-train-0003). In sorted order
"inlay" comes first; dataset.json tells `pipelines.data.load_folder_dataset`
that class 1 is "inlay" (other readers: pass positive_class="inlay"). Everything is
deterministic from `seed`: image i of a split and class depends only on
(seed, split, class, i), so asking for more images keeps the first ones.

    python -m pipelines.textures OUT [--image-size 64] [--count 40] [--seed 0]
"""

import argparse
import json
import os

import cv2
import numpy as np

from patchnet_tf.atomic import atomic_path, atomic_write_text
from pipelines.data import DATASET_FILE

BACKGROUNDS = ("grass", "gravel")
INLAY = "brick"
CLASS_NAMES = ("plain", "inlay")  # class 0, class 1
SPLIT_NAMES = ("train", "val", "test")
# scikit-image ships these photographs in grey; each gets the colour of its
# material (red brick, green grass, grey gravel). Texture and colour together
# make the inlay a local feature a small subnet learns in a few epochs on a CPU.
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


def texture_example(seed, split, inlay, index, image_size=(64, 64)):
    """One RGB image (H, W, 3) uint8 and its mask (H, W) uint8 0 / 255, from its own seed."""
    rng = np.random.default_rng([seed, SPLIT_NAMES.index(split), int(inlay), index])
    scale = rng.uniform(1.5, 2.5)  # texture pixels per image pixel: more structure per patch
    name = BACKGROUNDS[rng.integers(0, len(BACKGROUNDS))]
    background = _crop(rng, _textures()[name], image_size, scale)[..., None] * TINTS[name]
    image = background
    mask = np.zeros(image_size, np.uint8)
    if inlay:
        for _ in range(rng.integers(1, 4)):
            mask = np.maximum(mask, _shape_mask(rng, image_size))
        inlay_texture = _crop(rng, _textures()[INLAY], image_size, scale)[..., None] * TINTS[INLAY]
        image = np.where(mask[..., None] > 0, inlay_texture, background)
    image = np.clip(image * rng.uniform(0.85, 1.15), 0.0, 1.0)  # lighting varies, not the class
    image = np.round(image * 255).astype(np.uint8)
    return image, mask


_TEXTURES = {}


def _textures():
    if not _TEXTURES:
        for name in (*BACKGROUNDS, INLAY):
            _TEXTURES[name] = _texture(name)
    return _TEXTURES


def write_texture_dataset(root, *, image_size=(64, 64), count=None, seed=0):
    """Writes the dataset under `root` (layout in the module docstring); returns root.

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
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    atomic_write_text(os.path.join(root, DATASET_FILE), json.dumps({"class_names": list(CLASS_NAMES)}))
    for split in SPLIT_NAMES:
        for inlay, class_name in ((False, "plain"), (True, "inlay")):
            folder = os.path.join(root, split, class_name)
            os.makedirs(folder, exist_ok=True)
            for index in range(counts.get(split, 0)):
                image, mask = texture_example(seed, split, inlay, index, image_size)
                stem = f"{class_name}-{split}-{index:04d}"
                _write_png(os.path.join(folder, stem + ".png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
                _write_png(os.path.join(root, "masks", stem + ".png"), mask)
    return root


def _write_png(path, array):
    with atomic_path(path) as temporary:
        if not cv2.imwrite(temporary, array):
            raise OSError(f"{path}: could not write")


def main(argv=None):
    from patchnet_tf.cli import image_size, positive_int

    parser = argparse.ArgumentParser(prog="python -m pipelines.textures", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="output folder")
    parser.add_argument("--image-size", type=image_size, default=(64, 64), help="HEIGHTxWIDTH")
    parser.add_argument("--count", type=positive_int, default=None,
                        help="images per class per split (default: 40 train, 16 val, 16 test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_texture_dataset(args.root, image_size=args.image_size, count=args.count, seed=args.seed)
    print(f"wrote {args.root}")


if __name__ == "__main__":
    main()
