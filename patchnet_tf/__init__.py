"""PatchNet in Keras 3: context-restricted image classifiers with dense evidence maps."""

from patchnet_tf.errors import PatchNetError
from patchnet_tf.heatmaps import filter_heatmaps, heatmap
from patchnet_tf.layers import ExtractPatches, MeanPatchProbability, PatchwiseSubnet
from patchnet_tf.model import PatchNet, build_patchnet, build_subnet

__all__ = [
    "ExtractPatches",
    "MeanPatchProbability",
    "PatchNet",
    "PatchNetError",
    "PatchwiseSubnet",
    "build_patchnet",
    "build_subnet",
    "filter_heatmaps",
    "heatmap",
]
