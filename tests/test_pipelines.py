"""tf.data pipelines: formats, splits, bad files, class balance, masks, caching."""

import os

import cv2
import numpy as np
import pytest

from patchnet_tf.errors import PatchNetError
from patchnet_tf.preprocessing import Preprocessing
from pipelines.data import (
    Split,
    image_dataset,
    load_dataset,
    load_folder_dataset,
    mask_path_for,
    read_image,
)

PREPROCESSING = Preprocessing(image_size=(8, 8))


def write_image(path, value, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((*size, 3), value, np.uint8))
    return path


def make_folder(root, counts, prefix=""):
    """root/<class>/<prefix><class>-<i>.png; class c images have pixel value 10 + 100 c."""
    for label, (name, count) in enumerate(counts.items()):
        for index in range(count):
            write_image(os.path.join(root, name, f"{prefix}{name}-{index:03d}.png"), 10 + 100 * label)
    return root


def labels_of(dataset):
    return np.concatenate([batch[1].numpy().ravel() for batch in dataset])


def test_split_subfolders_and_class_order(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        make_folder(str(tmp_path / split), {"benign": count, "malignant": count}, prefix=split)
    dataset = load_folder_dataset(str(tmp_path))
    assert dataset.class_names == ("benign", "malignant")
    assert {name: len(split) for name, split in dataset.splits.items()} == {"train": 8, "val": 4, "test": 6}
    flipped = load_folder_dataset(str(tmp_path), positive_class="benign")
    assert flipped.class_names == ("malignant", "benign")
    assert flipped.splits["train"].labels.tolist() == [0] * 4 + [1] * 4
    with pytest.raises(PatchNetError, match="nevus"):
        load_folder_dataset(str(tmp_path), positive_class="nevus")


def test_seeded_fraction_is_stratified_and_reproducible(tmp_path):
    make_folder(str(tmp_path), {"a": 10, "b": 20})
    first = load_folder_dataset(str(tmp_path), val_fraction=0.2, seed=3)
    again = load_folder_dataset(str(tmp_path), val_fraction=0.2, seed=3)
    other = load_folder_dataset(str(tmp_path), val_fraction=0.2, seed=4)
    assert first.splits["val"].paths == again.splits["val"].paths
    assert first.splits["val"].paths != other.splits["val"].paths
    assert np.bincount(first.splits["val"].labels).tolist() == [2, 4]
    assert not set(first.splits["val"].paths) & set(first.splits["train"].paths)


def test_batches_are_preprocessed_images_and_float_labels(tmp_path):
    make_folder(str(tmp_path), {"a": 3, "b": 3})
    split = load_folder_dataset(str(tmp_path), val_fraction=0.5).splits["train"]
    for cache in ("memory", "off"):
        images, labels = next(iter(image_dataset(split, Preprocessing(image_size=(4, 6)), 2, cache=cache)))
        assert images.shape == (2, 4, 6, 3) and images.dtype.name == "float32"
        assert labels.shape == (2, 1) and labels.dtype.name == "float32"
        expected = (10 + 100 * labels.numpy()[:, 0]) / 255  # pixel value 10 + 100 * class
        np.testing.assert_allclose(images.numpy(), np.broadcast_to(expected[:, None, None, None], images.shape),
                                   atol=1e-6)


def test_cached_and_streamed_pipelines_agree(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(6):
        path = str(tmp_path / ("a" if index % 2 else "b") / f"{index}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cv2.imwrite(path, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    split = load_folder_dataset(str(tmp_path), val_fraction=0.5).splits["train"]
    cached = [b[0].numpy() for b in image_dataset(split, PREPROCESSING, 2, shuffle=True, seed=1, cache="memory")]
    streamed = [b[0].numpy() for b in image_dataset(split, PREPROCESSING, 2, shuffle=True, seed=1, cache="off")]
    np.testing.assert_allclose(np.concatenate(cached), np.concatenate(streamed))


def test_tiff_images_decode_like_png(tmp_path):
    """The folder format admits .tif; TensorFlow cannot decode it, OpenCV does (8 and 16 bit)."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), image)
    cv2.imwrite(str(tmp_path / "x.tif"), image)
    cv2.imwrite(str(tmp_path / "x16.tiff"), image.astype(np.uint16) * 257)
    png = read_image(str(tmp_path / "x.png"))
    np.testing.assert_allclose(read_image(str(tmp_path / "x.tif")), png, atol=1e-6)
    np.testing.assert_allclose(read_image(str(tmp_path / "x16.tiff")), png, atol=1e-6)
    (tmp_path / "bad.tif").write_bytes(b"II*\x00 truncated")
    with pytest.raises(PatchNetError, match="bad.tif: not a decodable image"):
        read_image(str(tmp_path / "bad.tif"))
    split = Split([str(tmp_path / "x.png"), str(tmp_path / "x.tif"), str(tmp_path / "bad.tif")],
                  np.array([0, 1, 1]))
    for cache in ("memory", "off"):
        with pytest.raises(PatchNetError, match="bad.tif"):
            image_dataset(split, PREPROCESSING, 2, cache=cache)
        images = np.concatenate([batch[0].numpy() for batch in image_dataset(
            Split(split.paths[:2], split.labels[:2]), PREPROCESSING, 2, cache=cache)])
        np.testing.assert_allclose(images[0], images[1], atol=1e-6)


def test_undecodable_file_is_named_or_skipped_and_listed(tmp_path):
    make_folder(str(tmp_path), {"a": 3, "b": 3})
    bad = tmp_path / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    split = Split([str(p) for p in sorted(tmp_path.glob("*/*.png"))],
                  np.array([0, 0, 0, 1, 1, 1, 1]))
    with pytest.raises(PatchNetError, match="broken.png"):
        image_dataset(split, PREPROCESSING, 2)
    reported = []
    dataset = image_dataset(split, PREPROCESSING, 2, skip_bad=True, on_skip=lambda name, paths: reported.extend(paths))
    assert reported == [str(bad)]
    assert len(labels_of(dataset)) == 6
    missing = Split(split.paths[:2] + [str(tmp_path / "a" / "gone.png")], np.array([0, 0, 0]))
    with pytest.raises(PatchNetError, match="gone.png"):
        image_dataset(missing, PREPROCESSING, 2, cache="off")


def test_class_balance_draws_equally_from_a_1_to_9_dataset(tmp_path):
    make_folder(str(tmp_path), {"rare": 6, "common": 54})
    split = load_folder_dataset(str(tmp_path), val_fraction=0.1).splits["train"]
    assert np.mean(split.labels) < 0.15  # "rare" sorts second: class 1
    balanced = image_dataset(split, PREPROCESSING, 6, shuffle=True, balance=True, seed=0, epochs=(0, 2))
    both = labels_of(balanced)
    epochs = [both[: len(both) // 2], both[len(both) // 2:]]
    for labels in epochs:
        assert len(labels) == 9 * 6  # an epoch is still about len(split) images
        assert abs(np.mean(labels) - 0.5) < 0.02
    # Batches are mixed, not one class after the other, and epochs differ.
    batch_means = [batch[1].numpy().mean() for batch in balanced]
    assert 0.2 < np.median(batch_means) < 0.8
    assert not np.array_equal(epochs[0], epochs[1])
    # Each epoch's order depends only on (seed, epoch): what a resumed run relies on.
    assert np.array_equal(labels_of(image_dataset(split, PREPROCESSING, 6, shuffle=True, balance=True, seed=0,
                                                  epochs=(1, 2))), epochs[1])
    unbalanced = labels_of(image_dataset(split, PREPROCESSING, 6, shuffle=True, balance=False))
    assert np.mean(unbalanced) < 0.15


def test_masks_are_matched_by_stem_and_resized(tmp_path):
    make_folder(str(tmp_path / "data"), {"a": 2, "b": 2})
    masks = tmp_path / "masks"
    masks.mkdir()
    split = load_folder_dataset(str(tmp_path / "data"), val_fraction=0.5).splits["train"]
    for index, path in enumerate(split.paths):
        stem = os.path.splitext(os.path.basename(path))[0]
        mask = np.zeros((16, 16), np.uint8)
        mask[: 4 * (index + 1)] = 255
        name = stem + ("_segmentation.png" if index == 0 else ".png")  # ISIC naming works too
        cv2.imwrite(str(masks / name), mask)
    assert mask_path_for(split.paths[0], str(masks)).endswith("_segmentation.png")
    assert mask_path_for(str(tmp_path / "x" / "unknown.jpg"), str(masks)) is None
    images, labels, got = next(iter(image_dataset(split, PREPROCESSING, 8, mask_dir=str(masks))))
    assert got.shape == (len(split), 8, 8, 1)
    assert sorted(np.unique(got.numpy()).tolist()) == [0.0, 1.0]
    assert got.numpy()[:, :, 0, 0].sum(axis=1).tolist() == [2 * (i + 1) for i in range(len(split))]
    os.remove(mask_path_for(split.paths[1], str(masks)))
    with pytest.raises(PatchNetError, match=os.path.basename(split.paths[1])):
        image_dataset(split, PREPROCESSING, 8, mask_dir=str(masks))


def test_isic_csv(tmp_path):
    images = tmp_path / "ISIC-2017_Training_Data"
    rows = ["image_id,melanoma,seborrheic_keratosis"]
    for index in range(10):
        write_image(str(images / f"ISIC_{index:07d}.jpg"), 50)
        rows.append(f"ISIC_{index:07d},{float(index % 2)},0.0")
    csv_path = tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    dataset = load_dataset(str(csv_path), image_dir=str(images), val_fraction=0.2)
    assert dataset.class_names == ("benign", "melanoma")
    assert len(dataset.splits["train"]) == 8 and len(dataset.splits["val"]) == 2
    assert all(os.path.exists(path) for path in dataset.splits["train"].paths)
    batch = next(iter(image_dataset(dataset.splits["train"], PREPROCESSING, 8)))
    assert batch[0].shape == (8, 8, 8, 3)
    (tmp_path / "bad.csv").write_text("id,label\nx,1\n")
    with pytest.raises(PatchNetError, match="bad.csv"):
        load_dataset(str(tmp_path / "bad.csv"), image_dir=str(images))
    csv_path.write_text("\n".join(rows + ["ISIC_9999999,1.0,0.0"]) + "\n")
    dataset = load_dataset(str(csv_path), image_dir=str(images), val_fraction=0.2, seed=1)
    every = Split(dataset.splits["train"].paths + dataset.splits["val"].paths,
                  np.concatenate([dataset.splits["train"].labels, dataset.splits["val"].labels]))
    with pytest.raises(PatchNetError, match="ISIC_9999999"):
        image_dataset(every, PREPROCESSING, 4)
