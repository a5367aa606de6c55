"""argparse value types shared by every command (kept out of cli.py, so nothing imports the front door)."""

import argparse
import math


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
