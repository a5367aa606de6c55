"""The `patchnet` console script: the command table and parser, free of TensorFlow.

Importing anything in `patchnet_tf` imports TensorFlow (the package registers
its Keras layers on import, so `keras.models.load_model` needs nothing more),
which takes seconds. This module sits outside the package, so `patchnet`,
`patchnet --help` and a mistyped command answer at once; a command hands over
to `patchnet_tf.cli`, which imports that command's module.
"""

import argparse
import copy
import os
import sys

COMMANDS = {
    "train": ("pipelines.train", "train a model with keras fit on a folder or ISIC dataset"),
    "heatmap": ("pipelines.heatmaps", "write heatmap PNGs (grayscale and overlay) for images"),
    "evaluate": ("pipelines.evaluate", "loss, accuracy, AUROC (and mask metrics) on a dataset"),
    "export": ("pipelines.export", "export a SavedModel with classify and heatmap signatures"),
    "push": ("pipelines.push", "evaluate, bless, infra-validate and push a version for serving"),
    "serve": ("serving.server", "run the local TF-Serving-compatible gRPC server"),
    "predict": ("serving.client", "query a TF Serving (or local) server over gRPC"),
    "compare": ("pipelines.compare", "PatchNet vs CAM vs Grad-CAM: the paper's tables and figure"),
    "sweep": ("pipelines.sweep", "one training run per setting, with a table and HParams logs"),
    "demo": ("pipelines.demo", "the whole job on the bundled dataset: train, heatmaps, serve"),
    "bulk": ("pipelines.bulk", "heatmaps and a results table for a whole archive, on Apache Beam"),
}


class ShowDefaults(argparse.HelpFormatter):
    """--help shows every flag's default, even where the flag has no help text."""

    def _format_action(self, action):
        default = action.default
        if action.option_strings and default is not None and default is not argparse.SUPPRESS \
                and not isinstance(default, bool) and "%(default)" not in (action.help or ""):
            action = copy.copy(action)
            action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (not the whole usage block), exit status 2."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=ShowDefaults, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def answer_without_a_command(argv):
    """`patchnet`, `patchnet --help`, `patchnet fly`: the usage, the command list or the error."""
    parser = Parser(
        prog="patchnet",
        description="PatchNet: interpretable image classification with dense evidence maps.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    parser.parse_args(argv)  # prints the help or the error and exits
    return 2


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        return answer_without_a_command(argv)
    if argv[0] == "serve":
        # Read by TensorFlow when it starts, so here: oneDNN's ops then allocate with malloc, which
        # serving/memory.py can trim, instead of a BFC pool that keeps a burst's peak (docs/serving.md).
        os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
    from patchnet_tf.cli import run_command  # imports TensorFlow

    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
