"""The `patchnet` console script: the command table, every command's parser and the flag types,
free of TensorFlow.

Importing anything in `patchnet_tf` imports TensorFlow (the package registers
its Keras layers on import, so `keras.models.load_model` needs nothing more),
which takes seconds. This module sits outside the package, and each command's
flags are declared in a TF-free module (`pipelines/flags.py`,
`serving/flags.py`), so `patchnet`, `patchnet COMMAND --help`, a mistyped
command and a bad flag value answer at once. Only a command line that parsed
hands over to `patchnet_tf.cli`, which imports the command's module and runs it.
"""

import argparse
import copy
import importlib
import math
import os
import sys

# name: (module whose run(args) runs it, TF-free module whose add_<name>_arguments(parser) declares its flags
# and, where the command passes flags on to another tool, parse_<name>_arguments(parser, argv) parses them;
# summary)
COMMANDS = {
    "train": ("pipelines.train", "pipelines.flags", "train a model with keras fit on a folder or ISIC dataset"),
    "heatmap": ("pipelines.heatmaps", "pipelines.flags", "write heatmap PNGs (grayscale and overlay) for images"),
    "evaluate": ("pipelines.evaluate", "pipelines.flags", "loss, accuracy, AUROC (and mask metrics) on a dataset"),
    "export": ("pipelines.export", "pipelines.flags", "export a SavedModel with classify and heatmap signatures"),
    "push": ("pipelines.push", "pipelines.flags", "evaluate, bless, infra-validate and push a version for serving"),
    "serve": ("serving.server", "serving.flags", "run the local TF-Serving-compatible gRPC server"),
    "predict": ("serving.client", "serving.flags", "query a TF Serving (or local) server over gRPC"),
    "compare": ("pipelines.compare", "pipelines.flags", "PatchNet vs CAM vs Grad-CAM: the paper's tables and figure"),
    "sweep": ("pipelines.sweep", "pipelines.flags", "one training run per setting, with a table and HParams logs"),
    "demo": ("pipelines.demo", "pipelines.flags", "the whole job on the bundled dataset: train, heatmaps, serve"),
    "bulk": ("pipelines.bulk", "pipelines.flags", "heatmaps and a results table for a whole archive, on Apache Beam"),
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


# --- flag value types, shared by every command (pipelines/ and serving/ alike) -----------------------

def _integer(text, low, high, expected):
    """int(text) if low <= it <= high (high None: no upper bound), else an argparse error saying `expected`."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text):
    return _integer(text, 1, None, "a positive integer")


def nonnegative_int(text):
    return _integer(text, 0, None, "an integer >= 0")


def port_number(text):
    """A TCP port, 0 (any free one) to 65535; larger numbers would wrap around."""
    return _integer(text, 0, 65535, "a port number from 0 to 65535")


def host_port(text):
    """A server's host:port, port 1 to 65535 (gRPC would wait for a bad one until --wait, then time out)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected host:port with a port from 1 to 65535 (e.g. localhost:8500), got {text!r}")
    return text


def message_bytes(text):
    """A gRPC message size cap: 1 to INT32_MAX (gRPC's limit is a C int; TF Serving uses INT32_MAX)."""
    return _integer(text, 1, 2**31 - 1, "a byte count from 1 to 2147483647")


def cell_pixels(text):
    """A figure cell's side. At most 1024: the figure is rows x 5 cells, and far larger cells run out of
    memory only when the figure is drawn, after the training."""
    return _integer(text, 1, 1024, "a cell size from 1 to 1024 pixels")


def _finite(text, accept, expected):
    """float(text) if finite and accept(value), else an argparse error saying `expected` (NaN never passes)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and accept(value)):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text):
    return _finite(text, lambda value: value > 0, "a positive finite number")  # NaN, inf would train to NaN


def nonnegative_float(text):
    return _finite(text, lambda value: value >= 0, "a finite number >= 0")


def unit_interval(text):
    """Thresholds, accuracies, AUROCs: 0 to 1."""
    return _finite(text, lambda value: 0 <= value <= 1, "a number from 0 to 1")


def open_unit_interval(text):
    """A fraction of a split that must leave both parts non-empty."""
    return _finite(text, lambda value: 0 < value < 1, "a number between 0 and 1 (both excluded)")


def zoom_factor(text):
    return _finite(text, lambda value: value >= 1, "a zoom factor >= 1 (1: no zoom)")


def image_size(text):
    """'192x256' or '128' -> (height, width)."""
    parts = text.lower().split("x")
    try:
        size = tuple(int(part) for part in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 192x256, got {text!r}")
    return size


# --- the command line ----------------------------------------------------------------------------------

def answer_without_a_command(argv):
    """`patchnet`, `patchnet --help`, `patchnet fly`: the usage, the command list or the error."""
    parser = Parser(
        prog="patchnet",
        description="PatchNet: interpretable image classification with dense evidence maps.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, _, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    parser.parse_args(argv)  # prints the help or the error and exits
    return 2


def command_parser(name):
    """`patchnet NAME`'s parser, built without importing TensorFlow."""
    _, flags, summary = COMMANDS[name]
    parser = Parser(prog=f"patchnet {name}", description=summary)
    getattr(importlib.import_module(flags), f"add_{name}_arguments")(parser)
    return parser


def parse_command(name, argv):
    """NAME's flags parsed from ARGV; --help and a bad flag exit here, before TensorFlow is imported."""
    parser = command_parser(name)
    parse = getattr(importlib.import_module(COMMANDS[name][1]), f"parse_{name}_arguments", None)
    return parse(parser, argv) if parse else parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        return answer_without_a_command(argv)
    args = parse_command(argv[0], argv[1:])
    if argv[0] == "serve":
        # Read by TensorFlow when it starts, so here: oneDNN's ops then allocate with malloc, which
        # serving/memory.py can trim, instead of a BFC pool that keeps a burst's peak (docs/serving.md).
        os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")
    from patchnet_tf.cli import run_command  # imports TensorFlow

    return run_command(argv[0], args)


if __name__ == "__main__":
    sys.exit(main())
