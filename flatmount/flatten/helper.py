"""The forked helper process that writes half of a big flattened image (and then its derived files)."""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import flatmount.flatten.trees as trees
from flatmount.flatten.paths import _digest_of
from flatmount.flatten.trees import DERIVERS, _Derivers
from flatmount.image.tree import Inode
from flatmount.log import debug
from flatmount.store.paths import reap
from objects.cpus import usable_cpus

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store.core import Store


# --- two processes for one big image -------------------------------------------------------------
# Writing the image of a big tree is per-inode Python work that one core does.  When the tree has to
# be read from disk anyway (not in this process's memory), a forked helper reads and lays out the same
# tree and writes the second half of the inodes into a shared buffer while this process writes the
# first: the layout is deterministic, and the two check they agree on it before writing.  Once the
# image is recorded, the helper also writes its derived files (its tree is the same), so no thread
# of this process competes with the caller for the GIL.  The helper uses no database, lock or thread
# of this process; if it fails at any point, this process writes the image alone (and derives in a
# thread).  Forked before the tree exists, so the two share no memory they write to.  Only for big
# trees, when a second copy fits in memory and the machine has a CPU to spare (`_helper_pays`).
# Off by default since the writer's passes are compiled (flatmount/image/_cwrite.c): the helper can
# only split the last of them (emitting the inodes, ~15 ms of 64k), while it decodes, merges and lays
# out the whole tree again and this process waits for its layout.  Measured on 2 CPUs (64k-inode
# chain, 5 layers, store.flatten in a new process, medians of interleaved pairs, at a load of 4 and
# again at nice -15): top layer new 0.27 s without, 0.71 s with; whole chain 0.58 s / 1.18 s.
# Kept (tests force it on) for a writer whose per-inode share is big again.
HELPER = False   # (False: flatten does not even import this module; see imagecache.flatten_chain)
HELPER_MIN_INODES = 20_000   # inodes in the chain's layers (an upper bound of the image's)
HELPER_SHARE = 0.5   # of the inodes (queue order), written by the helper
HELPER_BYTES_PER_INODE = 2048   # a generous bound of what one inode of a tree takes in memory
_DERIVE = struct.Struct("<32s16sQH")   # the derive order: image sha256, xxh3-128, size, path length


def _helper_pays(prefix: str | None, chain: Sequence) -> bool:
    if not HELPER or not hasattr(os, "fork") or usable_cpus() < 2:
        return False
    if prefix is not None and _digest_of(prefix) in trees._trees:
        return False   # the tree is in memory here: the helper would only start reading it
    inodes = sum(layer.inodes or 0 for layer in chain)
    # a second copy of the tree must fit with room to spare: never trade a flatten for a faster one
    return (inodes >= HELPER_MIN_INODES and 4 * inodes * HELPER_BYTES_PER_INODE <= _mem_available()
            and _spare_cpu())


