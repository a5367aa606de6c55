"""One call for a class-1 evidence map, whatever the model: PatchNet, CAM or VGG-11."""

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from patchnet_tf.baselines import arch_of
from patchnet_tf.baselines import heatmap as baseline_heatmap
from patchnet_tf.heatmaps import heatmap as patchnet_heatmap
from patchnet_tf.precision import at_precision


def explain(
    model: keras.Model,
    images: np.ndarray | tf.Tensor,
    *,
    stride: int = 1,
    on_rows: Callable[[int], object] | None = None,
    precision: str | None = None,
) -> np.ndarray:
    """(B, H, W) float32 in [0, 1], white = class 1; (B, H, W, K), one map per class, for a K-class model.

    PatchNet models: `patchnet_tf.heatmap` (the subnet on the patch centred
    at every `stride`-th pixel). CAM and VGG-11 models: their CAM / Grad-CAM
    map (`patchnet_tf.baselines.heatmap`); `stride` does not apply to them.
    `on_rows(n)` is called as n more rows of the maps are done (progress).
    `precision` as in `patchnet_tf.heatmap`: None computes as the model does.

    Example:

    >>> from patchnet_tf.baselines import build
    >>> from patchnet_tf.model import build_patchnet
    >>> images = np.zeros((2, 16, 16, 3), "float32")
    >>> explain(build_patchnet(5, filters=2, conv_layers=1), images).shape
    (2, 16, 16)
    >>> explain(build("cam", (16, 16, 3), width=2), images).shape
    (2, 16, 16)
    """
    if precision is not None:
        model = at_precision(model, precision)
    if arch_of(model) == "patchnet":
        return patchnet_heatmap(model, images, stride=stride, on_rows=on_rows)
    maps = baseline_heatmap(model, images)  # one forward and backward pass: no bands to report
    if on_rows is not None:
        on_rows(maps.shape[0] * maps.shape[1])
    return maps
