"""The helper process of objects.bulk.BulkWriter: stores the records its parent pipes to it.

A module of its own above objects.store (it opens an ObjectStore), so that objects.bulk stays below
the store that creates bulk writers.
"""

from __future__ import annotations

import os
import sys
import threading

from .bulk import _COUNT, _OK, _RECORD, FLUSH_EVERY, PIPE_BUFFER
from .errors import ObjectStoreError
from .libc import _syncfs
from .store import ObjectStore


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(1)


class _Flusher(threading.Thread):
    """Starts writing the file system's dirty data out while objects are still being stored.

    `ObjectStore.sync()` at the end of an import has to wait for every byte written since the last
    sync (syncfs), including unrelated data such as the freshly written layer tarball; flushing in
    the background, on the helper's core, leaves it little to do.  Durability still comes only from
    that sync.
    """

    def __init__(self, dirfd: int) -> None:
        super().__init__(name="objects-flush", daemon=True)
        self.dirfd = dirfd
        self.wake = threading.Event()
        self._stopped = False

    def run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self._stopped:
                return
            try:
                _syncfs(self.dirfd)
            except OSError:
                return  # only an optimisation: the final sync() reports real errors

    def stop(self) -> None:
        self._stopped = True
        self.wake.set()
        self.join()


def child_main(root: str, flush: bool = False) -> int:
    """The helper: store each record read from stdin; print `ok` at EOF, or the first error and stop."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (and terminates us on abort)
    signal.signal(signal.SIGTERM, _stop)  # unwinds: a named temp file being written is removed
    out = sys.stdout.buffer
    flusher = store = None
    created: set[bytes] = set()  # objects created by the general path (store.watch_created)
    new = bytearray()  # those _store_hashed_new created: 32 bytes each
    message = _OK
    rc = 0
    os.umask(0o022)  # new objects are created OBJECT_MODE (0644) as asked: _store_hashed_new needs no fstat
    try:
        store = ObjectStore(root)
        created = store.watch_created()
        if flush:
            flusher = _Flusher(store._dirfd)
            flusher.start()
        written = flushed = 0
        with os.fdopen(0, "rb", buffering=PIPE_BUFFER) as inp:
            while head := inp.read(_RECORD.size):
                if len(head) < _RECORD.size:
                    message, rc = b"", 1  # the parent went away mid-record: store nothing half-sent
                    break
                digest, size = _RECORD.unpack(head)
                data = inp.read(size)
                if len(data) < size:
                    message, rc = b"", 1
                    break
                if store._store_hashed_new(digest, data):  # (the parent sends each content once)
                    new += digest
                written += size
                if flusher is not None and written - flushed >= FLUSH_EVERY:
                    flusher.wake.set()
                    flushed = written
    except ObjectStoreError as e:
        message, rc = str(e).encode("utf-8", "replace"), 1
    finally:
        if flusher is not None:
            flusher.stop()
        if store is not None:
            store.close()
        out.write(_COUNT.pack(len(created) + len(new) // 32) + b"".join(created) + new + message)
    return rc
