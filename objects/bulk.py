"""Many small objects at once: hashed in the calling process, their files created by helper processes.

Why processes: for small objects the cost is the file system's (allocating an inode, a directory
entry, the write), not hashing, and every one of those syscalls needs the GIL back when it returns.
A helper *thread* would therefore only run while the importing thread happens to release the GIL,
which a tar parser rarely does; a helper process runs on another core for real.  The caller keeps
hashing (it needs the digests at once, e.g. for a layer tree) and streams `(digest, size, data)`
records through pipes, each object to one of `helper_count()` helpers by its digest (one CPU stays
the caller's, the others, up to `MAX_HELPERS`, are the helpers'); a helper stores each one exactly as
`ObjectStore.put_bytes` would (the same code: temp file, link, never overwrite, damaged copies
replaced).  The first helper also starts writeback of the file system every `FLUSH_EVERY` bytes, so
the caller's final `sync()` finds little left to write.

Helpers start only after `START_AFTER` puts (a few files are not worth a process), or after
`START_SOON` where the caller expects many (`many`: a big layer; its first 256 puts took 40-60 ms of
one core while the other idled), never on a single-CPU machine or where they cannot be started;
puts then simply happen in-process, as do puts of content over 1 MiB (`ObjectStore.put_bytes`
streams those through its writer thread).

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
import sys
from typing import TYPE_CHECKING, Protocol

from .bulkwire import COUNT, OK, PIPE_BUFFER, RECORD
from .cpus import usable_cpus
from .digest import READ_CHUNK, fsverity_digest, fsverity_digests
from .errors import ObjectStoreError

if TYPE_CHECKING:  # pragma: no cover
    import subprocess
    from collections.abc import Iterable, Sequence
    from typing import BinaryIO


class BulkTarget(Protocol):
    """What a BulkWriter needs of its object store (objects.store.ObjectStore), named here so that
    this module stays below the store that creates writers."""

    root: str

    def put_bytes(self, data: bytes) -> bytes: ...

    def _note_many(self, digests: list[bytes]) -> None: ...

    def _note_created(self, digests: Iterable[bytes]) -> None: ...

START_AFTER = 256  # puts done in-process before helpers are started
START_SOON = 16  # the same, where the caller expects many small objects (`BulkWriter(many=True)`)
MAX_HELPERS = 2  # helper processes at most (each object goes to one by its digest)
_F_SETPIPE_SZ = 1031


def helper_count(cpus: int | None = None) -> int:
    """How many helpers a bulk writer starts: one per CPU beside the caller's, at most MAX_HELPERS.

    Why not more: the caller parses and hashes all the while, so it keeps a CPU busy itself.  On 2
    CPUs a second helper only took turns with the caller and the first helper for the same two
    (and the kernel's writeback): a 50,000-file layer imported in 2.7-2.9 s with one helper against
    2.9-3.1 s with two, on a fresh ext4 and on a long-used one alike (`tools/bench_import.py
    --small-only [--same-fs] --old`, interleaved, session 18)."""
    return max(1, min(MAX_HELPERS, (usable_cpus() if cpus is None else cpus) - 1))


_CHILD = (  # (os._exit: nothing is left to clean up, and the parent waits for the exit)
    "import os, sys; sys.path.insert(0, sys.argv[1]); from objects.bulkhelper import child_main; "
    "os._exit(child_main(sys.argv[2], sys.argv[3] == 'flush', {'1': True, '0': False}.get(sys.argv[4])))"
)


class BulkWriter:
    """`put_bytes()` many small objects (see module docstring); a context manager."""

    def __init__(self, store: BulkTarget, helper: bool | None = None, many: bool = False) -> None:
        self.store = store
        self._use_helper = usable_cpus() >= 2 if helper is None else helper
        self._start_after = (START_SOON if many else START_AFTER) if helper is None else 0
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
        return self._send(fsverity_digest(data), data)

    def put_many(self, datas: Sequence[bytes | bytearray | memoryview]) -> list[bytes]:
        """`put_bytes` of each (same objects, same digests, in order), the digests of a run of small
        contents computed together (`objects.digest.fsverity_digests`)."""
        if self._closed:
            raise ObjectStoreError(f"bulk writer of {self.store.root} is closed")
        if not self._procs or any(memoryview(d).nbytes > READ_CHUNK for d in datas):
            return [self.put_bytes(d) for d in datas]
        send = self._send
        return [send(digest, data) for digest, data in zip(fsverity_digests(datas), datas, strict=True)]

    def _send(self, digest: bytes, data: bytes | bytearray | memoryview) -> bytes:
        """Hand `data`, whose digest is `digest`, to its helper (unless it was sent already)."""
        if digest in self._sent:
            return digest
        self._sent.add(digest)
        procs = self._procs
        stdin = procs[digest[0] % len(procs)].stdin
        assert stdin is not None
        try:
            stdin.write(RECORD.pack(digest, memoryview(data).nbytes))
            stdin.write(data)
        except OSError:  # a helper stopped (BrokenPipeError): report why
            self._finish()
            raise ObjectStoreError(f"helper storing objects in {self.store.root} stopped early") from None
        return digest

    def _start(self) -> bool:
        """Start the helpers; False (and no more tries) if they cannot be started."""
        import subprocess  # (here: most imports never start helpers, and it is slow to import)

        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tmpfile = getattr(self.store, "_tmpfile", None)  # (what the store probed: not probed again there)
        try:
            for i in range(helper_count()):
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _CHILD, pkg_parent, self.store.root,
                     "flush" if i == 0 else "-", {True: "1", False: "0"}.get(tmpfile, "?")],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=PIPE_BUFFER,
                )
                self._procs.append(proc)
                assert proc.stdin is not None and proc.stdout is not None
                import fcntl

                # its report (32 bytes per object created) written at once, not a pipe's worth per
                # wake-up of a parent thread that has to win the GIL back each time
                for pipe in (proc.stdin, proc.stdout):
                    with contextlib.suppress(OSError):
                        fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, PIPE_BUFFER)
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
                out = self._report(_read_all(proc.stdout))
                rc = proc.wait()
                if rc != 0 or out != OK:
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
        if len(out) >= COUNT.size:
            (n,) = COUNT.unpack_from(out)
            end = COUNT.size + 32 * n
            if len(out) >= end:
                self.store._note_created(out[i:i + 32] for i in range(COUNT.size, end, 32))
                return out[end:]
        return out

    def end_input(self) -> None:
        """No more puts: the helpers get the rest of their input and its end, and store it while the
        caller goes on; `close()` still waits for them (and reports their errors)."""
        self._closed = True
        for proc in self._procs:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]  # flushes the rest; the helper stops at EOF

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
                self._report(_read_all(proc.stdout))  # type: ignore[arg-type]
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    proc.terminate()
            proc.wait()
            with contextlib.suppress(OSError):
                proc.stdout.close()  # type: ignore[union-attr]


def _read_all(f: BinaryIO) -> bytes:
    """Everything until EOF from a helper's output, in reads of up to PIPE_BUFFER bytes (a buffered
    `read()` grows its buffer from 8 KiB, one read, and one wait for the GIL, at a time)."""
    fd = f.fileno()
    chunks = []
    while chunk := os.read(fd, PIPE_BUFFER):
        chunks.append(chunk)
    return b"".join(chunks)
