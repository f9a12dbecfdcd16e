"""The helper process of objects.bulk.BulkWriter: stores the records its parent pipes to it.

A module of its own above objects.store (it may open an ObjectStore), so that objects.bulk stays
below the store that creates bulk writers.  It starts on what the compiled loop needs (the object
directory's fd); objects.store, slow to import, is loaded only for a record the loop hands back.
"""

from __future__ import annotations

import os
import sys

from .bulkwire import COUNT, FLUSH_EVERY, OK, PIPE_BUFFER, RECORD
from .compiled import load
from .errors import ObjectStoreError

TYPE_CHECKING = False  # (typing is slow to import, and a helper starts for every big import)
if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Iterator
    from typing import BinaryIO

    from .store import ObjectStore

# the compiled store loop where it was built, unless FLATMOUNT_PURE=1 (objects/compiled.py)
_bulkstore = load("objects._bulkstore")
_MORE, _EXISTS, _GIVE_UP, _CLOSE_FAILED = range(4)  # its statuses
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(1)


class _Truncated(Exception):
    """The input ended inside a record."""


def _records(store: ObjectStore, inp: BinaryIO, new: bytearray) -> Iterator[int]:
    """Store each record of `inp` (the specification of `_compiled_records`); yields the bytes
    stored so far since the last yield, adds the digests of the objects it created to `new`."""
    while head := inp.read(RECORD.size):
        if len(head) < RECORD.size:
            raise _Truncated
        digest, size = RECORD.unpack(head)
        data = inp.read(size)
        if len(data) < size:
            raise _Truncated
        if store._store_hashed_new(digest, data):  # (the parent sends each content once)
            new += digest
        yield size


def _compiled_records(store: ObjectStore, inp: BinaryIO, new: bytearray) -> Iterator[int]:
    """`_records` with the loop in C (objects/_bulkstore.c: the same objects, created the same way,
    several hundred per call); every record it hands back (an existing name, an error, a missing
    fan-out dir) goes through the same Python code as in `_records`.  `inp.readinto` is called for
    up to PIPE_BUFFER bytes at a time and may return fewer (an unbuffered pipe: what is there)."""
    assert _bulkstore is not None
    store_records = _bulkstore.store_records
    dirfd = store._dirfd
    path_link = False
    # one buffer for the whole stream, read into in place: records are stored from it, the rest of
    # a record cut by a read is moved to its start (a fresh 1 MiB bytes object per read cost a
    # copy and, being memory new to the process each time, a page fault per 4 KiB)
    buf = bytearray(2 * PIPE_BUFFER)
    start = end = 0
    while True:
        if len(buf) - end < PIPE_BUFFER:  # room for a full read: move the cut record to the front
            buf[:end - start] = buf[start:end]
            end -= start
            start = 0
            if len(buf) - end < PIPE_BUFFER:  # a record bigger than the buffer
                buf.extend(bytes(end + PIPE_BUFFER - len(buf)))
        with memoryview(buf) as mv:
            n = inp.readinto(mv[end:end + PIPE_BUFFER])  # type: ignore[attr-defined]
        if not n:
            break
        end += n
        while True:
            with memoryview(buf) as mv:
                at, created, status, err, path_link = store_records(dirfd, mv[start:end], path_link)
            new += created
            at += start
            if status == _MORE:
                break
            digest, size = RECORD.unpack_from(buf, at)
            start = at + RECORD.size + size
            if status == _CLOSE_FAILED:
                raise ObjectStoreError(f"cannot store object {digest.hex()} in {store.root}: {os.strerror(err)}")
            if status == _GIVE_UP or store._existing_damaged(_object_path(digest), size) is not False:
                if store._store_hashed_new(digest, bytes(buf[at + RECORD.size:start])):
                    new += digest
        yield at - start
        start = at
    if end > start:
        raise _Truncated


class _HelperStore:
    """The object store as a helper uses it: the directory's fd at once, the ObjectStore (for the
    records the compiled loop hands back, or every record without it) on first use."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC)
        self._store: ObjectStore | None = None
        self.created: set[bytes] = set()  # objects the ObjectStore created (its watch_created)

    def general(self) -> ObjectStore:
        if self._store is None:
            from .store import ObjectStore

            self._store = ObjectStore(self.root)  # (ObjectStoreError if it cannot be opened)
            self.created = self._store.watch_created()
        return self._store

    def _existing_damaged(self, rel: str, size: int) -> bool | None:
        return self.general()._existing_damaged(rel, size)

    def _store_hashed_new(self, digest: bytes, data: bytes) -> bool:
        return self.general()._store_hashed_new(digest, data)

    def tmpfile(self) -> bool:
        """Whether anonymous files can be linked into the store (as the ObjectStore probes it)."""
        return self.general()._tmpfile_ok()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        os.close(self._dirfd)


def _object_path(digest: bytes) -> str:
    from .paths import object_path  # (its patterns compile `re`: only for records handed back)

    return object_path(digest)


def _syncfs(fd: int) -> None:
    """syncfs(), from the compiled module where it has it (a build older than its syncfs has not)."""
    compiled = getattr(_bulkstore, "syncfs", None)
    if compiled is not None:
        compiled(fd)
    else:
        from .libc import _syncfs as libc_syncfs

        libc_syncfs(fd)


def child_main(root: str, flush: bool = False, tmpfile: bool | None = None) -> int:
    """The helper: store each record read from stdin; print `ok` at EOF, or the first error and stop.
    `tmpfile`: whether the parent's ObjectStore found anonymous files linkable there (None: probe)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (and terminates us on abort)
    signal.signal(signal.SIGTERM, _stop)  # unwinds: a named temp file being written is removed
    out = sys.stdout.buffer
    flusher = store = None
    new = bytearray()  # those _store_hashed_new created: 32 bytes each
    message = OK
    rc = 0
    os.umask(0o022)  # new objects are created OBJECT_MODE (0644) as asked: _store_hashed_new needs no fstat
    try:
        try:
            store = _HelperStore(root)
        except OSError as e:
            raise ObjectStoreError(f"cannot open object store {root}: {e.strerror or e}") from None
        if flush:
            from .flush import Flusher

            flusher = Flusher(_syncfs, "objects-flush")
        written = flushed = 0
        # (the compiled loop links anonymous files, as _store_hashed_new)
        compiled = _bulkstore is not None and (store.tmpfile() if tmpfile is None else tmpfile)
        # the compiled loop reads into its own buffer, one read() at a time: unbuffered
        with os.fdopen(0, "rb", buffering=0 if compiled else PIPE_BUFFER) as inp:
            records = (_compiled_records if compiled else _records)(store, inp, new)  # type: ignore[arg-type]
            for size in records:
                written += size
                if flusher is not None and written - flushed >= FLUSH_EVERY:
                    flusher.kick(store._dirfd)
                    flushed = written
    except _Truncated:
        message, rc = b"", 1  # the parent went away mid-record: store nothing half-sent
    except ObjectStoreError as e:
        message, rc = str(e).encode("utf-8", "replace"), 1
    finally:
        if flusher is not None:
            flusher.stop()
        created: set[bytes] = set()
        if store is not None:
            created = store.created
            store.close()
        out.write(COUNT.pack(len(created) + len(new) // 32) + b"".join(created) + new + message)
        out.flush()  # (the caller may leave with os._exit)
    return rc
