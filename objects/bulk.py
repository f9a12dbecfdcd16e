"""Many small objects at once: hashed in the calling process, their files created by helper processes.

Why processes: for small objects the cost is the file system's (allocating an inode, a directory
entry, the write), not hashing, and every one of those syscalls needs the GIL back when it returns.
A helper *thread* would therefore only run while the importing thread happens to release the GIL,
which a tar parser rarely does; a helper process runs on another core for real.  The caller keeps
hashing (it needs the digests at once, e.g. for a layer tree) and streams `(digest, size, data)`
records through pipes, each object to one of `HELPERS` helpers by its digest (two: on a file system
with many recently deleted inodes, ext4's inode allocator is slow enough that one helper cannot keep
up); a helper stores each one exactly as `ObjectStore.put_bytes` would (the same code: temp file,
link, never overwrite, damaged copies replaced).  The first helper also starts writeback of the file
system every `FLUSH_EVERY` bytes, so the caller's final `sync()` finds little left to write.

Helpers start only after `START_AFTER` puts (a few files are not worth a process), never on a
single-CPU machine or where they cannot be started; puts then simply happen in-process, as do puts
of content over 1 MiB (`ObjectStore.put_bytes` streams those through its writer thread).

Errors: a helper that fails (e.g. ENOSPC) stops and reports; the next put or `close()` raises
ObjectStoreError with its message.  `abort()` (also on leaving the `with` block with an exception)
lets the helpers store what was already sent and waits for them, so no object appears afterwards.
Each helper reports the digests of the objects it created (not those it found stored), which go to
the store's `watch_created()` sets.  Objects are noted for the store's `sync()` at `close()`, after
the helpers have finished writing them.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading
from typing import TYPE_CHECKING

from . import usable_cpus
from .digest import READ_CHUNK, fsverity_digest
from .errors import ObjectStoreError

if TYPE_CHECKING:  # pragma: no cover
    import subprocess

    from .store import ObjectStore

START_AFTER = 256  # puts done in-process before helpers are started
HELPERS = 2  # helper processes (each object goes to one by its digest): inode allocation is slow on busy ext4
FLUSH_EVERY = 16 << 20  # the first helper starts writeback of the file system after this many bytes
PIPE_BUFFER = 1 << 20  # bytes buffered before a write to the helper (and the pipe size asked for)
_RECORD = struct.Struct("<32sI")  # digest, data size; the data follows
_F_SETPIPE_SZ = 1031
_OK = b"ok\n"
_COUNT = struct.Struct("<I")  # a helper's output: count, the digests it created, then `ok` or an error

_CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); from objects.bulk import _child_main; "
    "sys.exit(_child_main(sys.argv[2], sys.argv[3] == 'flush'))"
)


class BulkWriter:
    """`put_bytes()` many small objects (see module docstring); a context manager."""

    def __init__(self, store: ObjectStore, helper: bool | None = None) -> None:
        self.store = store
        self._use_helper = usable_cpus() >= 2 if helper is None else helper
        self._start_after = START_AFTER if helper is None else 0
        self._count = 0
        self._procs: list[subprocess.Popen] = []
        self._sent: set[bytes] = set()
        self._closed = False

    def __enter__(self) -> BulkWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def put_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Digest of `data` (32 raw bytes); the object is stored by `close()` at the latest."""
        if self._closed:
            raise ObjectStoreError(f"bulk writer of {self.store.root} is closed")
        big = memoryview(data).nbytes > READ_CHUNK  # stored in-process (put_bytes streams it)
        if not self._procs or big:
            self._count += 1
            if not self._use_helper or self._count <= self._start_after or big or not self._start():
                return self.store.put_bytes(data)
        digest = fsverity_digest(data)
        if digest in self._sent:
            return digest
        self._sent.add(digest)
        procs = self._procs
        stdin = procs[digest[0] % len(procs)].stdin
        assert stdin is not None
        try:
            stdin.write(_RECORD.pack(digest, memoryview(data).nbytes))
            stdin.write(data)
        except OSError:  # a helper stopped (BrokenPipeError): report why
            self._finish()
            raise ObjectStoreError(f"helper storing objects in {self.store.root} stopped early") from None
        return digest

    def _start(self) -> bool:
        """Start the helpers; False (and no more tries) if they cannot be started."""
        import subprocess  # (here: most imports never start helpers, and it is slow to import)

        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        try:
            for i in range(HELPERS):
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _CHILD, pkg_parent, self.store.root,
                     "flush" if i == 0 else "-"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=PIPE_BUFFER,
                )
                self._procs.append(proc)
                assert proc.stdin is not None
                with contextlib.suppress(OSError):
                    import fcntl

                    fcntl.fcntl(proc.stdin.fileno(), _F_SETPIPE_SZ, PIPE_BUFFER)
        except OSError:
            self.abort()
            self._closed = False
            self._use_helper = False
            return False
        return True

    def _finish(self) -> None:
        """Wait for the helpers to store everything sent; ObjectStoreError if one did not."""
        procs = self._procs
        self._closed = True
        errors = []
        try:
            for proc in procs:
                assert proc.stdin is not None
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # flushes the rest; the helper stops at EOF
            for proc in procs:
                assert proc.stdout is not None
                out = self._report(proc.stdout.read())
                rc = proc.wait()
                if rc != 0 or out != _OK:
                    text = out.decode("utf-8", "replace").strip()
                    if not text.startswith("cannot "):
                        text = f"helper storing objects in {self.store.root} failed (exit status {rc}): {text}"
                    errors.append(text)
        except BaseException:
            self.abort()
            raise
        self._procs = []
        for proc in procs:
            proc.stdout.close()  # type: ignore[union-attr]
        if errors:
            raise ObjectStoreError(errors[0])
        self.store._note_many(self._sent)

    def _report(self, out: bytes) -> bytes:
        """Take the digests of the objects a helper created from its output (`_child_main`): they are
        the store's creations (ObjectStore.watch_created); returns the rest (`ok` or an error)."""
        if len(out) >= _COUNT.size:
            (n,) = _COUNT.unpack_from(out)
            end = _COUNT.size + 32 * n
            if len(out) >= end:
                self.store._note_created(out[i:i + 32] for i in range(_COUNT.size, end, 32))
                return out[end:]
        return out

    def close(self) -> None:
        """Wait until every object put is stored (and noted for `sync()`); ObjectStoreError if not."""
        if self._procs:
            self._finish()
        self._closed = True

    def abort(self) -> None:
        """Stop the helpers and wait for them: they store what was already sent (a few MiB at most)
        and report what they created, so a failed import knows exactly which objects are its own
        (the objects stay, unnoted for `sync()`)."""
        procs, self._procs = self._procs, []
        self._closed = True
        for proc in procs:
            with contextlib.suppress(OSError, ValueError):
                proc.stdin.close()  # type: ignore[union-attr]  # the helper stops at EOF
        for proc in procs:
            try:
                self._report(proc.stdout.read())  # type: ignore[union-attr]
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    proc.terminate()
            proc.wait()
            with contextlib.suppress(OSError):
                proc.stdout.close()  # type: ignore[union-attr]


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
        from .store import _syncfs

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


def _child_main(root: str, flush: bool = False) -> int:
    """The helper: store each record read from stdin; print `ok` at EOF, or the first error and stop."""
    import signal

    from .store import ObjectStore

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (and terminates us on abort)
    signal.signal(signal.SIGTERM, _stop)  # unwinds: a named temp file being written is removed
    out = sys.stdout.buffer
    flusher = store = None
    created: set[bytes] = set()
    message = _OK
    rc = 0
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
                store._store_hashed(digest, data)
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
        out.write(_COUNT.pack(len(created)) + b"".join(created) + message)
    return rc
