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


def message_bytes(text):
    """A gRPC message size cap: 1 to INT32_MAX (gRPC's limit is a C int; TF Serving uses INT32_MAX)."""
    return _integer(text, 1, 2**31 - 1, "a byte count from 1 to 2147483647")


def nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):  # NaN and inf would train to NaN
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


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
