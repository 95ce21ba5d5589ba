"""A small progress bar for the CLI (calibration batches, layers, evaluation windows), on stderr.

On a terminal it redraws one line in place; on a pipe or file it writes a line at each quarter, so
logs stay short. Calling the bar advances it one step, which is the callback signature that
calibration and evaluation take.
"""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, label: str, total: int, stream=None, width: int = 28):
        self.label, self.total, self.width = label, max(int(total), 1), width
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done, self.start, self._quarter = 0, time.perf_counter(), 0

    def __call__(self, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        if self.tty:
            self._draw(end="\n" if self.done == self.total else "")
        elif self.done * 4 // self.total > self._quarter:
            self._quarter = self.done * 4 // self.total
            self._draw(end="\n")

    def _draw(self, end: str) -> None:
        elapsed = time.perf_counter() - self.start
        filled = self.width * self.done // self.total
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        prefix = "\r" if self.tty else ""
        each = f" ({elapsed / self.done:.1f}s each)" if self.done else ""
        self.stream.write(f"{prefix}{self.label} [{bar}] {self.done}/{self.total} {elapsed:.0f}s{each}, eta {eta:.0f}s{end}")
        self.stream.flush()


def progress_factory(enabled: bool):
    """A `progress(label, total)` factory for compress()/evaluate(), or None when disabled."""
    return (lambda label, total: ProgressBar(label, total)) if enabled else None
