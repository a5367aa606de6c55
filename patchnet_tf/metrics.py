"""Heatmap-against-mask metrics (paper Table 2 and 7; docs/comparison.md).

Per image, the heatmap is thresholded (pixel marked 1 where heat > threshold,
0.5 by default) and compared with the binary expert mask (nonzero = class-1
feature); then each metric is averaged over the images it is defined for:

- exact match: fraction of pixels where the thresholded map and the mask
  agree; every image.
- recall: masked pixels marked 1 / masked pixels; only images whose mask is
  not empty.
- AUROC: area under the ROC curve of the raw heatmap scores against the
  mask's pixels; only images whose mask has both values.

With `border=w`, exact match is also reported apart for the band of w
pixels along the image border and for the interior inside it: centred
patches there hang over the border, so a map can be worse there than inside.

An average over no images is NaN (reported as "n/a"), never a made-up 0.
"""

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from patchnet_tf.errors import PatchNetError


def image_mask_metrics(heat, mask, *, threshold=0.5):
    """(exact match, recall or NaN, AUROC or NaN) of one (H, W) heatmap against its mask."""
    heat = np.asarray(heat, np.float64)
    mask = np.asarray(mask) > 0
    if heat.shape != mask.shape or heat.ndim != 2:
        raise PatchNetError(f"heatmap {heat.shape} and mask {mask.shape} must be the same (H, W)")
    marked = heat > threshold
    exact_match = float(np.mean(marked == mask))
    masked = int(mask.sum())
    recall = float(np.sum(marked & mask) / masked) if masked else float("nan")
    auroc = float(roc_auc_score(mask.ravel(), heat.ravel())) if 0 < masked < mask.size else float("nan")
    return exact_match, recall, auroc


def border_band(shape, width):
    """bool (H, W): True within `width` pixels of the image border."""
    band = np.ones(shape, bool)
    band[width : shape[0] - width, width : shape[1] - width] = False
    return band


def mask_metrics(heatmaps, masks, *, threshold=0.5, border=None):
    """Averages over images: a dict with exact_match, recall, auroc (NaN when undefined)
    and the number of images each was averaged over (images, recall_images, auroc_images);
    with `border` also exact_match_border and exact_match_interior (module docstring)."""
    if len(heatmaps) != len(masks):
        raise PatchNetError(f"{len(heatmaps)} heatmaps but {len(masks)} masks")
    if border is not None and len(heatmaps):
        band = border_band(np.shape(masks[0]), border)
        agree = (np.asarray(heatmaps) > threshold) == (np.asarray(masks) > 0)
        border_result = {
            "border": int(border),
            "exact_match_border": float(np.mean(agree[:, band])) if band.any() else float("nan"),
            "exact_match_interior": float(np.mean(agree[:, ~band])) if (~band).any() else float("nan"),
        }
    else:
        border_result = {}
    rows = np.array(
        [image_mask_metrics(heat, mask, threshold=threshold) for heat, mask in zip(heatmaps, masks)],
        np.float64,
    ).reshape(-1, 3)
    result = {"threshold": float(threshold), "images": len(rows)}
    for column, name in enumerate(("exact_match", "recall", "auroc")):
        values = rows[:, column]
        defined = values[~np.isnan(values)]
        result[name] = float(defined.mean()) if len(defined) else float("nan")
        if name != "exact_match":
            result[f"{name}_images"] = int(len(defined))
    return {**result, **border_result}


def read_mask(path, size=None, *, image_shape=None):
    """A binary mask PNG -> bool (H, W), white (>= 128) = class-1 feature.

    `image_shape` (H, W) of the image it belongs to is checked (a mask must
    have the size of its image); `size` (H, W) resizes with nearest neighbour, as the
    image is resized to the model input.
    """
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise PatchNetError(f"{path}: not a readable mask image (expected a binary PNG)")
    if image_shape is not None and tuple(mask.shape) != tuple(image_shape[:2]):
        raise PatchNetError(
            f"{path}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
            f"{image_shape[0]}x{image_shape[1]}; masks must have the image's size"
        )
    if size is not None and tuple(mask.shape) != tuple(size):
        mask = cv2.resize(mask, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return mask >= 128


def format_percent(value):
    return "n/a" if np.isnan(value) else f"{100 * value:.1f}%"


def format_number(value, digits=3):
    return "n/a" if np.isnan(value) else f"{value:.{digits}f}"


def confusion_matrix(labels, predicted, classes):
    """(K, K) int64 counts: row = true class, column = predicted class."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def format_confusion_matrix(matrix, class_names):
    """The matrix as aligned text: rows true classes, columns predicted ones."""
    width = max(8, *(len(name) for name in class_names), len(str(int(matrix.max(initial=0)))))
    lines = [" " * width + "  predicted: " + " ".join(f"{name:>{width}}" for name in class_names)]
    for name, row in zip(class_names, matrix):
        lines.append(f"{name:>{width}}  true       " + " ".join(f"{int(value):>{width}}" for value in row))
    return "\n".join(lines)


def confusion_matrix_image(matrix, class_names, cell=64):
    """RGB uint8 picture of the matrix: each cell shaded by its row's fraction, with its count.

    Rows are true classes, columns predicted ones, labelled by their index
    (the names are in the title bar, in order), so long names never overlap.
    """
    classes = len(class_names)
    margin = 24
    picture = np.full((margin + classes * cell, margin + classes * cell, 3), 255, np.uint8)
    totals = np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for row in range(classes):
        for column in range(classes):
            shade = int(round(255 * (1.0 - matrix[row, column] / totals[row, 0])))
            top, left = margin + row * cell, margin + column * cell
            picture[top : top + cell - 1, left : left + cell - 1] = (shade, shade, 255)
            text = str(int(matrix[row, column]))
            colour = (255, 255, 255) if shade < 128 else (0, 0, 0)
            cv2.putText(picture, text, (left + 6, top + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, colour, 1,
                        cv2.LINE_AA)
        cv2.putText(picture, str(row), (6, margin + row * cell + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(picture, str(row), (margin + row * cell + cell // 2 - 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return picture
