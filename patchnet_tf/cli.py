"""`patchnet <command>`: the command-line front door.

Each command lives in its own module with `add_arguments(parser)` and
`run(args)`; the module is imported only when its command runs, so
`patchnet --help` is instant and the library never imports the pipelines or
the serving code otherwise.
"""

import argparse
import copy
import importlib
import sys

from patchnet_tf.errors import PatchNetError

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


def build_parser():
    parser = Parser(
        prog="patchnet",
        description="PatchNet: interpretable image classification with dense evidence maps.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage or the error, then exits
        return 2
    name = argv[0]
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = Parser(prog=f"patchnet {name}", description=summary)
    module.add_arguments(parser)
    # A command that passes flags on to another tool (bulk: Beam's pipeline options) parses them itself.
    parse = getattr(module, "parse_arguments", None)
    args = parse(parser, argv[1:]) if parse else parser.parse_args(argv[1:])
    try:
        return module.run(args) or 0
    except PatchNetError as error:
        print(f"patchnet {name}: error: {error}", file=sys.stderr)
        return error.exit_status
    except OSError as error:  # e.g. --out naming an existing file: the path and why, not a traceback
        where = error.filename if error.filename is not None else ""
        print(f"patchnet {name}: error: {where}{': ' if where else ''}{error.strerror or error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = name in ("train", "compare", "sweep")
        print(f"patchnet {name}: interrupted{'; run the same command to resume' if resumable else ''}",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
