"""Datasets on disk -> tf.data pipelines of (image, label) batches.

Folder format (docs/training.md, "Data"): DATA/<class>/*.png|jpg|jpeg|bmp|tif. Two
class folders are the paper's binary task: class 1 is the second in sorted
order unless `positive_class` (or DATA/dataset.json) names it. K > 2 class
folders are a K-class task (docs/k-classes.md): the class order is
dataset.json's "class_names" when present, else sorted names. With
DATA/train, DATA/val (and DATA/test) the splits come from those folders,
otherwise from a seeded fraction.
ISIC 2017 format: a ground-truth CSV (image_id,melanoma,seborrheic_keratosis)
and an image folder holding <image_id>.jpg; task "melanoma" (the paper's,
the default) is binary, task "diagnosis" the three diagnoses.
Masks: a flat folder of <stem>.png (binary); masks/<class>/<stem>.png (K classes).
"""

import csv
import dataclasses
import json
import os
import sys

import cv2
import numpy as np
import tensorflow as tf

from patchnet_tf.errors import PatchNetError, PositiveClassMismatch
from patchnet_tf.preprocessing import decode_image
from pipelines.settings import ISIC_TASKS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")
DATASET_FILE = "dataset.json"  # optional: {"class_names": [class 0, class 1, ...]}

