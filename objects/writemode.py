"""How big objects are written on this host: with O_DIRECT, or buffered (with early writeback), by measurement.

Why: which is faster depends on the host, not on the code.  On the development VM O_DIRECT puts ran
at the disk's speed and buffered ones at 0.8 of it (each fresh page-cache page costs a host fault
there); on another VM of the same kind O_DIRECT puts ran at 350 MB/s against 563 MB/s buffered.  So
the first big put of an object directory after each boot writes PROBE_BYTES both ways (ROUNDS times
each, alternating; every write ends with fdatasync, as a put's data ends in a sync) into an
anonymous temp file (O_TMPFILE: nothing is left behind, even by a crash), timing each round and
the CPU time its writes take, and hashes the same bytes as a put does (fs-verity blocks and a
sha256, CPU time).  A round's figure is what a put of those bytes would take: the longer of the
write's own time and the CPU time of hashing plus writing (a put writes in one thread while others
hash, but the copy into the page cache takes CPU that hashing needs; one core's worth, since the
hashing has a serial part and a loaded machine gives no more).  Writing speed alone misleads: on
the development VM an 8 MiB buffered write ran 1.7-2.4x faster than O_DIRECT in most probes, but
copying into fresh page-cache pages costs ~1.1 ns a byte of CPU there, and imports ran at 0.63x
with buffered writes.  O_DIRECT is kept unless the median buffered figure beats the median O_DIRECT
one by more than MARGIN: medians, not best against worst, since on a busy machine single rounds
are noisy both ways (the slowest buffered round against the fastest O_DIRECT one kept O_DIRECT on
a host where buffered writes were 1.6x faster as soon as one round of each was unlucky).  Where
the flush after the O_DIRECT writes takes a good share of their round (CACHED_SHARE), the host
caches them and writes them out only when flushed, so O_DIRECT pays the disk twice; buffered
writes flushed as they go win there by more than the probe shows, and are chosen unless O_DIRECT
is clearly faster (MARGIN_CACHED).  Buffered puts are no less durable: their writer starts
writeback as it goes (sync_file_range), a thread flushes their files meanwhile (objects.flush),
and `ObjectStore.sync()` waits for it all (fsync per file, or one syncfs) before any reference is
recorded.  The choice is recorded in `<root>/.write-mode` (with the boot id, both figures and the
flush share, written atomically) and kept for the process, so it costs 30-250 ms once per boot and
directory; a probe that cannot run (no O_TMPFILE, a full disk) chooses O_DIRECT for this process
and records nothing.  The probe writes 48 MiB: it waits until this process has put PROBE_AFTER
bytes of big objects of known size into the directory (their puts use O_DIRECT, as without a
measurement), so that a small image's first pull (a 1 MB binary: the probe took 0.2 s of its 0.37)
never pays for it.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # (mmap only where the probe runs: every command imports this module for boot_id)
if TYPE_CHECKING:  # pragma: no cover
    import mmap

STATE_FILE = ".write-mode"
PROBE_BYTES = 8 << 20
PROBE_WRITE = 1 << 20
PROBE_RUN = 4  # O_DIRECT writes of this many PROBE_WRITEs at once (objects.store.DIRECT_RUN)
PROBE_WRITERS = 2  # O_DIRECT writes in flight, into an allocated file (objects.store.DIRECT_WRITERS)
ROUNDS = 3
MARGIN = 1.5  # buffered must be this much faster (median against median) to be chosen: the figures
# of the development VM under load reached 1.3 with O_DIRECT the better way there; the VM that ran
# O_DIRECT at 350 MB/s and buffered at 563 gives 1.6
CACHED_SHARE = 0.3  # from this share of an O_DIRECT round spent in its fdatasync on, the host caches
# what O_DIRECT writes (and writes it out only when flushed): O_DIRECT then pays the disk twice
# (a VM doing 400-500 MB/s: 0.44-0.51 in 8 rounds of 8; a write that reaches the disk leaves
# the flush next to nothing) ...
MARGIN_CACHED = 0.8  # ... and buffered writes, flushed as they go (objects.flush), are chosen there
# unless O_DIRECT is clearly faster: they ran 459-490 MB/s against 297-381 with O_DIRECT, while the
# probe's ratio was 0.98-1.82 (its O_DIRECT rounds look fast when the host takes their writes into
# its cache, and their flush is then the longer: shares of 0.73-0.74 with ratios of 0.98-1.07)

_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
PROBE_AFTER = 64 << 20  # bytes of big puts of known size before the probe runs (see the docstring)
_chosen: dict[tuple[int, int], bool] = {}  # (st_dev, st_ino) of an object directory -> O_DIRECT
_unmeasured: dict[tuple[int, int], int] = {}  # ... -> bytes put there before the probe (PROBE_AFTER)


def boot_id() -> str:
    """This boot's id (a measurement is valid until the next boot); "" where the kernel has none."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def use_direct(dirfd: int, readonly: bool = False, size: int | None = None) -> bool:
    """Whether big puts into the object directory `dirfd` should use O_DIRECT (see module docstring).
    `size`: the put's size, when known: the probe waits until PROBE_AFTER bytes were put (O_DIRECT,
    unrecorded, until then)."""
    st = os.fstat(dirfd)
    key = (st.st_dev, st.st_ino)
    known = _chosen.get(key)
    if known is not None:
        return known
    bid = boot_id()
    recorded = recorded_direct(dirfd, bid)
    if recorded is not None:
        direct = recorded
    elif size is not None and _unmeasured.get(key, 0) + size < PROBE_AFTER:
        _unmeasured[key] = _unmeasured.get(key, 0) + size
        return True
    else:
        figures = None if readonly or not _O_DIRECT else measure(dirfd)
        if figures is None:
            direct = True
        else:
            direct_s, buffered_s, flush_share = figures
            direct = choose_direct(direct_s, buffered_s, flush_share)
            if bid:
                _record(dirfd, f"{'direct' if direct else 'buffered'} {bid} "
                               f"direct={PROBE_BYTES / direct_s / 1e6:.0f}MB/s "
                               f"buffered={PROBE_BYTES / buffered_s / 1e6:.0f}MB/s "
                               f"direct-flush={flush_share:.2f}")
    _chosen[key] = direct
    return direct


