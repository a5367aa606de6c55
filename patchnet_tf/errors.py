"""The one exception type that the command line turns into a one-line message."""


class PatchNetError(Exception):
    """A problem with the user's input (a path, an image, a flag, a request).

    The message names the input and says what was expected; `patchnet` prints
    it as one line and exits non-zero instead of showing a traceback.
    """
