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

from collections.abc import Sequence

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from patchnet_tf.errors import PatchNetError


def image_mask_metrics(heat: np.ndarray, mask: np.ndarray, *, threshold: float = 0.5) -> tuple[float, float, float]:
    """(exact match, recall or NaN, AUROC or NaN) of one (H, W) heatmap against its mask.

    Args:
        heat: (H, W) heatmap, class 1 = high.
        mask: (H, W) expert mask, nonzero = class-1 feature.
        threshold: heat above it marks a pixel as class 1.

    Example:

    >>> heat = np.array([[0.9, 0.2], [0.6, 0.1]])
    >>> mask = np.array([[1, 0], [0, 0]])
    >>> image_mask_metrics(heat, mask)  # 3 of 4 pixels agree; the masked one is marked and ranks first
    (0.75, 1.0, 1.0)
    """
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


def border_band(shape: tuple[int, int], width: int) -> np.ndarray:
    """bool (H, W): True within `width` pixels of the image border.

    Example:

    >>> border_band((4, 5), 1).astype(int)
    array([[1, 1, 1, 1, 1],
           [1, 0, 0, 0, 1],
           [1, 0, 0, 0, 1],
           [1, 1, 1, 1, 1]])
    """
    band = np.ones(shape, bool)
    band[width : shape[0] - width, width : shape[1] - width] = False
    return band


def mask_metrics(
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    *,
    threshold: float = 0.5,
    border: int | None = None,
) -> dict[str, float | int]:
    """Averages of `image_mask_metrics` over images, each over the images it is defined for.

    Args:
        heatmaps: (H, W) heatmaps, one per image.
        masks: their (H, W) masks, in the same order (PatchNetError if the
            counts differ).
        threshold: heat above it marks a pixel as class 1.
        border: also report exact match apart for the band of this many
            pixels along the border and for the interior.

    Returns:
        A dict with threshold, exact_match, recall, auroc (NaN when
        undefined) and the number of images each was averaged over (images,
        recall_images, auroc_images); with `border` also border,
        exact_match_border and exact_match_interior (module docstring).

    Example:

    >>> heat = np.array([[0.9, 0.2], [0.6, 0.1]])
    >>> result = mask_metrics([heat, heat], [np.array([[1, 0], [0, 0]]), np.zeros((2, 2))])
    >>> result["exact_match"], result["recall"], result["recall_images"]  # an empty mask has no recall
    (0.625, 1.0, 1)
    """
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


def read_mask(
    path: str, size: tuple[int, int] | None = None, *, image_shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """A binary mask PNG -> bool (H, W), white (>= 128) = class-1 feature.

    `image_shape` (H, W) of the image it belongs to is checked (a mask must
    have the size of its image); `size` (H, W) resizes with nearest neighbour, as the
    image is resized to the model input. Raises PatchNetError for an
    unreadable file or a size that differs from the image's.

    Example:

    >>> import os, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "mask.png")
    ...     _ = cv2.imwrite(path, np.array([[0, 255], [255, 255]], np.uint8))
    ...     mask = read_mask(path, size=(4, 4), image_shape=(2, 2, 3))
    >>> mask.shape, int(mask.sum())
    ((4, 4), 12)
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


def format_percent(value: float) -> str:
    """A fraction as a percentage with one decimal; NaN (undefined) as "n/a".

    Example:

    >>> format_percent(0.1234), format_percent(float("nan"))
    ('12.3%', 'n/a')
    """
    return "n/a" if np.isnan(value) else f"{100 * value:.1f}%"


def format_number(value: float, digits: int = 3) -> str:
    """A number with `digits` decimals; NaN (undefined) as "n/a".

    Example:

    >>> format_number(0.98765), format_number(float("nan"))
    ('0.988', 'n/a')
    """
    return "n/a" if np.isnan(value) else f"{value:.{digits}f}"


def confusion_matrix(
    labels: Sequence[int] | np.ndarray, predicted: Sequence[int] | np.ndarray, classes: int
) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class.

    Example:

    >>> confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3)
    array([[1, 0, 0],
           [0, 1, 1],
           [0, 0, 1]])
    """
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return matrix


def format_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str]) -> str:
    """The matrix as aligned text: rows true classes, columns predicted ones.

    Example:

    >>> print(format_confusion_matrix(np.array([[3, 1], [0, 4]]), ["cat", "dog"]))
                  predicted:      cat      dog
         cat  true              3        1
         dog  true              0        4
    """
    width = max(8, *(len(name) for name in class_names), len(str(int(matrix.max(initial=0)))))
    lines = [" " * width + "  predicted: " + " ".join(f"{name:>{width}}" for name in class_names)]
    for name, row in zip(class_names, matrix):
        lines.append(f"{name:>{width}}  true       " + " ".join(f"{int(value):>{width}}" for value in row))
    return "\n".join(lines)


def confusion_matrix_image(matrix: np.ndarray, class_names: Sequence[str], cell: int = 64) -> np.ndarray:
    """RGB uint8 picture of the matrix: each cell shaded by its row's fraction, with its count.

    Rows are true classes, columns predicted ones, labelled by their index
    (the names are in the title bar, in order), so long names never overlap.
    `cell` is the side of a cell in pixels.

    Example:

    >>> confusion_matrix_image(np.array([[3, 1], [0, 4]]), ["cat", "dog"], cell=32).shape
    (88, 88, 3)
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
