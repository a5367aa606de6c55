"""The bundled texture dataset: layout, exact masks, grey by default, variants, determinism."""

import glob
import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipelines.data import load_folder_dataset
from pipelines.textures import texture_example, write_texture_dataset


def digest(root):
    files = sorted(glob.glob(os.path.join(root, "**", "*.png"), recursive=True))
    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in files)).hexdigest(), len(files)


def test_layout_masks_and_class_order(tmp_path):
    root = write_texture_dataset(str(tmp_path / "tex"), image_size=(40, 48), count={"train": 3, "val": 2, "test": 1})
    stems = []
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        for name in ("plain", "inlay"):
            files = sorted(glob.glob(os.path.join(root, split, name, "*.png")))
            assert len(files) == count
            for path in files:
                stem = os.path.splitext(os.path.basename(path))[0]
                assert stem.startswith(f"{name}-{split}-")
                stems.append(stem)
                image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
                mask = cv2.imread(os.path.join(root, "masks", stem + ".png"), cv2.IMREAD_UNCHANGED)
                assert image.shape == (40, 48) and image.dtype == np.uint8  # grey: texture alone
                assert mask.shape == (40, 48) and mask.dtype == np.uint8
                assert set(np.unique(mask)) <= {0, 255}
                if name == "plain":
                    assert mask.max() == 0
                else:
                    assert 0.02 < np.mean(mask > 0) < 0.9
    assert len(set(stems)) == len(stems) == len(os.listdir(os.path.join(root, "masks")))
    assert json.loads(Path(os.path.join(root, "dataset.json")).read_text())["class_names"] == ["plain", "inlay"]
    dataset = load_folder_dataset(root)
    assert dataset.class_names == ("plain", "inlay")  # class 1 = inlay
    assert set(dataset.splits) == {"train", "val", "test"}


def test_the_mask_marks_the_inlay_texture():
    """Brick (the inlay) is flat between mortar lines; grass and gravel are busy."""
    ratios = []
    for index in range(6):
        image, mask = texture_example(0, "train", True, index, (64, 64))
        assert image.shape == (64, 64, 1)
        gradient = np.abs(cv2.Laplacian(image[..., 0].astype(np.float32), cv2.CV_32F))
        inside = cv2.erode(mask, np.ones((5, 5), np.uint8)) > 0
        outside = cv2.erode(255 - mask, np.ones((5, 5), np.uint8)) > 0
        if inside.sum() > 20:
            ratios.append(gradient[inside].mean() / gradient[outside].mean())
    assert len(ratios) >= 3 and np.median(ratios) < 0.7


def test_deterministic_from_seed_and_stable_when_growing(tmp_path):
    a = write_texture_dataset(str(tmp_path / "a"), image_size=32, count=2, seed=7)
    b = write_texture_dataset(str(tmp_path / "b"), image_size=32, count=2, seed=7)
    c = write_texture_dataset(str(tmp_path / "c"), image_size=32, count=2, seed=8)
    assert digest(a) == digest(b)
    assert digest(a)[0] != digest(c)[0]
    first, _ = texture_example(7, "val", True, 1, (32, 32))
    grown = write_texture_dataset(str(tmp_path / "d"), image_size=32, count=4, seed=7)
    again = cv2.imread(os.path.join(grown, "val", "inlay", "inlay-val-0001.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(again, first[..., 0])


def test_grey_classes_have_the_same_brightness():
    """No shortcut: plain and inlay images differ in texture, not in mean grey level."""
    for variant in ("brick", "grass"):
        means = [[texture_example(0, "train", inlay, index, (64, 64), variant=variant)[0].mean()
                  for index in range(24)] for inlay in (False, True)]
        spread = np.std(means[0]) + np.std(means[1])
        assert abs(np.mean(means[0]) - np.mean(means[1])) < spread, variant


def test_variants_swap_materials_and_tint_is_an_option():
    brick, brick_mask = texture_example(3, "train", True, 0, (32, 32), variant="brick")
    grass, _ = texture_example(3, "train", True, 0, (32, 32), variant="grass")
    assert not np.array_equal(brick, grass)
    tinted, tinted_mask = texture_example(3, "train", True, 0, (32, 32), variant="brick", tint=True)
    assert tinted.shape == (32, 32, 3) and np.ptp(tinted.astype(int), axis=-1).max() > 0  # coloured
    np.testing.assert_array_equal(tinted_mask, brick_mask)  # same draw, only the colour differs
    with pytest.raises(ValueError, match="variant"):
        texture_example(3, "train", True, 0, (32, 32), variant="marble")
