"""objects.flush.Flusher: background flushes through duplicates of the fds, one queued at most."""

from __future__ import annotations

import os
import threading
import time

from objects.flush import Flusher


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert cond()


def test_kicks_during_a_flush_are_merged_and_no_fd_is_left(tmp_path):
    """While a flush runs, any number of kicks queue one more; each flush gets a duplicate of the
    fd (the owner closes its own meanwhile), closed after it."""
    release = threading.Event()
    seen: list[tuple[int, int]] = []

    def flush(fd: int) -> None:
        seen.append((fd, os.fstat(fd).st_ino))
        release.wait(10)

    before = _open_fds()
    flusher = Flusher(flush, "test-flusher")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    ino = os.fstat(fd).st_ino
    flusher.kick(fd)
    _wait(lambda: len(seen) == 1)       # the first flush is under way ...
    for _ in range(5):                  # ... and five more kicks queue one flush
        flusher.kick(fd)
    os.close(fd)
    release.set()
    _wait(lambda: len(seen) == 2 and flusher.idle())
    flusher.stop()
    assert [i for _, i in seen] == [ino, ino] and all(f != fd for f, _ in seen)
    assert _open_fds() == before


def test_stop_drops_what_is_queued_and_later_kicks(tmp_path):
    release = threading.Event()
    calls: list[int] = []

    def flush(fd: int) -> None:
        calls.append(fd)
        release.wait(10)

    before = _open_fds()
    flusher = Flusher(flush, "test-flusher")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    flusher.kick(fd)
    _wait(lambda: len(calls) == 1)
    flusher.kick(fd)                    # queued behind the one under way
    threading.Timer(0.05, release.set).start()
    flusher.stop()                      # waits for the flush under way, drops the queued one
    flusher.kick(fd)
    os.close(fd)
    assert len(calls) == 1 and _open_fds() == before


def test_a_failing_flush_is_ignored(tmp_path):
    calls: list[int] = []

    def flush(fd: int) -> None:
        calls.append(fd)
        raise OSError(5, "I/O error")

    before = _open_fds()
    flusher = Flusher(flush, "test-flusher")
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    flusher.kick(fd)
    _wait(lambda: len(calls) == 1 and flusher.idle())
    flusher.kick(fd)
    _wait(lambda: len(calls) == 2)
    flusher.stop()
    os.close(fd)
    assert _open_fds() == before
