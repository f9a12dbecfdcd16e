"""Progress of long operations, reported by the library and drawn by the CLI.

Operations call `step(what, done, total)` at points of their loops; that does nothing unless a
caller installed a reporter with `reporting(...)` (the CLI does, for a terminal on stderr, without
-q or --json).  So the library stays silent and its signatures stay as they are, while gc, fsck,
usage reports, diff -o and containers-storage pulls show where they are on a terminal.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import time

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator
    from typing import TextIO

_current: contextvars.ContextVar[TerminalLine | None] = contextvars.ContextVar("flatmount_progress",
                                                                               default=None)
EVERY = 256   # loops over objects report every EVERY-th item: a step costs a context lookup


class TerminalLine:
    """One stderr line redrawn at most five times a second (and at once when the phase changes),
    cleared at the end."""

    def __init__(self, stream: TextIO, interval: float = 0.2):
        self.stream = stream
        self.interval = interval
        self._last = 0.0
        self._what = ""
        self._drawn = False

    def __call__(self, what: str, done: int, total: int | None = None) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and what == self._what:
            return
        self._last = now
        self._what = what
        count = f"{done:,}" if total is None else f"{done:,}/{total:,}"
        self.stream.write(f"\r{what}: {count}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def step(what: str, done: int, total: int | None = None) -> None:
    """Report `done` (of `total`) items of `what`, if anyone listens."""
    line = _current.get()
    if line is not None:
        line(what, done, total)


@contextlib.contextmanager
def reporting(stream: TextIO | None = None, *, enabled: bool = True) -> Iterator[TerminalLine | None]:
    """Draw the steps of the operations run inside on `stream` (stderr) if it is a terminal."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not stream.isatty():
        yield None
        return
    line = TerminalLine(stream)
    token = _current.set(line)
    try:
        yield line
    finally:
        _current.reset(token)
        line.clear()