def choose_direct(direct_s: float, buffered_s: float, flush_share: float) -> bool:
    """O_DIRECT, unless buffered writes beat it by MARGIN; where the host caches O_DIRECT writes
    (`flush_share` of an O_DIRECT round spent in its flush, see CACHED_SHARE), buffered unless
    O_DIRECT is clearly faster (MARGIN_CACHED)."""
    return direct_s <= buffered_s * (MARGIN_CACHED if flush_share >= CACHED_SHARE else MARGIN)


def recorded_direct(dirfd: int, bid: str | None = None) -> bool | None:
    """The choice `.write-mode` records for this boot (`bid`, default `boot_id()`): True for
    O_DIRECT, False for buffered; None where none is recorded for it (nothing is measured here)."""
    bid = boot_id() if bid is None else bid
    recorded = read_state(dirfd)
    if recorded is None or not bid or recorded[1] != bid:
        return None
    return recorded[0] == "direct"


def set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False where that fails (a file system refusing it)."""
    import fcntl

    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | _O_DIRECT if on else flags & ~_O_DIRECT)
    except OSError:
        return False
    return True


def read_state(dirfd: int) -> tuple[str, str] | None:
    """("direct" or "buffered", boot id) from `.write-mode`, None if absent or unreadable (a symlink
    there is not followed)."""
    try:
        fd = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    try:
        fields = os.read(fd, 512).decode("ascii", "replace").split()
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(fields) >= 2 and fields[0] in ("direct", "buffered"):
        return fields[0], fields[1]
    return None


def measure(dirfd: int) -> tuple[float, float, float] | None:
    """Seconds a put of PROBE_BYTES would take (see the module docstring) with O_DIRECT and buffered
    writes, the median round of each (rounds alternate, so a burst of load from elsewhere hits
    both), and the median share of an O_DIRECT round its flush took; None if the probe cannot run
    here (then nothing is decided)."""
    import mmap

    buf = mmap.mmap(-1, PROBE_WRITE)  # page-aligned, as O_DIRECT needs
    try:
        buf.write(os.urandom(PROBE_WRITE))
        hashing = _hash_seconds(buf)
        direct_s: list[float] = []
        buffered_s: list[float] = []
        shares: list[float] = []
        for _ in range(ROUNDS):
            t = _time_write(dirfd, buf, True)
            b = _time_write(dirfd, buf, False)
            if t is None or b is None:
                return None
            direct_s.append(max(t[0], hashing + t[1]))
            buffered_s.append(max(b[0], hashing + b[1]))
            shares.append(t[2] / t[0] if t[0] > 0 else 0.0)
        return _median(direct_s), _median(buffered_s), _median(shares)
    finally:
        buf.close()


def _hash_seconds(buf: mmap.mmap) -> float:
    """CPU seconds to hash PROBE_BYTES as an import does: fs-verity block hashes and a sha256."""
    from hashlib import sha256

    from .digest import STREAM_BLOCKS, StreamSha256, hash_full_blocks

    mv = memoryview(buf)
    try:
        t0 = time.thread_time()
        if STREAM_BLOCKS:  # (both in one pass, as an uncompressed layer's chunks are)
            s = StreamSha256()
            for _ in range(PROBE_BYTES // PROBE_WRITE):
                s.update_blocks(mv)
        else:
            h = sha256()
            for _ in range(PROBE_BYTES // PROBE_WRITE):
                hash_full_blocks(mv)
                h.update(mv)
        return time.thread_time() - t0
    finally:
        mv.release()


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _time_write(dirfd: int, buf: mmap.mmap, direct: bool) -> tuple[float, float, float] | None:
    """(seconds, CPU seconds of the writing threads, seconds of the fdatasync at the end) to write
    PROBE_BYTES and fdatasync them, as a big put does: O_DIRECT into a file allocated first,
    PROBE_WRITERS writes in flight; buffered from one thread."""
    flags = os.O_WRONLY | _O_TMPFILE | _O_CLOEXEC | (_O_DIRECT if direct else 0)
    if not _O_TMPFILE:
        return None
    try:
        fd = os.open(".", flags, 0o600, dir_fd=dirfd)
    except OSError:
        return None
    try:
        if direct:
            import fcntl

            if not fcntl.fcntl(fd, fcntl.F_GETFL) & _O_DIRECT:
                return None
        run = PROBE_RUN if direct else 1  # (as a lagging O_DIRECT writer does: objects.store._gather)
        t0, c0 = time.perf_counter(), time.thread_time()
        if direct:
            from .libc import _fallocate

            _fallocate(fd, PROBE_BYTES)  # (as objects.store._put_large; without it, as there)
        offsets = list(range(0, PROBE_BYTES, PROBE_WRITE * run))
        if direct and PROBE_WRITERS > 1:
            cpu = _write_threads(fd, buf, run, offsets)
            if cpu is None:
                return None
        else:
            for off in offsets:
                if os.pwritev(fd, [buf] * run, off) != PROBE_WRITE * run:
                    return None
            cpu = 0.0
        t1 = time.perf_counter()
        os.fdatasync(fd)
        t2 = time.perf_counter()
        return t2 - t0, time.thread_time() - c0 + cpu, t2 - t1
    except OSError:
        return None
    finally:
        os.close(fd)


def _write_threads(fd: int, buf: mmap.mmap, run: int, offsets: list[int]) -> float | None:
    """Write runs of `run` PROBE_WRITEs at `offsets` from PROBE_WRITERS threads (each takes the next);
    their CPU seconds, or None if a write failed or was short."""
    import threading

    lock = threading.Lock()
    todo = list(reversed(offsets))
    cpu: list[float] = []
    failed: list[bool] = []

    def write() -> None:
        c0 = time.thread_time()
        try:
            while True:
                with lock:
                    if not todo or failed:
                        return
                    off = todo.pop()
                if os.pwritev(fd, [buf] * run, off) != PROBE_WRITE * run:
                    failed.append(True)
        except OSError:
            failed.append(True)
        finally:
            cpu.append(time.thread_time() - c0)

    threads = [threading.Thread(target=write, name="objects-probe") for _ in range(PROBE_WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return None if failed else sum(cpu)


def _record(dirfd: int, line: str) -> None:
    """Write `.write-mode` atomically (temp name, then rename); losing it only means a new probe."""
    tmp = f"{STATE_FILE}.{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC, 0o644, dir_fd=dirfd)
        try:
            os.write(fd, (line + "\n").encode())
            os.fchmod(fd, 0o644)
        finally:
            os.close(fd)
        os.replace(tmp, STATE_FILE, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except OSError:
        try:
            os.unlink(tmp, dir_fd=dirfd)
        except OSError:
            pass
