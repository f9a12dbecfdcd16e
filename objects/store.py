"""Content-addressed object directory: `<root>/XX/<62 hex>` named by the fs-verity digest.

The layout is composefs's, so the directory can be handed to overlayfs as a data-only lower layer.

Writes are atomic and never overwrite: content goes to a temp file in `<root>/.tmp/` (an anonymous
O_TMPFILE where the kernel allows it, so a crash leaves nothing behind), is chmod 0644 and then
hard-linked to its final name; if that name exists (a concurrent put of the same content in this or
another process), the link fails and the temp file is dropped.  Readers therefore only ever see whole
objects.

Durability is batched: `put` does not fsync, `sync()` makes everything put since the previous `sync()`
durable in one go (a single syncfs() for big batches, per-file fsync for a few files: syncfs() also
flushes whatever else is dirty on the file system, e.g. the tarball being imported), so importing
50,000 small files does not pay 50,000 journal commits.  Callers must `sync()` before recording
references to new objects (e.g. committing a database row).  An object left truncated by a power
failure before `sync()` (ext4/xfs show such files as short or empty) is detected by its size on the
next put of that content and replaced.

Speed: a big put is read in aligned 1 MiB chunks by one worker thread per CPU (up to four), each
chunk fs-verity hashed (and the source's deferred work done on it, e.g. an uncompressed layer's
sha256, in the same pass where the source can: HashingReader.settle_blocks) in read order by
whichever worker holds the source's lane (`_Lane`), while the others read on, and written with
O_DIRECT (two writes in flight) or buffered, whichever this host does faster (objects.writemode),
by long-lived writer threads meanwhile (`_FileWrites`); so it costs about as much as hashing,
spread over the cores.  A layer of many files of a few MiB is one pipeline: the workers besides
each put's own thread go from one put to the next (`_Helpers`), the lane goes on from the last
chunk of one file to the first of the next, the writers take the chunks of every file from one
queue, and each put's temp file was opened by the put before it (`_take_temp`).  Many small
puts go through `bulk()` (objects.bulk), whose helper processes create the files on another core.

Digests are accepted as 32 raw bytes, 64 hex digits (str or ASCII bytes) or an `XX/<62 hex>` object
path; methods return 32 raw bytes.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO, Protocol

from .cpus import usable_cpus
from .digest import (
    BLOCK_SIZE,
    READ_CHUNK,
    FsVerityHasher,
    digest_file,
    fsverity_digest,
    hash_full_blocks,
    parse_digest,
)
from .errors import (
    ObjectDigestMismatchError,
    ObjectNotFoundError,
    ObjectStoreError,
    ReadOnlyObjectStoreError,
)
from .flush import Flusher
from .libc import _fallocate, _Libc, _syncfs
from .paths import is_hex, object_path

TMP_DIR = ".tmp"
OBJECT_MODE = 0o644
DIR_MODE = 0o755
PIPELINE_BUFFERS = 16  # 1 MiB buffers of one big put in flight between its workers and its writers
# (16, not 8: the two O_DIRECT writers take up to DIRECT_RUN chunks each, so 8 could all be waiting
# on the disk, the hashing stopped; 16 gave big pulls 1.04x the MB/s, half the context switches)
ASYNC_PUTS = 3  # big puts of one store in flight at once (put_async): two finishing while the next reads
# (two: a put whose thread finished the last chunks of its file and then, in the lane, the first of
# the next file (see _Lane) published late, and the file after waited for its slot, the lane idle)
WRITEBACK_EVERY = 16 << 20  # buffered big objects: start disk writeback every 16 MiB, so sync() has less to do
DIRECT_ALIGN = 4096  # O_DIRECT needs buffer address, length and file offset aligned to the logical block size
DIRECT_RUN = 4  # chunks a lagging O_DIRECT writer writes in one call (see _gather)
DIRECT_WRITERS = 2  # O_DIRECT writer threads of one put: two writes in flight (see _put_large)
SYNCFS_MIN = 64  # from this many pending files/dirs on, one syncfs() is cheaper than one fsync each
CHUNK_WORKERS = max(1, min(usable_cpus(), 4))  # threads reading and hashing one big put's chunks

_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DeferredWork(Protocol):
    """What a source stream's optional `defer_work()` returns (see `ObjectStore.put_async`)."""

    def mark(self) -> int: ...

    def settle(self, upto: int | None = None) -> None: ...

    def end(self, upto: int | None = None) -> None: ...

    # optional: `claim() -> int`, a mark to be settled by `settle_blocks(mark, chunk) -> bytes | None`,
    # which may also return the chunk's fs-verity block hashes, computed in the same pass, or dropped
    # by `unclaim(mark)` (HashingReader)


if TYPE_CHECKING:  # pragma: no cover
    from .bulk import BulkWriter

Digest = bytes | str


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, and the disk to write out its cache soon
    (`_FLUSHER`: buffered pulls of 500 MB on a VM whose host writes out only when flushed, 1.03-1.06
    s against 1.33-1.44 s, see objects.flush); best effort, does not wait."""
    fn = _Libc.load().sync_file_range
    if fn is not None:
        fn(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE
    _FLUSHER.kick(fd)


_FLUSHER = Flusher(lambda fd: os.fdatasync(fd), "objects-flusher")  # (os.fdatasync looked up at each call)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    """os.write until everything is written (it may write less than asked)."""
    n = os.write(fd, data)
    if n < len(data):
        mv = memoryview(data)
        while n < len(mv):
            n += os.write(fd, mv[n:])


def _read_full(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes; fewer only at EOF (streams may return short reads before it)."""
    data = stream.read(size)
    if data is None:
        raise ObjectStoreError("put() needs a blocking stream (read() returned None)")
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _fill(stream: BinaryIO, buf: bytearray) -> int:
    """Fill `buf` from the stream; returns the byte count, less than len(buf) only at EOF.

    A stream that tells how much it has left (`remaining`) is not read again once that is 0: its
    owner may already be reading on from what lies beneath (see `_StreamChunks`)."""
    readinto = getattr(stream, "readinto", None)
    size = len(buf)
    if readinto is None:
        data = _read_full(stream, size)
        buf[: len(data)] = data
        return len(data)
    mv = memoryview(buf)
    got = 0
    while got < size:
        n = readinto(mv[got:])
        if n is None:
            raise ObjectStoreError("put() needs a blocking stream (readinto() returned None)")
        if not n:
            break
        got += n
        if got < size and getattr(stream, "remaining", None) == 0:
            break
    return got