def _spare_cpu() -> bool:
    """Whether the helper may find a CPU of its own: the 1-minute load average leaves at least half of
    one of our CPUs idle.  Without one it only slows this process down: this process waits for the
    helper's layout before writing (measured on 2 CPUs at a load of 5: 1.35 s with it, 0.82 s
    without, medians of 6 interleaved runs of the 64k-inode top-layer-new flatten)."""
    try:
        load = os.getloadavg()[0]
    except OSError:   # (no load average: assume the CPUs are ours)
        return True
    return load <= usable_cpus() - 0.5   # (2 CPUs: a load of at most 1.5)


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 when unknown: no helper then)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Helper:
    """A forked helper process building the same image (see above).  Use: `image()`, then once the
    image is recorded `derive()`; `close()` in any case."""

    def __init__(self, fd: int, down: int, up: int, pid: int) -> None:
        self.fd, self.down, self.up, self.pid = fd, down, up, pid
        self.started = time.monotonic()
        self.wrote = False   # it wrote its half and waits for the derive order

    @classmethod
    def start(cls, store: Store, build: Callable[[], Inode]) -> _Helper | None:
        """Fork the helper, which builds its tree with `build`; None if the system refuses (no
        memfd, no process to spare): this process then writes the image alone."""
        fds: list[int] = []
        try:
            fds.append(os.memfd_create("flatmount-image", os.MFD_CLOEXEC))
            fds += os.pipe()   # to the helper: go or not, then the derive order
            fds += os.pipe()   # from the helper: its layout, then done
            pid = os.fork()
        except OSError as e:
            for x in fds:
                os.close(x)
            debug("flatten: no helper process (%s): this process writes the whole image", e)
            return None
        fd, down_r, down_w, up_r, up_w = fds
        if pid == 0:
            _helper_main(store, build, fd, down_r, up_w)   # never returns
        os.close(down_r)
        os.close(up_w)
        return cls(fd, down_w, up_r, pid)

    def image(self, build: Callable[[], Inode]) -> tuple[Inode, object]:
        """(tree, image buffer): the tree from `build` here, its image written half here, half there."""
        import mmap

        from flatmount.image.writer import image_buffer

        tree = build()
        agreed = False

        def hook(n: int, layout: bytes, size: int) -> tuple:
            nonlocal agreed
            os.ftruncate(self.fd, size)   # before the helper maps it
            # it does what this process did: waiting longer than that (say, on a lock a thread of
            # ours held when we forked) would cost more than writing its half here
            agreed = _read_exact(self.up, len(layout), max(0.5, time.monotonic() - self.started)) == layout
            with contextlib.suppress(OSError):   # (gone already)
                os.write(self.down, b"g" if agreed else b"n")
            self.started = time.monotonic()
            return mmap.mmap(self.fd, size), 0, _split(n) if agreed else n

        buf = image_buffer(tree, layout_hook=hook)
        if agreed and _read_exact(self.up, 1, max(0.5, 2 * (time.monotonic() - self.started))) == b"d":
            self.wrote = True
        elif agreed:
            debug("flatten: the helper failed half-way: this process writes the whole image")
            buf = image_buffer(tree)   # the helper failed half-way: all of it here
        else:
            debug("flatten: the helper's layout differs or came late: this process writes the whole image")
        return tree, buf

    def derive(self, path: str, digest: str, size: int, image_id: bytes) -> bool:
        """Have the helper write the derived files of the recorded image at `path`; False if it
        cannot (they are then for this process to write)."""
        if not self.wrote:
            return False
        p = os.fsencode(path)
        try:
            os.write(self.down, _DERIVE.pack(bytes.fromhex(digest), image_id, size, len(p)) + p)
        except OSError:
            return False
        DERIVERS.adopt(self.pid)
        self.pid = 0
        return True

    def close(self) -> None:
        for x in (self.fd, self.down, self.up):
            os.close(x)
        if self.pid:   # not deriving: it has nothing more to do for us
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            # reaped in the background: its exit (freeing its tree) takes a while
            threading.Thread(target=reap, args=(self.pid,), name="flatmount-reap", daemon=True).start()


def _helper_main(store: Store, build: Callable[[], Inode], fd: int, down_r: int, up_w: int) -> None:
    """The forked helper: build, send the layout, on "g" write the second half and send "d"; then
    on a derive order write the derived files.  Exits (never returns, never runs the parent's exit
    handlers)."""
    import mmap

    from flatmount.image.writer import image_buffer

    code = 1
    try:
        # keep nothing of the parent's open: not its ends of our pipes (we would never see them
        # close when it dies), not its GC lock (ours would hold it as long as we live), not its DB
        _close_all_but((0, 1, 2, fd, down_r, up_w))
        tree = build()

        def hook(n: int, layout: bytes, size: int) -> tuple:
            os.write(up_w, layout)
            if _read_exact(down_r, 1) != b"g":
                raise _Declined
            return mmap.mmap(fd, size), _split(n), n

        image_buffer(tree, layout_hook=hook)
        os.write(up_w, b"d")
        os.close(up_w)
        order = _read_exact(down_r, _DERIVE.size)
        if len(order) == _DERIVE.size:
            digest, image_id, size, plen = _DERIVE.unpack(order)
            path = os.fsdecode(_read_exact(down_r, plen))
            _Derivers.write_derived(store, path, tree, digest.hex(), size, image_id)
        code = 0
    except BaseException:  # noqa: BLE001, S110 - the parent sees no "d" and does it itself
        pass
    finally:
        os._exit(code)


def _close_all_but(keep: Sequence[int]) -> None:
    """Close every file descriptor of this process but `keep`."""
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        if n not in keep:
            with contextlib.suppress(OSError):   # (the listing's own, closed already)
                os.close(n)


class _Declined(Exception):
    """The parent laid the image out differently: the helper writes nothing."""


def _split(n: int) -> int:
    """Where the helper's inodes start: it writes the last HELPER_SHARE of them (both processes
    build the same tree and layout first, so an even split ends their writing together)."""
    return int(n * (1 - HELPER_SHARE))


def _read_exact(fd: int, n: int, timeout: float | None = None) -> bytes:
    """`n` bytes from a pipe, fewer if the writer closed it first or `timeout` seconds passed."""
    import select

    deadline = None if timeout is None else time.monotonic() + timeout
    out = b""
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
        b = os.read(fd, n - len(out))
        if not b:
            break
        out += b
    return out
