"""Mask metrics (paper Table 2; docs/comparison.md) against cases computed by hand, and mask file handling."""

import math

import cv2
import numpy as np
import pytest

from patchnet_tf.errors import PatchNetError
from patchnet_tf.metrics import image_mask_metrics, mask_metrics, read_mask

# A 2 x 3 heatmap and mask:
#   heat  0.9 0.2 0.6      marked (> 0.5)  1 0 1
#         0.4 0.7 0.1                       0 1 0
#   mask    1   1   0
#           0   1   0
HEAT = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1]])
MASK = np.array([[1, 1, 0], [0, 1, 0]], np.uint8)


def test_one_image_by_hand():
    exact, recall, auroc = image_mask_metrics(HEAT, MASK)
    # agree at (0,0) (1,0) (1,1) (1,2): 4 of 6 pixels
    assert exact == pytest.approx(4 / 6)
    # masked pixels (0,0) (0,1) (1,1); marked among them (0,0) (1,1): 2 of 3
    assert recall == pytest.approx(2 / 3)
    # positives 0.9 0.2 0.7, negatives 0.6 0.4 0.1: pairs won 3 + 1 + 3 = 7 of 9
    assert auroc == pytest.approx(7 / 9)


def test_threshold_is_a_parameter_and_strict():
    exact, recall, _ = image_mask_metrics(HEAT, MASK, threshold=0.15)
    # marked: everything but 0.1 -> agree at (0,0) (0,1) (1,1) (1,2): 4 of 6; recall 3 of 3
    assert exact == pytest.approx(4 / 6)
    assert recall == pytest.approx(1.0)
    # a pixel exactly at the threshold is not marked
    assert image_mask_metrics(np.full((1, 2), 0.5), np.array([[1, 0]]))[:2] == (0.5, 0.0)


def test_empty_mask_has_exact_match_only():
    heat = np.array([[0.8, 0.1], [0.3, 0.2]])
    exact, recall, auroc = image_mask_metrics(heat, np.zeros((2, 2)))
    assert exact == pytest.approx(3 / 4)
    assert math.isnan(recall) and math.isnan(auroc)


def test_full_mask_has_recall_but_no_auroc():
    heat = np.array([[0.8, 0.1], [0.3, 0.6]])
    exact, recall, auroc = image_mask_metrics(heat, np.full((2, 2), 255, np.uint8))
    assert exact == pytest.approx(2 / 4)
    assert recall == pytest.approx(2 / 4)
    assert math.isnan(auroc)


def test_averages_skip_images_where_a_metric_is_undefined():
    heatmaps = [HEAT, np.array([[0.8, 0.1, 0.3], [0.2, 0.2, 0.2]]), np.full((2, 3), 0.9)]
    masks = [MASK, np.zeros((2, 3)), np.ones((2, 3))]
    result = mask_metrics(heatmaps, masks)
    # exact: 4/6, 5/6, 6/6 over 3 images
    assert result["exact_match"] == pytest.approx((4 / 6 + 5 / 6 + 1.0) / 3)
    # recall: images 1 and 3 only (2/3 and 1)
    assert result["recall"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert result["recall_images"] == 2
    # AUROC: image 1 only
    assert result["auroc"] == pytest.approx(7 / 9)
    assert result["auroc_images"] == 1
    assert result["images"] == 3


def test_no_defined_image_gives_nan_not_zero():
    result = mask_metrics([np.zeros((2, 2))], [np.zeros((2, 2))])
    assert result["exact_match"] == 1.0
    assert math.isnan(result["recall"]) and math.isnan(result["auroc"])
    assert result["recall_images"] == 0 and result["auroc_images"] == 0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(PatchNetError, match="same"):
        image_mask_metrics(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(PatchNetError, match="2 heatmaps but 1 masks"):
        mask_metrics([np.zeros((2, 2))] * 2, [np.zeros((2, 2))])


def test_masks_are_resized_with_nearest_neighbour_and_checked(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :2] = 255
    mask[7, 7] = 100  # below half grey: not a feature
    path = str(tmp_path / "a.png")
    cv2.imwrite(path, mask)
    small = read_mask(path, (4, 4), image_shape=(8, 8, 3))
    assert small.dtype == bool
    np.testing.assert_array_equal(small, np.array([[1, 0, 0, 0]] * 2 + [[0, 0, 0, 0]] * 2, bool))
    assert read_mask(path).sum() == 8
    with pytest.raises(PatchNetError, match="must have the image's size"):
        read_mask(path, image_shape=(16, 16, 3))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(PatchNetError, match="bad.png"):
        read_mask(str(tmp_path / "bad.png"))