class _Buffers:
    """Page-aligned 1 MiB buffers (mmap) for big puts: O_DIRECT can write them, and reusing them across
    puts spares the page faults of fresh memory (the store keeps enough for ASYNC_PUTS puts at once).
    `take()` blocks once PIPELINE_BUFFERS are out."""

    def __init__(self, pool: queue.SimpleQueue) -> None:
        self._pool = pool  # the store's idle buffers, shared by all puts
        self.free: queue.SimpleQueue = queue.SimpleQueue()  # this put's buffers the writer and workers are done with
        self.owned: list[mmap.mmap] = []

    def take(self) -> mmap.mmap | None:
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        if len(self.owned) >= PIPELINE_BUFFERS:
            return self.free.get()  # None: the consumer gave up
        try:
            buf = self._pool.get_nowait()
        except queue.Empty:
            buf = mmap.mmap(-1, READ_CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # (not shmem: cheaper faults)
        self.owned.append(buf)
        return buf

    def release(self) -> None:
        """Return this put's buffers to the store (call once no thread uses them)."""
        for buf in self.owned[: max(0, PIPELINE_BUFFERS * ASYNC_PUTS - self._pool.qsize())]:
            self._pool.put(buf)
        self.owned = []


class _StreamChunks:
    """The stream as 1 MiB memoryviews over recycled aligned buffers (`first`, a full one, already read).

    `exhausted` is true once the last one has been read, as far as can be told without another read:
    a short read, or a stream whose `remaining` byte count (a tar member's, say) is down to 0.  The
    pipeline then lets the caller read on from the source at once, while that last chunk is still
    being hashed: with many files of a few MiB, waiting for a read that returns nothing cost about
    0.6 ms a file, a tenth of the import.

    `prefetch()` reads the first chunk in the calling thread while the pipeline's threads wake up
    (which takes 0.3-0.5 ms when both cores are busy hashing the previous file); the first `next()`
    waits for it.
    """

    def __init__(self, first: memoryview | None, stream: BinaryIO, buffers: _Buffers,
                 prefetch: bool = False, deferred: DeferredWork | None = None) -> None:
        self._first = first
        self._stream = stream
        self._buffers = buffers
        self._deferred = deferred
        self.read_mark = deferred.mark() if deferred is not None else None  # the deferred work's mark
        # after our last read: what the source hands out after it is read by the next put (see `end`)
        self._ended = False
        self._prefetched: threading.Event | None = threading.Event() if prefetch else None
        self._prefetch_error: BaseException | None = None

    def prefetch(self) -> None:
        """Read the first chunk now (a read error is raised by the `next()` that takes it)."""
        assert self._prefetched is not None and not self._prefetched.is_set()
        try:
            self._first = self._read()
        except BaseException as e:  # noqa: BLE001 - the pipeline's reader raises it
            self._prefetch_error = e
        finally:
            self._prefetched.set()

    def wait_prefetch(self) -> None:
        """Wait until a `prefetch()` begun is over (its buffer may be in use until then)."""
        if self._prefetched is not None:
            self._prefetched.wait()

    def __iter__(self) -> _StreamChunks:
        return self

    def __next__(self) -> memoryview:
        if self._prefetched is not None:
            self._prefetched.wait()
            self._prefetched = None
            if self._prefetch_error is not None:
                raise self._prefetch_error
        if self._first is not None:
            mv, self._first = self._first, None
            return mv
        mv = self._read()
        if mv is None:
            raise StopIteration
        return mv

    def _read(self) -> memoryview | None:
        if self._ended or (buf := self._buffers.take()) is None:
            return None
        n = _fill(self._stream, buf)
        if self._deferred is not None:
            self.read_mark = self._deferred.mark()
        if n < len(buf):
            self._ended = True
            if not n:
                return None
        return memoryview(buf)[:n]

    @property
    def exhausted(self) -> bool:
        return self._ended or getattr(self._stream, "remaining", None) == 0


def _not_found(hexdigest: str, root: str) -> ObjectNotFoundError:
    err = ObjectNotFoundError(f"object {hexdigest} is not in object store {root}")
    err.errno = errno.ENOENT  # (no filename: OSError would then print "[Errno 2] None: path")
    return err


class ObjectStore:
    """A directory of content-addressed objects (see module docstring); safe across threads and processes.

    `readonly=True` never writes, not even at open, so it works on read-only mounts; write methods then
    raise ReadOnlyObjectStoreError.  A writable store creates its directory and `.tmp/` if missing and
    holds a directory fd until `close()` (also a context manager).
    """

    #: Write big streamed objects with O_DIRECT (True; buffered where unsupported) or buffered with early
    #: writeback (False); None: whichever measures faster on this host (objects.writemode).
    direct_io: bool | None = None

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False) -> None:
        self.root = os.path.abspath(os.fspath(path))
        self.readonly = readonly
        self._dirfd = -1
        self._lock = threading.Lock()
        self._pending_files: set[str] = set()  # relative paths of objects put since the last sync()
        self._pending_dirs: set[str] = set()  # relative paths of directories whose entries changed
        self._pending_digests: list[list[bytes]] = []  # objects helpers stored (`_note_many`): named only
        # when sync() needs their names (its fsync per file, fs-verity), not when one syncfs covers them
        self._tmpfile: bool | None = None  # O_TMPFILE + link via /proc works here (probed on first put)
        self._verity: str | None = None  # objects.verity state of this directory (read or probed at sync)
        self._token = os.urandom(4).hex()
        self._seq = itertools.count()
        self._buffer_pool: queue.SimpleQueue = queue.SimpleQueue()  # idle aligned buffers of big puts
        self._async_slots = threading.BoundedSemaphore(ASYNC_PUTS)
        self._created_watchers: list[set[bytes]] = []  # see watch_created()
        self._spare: dict[bool, tuple[int, int]] = {}  # O_DIRECT wanted -> (pid, fd): see _take_temp
        if readonly:
            if not os.path.isdir(self.root):
                raise ObjectStoreError(f"object store {self.root} does not exist or is not a directory")
            return
        try:
            if not os.path.isdir(self.root):
                os.makedirs(self.root, mode=DIR_MODE, exist_ok=True)
                self._pending_dirs.add("..")
            os.makedirs(os.path.join(self.root, TMP_DIR), mode=0o700, exist_ok=True)
            self._dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC)
        except OSError as e:
            raise ObjectStoreError(
                f"cannot open object store {self.root} for writing: {e.strerror or e}"
                + (" (open it read-only instead)" if e.errno == errno.EROFS else "")
            ) from e

    # -- lifecycle -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the directory fd; pending objects stay non-durable unless `sync()` was called."""
        fd, self._dirfd = self._dirfd, -1
        if fd >= 0:
            os.close(fd)
        with self._lock:
            spares, self._spare = list(self._spare.values()), {}
        for pid, spare in spares:
            if pid == os.getpid():
                os.close(spare)

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_dirfd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        return f"ObjectStore({self.root!r}, readonly={self.readonly})"

    # -- reading -------------------------------------------------------------------------------------

    def path(self, digest: Digest) -> str:
        """Absolute path `<root>/XX/<62 hex>` of an object (whether or not it exists)."""
        h = parse_digest(digest).hex()
        return f"{self.root}/{h[:2]}/{h[2:]}"

    def has(self, digest: Digest) -> bool:
        """Whether the object is present."""
        return os.path.isfile(self.path(digest))

    __contains__ = has

    def open(self, digest: Digest) -> BinaryIO:
        """Open an object for reading; ObjectNotFoundError if absent."""
        path = self.path(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise _not_found(parse_digest(digest).hex(), self.root) from None

    def verify(self, digest: Digest) -> bool:
        """Recompute the object's digest: False if its content no longer matches its name."""
        raw = parse_digest(digest)
        path = self.path(raw)
        try:
            return digest_file(path) == raw
        except FileNotFoundError:
            raise _not_found(raw.hex(), self.root) from None

    def __iter__(self) -> Iterator[bytes]:
        """Digests of all objects, sorted; temp files and malformed names are skipped."""
        try:
            with os.scandir(self.root) as it:
                fanout = sorted(
                    e.name for e in it if is_hex(e.name, 2) and e.is_dir(follow_symlinks=False)
                )
        except FileNotFoundError:
            return
        for xx in fanout:
            try:
                with os.scandir(os.path.join(self.root, xx)) as it:
                    names = sorted(
                        e.name for e in it if is_hex(e.name, 62) and e.is_file(follow_symlinks=False)
                    )
            except FileNotFoundError:
                continue
            for rest in names:
                yield bytes.fromhex(xx + rest)

    # -- writing -------------------------------------------------------------------------------------

    def put_bytes(self, data: bytes | bytearray | memoryview, expected: Digest | None = None) -> bytes:
        """Store in-memory content; returns its digest (32 raw bytes).

        `expected`: raise ObjectDigestMismatchError (and store nothing) if the digest differs.
        """
        self._check_writable("put")
        mv = memoryview(data).cast("B")
        if len(mv) <= READ_CHUNK:
            return self._put_small(data if isinstance(data, bytes) else mv, expected)
        return self._put_large(
            (mv[i : i + READ_CHUNK] for i in range(0, len(mv), READ_CHUNK)), None, expected, direct=False
        )

    def put(self, stream: BinaryIO, expected: Digest | None = None, size: int | None = None) -> bytes:
        """Store everything read from `stream` until EOF; returns its digest (32 raw bytes).

        Big content is read and hashed by helper threads, one per CPU, and written by another (the
        hashing and the I/O release the GIL), so the cost is close to hashing alone, spread over the
        cores (see `_put_large`).  Streams with `readinto` fill the store's aligned buffers directly
        (no intermediate bytes objects).
        `expected` as for `put_bytes`.  `size`: how much the stream holds, when known (e.g. a tar
        member); big content then goes to the helper threads from its first byte.
        """
        return self.put_async(stream, expected, size).result()

    def put_async(self, stream: BinaryIO, expected: Digest | None = None, size: int | None = None
                  ) -> PendingPut:
        """`put`, returning as soon as `stream` has been read to its end: the rest (hashing the last
        chunks, writing, publishing) goes on in the helper threads, so the caller can read on (the next
        member of a tar) meanwhile.  `result()` of the returned PendingPut gives the digest (or raises
        the put's error); every one must be waited for before the objects count as stored.  At most
        ASYNC_PUTS big puts of a store are in flight at once (this call waits for a slot first).

        An error while reading `stream` is raised here (after the put has cleaned up), since the
        caller must not read on from a stream in an unknown state.

        A stream may have `defer_work()`, returning a DeferredWork or None: work of its own on what
        it reads (e.g. hashing it) that it leaves for later.  Right after reading each chunk the
        pipeline takes its `mark()`; `settle(mark)`, called in chunk order by the thread that read
        the chunk, before the chunk's buffer may be refilled, must do the work on everything read up
        to that mark; `end(upto)` (once the pipeline is done with the stream; `upto`: the mark after
        its last read, or None) does the rest of what it read.  So the work runs on the core that has
        the chunk in its cache (see `_put_large`)."""
        self._check_writable("put")
        buffers = _Buffers(self._buffer_pool)
        handed_over = False
        try:
            first = None
            if size is None or size <= READ_CHUNK:
                buf = buffers.take()
                assert buf is not None
                n = _fill(stream, buf)
                if n < len(buf):
                    return PendingPut.completed(self._put_small(bytes(buf[:n]), expected))
                first = memoryview(buf)
            self._async_slots.acquire()
            pending = PendingPut(self._async_slots)   # (its set() gives the slot back)
            read_done = threading.Event()
            defer_work = getattr(stream, "defer_work", None)
            deferred = defer_work() if defer_work is not None else None
            chunks = _StreamChunks(first, stream, buffers, prefetch=first is None, deferred=deferred)
            try:
                _WORKERS.run(self._put_large_job, chunks, buffers, expected, self._use_direct(size), pending,
                             read_done, deferred, size)
            except BaseException as e:   # no thread to run it (the slot must not leak)
                if deferred is not None:
                    deferred.end()
                pending.set(None, e)
                raise
            handed_over = True
        finally:
            if not handed_over:
                buffers.release()
        if first is None:
            chunks.prefetch()
        read_done.wait()
        if pending.read_error:
            pending.result()  # raises the put's error once it has cleaned up
        return pending

    def _use_direct(self, size: int | None = None) -> bool:
        """O_DIRECT for big puts: as set in `direct_io`, else as measured (objects.writemode; `size`:
        the put's, if known)."""
        if self.direct_io is not None:
            return self.direct_io
        from .writemode import use_direct

        try:
            return use_direct(self._dirfd, size=size)
        except OSError:
            return True

    def _put_large_job(self, chunks: Iterator[memoryview], buffers: _Buffers, expected: Digest | None,
                       direct: bool, pending: PendingPut, read_done: threading.Event,
                       deferred: DeferredWork | None, size: int | None) -> None:
        """`_put_large` on a helper thread for `put_async`; never raises (the outcome goes to `pending`)."""
        digest: bytes | None = None
        error: BaseException | None = None
        try:
            digest = self._put_large(chunks, buffers, expected, direct, read_done, pending, deferred, size)
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits for the put
            error = e
            if not read_done.is_set():  # failed before the source was read (e.g. no temp file):
                pending.read_error = True  # the source is not read to its end, put_async raises
        finally:
            if isinstance(chunks, _StreamChunks):
                chunks.wait_prefetch()  # (the caller may still be reading into one of our buffers)
            if deferred is not None:  # (no worker reads any more: what it handed out is in our buffers)
                deferred.end(chunks.read_mark if isinstance(chunks, _StreamChunks) else None)
            buffers.release()
            pending.set(digest, error)
            read_done.set()  # (already set at the end of the source, unless it was not reached)
            if error is None:
                self._open_spare(direct and bool(_O_DIRECT))

    def put_file(self, path: str | os.PathLike[str], expected: Digest | None = None) -> bytes:
        """Store a copy of a file's content; returns its digest."""
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            return self.put(f, expected, st.st_size if stat.S_ISREG(st.st_mode) else None)

    def bulk(self, helper: bool | None = None, many: bool = False) -> BulkWriter:
        """A writer for many small objects whose files a helper process creates (see objects.bulk;
        `many`: the caller expects many, so the helpers start after a few puts, not 256).

        Use as a context manager (or `close()` it): objects are only stored, and noted for `sync()`,
        once it is closed without error.
        """
        from .bulk import BulkWriter

        self._check_writable("put")
        return BulkWriter(self, helper, many)

    def watch_created(self) -> set[bytes]:
        """A set that from now on receives the digest of every object a put of this store (or of its
        bulk helpers) CREATES: not those found already stored, nor damaged copies replaced.  Why: a
        failed import may remove what it created, and nothing else (`unwatch_created` when done)."""
        created: set[bytes] = set()
        with self._lock:
            self._created_watchers.append(created)
        return created

    def unwatch_created(self, created: set[bytes]) -> None:
        with self._lock:
            self._created_watchers = [w for w in self._created_watchers if w is not created]

    def _note_created(self, digests: Iterable[bytes]) -> None:
        if self._created_watchers:
            digests = list(digests)  # (every watcher gets them all: a generator would go to the first only)
            with self._lock:
                for w in self._created_watchers:
                    w.update(digests)

    def remove(self, digest: Digest, missing_ok: bool = False) -> None:
        """Delete an object (ObjectNotFoundError if absent, unless `missing_ok`)."""
        self._check_writable("remove objects")
        raw = parse_digest(digest)
        rel = _rel(raw)
        try:
            os.unlink(rel, dir_fd=self._dirfd)
        except FileNotFoundError:
            if not missing_ok:
                raise _not_found(raw.hex(), self.root) from None
        except OSError as e:
            raise ObjectStoreError(f"cannot remove {self.path(raw)}: {e.strerror or e}") from e
        with self._lock:
            self._pending_files.discard(rel)

    def sync(self) -> None:
        """Make every object put since the last sync() durable (files and the directory entries naming them)."""
        with self._lock:
            files, self._pending_files = self._pending_files, set()
            dirs, self._pending_dirs = self._pending_dirs, set()
            noted, self._pending_digests = self._pending_digests, []
        count = len(files) + len(dirs) + sum(map(len, noted))
        if not count:
            return
        dirfd = self._dirfd
        if dirfd < 0:
            raise ObjectStoreError(f"object store {self.root} is closed: cannot sync")

        def noted_rels() -> Iterator[str]:  # the names of the objects helpers stored
            return (_rel(d) for batch in noted for d in batch)

        def named() -> None:  # ... added to `files` and `dirs` (once)
            rels = list(noted_rels())
            noted.clear()
            files.update(rels)
            dirs.update(r[:2] for r in rels)

        if files or noted:
            # (a first sync's probe reads the names of the objects being synced only where the
            # file system has fs-verity)
            if self.verity_state(itertools.chain(files, noted_rels())) != "off":
                named()
                self._enable_verity(files)
        try:
            if count >= SYNCFS_MIN and _syncfs(dirfd):
                return
            named()
            for rel in files:
                self._fsync(rel, os.O_RDONLY)
            for rel in sorted(dirs, key=len, reverse=True):  # children before parents
                self._fsync(rel, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise ObjectStoreError(f"cannot make objects in {self.root} durable: {e.strerror or e}") from e

    def verity_state(self, pending: Iterable[str] = ()) -> str:
        """"all", "new" or "off" (objects.verity): read from `.verity`, else probed and recorded.

        Probing happens on the first sync() of a writable store that has no record yet; the
        directory counts as "all" only if it then holds nothing but the objects being synced."""
        from . import verity

        if self._verity is None:
            state = verity.read_state(self.root)
            if state is None and not self.readonly and self._dirfd >= 0:
                ok, why = verity.probe(os.path.join(self.root, TMP_DIR))
                if not ok:
                    state = verity.OFF
                else:
                    state = verity.ALL if self._holds_only(set(pending)) else verity.NEW
                self._record_verity(state + ("" if ok else f": {why}"))
            self._verity = state or verity.OFF
        return self._verity

    def _holds_only(self, rels: set[str]) -> bool:
        """Whether every object file in the directory is one of `rels` (stops at the first other)."""
        with os.scandir(self.root) as top:
            fanouts = [e.name for e in top if is_hex(e.name, 2) and e.is_dir(follow_symlinks=False)]
        for xx in fanouts:
            with os.scandir(os.path.join(self.root, xx)) as it:
                if any(f"{xx}/{e.name}" not in rels for e in it):
                    return False
        return True

    def _record_verity(self, line: str) -> None:
        """Write `.verity` atomically (temp file in .tmp/, then rename); losing it only means a re-probe."""
        from .verity import STATE_FILE

        tmp = os.path.join(TMP_DIR, f"verity-{self._token}-{next(self._seq)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, 0o644,
                         dir_fd=self._dirfd)
            try:
                _write_all(fd, (line + "\n").encode())
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.replace(tmp, STATE_FILE, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
        except OSError:
            _unlink_quiet(tmp, self._dirfd)

    def _enable_verity(self, rels: Iterable[str]) -> None:
        """fs-verity on each new object, its measured digest checked against its name.  A refusal
        other than a wrong digest only downgrades the directory to "new" (never fails a put)."""
        from . import verity

        for rel in rels:
            try:
                fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._dirfd)
            except FileNotFoundError:
                continue   # removed meanwhile (gc of a put that lost its race): nothing to protect
            try:
                verity.enable_and_check(fd, bytes.fromhex(rel.replace("/", "")), f"object {rel} in {self.root}")
            except ObjectDigestMismatchError:
                raise
            except ObjectStoreError as e:
                if self._verity == verity.ALL:
                    self._verity = verity.NEW
                    self._record_verity(f"{verity.NEW}: {e}")
            finally:
                os.close(fd)

    def clean_temp(self, max_age_s: float = 24 * 3600) -> int:
        """Delete named temp files older than `max_age_s` (left by crashed puts); returns how many."""
        self._check_writable("clean temp files")
        cutoff = time.time() - max_age_s
        removed = 0
        tmp = -1
        try:  # through directory fds, never following a symlink: a swapped-in link cannot redirect unlinks
            tmp = os.open(TMP_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._dirfd)
            with os.scandir(tmp) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                        if not stat.S_ISDIR(st.st_mode) and st.st_mtime < cutoff:
                            os.unlink(e.name, dir_fd=tmp)
                            removed += 1
                    except FileNotFoundError:
                        pass
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ObjectStoreError(f"cannot clean {self.root}/{TMP_DIR}: {e.strerror or e}") from e
        finally:
            if tmp >= 0:
                os.close(tmp)
        return removed

    # -- internals -----------------------------------------------------------------------------------

    def _check_writable(self, what: str) -> None:
        if self.readonly:
            raise ReadOnlyObjectStoreError(f"object store {self.root} is opened read-only: cannot {what}")
        if self._dirfd < 0:
            raise ObjectStoreError(f"object store {self.root} is closed: cannot {what}")

    def _fsync(self, rel: str, flags: int) -> None:
        try:
            fd = os.open(rel, flags | _O_CLOEXEC, dir_fd=self._dirfd)
        except FileNotFoundError:  # removed since it was put
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _put_small(self, data: bytes | memoryview, expected: Digest | None) -> bytes:
        """One-chunk content: hash first, so content already stored is never written at all."""
        digest = fsverity_digest(data)
        self._check_expected(digest, expected)
        self._store_hashed(digest, data)
        return digest

    def _store_hashed(self, digest: bytes, data: bytes | memoryview) -> None:
        """Write in-memory content whose digest is already known (unless a good copy is stored)."""
        rel = _rel(digest)
        damaged = self._existing_damaged(rel, len(data))
        if damaged is False:
            return
        try:
            fd, name = self._open_temp(rel[:2])
            try:
                _write_all(fd, data)
                _chmod_object(fd)
                self._publish(fd, name, rel, damaged)
            except BaseException:
                if name is not None:
                    _unlink_quiet(name, self._dirfd)
                raise
            finally:
                os.close(fd)
        except OSError as e:
            raise ObjectStoreError(f"cannot store object {digest.hex()} in {self.root}: {e.strerror or e}") from e

    def _store_hashed_new(self, digest: bytes, data: bytes | memoryview) -> bool:
        """`_store_hashed` for content that is most likely not stored yet, in a process whose umask
        leaves OBJECT_MODE as it is (a bulk helper's: objects.bulkhelper sets it): four syscalls per
        object (open O_TMPFILE, write, link, close) instead of six.  No existence check before
        writing and no fstat of the mode: the link refuses an existing name, and only then is the
        stored object checked (a good one kept, the new copy dropped; a damaged one replaced), the
        same outcome as `_store_hashed` at the cost of one wasted write for content already stored.
        True if this call created the object: then it is neither noted for `sync()` nor reported to
        `watch_created()` sets, the caller does both (a helper reports to its parent, which notes
        what it sent: kept per object here, 300 bytes each, that was a third of a helper's memory).
        """
        if not self._tmpfile and not self._tmpfile_ok():  # (named temp files: the general path)
            self._store_hashed(digest, data)
            return False
        rel = _rel(digest)
        dirfd = self._dirfd
        try:
            fd, _ = self._open_temp(rel[:2])  # (anonymous: self._tmpfile)
            try:
                _write_all(fd, data)
                # src_dir_fd makes os.link use linkat(AT_SYMLINK_FOLLOW), needed for /proc/self/fd
                os.link(f"/proc/self/fd/{fd}", rel, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except (FileExistsError, FileNotFoundError):  # stored already, or the fan-out dir vanished
                damaged = self._existing_damaged(rel, len(data))
                if damaged is not False:  # the general path's publish (replaces a damaged copy)
                    _chmod_object(fd)
                    self._publish(fd, None, rel, damaged)
                return False
            finally:
                os.close(fd)
        except OSError as e:
            raise ObjectStoreError(f"cannot store object {digest.hex()} in {self.root}: {e.strerror or e}") from e
        return True

    def _put_large(
        self, chunks: Iterator[memoryview], buffers: _Buffers | None, expected: Digest | None, direct: bool,
        read_done: threading.Event | None = None, pending: PendingPut | None = None,
        deferred: DeferredWork | None = None, size: int | None = None,
    ) -> bytes:
        """Hash `chunks` in CHUNK_WORKERS threads (this one among them) while another writes them to a
        temp file; publish.

        Each worker takes the next 1 MiB chunk from the source (one at a time, in order), hands it to
        the writers, hashes its fs-verity blocks (unless the source's deferred work does them in the
        same pass), and places it in the source's lane (`_Lane`), where whichever worker holds the
        lane, in chunk order and across the puts of one source, does the source's deferred work on
        it (`deferred`: an uncompressed layer's sha256) and adds its block hashes to the object's
        Merkle tree.  (A chunk read on one core and hashed on the other cost 0-4% more hashing CPU
        here, far less than a wake-up per chunk.)  The buffer goes back to the source once the
        writer is done too, so a slow write never holds up hashing.  `direct`: write with O_DIRECT (chunks must then be
        aligned buffers): on this kind of machine (a VM whose fresh page-cache pages cost a host fault
        each) copying into the page cache, not hashing, is what limits a buffered put; O_DIRECT lets
        the device DMA from our buffers instead, from DIRECT_WRITERS threads: one O_DIRECT write in
        flight left the virtual disk idle between writes (1,100-1,300 MB/s against 1,500-1,700 with
        two).  When the stream's `size` is known, the temp file is first allocated to it (fallocate):
        ext4 runs O_DIRECT writes that extend a file one at a time (under the inode lock), while
        writes into allocated space go in parallel.  Threads are kept between puts (`_WORKERS`,
        `_WRITERS`), and the helpers working beside this thread move on to the next put offered when
        this one's chunks are all taken (`_HELPERS`).
        `read_done` is set once no worker will touch the source again (`pending.read_error` set first
        if reading it failed).
        """
        where = f"{self.root}/{TMP_DIR}"
        try:
            fd, name = self._take_temp(direct and bool(_O_DIRECT))
        except OSError as e:
            raise ObjectStoreError(f"cannot create a temp file in {where}: {e.strerror or e}") from e
        direct = direct and bool(_O_DIRECT) and bool(_getfl(fd) & _O_DIRECT)
        nwriters = max(1, DIRECT_WRITERS) if direct else 1  # (buffered: one, its writeback follows the offset)
        # (a file shorter than promised is cut to what was read before it is published)
        allocated = direct and size is not None and size > READ_CHUNK and _fallocate(fd, size)
        release = _Release(buffers)
        published = False
        writes: _FileWrites | None = None
        run: _ChunkRun | None = None
        try:
            writes = _FileWrites(fd, direct, where, release, _WRITERS.queue(nwriters))
            run = _ChunkRun(chunks, writes, release, deferred, read_done, pending)
            _HELPERS.offer(run)
            run.work()
            _HELPERS.withdraw(run)
            run.wait_helpers()
            run.wait_finished()
            run.check()
            error = writes.finish()
            if error is not None:
                raise error
            if allocated and run.hasher.size != size:
                try:
                    os.ftruncate(fd, run.hasher.size)
                except OSError as e:
                    raise ObjectStoreError(f"cannot write a temp file in {where}: {e.strerror or e}") from e
            digest = run.hasher.digest()
            self._check_expected(digest, expected)
            rel = _rel(digest)
            damaged = self._existing_damaged(rel, run.hasher.size)
            if damaged is False and self._has_hole(rel, run.hasher.size):
                damaged = True
            if damaged is not False:
                try:
                    _chmod_object(fd)
                    self._publish(fd, name, rel, damaged)
                except OSError as e:
                    raise ObjectStoreError(f"cannot store object {digest.hex()} in {self.root}: {e.strerror or e}") from e
                published = True
            return digest
        finally:
            if run is not None:
                _HELPERS.withdraw(run)
                run.stop()
                if buffers is not None:
                    for _ in range(CHUNK_WORKERS):
                        buffers.free.put(None)  # unblock a worker waiting for a buffer
                run.wait_helpers()
                run.wait_finished()  # (the chunks taken: finished, or dropped in their turn)
                if deferred is not None and run.last_mark is not None:
                    deferred.settle(run.last_mark)  # (done unless the run stopped: our buffers hold it)
            if writes is not None:
                writes.finish(abandon=True)  # (after a normal end: nothing left; else no write touches fd after)
            os.close(fd)
            if name is not None and not published:
                _unlink_quiet(name, self._dirfd)

    def _check_expected(self, digest: bytes, expected: Digest | None) -> None:
        if expected is not None and parse_digest(expected) != digest:
            raise ObjectDigestMismatchError(
                f"content has fs-verity digest {digest.hex()}, expected {parse_digest(expected).hex()}"
            )

    def _existing_damaged(self, rel: str, size: int) -> bool | None:
        """None: no object yet; False: a good one exists (noted for sync); True: one of the wrong size."""
        if not os.access(rel, os.F_OK, dir_fd=self._dirfd):  # the common case, without an exception
            return None
        try:
            st = os.stat(rel, dir_fd=self._dirfd)
        except FileNotFoundError:
            return None
        if st.st_size != size or not stat.S_ISREG(st.st_mode):
            return True
        # It may come from a concurrent put that has not synced yet: our sync() covers it too.
        self._note(rel)
        return False

    def _has_hole(self, rel: str, size: int) -> bool:
        """Whether the object has a hole (or space allocated but never written) before `size`.

        Why: what a power failure before sync() leaves may have the right size and no data: a big
        put allocates its temp file to its size before writing (fallocate), and delayed allocation
        can reach the disk with the size before the blocks.  The file system reports such ranges as
        holes (SEEK_HOLE) as long as none of it is in the page cache, as after the reboot that
        follows such a failure; no put leaves one, so the object is replaced (a file system that
        stores zeros as holes only costs a rewrite).  False where it cannot tell."""
        try:
            fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._dirfd)
        except OSError:
            return False
        try:
            return os.lseek(fd, 0, os.SEEK_HOLE) < size
        except OSError:
            return False
        finally:
            os.close(fd)

    def _open_temp(self, fanout: str | None = None, direct: bool = False) -> tuple[int, str | None]:
        """A new writable temp file: (fd, relative name), name None for an anonymous O_TMPFILE.

        Named temp files live in .tmp/.  An anonymous one is opened in the object's fan-out dir when
        known (it has no name there, so nothing can see it): ext4 allocates a new inode near its
        directory, and funnelling every object through .tmp/'s block group makes that group's
        allocator scan (recently freed inodes) the bottleneck of small-file imports.
        `direct`: try O_DIRECT (silently without it where the file system refuses it).
        """
        if direct and _O_DIRECT:
            try:
                return self._open_temp_flags(fanout, _O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return self._open_temp_flags(fanout, 0)

    def _take_temp(self, direct: bool) -> tuple[int, str | None]:
        """`_open_temp` for a big put: the spare anonymous temp file a finished put opened, if any.

        Why: creating a file costs 0.1-0.5 ms (ext4 inode allocation, longer after many deletes),
        and in a big put it comes before the first chunk can be hashed, so a layer of 5 MB files
        left the serial sha256 lane idle that long per file.  The spare is opened by the previous
        put's thread after that put is over, while the next one runs."""
        with self._lock:
            got = self._spare.pop(direct, None)
        if got is not None:
            if got[0] == os.getpid():  # (a forked child must not write into its parent's file)
                return got[1], None
        return self._open_temp(direct=direct)

    def _open_spare(self, direct: bool) -> None:
        """Open the next big put's temp file (see `_take_temp`); only an anonymous one (nothing to
        clean up if the process dies), and nothing on any error (the put then opens its own)."""
        with self._lock:
            if direct in self._spare or self._dirfd < 0 or not self._tmpfile:
                return
        try:
            fd, name = self._open_temp(direct=direct)
        except OSError:
            return
        if name is not None:  # (cannot happen with _tmpfile)
            os.close(fd)
            _unlink_quiet(name, self._dirfd)
            return
        with self._lock:
            if direct not in self._spare and self._dirfd >= 0:
                self._spare[direct] = (os.getpid(), fd)
                fd = -1
        if fd >= 0:
            os.close(fd)

    def _open_temp_flags(self, fanout: str | None, extra: int) -> tuple[int, str | None]:
        dirfd = self._dirfd
        if self._tmpfile_ok():
            where = fanout or TMP_DIR
            flags = os.O_WRONLY | _O_TMPFILE | _O_CLOEXEC | extra
            try:
                return os.open(where, flags, OBJECT_MODE, dir_fd=dirfd), None
            except FileNotFoundError:
                if fanout:
                    self._make_fanout(fanout)
                else:
                    os.makedirs(os.path.join(self.root, TMP_DIR), mode=0o700, exist_ok=True)
            return os.open(where, flags, OBJECT_MODE, dir_fd=dirfd), None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | extra
        for attempt in (0, 1):
            try:
                while True:
                    name = self._temp_name()
                    try:
                        return os.open(name, flags, OBJECT_MODE, dir_fd=dirfd), name
                    except FileExistsError:
                        continue
            except FileNotFoundError:  # someone removed .tmp/
                if attempt:
                    raise
                os.makedirs(os.path.join(self.root, TMP_DIR), mode=0o700, exist_ok=True)
        raise AssertionError("unreachable")

    def _temp_name(self) -> str:
        return f"{TMP_DIR}/{os.getpid()}-{self._token}-{next(self._seq)}"

    def _tmpfile_ok(self) -> bool:
        """Whether anonymous files can be linked into the store (`_probe_tmpfile`, once)."""
        if self._tmpfile is None:
            self._tmpfile = self._probe_tmpfile()
        return self._tmpfile

    def _probe_tmpfile(self) -> bool:
        """Whether O_TMPFILE files in .tmp/ can be linked into the store via /proc/self/fd."""
        if not _O_TMPFILE or not os.path.isdir("/proc/self/fd"):
            return False
        try:
            fd = os.open(TMP_DIR, os.O_WRONLY | _O_TMPFILE | _O_CLOEXEC, 0o600, dir_fd=self._dirfd)
        except OSError:
            return False
        name = self._temp_name()
        try:
            os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
        except OSError:
            return False
        else:
            os.unlink(name, dir_fd=self._dirfd)
            return True
        finally:
            os.close(fd)

    def _publish(self, fd: int, name: str | None, rel: str, replace: bool | None) -> None:
        """Give the finished temp file its object name; if the name appeared meanwhile, keep that object."""
        dirfd = self._dirfd
        if replace and name is None:  # rename() needs a name: give the anonymous file one first
            name = self._temp_name()
            os.link(f"/proc/self/fd/{fd}", name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        src = name if name is not None else f"/proc/self/fd/{fd}"
        for attempt in (0, 1):
            try:
                if replace:
                    os.replace(src, rel, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                    name = None
                else:
                    # src_dir_fd makes os.link use linkat(AT_SYMLINK_FOLLOW), needed for /proc/self/fd
                    os.link(src, rel, src_dir_fd=dirfd, dst_dir_fd=dirfd)
                    if self._created_watchers:
                        self._note_created((bytes.fromhex(rel[:2] + rel[3:]),))
                break
            except FileExistsError:  # a concurrent put of the same content won: its object is as good
                break
            except FileNotFoundError:
                if attempt:
                    raise
                self._make_fanout(rel[:2])
        if name is not None:
            _unlink_quiet(name, dirfd)
        self._note(rel)

    def _make_fanout(self, xx: str) -> None:
        try:
            os.mkdir(xx, DIR_MODE, dir_fd=self._dirfd)
        except FileExistsError:
            return
        os.chmod(xx, DIR_MODE, dir_fd=self._dirfd)  # whatever the umask: overlayfs readers need x
        with self._lock:
            self._pending_dirs.add(".")

    def _note(self, rel: str) -> None:
        with self._lock:
            self._pending_files.add(rel)
            self._pending_dirs.add(rel[:2])

    def _note_many(self, digests: Iterable[bytes]) -> None:
        """Note objects another process stored here (and fan-out dirs it may have made) for `sync()`:
        by digest, named only if sync() needs the names (a bulk writer's 50,000 objects cost a
        twentieth of a second to name, at the end of an import, where one syncfs covers them)."""
        batch = list(digests)
        with self._lock:
            self._pending_digests.append(batch)
            if batch:
                self._pending_dirs.add(".")


_rel = object_path   # `XX/<62 hex>` of a raw digest (objects.paths)


def _chmod_object(fd: int) -> None:
    """Make the new object 0644 whatever the umask; fstat first: a no-op chmod would still be journaled."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != OBJECT_MODE:
        os.fchmod(fd, OBJECT_MODE)


def _unlink_quiet(name: str, dirfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dirfd)
    except OSError:
        pass


def _getfl(fd: int) -> int:
    """The fd's status flags (whether O_DIRECT stuck)."""
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


class PendingPut:
    """A big put under way (`ObjectStore.put_async`): `result()` waits for it and gives its digest."""

    __slots__ = ("_done", "_digest", "_error", "_slot", "read_error")

    def __init__(self, slot: threading.BoundedSemaphore | None = None) -> None:
        self._done = threading.Event()
        self._digest: bytes | None = None
        self._error: BaseException | None = None
        self._slot = slot              # released when the put is over
        self.read_error = False        # the source was not read to its end (the put failed first)

    @classmethod
    def completed(cls, digest: bytes) -> PendingPut:
        p = cls()
        p.set(digest, None)
        return p

    def set(self, digest: bytes | None, error: BaseException | None) -> None:
        self._digest, self._error = digest, error
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> bytes:
        """The digest (32 raw bytes); raises the put's error."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._digest is not None
        return self._digest


class _Workers:
    """Daemon threads kept for the helper stages of big puts: starting two fresh threads per put costs
    about a millisecond each on a busy machine, which a layer of many big files pays many times."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue] = []  # job queues of idle workers
        os.register_at_fork(after_in_child=self._forget)  # the threads do not exist in a forked child

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._idle = []

    def run(self, fn: Callable[..., None], *args: object) -> queue.SimpleQueue:
        """Run `fn(*args)` on an idle worker (a new one if none is idle); the returned queue gets one
        item when it has returned.  `fn` must not raise (the stages hand their errors on themselves)."""
        with self._lock:
            jobs = self._idle.pop() if self._idle else None
        if jobs is None:
            jobs = queue.SimpleQueue()
            threading.Thread(target=self._work, args=(jobs,), name="objects-pipeline", daemon=True).start()
        finished: queue.SimpleQueue = queue.SimpleQueue()
        jobs.put((fn, args, finished))
        return finished

    def _work(self, jobs: queue.SimpleQueue) -> None:
        while True:
            fn, args, finished = jobs.get()
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._idle.append(jobs)
                finished.put(None)


_WORKERS = _Workers()


class _Helpers:
    """The threads that help big puts' own threads hash chunks: at most CHUNK_WORKERS - 1 per
    process, each going from one put to the next.

    Why: a layer of many files of a few MiB starts and ends a put every few milliseconds.  With
    helpers per put, each put woke its own and they went back to the pool after it, while the
    previous put's still worked: two overlapping puts ran twice the threads, each file's start
    waited for a wake-up.  Here a helper done with one put's chunks joins the next put whose source
    still has chunks (`offer`ed by its put's thread, oldest first), so the number of threads stays
    the same whatever the file sizes; it returns to the pool when there is none (the next file not
    offered yet: that offer starts it again).  A put's own thread always works on it, so no put
    waits for a helper (nor ever depends on one being free)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[_ChunkRun] = []  # runs that may still have chunks to take, oldest first
        self._count = 0  # helper threads alive (working, or about to look for the next run)
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._open = []
        self._count = 0

    def offer(self, run: _ChunkRun) -> None:
        """Let helpers work on `run`; start new ones while fewer than CHUNK_WORKERS - 1 exist."""
        with self._lock:
            self._open.append(run)
            while self._count < CHUNK_WORKERS - 1 and run.join():
                self._count += 1
                try:
                    _WORKERS.run(self._help, run)
                except BaseException:
                    self._count -= 1
                    run.leave()
                    raise

    def withdraw(self, run: _ChunkRun) -> None:
        """No new helper joins `run` (its source has ended, or it stopped)."""
        with self._lock:
            if run in self._open:
                self._open.remove(run)

    def _help(self, run: _ChunkRun) -> None:
        while True:
            run.work(helper=True)
            with self._lock:
                nxt = next((r for r in self._open if r.join()), None)
                if nxt is None:
                    self._count -= 1
                    return
            run = nxt


_HELPERS = _Helpers()


class _Release:
    """Gives a pipeline buffer back to its put once both the writer and the worker are done with it."""

    def __init__(self, buffers: _Buffers | None) -> None:
        self._free = buffers.free if buffers is not None else None
        self._lock = threading.Lock()
        self._half: set[int] = set()  # ids of buffers one of the two is done with

    def __call__(self, mv: memoryview) -> None:
        if self._free is None:  # chunks of the caller's memory, nothing to recycle
            return
        buf = mv.obj
        with self._lock:
            key = id(buf)
            if key not in self._half:
                self._half.add(key)
                return
            self._half.discard(key)
        self._free.put(buf)


class _Lane:
    """The order in which chunks are finished (the source's deferred work, the Merkle tree): the
    order they were taken from the source, across all the big puts reading one source (one lane
    per `deferred`, see `_Lanes`; a put without one has its own).

    Whichever worker holds the lane (`drive`) finishes every chunk whose turn it is and that has
    been read, in turn, for whichever put it belongs to; a worker that finds it held reads on.  Why:
    when each worker finished its own chunks, every chunk (the serial sha256 of an uncompressed
    layer runs there, with the block hashes in one pass) began with a wake-up of its worker, and
    every file with one more for the first chunk of the next put waiting for the last one of the
    put before, 0.1-0.3 ms each on a busy machine with the lane idle.  The lane is checked again
    after it is let go, so no chunk placed meanwhile is left behind; every chunk taken is placed
    (`_ChunkRun._work`), so a put never waits for one that will not come."""

    __slots__ = ("_lock", "_guard", "_ready", "_taken", "_next", "runs")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held by the one thread finishing chunks
        self._guard = threading.Lock()  # guards the fields below
        self._ready: dict[int, tuple] = {}  # number -> (run, chunk, mark, hashes): taken, not finished
        self._taken = 0  # chunks numbered so far
        self._next = 0  # the number of the next chunk to finish
        self.runs = 0  # puts using the lane (see _Lanes)

    def number(self) -> int:
        """The next chunk's number (call in the order chunks are taken from the source)."""
        with self._guard:
            n = self._taken
            self._taken += 1
            return n

    def place(self, number: int, item: tuple) -> None:
        with self._guard:
            self._ready[number] = item

    def drive(self) -> None:
        """Finish the chunks whose turn it is, unless another thread does (see the class docstring)."""
        while self._lock.acquire(blocking=False):
            try:
                while True:
                    with self._guard:
                        item = self._ready.pop(self._next, None)
                    if item is None:
                        break
                    item[0].finish_chunk(*item[1:])
                    with self._guard:
                        self._next += 1
            finally:
                self._lock.release()
            with self._guard:
                if self._next not in self._ready:
                    return


class _Lanes:
    """The lane of each source that big puts are reading (keyed by their `deferred`, alive while a
    put uses it); a put without deferred work gets a lane of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lanes: dict[int, _Lane] = {}
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._lanes = {}

    def enter(self, deferred: object | None) -> _Lane:
        if deferred is None:
            return _Lane()
        with self._lock:
            lane = self._lanes.get(id(deferred))  # (the put holds `deferred`: its id is not reused meanwhile)
            if lane is None:
                lane = self._lanes[id(deferred)] = _Lane()
            lane.runs += 1
            return lane

    def leave(self, deferred: object | None, lane: _Lane) -> None:
        if deferred is None:
            return
        with self._lock:
            lane.runs -= 1
            if not lane.runs and self._lanes.get(id(deferred)) is lane:
                del self._lanes[id(deferred)]


_LANES = _Lanes()


class _ChunkRun:
    """The shared state of one big put's workers (see `ObjectStore._put_large`)."""

    def __init__(self, chunks: Iterator[memoryview], writes: _FileWrites, release: _Release,
                 deferred: DeferredWork | None, read_done: threading.Event | None,
                 pending: PendingPut | None) -> None:
        self.hasher = FsVerityHasher()
        self._chunks = chunks
        self._writes = writes
        self._release = release
        self._deferred = deferred
        self._read_done = read_done
        self._pending = pending
        self._read_lock = threading.Lock()  # one worker reads the source at a time, in order
        self._offset = 0  # of the next chunk read
        self._reads = 0  # chunks read
        self._eof = False
        self._turn = threading.Condition()  # guards _next, _stopped, _helpers
        self._next = 0  # chunks finished (deferred work, Merkle tree), in read order: see _Lane
        self._lane = _LANES.enter(deferred)
        self._in_lane = True  # until wait_finished() leaves it
        self._stopped = False
        self._error: BaseException | None = None
        self._helpers = 0  # helper threads that joined (see _Helpers), until their work() returns
        self._settle_blocks = getattr(deferred, "settle_blocks", None)
        self.last_mark: int | None = None  # the deferred-work mark of the last chunk taken

    def join(self) -> bool:
        """Count in a helper thread that will call `work(helper=True)`; False (not counted) once no
        chunk is left to take."""
        with self._turn:
            if self._eof or self._stopped:
                return False
            self._helpers += 1
            return True

    def leave(self) -> None:
        """Count out a helper that joined; it must not touch the run afterwards."""
        with self._turn:
            self._helpers -= 1
            self._turn.notify_all()

    def wait_helpers(self) -> None:
        """Wait until every helper that joined is done with this run's chunks."""
        with self._turn:
            self._turn.wait_for(lambda: not self._helpers)

    def work(self, helper: bool = False) -> None:
        """Take, hash and place chunks (finishing those whose turn it is, if the lane is free) until
        the source ends or the run stops; never raises.
        `helper`: called by a thread counted in by `join()`."""
        try:
            self._work()
        finally:
            if helper:
                self.leave()

    def _work(self) -> None:
        try:
            while (got := self._take()) is not None:
                number, offset, mv, mark = got
                hashes = None
                try:
                    self._writes.add(mv, offset)
                    full = len(mv) - len(mv) % BLOCK_SIZE
                    if full and not (self._settle_blocks is not None and mark is not None):
                        hashes = hash_full_blocks(mv[:full])
                finally:  # (every chunk taken is placed: the lane finishes chunks in the order taken)
                    self._lane.place(number, (self, mv, mark, hashes))
                self._lane.drive()
                self._watch_writer()
        except BaseException as e:  # noqa: BLE001 - raised by check() in the put's thread
            self._fail(e)

    def finish_chunk(self, mv: memoryview, mark: int | None, hashes: bytes | None) -> None:
        """Finish a chunk in its turn (called by the lane's driver, see _Lane); never raises."""
        try:
            if self._stopped:
                if mark is not None and self._settle_blocks is not None:
                    self._deferred.unclaim(mark)
            else:
                if mark is not None and self._settle_blocks is not None:  # (the source's sha256 and the
                    hashes = self._settle_blocks(mark, mv)              # block hashes in one pass)
                elif self._deferred is not None:
                    self._deferred.settle(mark)
                self.hasher.update(mv, hashes)
        except BaseException as e:  # noqa: BLE001 - raised by check() in the put's thread
            self._fail(e)
        finally:
            with self._turn:
                self._next += 1
                if self._next == self._reads:
                    self._turn.notify_all()
            self._release(mv)

    def wait_finished(self) -> None:
        """Wait until every chunk taken is finished (or dropped, after a stop); call once no worker
        takes any more.  Leaves the lane: the run is done with it."""
        self._lane.drive()
        with self._turn:
            self._turn.wait_for(lambda: self._next == self._reads)
            lane, self._in_lane = self._in_lane, False
        if lane:
            _LANES.leave(self._deferred, self._lane)

    def _take(self) -> tuple[int, int, memoryview, int | None] | None:
        """The next chunk with its number, offset and deferred-work mark; None at the end."""
        with self._read_lock:
            if self._eof or self._stopped:
                return None
            try:
                mv = next(self._chunks, None)
            except BaseException as e:
                if self._pending is not None:
                    self._pending.read_error = True
                self._fail(e)
                self._end_of_source(read_on=True)
                return None
            if mv is None or self._stopped:
                self._end_of_source(read_on=not self._stopped)
                if mv is not None:  # read after a stop: neither the writer nor a worker will have it
                    self._release(mv)
                    self._release(mv)
                return None
            if self._deferred is None:
                mark = None
            elif self._settle_blocks is not None:
                mark = self._deferred.claim()
            else:
                mark = self._deferred.mark()
            self.last_mark = mark
            # (numbered last, and before the caller may read on: a chunk numbered is always placed)
            number, offset = self._lane.number(), self._offset
            with self._turn:
                self._reads += 1
            self._offset += len(mv)
            if getattr(self._chunks, "exhausted", False):  # the caller may read on now (see _StreamChunks)
                self._end_of_source(read_on=True)
            return number, offset, mv, mark

    def _end_of_source(self, read_on: bool) -> None:
        """No worker reads the source any more; `read_on`: its owner may go on reading it (so
        `read_done`; after a source error, `pending.read_error` and the failure are set first)."""
        self._eof = True
        if read_on and self._read_done is not None:
            self._read_done.set()

    def _watch_writer(self) -> None:
        """Stop early once a write of this put failed."""
        error = self._writes.error
        if error is not None:
            self._fail(error)

    def _fail(self, e: BaseException) -> None:
        with self._turn:
            if self._error is None:
                self._error = e
            self._stopped = True
            self._turn.notify_all()

    def stop(self) -> None:
        with self._turn:
            self._stopped = True
            self._turn.notify_all()

    def check(self) -> None:
        """Raise the first error of a worker (a source error as it is); call once no worker runs."""
        if self._error is not None:
            raise self._error
        if self._next != self._reads:  # (cannot happen: wait_finished() waits for them)
            raise ObjectStoreError(f"internal error: {self._reads - self._next} chunks of a put not hashed")


class _FileWrites:
    """The writes of one big put, done by the shared writer threads (`_WRITERS`): the put's workers
    `add` (chunk, offset) pairs, `finish` waits until every one added is written (or dropped).

    Why shared threads, not writers per put: a layer of many files of a few MiB started two writer
    jobs per file and joined them at its end, a hand-off and a wake-up each; long-lived writers
    take one queue of (file, chunk) items, so the writes of the next file go out as soon as its
    first chunk is read, behind the last ones of the file before.

    Each chunk is released once written (or dropped after a failure, so no worker waits for a
    buffer that will not come back).  The first failure is kept in `error` (an ObjectStoreError
    for an OSError) and later chunks are not written.  With `direct`, an unaligned tail (or a file
    system refusing the aligned writes) switches the fd to buffered writes (see `_write_chunk`)."""

    __slots__ = ("fd", "direct", "where", "release", "error", "_queue", "_lock", "_left", "_closed",
                 "_done", "_written", "_flushed", "_abandoned")

    def __init__(self, fd: int, direct: bool, where: str, release: _Release, chunks: queue.SimpleQueue) -> None:
        self.fd = fd
        self.direct = direct
        self.where = where
        self.release = release
        self.error: BaseException | None = None
        self._queue = chunks
        self._lock = threading.Lock()
        self._left = 0  # chunks added, not yet written or dropped
        self._closed = False
        self._done = threading.Event()
        self._written = 0  # bytes written (buffered: for early writeback)
        self._flushed = 0  # ... of which writeback was started for
        self._abandoned = False

    def add(self, mv: memoryview, offset: int) -> None:
        with self._lock:
            self._left += 1
        self._queue.put((self, mv, offset))

    def finish(self, abandon: bool = False) -> BaseException | None:
        """Wait until every chunk added is written; the first error, if any.  `abandon`: chunks not
        written yet are dropped (the put failed).  Call once no worker adds any more."""
        with self._lock:
            self._closed = True
            self._abandoned = self._abandoned or abandon
            if not self._left:
                self._done.set()
        self._done.wait()
        if self.error is None and not abandon and not self.direct and self._written > self._flushed:
            _start_writeback(self.fd, self._flushed, self._written - self._flushed)  # (sync() finds it under way)
            self._flushed = self._written
        return self.error

    def write(self, run: list) -> None:
        """Write a run of contiguous (self, chunk, offset) items (see `_gather`), then release them."""
        if self.error is None and not self._abandoned:
            try:
                if len(run) > 1:
                    direct = _write_run(self.fd, [(mv, at) for _, mv, at in run], self.direct)
                else:
                    direct = _write_chunk(self.fd, run[0][1], run[0][2], self.direct)
            except OSError as e:
                err = ObjectStoreError(f"cannot write a temp file in {self.where}: {e.strerror or e}")
                err.__cause__ = e
                self._failed(err)
            except BaseException as e:  # noqa: BLE001 - the put's thread raises it
                self._failed(e)
            else:
                n = sum(len(mv) for _, mv, _ in run)
                with self._lock:
                    self.direct = self.direct and direct
                    self._written += n
                    start = not self.direct and self._written - self._flushed >= WRITEBACK_EVERY
                    if start:
                        flushed, self._flushed = self._flushed, self._written
                if start:
                    _start_writeback(self.fd, flushed, self._written - flushed)
        for _, mv, _ in run:
            self.release(mv)
        with self._lock:
            self._left -= len(run)
            if self._closed and not self._left:
                self._done.set()

    def _failed(self, e: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = e


class _WriterPool:
    """Long-lived writer threads of big puts (see `_FileWrites`): for each number of writes in
    flight a put asks for (DIRECT_WRITERS with O_DIRECT, one buffered), that many threads sharing
    one queue; started on first use, forgotten in a forked child (its threads do not exist there)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[int, queue.SimpleQueue] = {}
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._queues = {}

    def queue(self, writers: int) -> queue.SimpleQueue:
        """The queue that `writers` threads take (file, chunk, offset) items from."""
        with self._lock:
            q = self._queues.get(writers)
            if q is None:
                q = queue.SimpleQueue()
                for _ in range(writers):
                    threading.Thread(target=_write_loop, args=(q,), name="objects-writer", daemon=True).start()
                self._queues[writers] = q
            return q


_WRITERS = _WriterPool()


def _write_loop(chunks: queue.SimpleQueue) -> None:
    """A writer thread of `_WRITERS`: forever, the next item and those queued right behind it that
    continue it (`_gather`), written by their file's `write` (which never raises)."""
    held: list = []  # items taken from the queue while gathering a run, not written yet (in order)
    while True:
        item = held.pop(0) if held else chunks.get()
        run = [item]
        if item[0].direct and not held:
            _gather(run, chunks, held)
        item[0].write(run)


def _gather(run: list, chunks: queue.SimpleQueue, held: list) -> None:
    """Add to `run` the (file, chunk, offset) items already queued that continue it (same file,
    the next offset), up to DIRECT_RUN of them, whole aligned ones only; the first that does not
    goes to `held`.  Why: O_DIRECT writes go to the device one at a time, so when the writer lags
    (a disk slow with small O_DIRECT writes), one write of several MiB gets more through than as
    many 1 MiB ones; when it keeps up, nothing is queued and each chunk goes out at once."""
    if len(run[0][1]) % DIRECT_ALIGN:
        return
    while len(run) < DIRECT_RUN:
        try:
            item = chunks.get_nowait()
        except queue.Empty:
            return
        f, mv, offset = run[-1]
        if item[0] is not f or item[2] != offset + len(mv) or len(item[1]) % DIRECT_ALIGN:
            held.append(item)
            return
        run.append(item)


def _write_run(fd: int, run: list, direct: bool) -> bool:
    """Write contiguous aligned chunks with one pwritev; returns whether the fd is still in O_DIRECT
    mode.  A short or refused write goes on chunk by chunk (`_write_chunk`) from where it stopped."""
    offset = run[0][1]
    try:
        done = os.pwritev(fd, [mv for mv, _ in run], offset)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        done = 0
    for mv, at in run:
        start = done - (at - offset)
        if start < len(mv):
            start = max(start, 0)
            direct = _write_chunk(fd, mv[start:], at + start, direct)
    return direct


def _write_chunk(fd: int, mv: memoryview, offset: int, direct: bool) -> bool:
    """Write `mv` at `offset`; returns whether the fd is still in O_DIRECT mode.

    In direct mode the aligned head goes out directly; an unaligned tail, or EINVAL from a file
    system that accepted O_DIRECT at open but not these writes, switches the fd to buffered writes,
    which continue exactly where the direct ones stopped.
    """
    n = len(mv)
    pos = 0
    if direct:
        head = n - n % DIRECT_ALIGN
        try:
            while pos < head:
                pos += os.pwrite(fd, mv[pos:head], offset + pos)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        if pos < n:
            from .writemode import set_direct

            set_direct(fd, False)  # (where that fails, the buffered pwrite below says why)
            direct = False
    while pos < n:
        pos += os.pwrite(fd, mv[pos:], offset + pos)
    return direct
