"""`patchnet <command>`: runs a command whose flags `patchnet_launcher` has parsed.

Each command lives in its own module with `run(args)`; its flags are declared
in a TF-free module (`pipelines/flags.py`, `serving/flags.py`), so the
launcher answers --help and bad flags before TensorFlow is imported. The
command's module is imported only when its command runs, so the library never
imports the pipelines or the serving code otherwise.
"""

import importlib
import sys

from patchnet_launcher import COMMANDS, Parser, command_parser, main  # noqa: F401 (main: `patchnet` and python -m patchnet_tf)
from patchnet_tf.errors import PatchNetError


def run_command(name, args):
    """Runs `patchnet NAME` with its parsed flags `args`; the exit status."""
    module = importlib.import_module(COMMANDS[name][0])
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
