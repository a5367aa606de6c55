"""`patchnet <command>`: the command-line front door.

Each command lives in its own module with `add_arguments(parser)` and
`run(args)`; the module is imported only when its command runs, so the
library never imports the pipelines or the serving code otherwise. The
command table and the bare `patchnet --help` live in `patchnet_launcher`,
outside this package, because importing the package imports TensorFlow.
"""

import importlib
import sys

from patchnet_launcher import COMMANDS, Parser, main  # noqa: F401 (main: `patchnet` and python -m patchnet_tf)
from patchnet_tf.errors import PatchNetError


def run_command(name, argv):
    """Parses `patchnet NAME ARGV` with NAME's flags and runs it; the exit status."""
    module_name, summary = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = Parser(prog=f"patchnet {name}", description=summary)
    module.add_arguments(parser)
    # A command that passes flags on to another tool (bulk: Beam's pipeline options) parses them itself.
    parse = getattr(module, "parse_arguments", None)
    args = parse(parser, argv) if parse else parser.parse_args(argv)
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
