"""Progress for long loops: Keras's bar on a terminal, plain dated lines in a log."""

import sys
import time

import keras


class Progress:
    """`add(count)` as work gets done. On a terminal, Keras's progress bar; otherwise (a log
    file, a pipe) one plain line every `every_seconds` and at the end, with no terminal codes."""

    def __init__(self, total, unit, label="progress", every_seconds=5.0, stream=None):
        self.total, self.unit, self.label, self.every_seconds = total, unit, label, every_seconds
        self.stream = stream or sys.stdout
        self.done = 0
        self.started = self.printed = time.monotonic()
        isatty = getattr(self.stream, "isatty", None)
        self.bar = keras.utils.Progbar(total, unit_name=unit) if isatty and isatty() else None

    def add(self, count=1):
        self.done += count
        if self.bar is not None:
            self.bar.add(count)
            return
        now = time.monotonic()
        if self.done >= self.total or now - self.printed >= self.every_seconds:
            self.printed = now
            print(f"{self.label}: {self.done}/{self.total} {self.unit}s, {now - self.started:.0f} s",
                  file=self.stream, flush=True)
