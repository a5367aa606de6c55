"""Writes that never leave a half-written file behind (a kill -9 keeps the old one)."""

import contextlib
import os
import tempfile

from patchnet_tf.errors import PatchNetError


def check_output_path(path, flag, *, folder=True):
    """Refuses, before any work, an output path that cannot be written: `path` (a folder, or with
    folder=False a file) or a parent of it that exists as the other kind."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise PatchNetError(f"{path}: exists and is {'not ' if folder else ''}a folder ({flag})")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise PatchNetError(f"{parent}: exists and is not a folder ({flag} {path})")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside `path`; renames it over `path` on success."""
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


def remove_stale_temporaries(directory):
    """Deletes the temporary files that writes killed with -9 left in `directory` (not below it)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith(".tmp-") and os.path.isfile(path):
            os.remove(path)


def write_png(path, pixels):
    """uint8 (H, W) or BGR (H, W, 3) pixels -> a PNG at `path`, written atomically."""
    import cv2  # here, not above: the command line imports this module before it needs OpenCV

    with atomic_path(path) as temporary:
        if not cv2.imwrite(temporary, pixels):
            raise OSError(f"{path}: could not write")


def atomic_write_text(path, text):
    with atomic_path(path) as temporary, open(temporary, "w") as file:
        file.write(text)


def fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
