"""PatchNet in Keras 3: context-restricted image classifiers with dense evidence maps."""

from patchnet_tf.quiet_start import import_tensorflow

import_tensorflow()  # before anything imports it, so its start-up noise is filtered
from patchnet_tf.errors import PatchNetError  # noqa: E402
from patchnet_tf.heatmaps import filter_heatmaps, heatmap  # noqa: E402
from patchnet_tf.layers import ExtractPatches, MeanPatchProbability, PatchwiseSubnet  # noqa: E402
from patchnet_tf.model import PatchNet, build_patchnet, build_subnet  # noqa: E402

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
