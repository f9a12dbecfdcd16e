"""A new flattened image's file: written and hashed while the writer still emits its later inodes,
with O_DIRECT where that is the faster way.

Why: on the development VM the image's file used to take ~12 ms after the image was built (its copy
into fresh page-cache pages, each a host fault there, then the fsync, with the sha256 of its name on
the side).  Now the writer (`image_buffer(final=)`) tells how far the image is final after each slice
of inodes, and two threads follow it: one writes each final range to the file (O_DIRECT from the
page-aligned buffer: no copy; where the filesystem refuses it, or refuses a write half-way, the rest
is written buffered), the other hashes it (sha256: the file's name; xxh3-128: the diff index's id).
Both release the GIL in their system call and hash, so they run beside the writer on a second CPU;
what is left when the last inode is emitted is the last range and the fsync.  O_DIRECT is used unless
the store's object directory measured buffered writes faster on this boot (objects.writemode: the same
disk; no measurement is started here).
"""

from __future__ import annotations

import _thread
import errno
import os
import sys
import threading
from collections import deque

from flatmount.flatten.paths import flat_image_path
from objects.writemode import set_direct

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.image.tree import Inode
    from flatmount.store.core import Store

SWITCH_INTERVAL = 0.0005   # seconds, while the image is built (sys.setswitchinterval)


def write_streamed(store: Store, tree: Inode, keep: list | None = None,
                   size_hint: int = 0) -> tuple[str, str, int, bytes]:
    """Build the image of `tree` and write it as `<root>/images/<sha256>.erofs` (temp in `tmp/`, fsync,
    rename): (digest, path, size, xxh3-128 of the image).  `keep`: see `image_buffer`; `size_hint`:
    about how big the image may get (0: unknown), for its buffer's pages to be allocated early."""
    from flatmount.atomic import AtomicFile
    from flatmount.image.writer import image_buffer

    direct = direct_images(store)
    early = _EarlyBuffer.start(size_hint) if direct else None
    try:
        return _write_streamed(store, tree, keep, direct, image_buffer, AtomicFile,
                               early.alloc if early is not None else aligned_buffer)
    finally:
        if early is not None:
            early.join()


def _write_streamed(store: Store, tree: Inode, keep: list | None, direct: bool, image_buffer, AtomicFile,
                    alloc) -> tuple[str, str, int, bytes]:
    with AtomicFile(store.tmp_str, prefix="flat-") as af:
        stream = _Stream(af.file.fileno(), direct and set_direct(af.file.fileno(), True))
        # the threads need the GIL between two system calls: a shorter switch interval gets it to them
        # when the writer returns from a slice of inodes, not once every 5 ms
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL))
        try:
            buf = image_buffer(tree, keep=keep, alloc=alloc if direct else None, final=stream.final)
        except BaseException:
            stream.finish(check=False)
            raise
        finally:
            sys.setswitchinterval(interval)
        digest, image_id = stream.finish()
        size = len(buf)
        del buf
        path = af.commit(flat_image_path(store.root_str, digest))  # (fsync, rename; content-addressed)
    return digest, path, size, image_id


