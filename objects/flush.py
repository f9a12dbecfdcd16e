"""Flushes in the background: a thread that sends written data to the disk while the work that wrote
it goes on, so that the sync which makes it durable finds little left to do.

Why: the sync at the end of an import waited for everything the import wrote, with the disk idle
until then.  On a VM whose host caches what the guest writes (O_DIRECT writes too) and writes it
out only when flushed, that was 0.7 s of a 1.4 s pull of 500 MB of large files.  Durability still
comes only from that sync: these flushes are best effort.  Used by the bulk helpers (syncfs of the
object directory, every FLUSH_EVERY bytes of small objects) and by buffered big puts (fdatasync of
the put's file, as its writer starts writeback: objects.store._start_writeback).
"""

from __future__ import annotations

import os
import threading

TYPE_CHECKING = False  # (typing is slow to import, and a bulk helper starts for every big import)
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable


class Flusher:
    """One daemon thread that calls `flush(fd)` for each `kick(fd)`, started on the first.

    A flush covers what was written before it, so one queued behind the one under way is enough:
    kicks meanwhile are dropped.  The fd is flushed through a duplicate (closed after), so its
    owner may close it at any time.  Errors are ignored (the final sync reports real ones)."""

    def __init__(self, flush: Callable[[int], object], name: str) -> None:
        self._flush, self._name = flush, name
        self._forget()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """(Also after a fork: the thread does not exist in the child; a queued dup is its own.)"""
        queued = getattr(self, "_queued", None)
        if queued is not None:
            os.close(queued)
        self._lock = threading.Lock()
        self._queued: int | None = None  # the fd (a dup) to flush next
        self._wake = threading.Semaphore(0)
        self._thread: threading.Thread | None = None
        self._stopped = False

    def kick(self, fd: int) -> None:
        with self._lock:
            if self._queued is not None or self._stopped:
                return
            try:
                self._queued = os.dup(fd)
            except OSError:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
        self._wake.release()

    def stop(self) -> None:
        """End the thread after the flush under way (one queued is dropped); no kick counts after."""
        with self._lock:
            self._stopped = True
            thread = self._thread
        self._wake.release()
        if thread is not None:
            thread.join()
        with self._lock:
            queued, self._queued = self._queued, None
        if queued is not None:
            os.close(queued)

    def idle(self) -> bool:
        """Nothing queued (a flush may still be under way)."""
        return self._queued is None

    def _run(self) -> None:
        while True:
            self._wake.acquire()
            with self._lock:
                if self._stopped:
                    return
                fd, self._queued = self._queued, None
            if fd is None:
                continue
            try:
                self._flush(fd)
            except OSError:
                pass
            finally:
                os.close(fd)
