"""Datasets on disk -> tf.data pipelines of (image, label) batches.

Folder format (SPEC section 7): DATA/<class>/*.png|jpg|jpeg|bmp|tif, two
class folders; class 1 is the second in sorted order unless
`positive_class` names it. With DATA/train, DATA/val (and DATA/test) the
splits come from those folders, otherwise from a seeded fraction.
"""

import dataclasses
import os

import numpy as np
import tensorflow as tf

from patchnet_tf.errors import PatchNetError
from patchnet_tf.preprocessing import decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")


@dataclasses.dataclass
class Split:
    paths: list
    labels: np.ndarray

    def __len__(self):
        return len(self.paths)


@dataclasses.dataclass
class FolderDataset:
    class_names: tuple
    splits: dict  # "train" / "val" / "test" -> Split


def _class_folders(root):
    if not os.path.isdir(root):
        raise PatchNetError(f"{root}: no such data folder")
    return sorted(
        name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name))
    )


def _list_split(root, class_names):
    paths, labels = [], []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise PatchNetError(f"{root}: missing class folder {name!r}")
        files = sorted(
            os.path.join(folder, file)
            for file in os.listdir(folder)
            if file.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise PatchNetError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [label] * len(files)
    return Split(paths, np.array(labels, np.int64))


def _order_classes(names, positive_class, root):
    if len(names) != 2:
        raise PatchNetError(
            f"{root}: expected exactly two class folders, found {len(names)}: {', '.join(names) or 'none'}"
        )
    if positive_class is None:
        return tuple(names)
    if positive_class not in names:
        raise PatchNetError(f"--positive-class {positive_class!r} is not one of {', '.join(names)}")
    return tuple(name for name in names if name != positive_class) + (positive_class,)


def load_folder_dataset(root, *, positive_class=None, val_fraction=0.2, seed=0):
    """Lists a folder dataset and splits it; nothing is decoded yet."""
    folders = _class_folders(root)
    if "train" in folders:
        class_names = _order_classes(_class_folders(os.path.join(root, "train")), positive_class, root)
        splits = {
            name: _list_split(os.path.join(root, name), class_names)
            for name in SPLIT_NAMES
            if name in folders
        }
        if "val" not in splits:
            splits["train"], splits["val"] = split_fraction(splits["train"], val_fraction, seed)
        return FolderDataset(class_names, splits)
    class_names = _order_classes(folders, positive_class, root)
    train, val = split_fraction(_list_split(root, class_names), val_fraction, seed)
    return FolderDataset(class_names, {"train": train, "val": val})


def split_fraction(split, fraction, seed):
    """Seeded, stratified split: `fraction` of each class goes to the second part."""
    if not 0.0 < fraction < 1.0:
        raise PatchNetError(f"--val-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    second = np.zeros(len(split), bool)
    for label in np.unique(split.labels):
        members = rng.permutation(np.flatnonzero(split.labels == label))
        second[members[: max(1, int(round(fraction * len(members))))]] = True
    pick = lambda mask: Split([p for p, m in zip(split.paths, mask) if m], split.labels[mask])
    return pick(~second), pick(second)


def read_image(path, channels=3):
    """One image file -> float32 (H, W, C) in [0, 1]; a clear error names a bad file."""
    try:
        return decode_image(tf.io.read_file(path), channels).numpy()
    except tf.errors.NotFoundError:
        raise PatchNetError(f"{path}: no such file") from None
    except tf.errors.InvalidArgumentError:
        raise PatchNetError(f"{path}: not a decodable image (JPEG, PNG, BMP or GIF)") from None


def image_dataset(split, preprocessing, batch_size, *, shuffle=False, seed=0):
    """(images, labels) batches: decoded in parallel, preprocessed, prefetched."""
    dataset = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)

    def load(path, label):
        image = decode_image(tf.io.read_file(path), preprocessing.channels)
        return preprocessing(image), tf.cast(label, tf.float32)[None]

    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