class _Stream:
    """The two threads that follow the writer (see the module docstring): `final(buf, end)` hands
    them `buf[:end]`, `finish()` waits for them and gives (sha256 hex, xxh3-128) of all of it."""

    def __init__(self, fd: int, direct: bool) -> None:
        import xxhash

        from objects.sha256 import sha256

        self.fd, self.direct = fd, direct
        self.sha, self.xxh = sha256(), xxhash.xxh3_128()
        self.view: memoryview | None = None
        self.given = 0
        self.queues: tuple[deque, deque] = (deque(), deque())
        self.ready = (threading.Semaphore(0), threading.Semaphore(0))
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []

    def final(self, buf, end: int) -> None:
        if self.view is None:
            self.view = memoryview(buf)
            self.threads = [threading.Thread(target=self._run, args=(k,), name="flatmount-image", daemon=True)
                            for k in (0, 1)]
            for t in self.threads:
                t.start()
        if end > self.given:
            for q, r in zip(self.queues, self.ready, strict=True):
                q.append((self.given, end))
                r.release()
            self.given = end

    def finish(self, check: bool = True) -> tuple[str, bytes]:
        for q, r in zip(self.queues, self.ready, strict=True):
            q.append(None)
            r.release()
        for t in self.threads:
            t.join()
        if self.view is not None:
            self.view.release()
            self.view = None
        if check and self.errors:
            raise self.errors[0]
        return self.sha.hexdigest(), self.xxh.digest()

    def _run(self, k: int) -> None:
        queue, ready = self.queues[k], self.ready[k]
        while True:
            ready.acquire()
            item = queue.popleft()
            if item is None:
                return
            if self.errors:
                continue   # (a failure: the caller raises it; the rest is only drained)
            a, b = item
            try:
                with self.view[a:b] as chunk:
                    if k == 0:
                        self._write(chunk, a)
                        if not queue and not self.direct:   # (nothing more to write yet: see _flush)
                            self._flush()
                    else:
                        self.sha.update(chunk)
                        self.xxh.update(chunk)
            except BaseException as e:  # noqa: BLE001 - raised by the caller's thread (finish)
                self.errors.append(e)

    def _flush(self) -> None:
        """Make what was written buffered so far durable now, while the writer still emits inodes.

        Why: the fsync at the end waited for all of the image to reach the disk (on a VM writing
        500 MB/s, 20 ms of an 11 MB image); flushed as it goes, that fsync is left with the last
        range (`store.flatten` of the 64k-inode chain: 0.164 against 0.172 s, median of 5; with
        O_DIRECT writes, which there took as long as the flush, it gained nothing).  Best effort:
        the fsync of the commit reports any error."""
        try:
            os.fdatasync(self.fd)
        except OSError:
            pass

    def _write(self, chunk: memoryview, off: int) -> None:
        """All of `chunk` at file offset `off`; what O_DIRECT refuses (EINVAL: an unaligned rest after a
        short write, a filesystem that takes the flag but not the write) is written buffered."""
        done = 0
        while done < len(chunk):
            try:
                n = os.pwrite(self.fd, chunk[done:], off + done)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct or not set_direct(self.fd, False):
                    raise
                self.direct = False
                continue
            if n <= 0:
                raise OSError(errno.EIO, "short write of a flattened image")
            done += n


class _EarlyBuffer:
    """Page-aligned memory for the image, its pages allocated by another thread (flatmount/flatten/
    _carena.c `populate`, the GIL released) while this one decodes, merges and lays the image out:
    allocating the 2,700 pages of an 11 MB image costs ~3.5 ms (7 ms faulted in one by one), off
    the path this way where a second CPU is free.  Its size comes from a hint (the prefix image's
    and the new layers' sizes); an image that does not fit gets memory of its own (aligned_buffer)."""

    MAX = 256 << 20   # no bigger guesses (a flattened image has no file content: 256 MB is 1.7M inodes)

    def __init__(self, buf, done) -> None:
        self.buf, self.done = buf, done

    @classmethod
    def start(cls, size: int) -> _EarlyBuffer | None:
        from objects.compiled import load

        arena = load("flatmount.flatten._carena")
        if arena is None or not 0 < size <= cls.MAX:
            return None
        import mmap

        buf = mmap.mmap(-1, size)   # (no pages yet)
        done = _thread.allocate_lock()
        done.acquire()

        def run() -> None:
            try:
                arena.populate(buf)
            except BaseException:  # noqa: BLE001, S110 - best effort: the pages then fault in as written
                pass
            finally:
                done.release()

        _thread.start_new_thread(run, ())
        return cls(buf, done)

    def alloc(self, size: int):
        if size <= len(self.buf):
            return memoryview(self.buf)[:size]   # (zeroed: a fresh anonymous mapping)
        return aligned_buffer(size)

    def join(self) -> None:
        self.done.acquire()
        self.done.release()


def direct_images(store: Store) -> bool:
    """Whether to write a new image with O_DIRECT: unless objects.writemode recorded buffered writes
    as the faster way for the store's objects on this boot (no measurement is started here)."""
    if not getattr(os, "O_DIRECT", 0):
        return False
    from objects.writemode import recorded_direct

    try:
        dirfd = os.open(store.objects_str, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        return recorded_direct(dirfd) is not False
    finally:
        os.close(dirfd)


def aligned_buffer(size: int):
    """Zeroed, page-aligned memory of `size` bytes (anonymous mmap), as O_DIRECT writes need; its
    pages allocated by the mmap call itself (MAP_POPULATE: half the cost of faulting them in one by
    one as the writer fills them, 3.5 against 7.4 ms for 11 MB on the development VM)."""
    import mmap

    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, max(size, 1), flags=flags)


