"""The one exception type that the command line turns into a one-line message."""


class PatchNetError(Exception):
    """A problem with the user's input (a path, an image, a flag, a request).

    The message names the input and says what was expected; `patchnet` prints
    it as one line and exits with `exit_status` instead of showing a traceback.

    Example:

    >>> from patchnet_tf import build_patchnet
    >>> try:
    ...     build_patchnet(5, classes=0)
    ... except PatchNetError as error:
    ...     print(error.exit_status, error)
    2 classes must be 1 (binary, sigmoid) or K > 1 (softmax), got 0
    """

    exit_status: int = 2


class WorkerLost(PatchNetError):
    """A multi-worker run lost a worker (killed, preempted, unreachable).

    Not the user's input: a distinct status (EX_TEMPFAIL, "try again") lets a
    cluster scheduler restart the workers, which resumes the run.
    """

    exit_status: int = 75


class MissingSplit(PatchNetError):
    """A dataset has no folder for the split asked for (`compare` then falls back to another)."""


class PositiveClassMismatch(PatchNetError):
    """The positive class asked for does not fit a folder dataset's class folders
    (`evaluate` then reports that the data's classes differ from the model's)."""
