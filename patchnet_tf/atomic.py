"""Writes that never leave a half-written file behind (a kill -9 keeps the old one)."""

import contextlib
import os
import tempfile
from collections.abc import Iterator

import numpy as np

from patchnet_tf.errors import PatchNetError


def check_output_path(path: str, flag: str, *, folder: bool = True) -> None:
    """Refuses, before any work, an output path that cannot be written.

    That is `path` (a folder, or with folder=False a file) or a parent of it
    that exists as the other kind: PatchNetError naming the path and `flag`
    (the command-line flag that gave it).

    Example:

    >>> with tempfile.NamedTemporaryFile() as file:
    ...     check_output_path(file.name, "--out")
    Traceback (most recent call last):
    ...
    patchnet_tf.errors.PatchNetError: /...: exists and is not a folder (--out)
    """
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise PatchNetError(f"{path}: exists and is {'not ' if folder else ''}a folder ({flag})")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise PatchNetError(f"{parent}: exists and is not a folder ({flag} {path})")


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it over `path` on success.

    The temporary file has the same extension (Keras checks ".weights.h5")
    and is fsynced before the rename; an exception removes it and leaves
    `path` as it was. Missing parent folders are created.

    Example:

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = os.path.join(folder, "model.keras")
    ...     with atomic_path(path) as temporary:
    ...         os.path.basename(temporary).startswith(".tmp-"), temporary.endswith(".keras")
    ...     sorted(os.listdir(folder))
    (True, True)
    ['model.keras']
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    suffix = name[name.index(".") :] if "." in name else ""  # Keras checks ".weights.h5"
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(handle)
    os.chmod(temporary, 0o644)  # readable by a server running as another user
    try:
        yield temporary
        fsync(temporary)
        os.replace(temporary, path)
        fsync(directory)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def remove_stale_temporaries(directory: str) -> None:
    """Deletes the temporary files that writes killed with -9 left in `directory` (not below it).

    Example:

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for name in (".tmp-abc.keras", "model.keras"):
    ...         open(os.path.join(folder, name), "w").close()
    ...     remove_stale_temporaries(folder)
    ...     os.listdir(folder)
    ['model.keras']
    """
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".tmp-") and os.path.isfile(path):
            os.remove(path)


def write_png(path: str, pixels: np.ndarray) -> None:
    """uint8 (H, W) or BGR (H, W, 3) pixels -> a PNG at `path`, written atomically.

    Example:

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_png(os.path.join(folder, "map.png"), np.zeros((4, 6), np.uint8))
    ...     os.listdir(folder)
    ['map.png']
    """
    import cv2  # here, not above: the command line imports this module before it needs OpenCV

    with atomic_path(path) as temporary:
        if not cv2.imwrite(temporary, pixels):
            raise OSError(f"{path}: could not write")


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically (`atomic_path`).

    Example:

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     atomic_write_text(os.path.join(folder, "notes.txt"), "done")
    ...     with open(os.path.join(folder, "notes.txt")) as file:
    ...         file.read()
    'done'
    """
    with atomic_path(path) as temporary, open(temporary, "w") as file:
        file.write(text)


def fsync(path: str) -> None:
    """Flushes a file, or a folder's entries, to disk (a rename is durable once its folder is)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
