"""Give the memory of a large request back to the operating system.

Two things held a burst's memory (bench/memory.py): TensorFlow's oneDNN ops allocate from a BFC
pool of their own that never shrinks, and everything else (TensorFlow's other tensors, gRPC and
protobuf for a request's bytes) from glibc's malloc, whose arenas keep freed chunks; only free space
at the very top of an arena goes back to the system by itself. `patchnet serve` therefore starts
TensorFlow with TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 (patchnet_launcher.py), so that oneDNN's tensors
come from malloc too, and `malloc_trim(0)` here returns the free pages of every arena (madvise).

`returns_memory` wraps the request handler. When a request ends and RSS is GROWTH_MIB above the
baseline (RSS after the last trim at a quiet moment), it trims, at most once a second; ordinary
requests pay one read of /proc/self/statm. The baseline is taken only when no request is running,
so a burst in flight never raises it, and again a second later: a request's own bytes (the gRPC
message, the JSON body) are freed only after its handler returns. PATCHNET_MALLOC_TRIM=0 turns it
off (for measuring what it gives).
"""

import ctypes
import ctypes.util
import functools
import os
import threading
import time

GROWTH_MIB = 256
FOLLOW_UP_SECONDS = 1.0
MIN_SECONDS_BETWEEN_TRIMS = 1.0

_PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS) or it is turned off."""
    if os.environ.get("PATCHNET_MALLOC_TRIM", "1") == "0":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def rss_mib():
    """This process's resident set size in MiB (Linux)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * _PAGE_MIB


class _Trimmer:
    def __init__(self, trim):
        self.trim = trim
        self.lock = threading.Lock()
        self.running = 0  # requests in their handler
        self.baseline = None  # MiB after the last quiet trim
        self.last_trim = -MIN_SECONDS_BETWEEN_TRIMS
        self.follow_up = None

    def request_started(self):
        with self.lock:
            self.running += 1

    def request_done(self):
        with self.lock:
            self.running -= 1
            if self.baseline is not None and rss_mib() < self.baseline + GROWTH_MIB:
                return
            if time.monotonic() - self.last_trim >= MIN_SECONDS_BETWEEN_TRIMS:
                self._trim()
            if self.follow_up is None and not self.running:
                self.follow_up = threading.Timer(FOLLOW_UP_SECONDS, self._trim_if_quiet)
                self.follow_up.daemon = True
                self.follow_up.start()

    def _trim(self):
        self.trim(0)
        self.last_trim = time.monotonic()
        if not self.running:
            self.baseline = rss_mib()

    def _trim_if_quiet(self):
        with self.lock:
            self.follow_up = None
            if not self.running:
                self._trim()


_trimmer = _Trimmer(_malloc_trim())


def returns_memory(handler):
    """Decorator for a request handler: after it returns or raises, give back what the request left in
    malloc's arenas (see the module docstring)."""
    if _trimmer.trim is None:
        return handler

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        _trimmer.request_started()
        try:
            return handler(*args, **kwargs)
        finally:
            _trimmer.request_done()

    return wrapper