# OpenCV prints libtiff's own "[ERROR] TIFFFetchDirectory" lines for a corrupt TIFF; every
# undecodable file is reported here, by name, once (or listed under --skip-bad).
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


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
        names = sorted(os.listdir(folder))
        files = [os.path.join(folder, file) for file in names if file.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            others = [file for file in names if os.path.isfile(os.path.join(folder, file))]
            found = f"; its {len(others)} file(s) are not images: {', '.join(others[:5])}" if others else "; it is empty"
            raise PatchNetError(
                f"{folder}: no images{found}. Each class folder needs image files "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += files
        labels += [label] * len(files)
    return Split(paths, np.array(labels, np.int64))


def _order_classes(names, positive_class, root, declared=None):
    if len(names) < 2:
        raise PatchNetError(
            f"{root}: expected two or more class folders, found {len(names)}: {', '.join(names) or 'none'}"
        )
    # Checked first: with two classes the file's second name becomes the positive class, and a
    # wrong file must be blamed, not a --positive-class nobody typed.
    if declared is not None and sorted(declared) != sorted(names):
        dataset_file = os.path.join(root, DATASET_FILE)
        without_folder = [name for name in declared if name not in names]
        if without_folder:
            raise PatchNetError(f"{dataset_file}: names classes with no folder: {', '.join(without_folder)} "
                                f"(the class folders are {', '.join(names)})")
        raise PatchNetError(f"{dataset_file}: class_names {', '.join(declared)} are not "
                            f"the class folders {', '.join(names)}")
    if len(names) > 2:
        if positive_class is not None:
            raise PositiveClassMismatch(
                f"--positive-class applies to two classes; {root} has {len(names)} "
                f"({', '.join(names)}): order them with {DATASET_FILE}"
            )
        return tuple(declared or names)
    if positive_class is None:
        return tuple(names)
    if positive_class not in names:
        raise PositiveClassMismatch(f"--positive-class {positive_class!r} is not one of {', '.join(names)}")
    return tuple(name for name in names if name != positive_class) + (positive_class,)


def _declared_class_names(root):
    """The class order ROOT/dataset.json declares (the bundled texture datasets write one), or None."""
    path = os.path.join(root, DATASET_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as file:
            names = json.load(file)["class_names"]
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(name, str) for name in names):
            raise ValueError("class_names must list two or more folder names")
        return names
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise PatchNetError(f"{path}: expected {{\"class_names\": [class 0, class 1, ...]}} ({error})") from None


def load_folder_dataset(root, *, positive_class=None, val_fraction=0.2, seed=0):
    """Lists a folder dataset and splits it; nothing is decoded yet."""
    folders = _class_folders(root)
    declared = _declared_class_names(root)
    if positive_class is None and declared is not None and len(declared) == 2:
        positive_class = declared[1]
    if "train" in folders:
        class_names = _order_classes(_class_folders(os.path.join(root, "train")), positive_class, root, declared)
        splits = {
            name: _list_split(os.path.join(root, name), class_names)
            for name in SPLIT_NAMES
            if name in folders
        }
        if "val" not in splits:
            splits["train"], splits["val"] = split_fraction(splits["train"], val_fraction, seed)
        return FolderDataset(class_names, splits)
    class_names = _order_classes(folders, positive_class, root, declared)
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
    def pick(mask):
        return Split([p for p, m in zip(split.paths, mask) if m], split.labels[mask])

    return pick(~second), pick(second)


def load_isic_dataset(csv_path, *, image_dir=None, val_fraction=0.2, seed=0, task="melanoma"):
    """ISIC 2017 ground truth (`image_id,melanoma,seborrheic_keratosis`) -> a seeded train/val split.

    Images are `<image_id>.jpg` (or .png, ...) in `image_dir`, by default the
    CSV's folder. Task "melanoma" (the paper's): class 1 is melanoma, class 0
    the rest. Task "diagnosis": nevus (neither column set), melanoma,
    seborrheic_keratosis; a row with both columns set is an error.
    """
    if task not in ISIC_TASKS:
        raise PatchNetError(f"--isic-task must be one of {', '.join(ISIC_TASKS)}, got {task!r}")
    columns = ("melanoma",) if task == "melanoma" else ("melanoma", "seborrheic_keratosis")
    image_dir = image_dir or os.path.dirname(os.path.abspath(csv_path))
    try:
        with open(csv_path, newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
    except OSError as error:
        raise PatchNetError(f"{csv_path}: unreadable ({error.strerror})") from None
    if not {"image_id", *columns} <= set(reader.fieldnames or ()):
        raise PatchNetError(
            f"{csv_path}: expected an ISIC ground-truth CSV with columns image_id,{','.join(columns)}"
        )
    if not rows:
        raise PatchNetError(f"{csv_path}: no rows below the header (one row per image)")
    if not os.path.isdir(image_dir):
        raise PatchNetError(f"{image_dir}: no such image folder for {csv_path}")
    present = {os.path.splitext(name)[0]: name for name in sorted(os.listdir(image_dir))
               if name.lower().endswith(IMAGE_EXTENSIONS)}
    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        flags = []
        for column in columns:
            try:
                flag = int(float(row[column]))
            except (TypeError, ValueError):
                flag = -1
            if flag not in (0, 1):
                raise PatchNetError(f"{csv_path}, line {line}: {column} must be 0 or 1, got {row[column]!r}")
            flags.append(flag)
        if sum(flags) > 1:
            raise PatchNetError(f"{csv_path}, line {line}: both melanoma and seborrheic_keratosis are 1")
        # Class 0 when no column is set; else 1 + the index of the set column.
        label = flags.index(1) + 1 if 1 in flags else 0
        image_id = row["image_id"]
        # A missing file is reported (or skipped) by the decode pass, like a corrupt one.
        paths.append(os.path.join(image_dir, present.get(image_id, image_id + ".jpg")))
        labels.append(label)
    split = Split(paths, np.array(labels, np.int64))
    class_names = ISIC_TASKS[task]
    missing = [name for label, name in enumerate(class_names) if not np.any(split.labels == label)]
    if missing:
        raise PatchNetError(f"{csv_path}: needs images of every class; none of {', '.join(missing)}")
    train, val = split_fraction(split, val_fraction, seed)
    return FolderDataset(class_names, {"train": train, "val": val})


def load_dataset(path, *, positive_class=None, image_dir=None, val_fraction=0.2, seed=0, isic_task="melanoma"):
    """A folder dataset, or an ISIC CSV when `path` is a .csv file (docs/training.md, "Data")."""
    if path.lower().endswith(".csv"):
        if positive_class is not None:
            raise PatchNetError("--positive-class applies to folder datasets; in an ISIC CSV melanoma is class 1")
        return load_isic_dataset(path, image_dir=image_dir, val_fraction=val_fraction, seed=seed, task=isic_task)
    return load_folder_dataset(path, positive_class=positive_class, val_fraction=val_fraction, seed=seed)


def mask_path_for(image_path, mask_dir):
    """The mask of an image in a flat folder: `<stem>.png` (or ISIC's `<stem>_segmentation.png`).

    Returns None when there is none.
    """
    stem = os.path.splitext(os.path.basename(image_path))[0]
    for name in (stem + ".png", stem + "_segmentation.png"):
        path = os.path.join(mask_dir, name)
        if os.path.exists(path):
            return path
    return None


def decode_file(path, channels=3):
    """An image file (a path tensor) -> float32 (H, W, channels) in [0, 1].

    JPEG, PNG, BMP and GIF decode with TensorFlow's ops, as in the exported
    graph. TensorFlow has no TIFF decoder, and the folder format admits .tif
    (microscopy ships it), so training reads TIFF through OpenCV.
    """
    is_tiff = tf.strings.regex_full_match(tf.strings.lower(path), r".*\.tiff?")
    return tf.cond(
        is_tiff,
        lambda: _decode_tiff(path, channels),
        lambda: decode_image(tf.io.read_file(path), channels),
    )


def _decode_tiff(path, channels):
    def read(path_bytes):
        path = np.asarray(path_bytes).item().decode()  # a 0-d array eagerly, bytes in tf.data
        flags = cv2.IMREAD_ANYDEPTH | (cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE)
        image = cv2.imread(path, flags)
        if image is None:
            raise ValueError(f"{path}: not a decodable TIFF image")
        scale = np.iinfo(image.dtype).max if np.issubdtype(image.dtype, np.integer) else 1.0
        image = image.astype(np.float32) / scale
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if channels == 3 else image[..., None]
        return np.clip(image, 0.0, 1.0)

    image = tf.numpy_function(read, [path], tf.float32, stateful=False)
    image.set_shape([None, None, channels])
    return image


def read_image(path, channels=3):
    """One image file -> float32 (H, W, C) in [0, 1]; a clear error names a bad file."""
    if not os.path.isfile(path):
        raise PatchNetError(f"{path}: no such file")
    try:
        return decode_file(tf.constant(path), channels).numpy()
    except (tf.errors.OpError, ValueError):  # eagerly, the TIFF reader's ValueError comes through as is
        raise PatchNetError(f"{path}: not a decodable image (JPEG, PNG, BMP, GIF or TIFF)") from None


def decode_mask(mask_bytes, image_size):
    """Encoded mask PNG -> float32 (H, W, 1) of 0 / 1, resized with nearest neighbour."""
    mask = tf.io.decode_image(mask_bytes, channels=1, expand_animations=False)
    mask = tf.image.resize(mask, image_size, method="nearest")
    return tf.cast(mask > 127, tf.float32)


def _mask_paths(split, mask_dir):
    paths = []
    for image_path in split.paths:
        path = mask_path_for(image_path, mask_dir)
        if path is None:
            raise PatchNetError(f"{image_path}: no mask {os.path.join(mask_dir, '<stem>.png')} for it")
        paths.append(path)
    return paths


def encode_labels(labels, class_count):
    """Integer labels -> what the model is trained on: float32 (..., 1) for two
    classes (binary cross-entropy), one-hot float32 (..., K) for K > 2 (categorical)."""
    if class_count == 2:
        return tf.cast(labels, tf.float32)[..., None]
    return tf.one_hot(labels, class_count, dtype=tf.float32)


def _loader(preprocessing, with_masks):
    def load(path, label, mask_path=None):
        image = preprocessing(decode_file(path, preprocessing.channels))
        label = encode_labels(label, len(preprocessing.class_names))
        if not with_masks:
            return image, label
        return image, label, decode_mask(tf.io.read_file(mask_path), preprocessing.image_size)

    return load


def _slices(split, mask_paths):
    columns = (split.paths, split.labels) + ((mask_paths,) if mask_paths is not None else ())
    return tf.data.Dataset.from_tensor_slices(columns)


def _decode_pass(split, preprocessing, mask_paths, keep):
    """Decodes every file once, in parallel; returns (good indices, arrays or None).

    `keep` keeps the preprocessed tensors (the in-memory cache); otherwise
    only the decode is checked (the shape is returned so the decode is not
    pruned from the graph).
    """
    load = _loader(preprocessing, mask_paths is not None)

    def checked(index, *columns):
        if keep:
            return (index,) + tuple(load(*columns))
        # Only decode; return the decoded shapes, which are not known before
        # decoding (a resized image's would be, and the decode be pruned).
        shapes = [tf.shape(decode_file(columns[0], preprocessing.channels))]
        shapes += [tf.shape(tf.io.decode_image(tf.io.read_file(path), expand_animations=False))
                   for path in columns[2:]]
        return (index, *shapes)

    indices = tf.data.Dataset.range(len(split))
    dataset = tf.data.Dataset.zip((indices, _slices(split, mask_paths))).map(
        lambda index, columns: checked(index, *columns),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    dataset = dataset.ignore_errors(log_warning=False).batch(256).prefetch(2)
    good, arrays = [], []
    for batch in dataset.as_numpy_iterator():
        good.append(batch[0])
        if keep:
            arrays.append(batch[1:])
    good = np.concatenate(good) if good else np.zeros([0], np.int64)
    if not keep:
        return good, None
    return good, tuple(np.concatenate(parts) for parts in zip(*arrays)) if arrays else None


def _fits_in_memory(split, preprocessing, limit_bytes):
    height, width = preprocessing.image_size
    needed = len(split) * height * width * (preprocessing.channels + 1) * 4
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pages = limit_bytes
    return needed <= min(limit_bytes, pages // 2)


def _report_skipped(name, bad):
    shown = ", ".join(bad[:20]) + (f", ... ({len(bad) - 20} more)" if len(bad) > 20 else "")
    print(f"skipped {len(bad)} undecodable file(s) in {name}: {shown}", file=sys.stderr)


def epoch_order(labels, seed, epoch, *, shuffle, balance, draws):
    """The indices into a split that one epoch visits: a pure function of (seed, epoch).

    Not tf.data's reshuffling, whose state starts over in a new process: a run resumed after
    epoch N (a new process) sees epoch N + 1 exactly as an uninterrupted run does. With
    `balance`, `draws` picks alternate classes in shuffled order, each class cycling through
    its own reshuffled members.
    """
    if not shuffle:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, epoch])
    if not balance:
        return rng.permutation(len(labels))
    classes = np.unique(labels)
    choice = rng.permutation(np.arange(draws) % len(classes))
    order = np.empty(draws, np.int64)
    for position, label in enumerate(classes):
        members = np.flatnonzero(labels == label)
        wanted = int(np.sum(choice == position))
        cycles = [rng.permutation(members) for _ in range(-(-wanted // len(members)))]
        order[choice == position] = np.concatenate(cycles)[:wanted]
    return order


def image_dataset(
    split,
    preprocessing,
    batch_size,
    *,
    shuffle=False,
    seed=0,
    balance=False,
    cache="auto",
    skip_bad=False,
    mask_dir=None,
    name="data",
    on_skip=_report_skipped,
    cache_limit_bytes=2 << 30,
    epochs=(0, 1),
):
    """(images, labels[, masks]) batches: decoded in parallel, preprocessed, prefetched.

    Every file is decoded once up front: an undecodable (or missing) file
    stops with an error naming it (suggesting --skip-bad unless `skip_bad` is
    None: the caller has no such flag), or with `skip_bad` is left out and
    reported through `on_skip(name, paths)`; a class left with no image is an
    error. That pass also fills the
    in-memory cache when the preprocessed split fits (`cache="auto"`, up to
    `cache_limit_bytes` and half the free memory; "memory" forces it, "off"
    decodes every epoch).

    The dataset holds epochs `first` to `last - 1` (`epochs=(first, last)`)
    back to back, each in its own `epoch_order`; with `shuffle`, every epoch
    in a different order. `balance` (training): each epoch draws the same
    number of images from every class, in shuffled order, len(split) images
    in all, whatever the class ratio on disk. Labels are float32 (B, 1) for
    two classes, one-hot float32 (B, K) for K (`encode_labels`);
    masks float32 (B, H, W, 1) of 0 / 1 when `mask_dir` is given.
    """
    if cache not in ("auto", "memory", "off"):
        raise ValueError(f"cache must be 'auto', 'memory' or 'off', got {cache!r}")
    if len(split) == 0:
        raise PatchNetError(f"{name}: no images")
    mask_paths = _mask_paths(split, mask_dir) if mask_dir is not None else None
    keep = cache == "memory" or (cache == "auto" and _fits_in_memory(split, preprocessing, cache_limit_bytes))
    good, arrays = _decode_pass(split, preprocessing, mask_paths, keep)
    if len(good) < len(split):
        bad_indices = sorted(set(range(len(split))) - set(good.tolist()))
        bad = [split.paths[index] for index in bad_indices]
        if not skip_bad:
            what = f" (or its mask {mask_paths[bad_indices[0]]})" if mask_paths else ""
            others = f"; {len(bad) - 1} more bad file(s)" if len(bad) > 1 else ""
            hint = "; --skip-bad leaves such files out" if skip_bad is False else ""
            raise PatchNetError(
                f"{bad[0]}{what}: missing or not a decodable image (JPEG, PNG, BMP, GIF or TIFF){others}{hint}"
            )
        emptied = sorted(set(split.labels.tolist()) - set(split.labels[good].tolist()))
        if emptied:  # training on the classes that are left would "succeed" at a different task
            first_bad = next(path for path, label in zip(split.paths, split.labels) if label == emptied[0])
            raise PatchNetError(
                f"{name}: no decodable image left in {os.path.dirname(first_bad)} after skipping "
                f"{len(bad)} undecodable file(s) (e.g. {first_bad})"
            )
        on_skip(name, bad)
        split = Split([split.paths[index] for index in good], split.labels[good])
        mask_paths = [mask_paths[index] for index in good] if mask_paths is not None else None

    if keep:  # the decode pass's preprocessed tensors
        columns = tuple(tf.constant(array) for array in arrays)
    else:
        columns = (tf.constant(split.paths), tf.constant(split.labels))
        columns += (tf.constant(mask_paths),) if mask_paths is not None else ()
    load = _loader(preprocessing, mask_paths is not None)

    def element(index):
        picked = tuple(tf.gather(column, index) for column in columns)
        return picked if keep else load(*picked)

    batches = -(-len(split) // batch_size)
    draws = batches * batch_size if balance else len(split)

    def one_epoch(order):
        return (tf.data.Dataset.from_tensor_slices(order)
                .map(element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .batch(batch_size))

    first, last = epochs
    # Every epoch's order computed here, not by Python inside the pipeline: a py_func that runs on
    # the main thread swallows the KeyboardInterrupt of a Ctrl-C into a dataset error.
    orders = np.stack([epoch_order(split.labels, seed, epoch, shuffle=shuffle, balance=balance, draws=draws)
                       for epoch in range(first, last)]).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices(orders).flat_map(one_epoch)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches * (last - first)))
    options = tf.data.Options()
    # Sharding by data, not files: the sources are in-memory tensors or a path list.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
