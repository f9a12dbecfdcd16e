#!/usr/bin/env python3
"""Benchmark of the objects/ library: fs-verity hashing and putting objects, against the machine's own
baselines measured in the same run (single-core hashlib sha256, sequential disk write + fsync).

The target: putting one big layer file reaches >= 70% of min(sha256, disk write); putting ~1 KiB files
runs well above 10,000 files/s, each figure including the final sync().

    python tools/bench_objects.py [--quick]
    python tools/bench_objects.py --budget [--quick]   # per-byte costs of a big import (see budget())
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from objects import FsVerityHasher, ObjectStore  # noqa: E402

MIB = 1 << 20
BENCH_DIR = "/var/tmp"


def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / 1e6 / seconds, 1)


def _chunk(seed: bytes) -> bytes:
    """1 MiB of incompressible data (distinct per seed, so no two chunks of a file are equal)."""
    return os.urandom(MIB - len(seed)) + seed


def bench_sha256(total_mib: int) -> float:
    """hashlib sha256 over 1 MiB buffers, MB/s (the single-core hashing ceiling).

    The buffer stays in cache, as a put's chunks do (a 16 MiB one measured memory: 1,200-1,400 MB/s
    here against 1,850-1,950), and a quarter as much is hashed unmeasured first (straight after an
    idle wait the vCPU read up to a quarter low): a low ceiling would flatter the ratios against it.
    """
    import hashlib

    buf = _chunk(b"sha")
    h = hashlib.sha256()
    for _ in range(max(1, total_mib // 4)):
        h.update(buf)
    t = time.perf_counter()
    for _ in range(total_mib):
        h.update(buf)
    return _mbps(total_mib * MIB, time.perf_counter() - t)


def bench_fsverity(total_mib: int) -> float:
    """FsVerityHasher over 1 MiB chunks, MB/s."""
    buf = _chunk(b"fsv")
    hasher = FsVerityHasher()
    t = time.perf_counter()
    for _ in range(total_mib):
        hasher.update(buf)
    hasher.digest()
    return _mbps(total_mib * MIB, time.perf_counter() - t)


def bench_disk_write(path: str | os.PathLike[str], total_mib: int) -> float:
    """Write `total_mib` MiB sequentially then fsync, MB/s (the disk ceiling); leaves the file behind."""
    bufs = [_chunk(i.to_bytes(8, "little")) for i in range(8)]
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(total_mib):
            os.write(fd, bufs[i % 8])
        os.fsync(fd)
    finally:
        os.close(fd)
    return _mbps(total_mib * MIB, time.perf_counter() - t)


def bench_put_large(src: str, store_dir: str, direct_io: bool = True) -> tuple[float, bytes]:
    """put_file() of one big file (page-cache hot) into an empty store, plus sync(), MB/s."""
    size = os.path.getsize(src)
    with ObjectStore(store_dir) as store:
        store.direct_io = direct_io
        t = time.perf_counter()
        digest = store.put_file(src)
        store.sync()
        dt = time.perf_counter() - t
    return _mbps(size, dt), digest


def bench_put_small(store_dir: str, count: int, via_stream: bool) -> float:
    """put_bytes() (or put(stream)) of `count` distinct ~1 KiB contents, plus sync(), files/s."""
    import io

    blob = os.urandom(2048)
    datas = [blob[i % 512 : i % 512 + 768 + i % 512] + i.to_bytes(8, "little") for i in range(count)]
    with ObjectStore(store_dir) as store:
        t = time.perf_counter()
        if via_stream:
            for d in datas:
                store.put(io.BytesIO(d))
        else:
            for d in datas:
                store.put_bytes(d)
        store.sync()
        dt = time.perf_counter() - t
    return round(count / dt)


def bench_raw_create(root: str, count: int) -> float:
    """Baseline for small puts: plain create + write + close of `count` ~1 KiB files over 256
    directories, then one sync: the file system's own cost, without hashing or atomic publication."""
    blob = os.urandom(1024)
    for i in range(256):
        os.makedirs(os.path.join(root, f"{i:02x}"))
    t = time.perf_counter()
    for i in range(count):
        fd = os.open(f"{root}/{i % 256:02x}/{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, blob)
        os.close(fd)
    os.sync()
    return round(count / (time.perf_counter() - t))


def run(quick: bool) -> dict:
    """All figures in one dict (MB/s are 10^6 bytes per second); each is the best of `reps` runs."""
    total_mib = 64 if quick else 500
    small = 10_000 if quick else 50_000
    reps = 3
    work = tempfile.mkdtemp(prefix="bench-objects-", dir=BENCH_DIR)
    try:
        src = os.path.join(work, "layer.bin")
        scratch = os.path.join(work, "disk-test.bin")
        sha = max(bench_sha256(total_mib) for _ in range(reps))
        fsv = max(bench_fsverity(total_mib) for _ in range(reps))
        bench_disk_write(src, total_mib)  # the put source (page-cache hot); not a measurement
        # Alternate disk test and put, each freeing its file right away: on this VM a page the guest
        # has not touched lately costs a host fault (free pages are handed back to the host), so
        # each run should find the pages the previous one freed, like its rival does.
        disk = put_large = put_buffered = 0.0
        for i in range(reps):
            disk = max(disk, bench_disk_write(scratch, total_mib))
            os.unlink(scratch)
            d = os.path.join(work, f"store-large-{i}")
            put_large = max(put_large, bench_put_large(src, d)[0])
            shutil.rmtree(d)
            put_buffered = max(put_buffered, bench_put_large(src, d, direct_io=False)[0])
            shutil.rmtree(d)
        os.unlink(src)
        # Nothing is deleted between the small-file runs: for about 30 s after a mass deletion ext4's
        # inode allocator skips (and reads) every recently freed inode, which would slow whichever
        # run came next.
        small_rate = small_stream_rate = raw_rate = 0
        for i in range(reps if quick else 2):
            raw_rate = max(raw_rate, bench_raw_create(os.path.join(work, f"raw-{i}"), small))
            small_rate = max(small_rate, bench_put_small(os.path.join(work, f"small-{i}"), small, via_stream=False))
            small_stream_rate = max(
                small_stream_rate, bench_put_small(os.path.join(work, f"small-stream-{i}"), small, via_stream=True)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ceiling = min(sha, disk)
    return {
        "size_mib": total_mib,
        "sha256_mb_s": sha,
        "disk_write_fsync_mb_s": disk,
        "fsverity_digest_mb_s": fsv,
        "fsverity_vs_sha256": round(fsv / sha, 3),
        "put_large_mb_s": put_large,
        "put_large_vs_ceiling": round(put_large / ceiling, 3),
        "put_large_buffered_mb_s": put_buffered,  # ObjectStore.direct_io = False, for comparison
        "small_files": small,
        "small_raw_create_files_s": raw_rate,
        "small_put_bytes_files_s": small_rate,
        "small_put_stream_files_s": small_stream_rate,
        "small_put_vs_raw_create": round(small_rate / raw_rate, 3),
    }


def budget(quick: bool, rounds: int = 4) -> dict:
    """The per-byte costs a big import is made of, each alone on one thread: CPU nanoseconds a byte
    (user+sys of the thread, which others' load changes little; best of 3) and MB/s of wall time.

    - reading a page-cached file into a 1 MiB user buffer (read()) or mapping it (mmap, first touch);
    - fs-verity block hashes (objects._fsverity), hashlib sha256 (OpenSSL), both apart, and both in
      the one SHA-NI pass of objects.digest.StreamSha256 where it exists;
    - writing to disk with fdatasync: buffered, and O_DIRECT with 1, 2 and 4 writes in flight, into a
      fresh file (extending: ext4 serialises those) and into one allocated first (fallocate); these
      interleaved over `rounds` rounds, medians (the virtual disk drifts)."""
    import hashlib
    import mmap
    import statistics
    import threading

    from objects import digest

    size = (64 if quick else 256) * MIB
    work = tempfile.mkdtemp(prefix="bench-budget-", dir=BENCH_DIR)
    buf = mmap.mmap(-1, 4 * MIB)
    buf.write(os.urandom(4 * MIB))
    mv = memoryview(buf)
    chunk = mv[:MIB]
    out: dict = {"size_mib": size // MIB}
    try:
        src = os.path.join(work, "src.bin")
        bench_disk_write(src, size // MIB)
        with open(src, "rb") as f:  # (page-cache hot from here on)
            while f.read(MIB):
                pass

        def cpu_ns(fn: Callable[[], None]) -> tuple[float, float]:
            best_c = best_w = 1e9
            for _ in range(3):
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                best_c = min(best_c, time.thread_time() - c0)
                best_w = min(best_w, time.perf_counter() - t0)
            return round(best_c / size * 1e9, 3), round(size / best_w / 1e6)

        def read_file() -> None:
            fd = os.open(src, os.O_RDONLY)
            try:
                while os.readv(fd, [chunk]) == MIB:
                    pass
            finally:
                os.close(fd)

        def map_file() -> None:
            fd = os.open(src, os.O_RDONLY)
            m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            os.close(fd)
            total = 0
            for off in range(0, size, 4096):
                total += m[off]
            m.close()

        def fsverity() -> None:
            for _ in range(size // MIB):
                digest.hash_full_blocks(chunk)

        def sha() -> None:
            h = hashlib.sha256()
            for _ in range(size // MIB):
                h.update(chunk)

        def both_apart() -> None:
            h = hashlib.sha256()
            for _ in range(size // MIB):
                digest.hash_full_blocks(chunk)
                h.update(chunk)

        def both_one_pass() -> None:
            h = digest.StreamSha256()
            for _ in range(size // MIB):
                h.update_blocks(chunk)

        cases = [("read_page_cache", read_file), ("mmap_first_touch", map_file), ("fsverity_blocks", fsverity),
                 ("sha256_hashlib", sha), ("fsverity_and_sha256_apart", both_apart)]
        if digest.STREAM_BLOCKS:
            cases.append(("fsverity_and_sha256_one_pass", both_one_pass))
        for name, fn in cases:
            out[f"{name}_cpu_ns_per_byte"], out[f"{name}_mb_s"] = cpu_ns(fn)

        def write(direct: bool, inflight: int, allocate: bool, wsize: int = MIB) -> float:
            flags = os.O_WRONLY | os.O_TMPFILE | (os.O_DIRECT if direct else 0)
            fd = os.open(work, flags, 0o600)
            todo = list(range(size - wsize, -1, -wsize))
            lock = threading.Lock()

            def writer() -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        off = todo.pop()
                    os.pwrite(fd, mv[:wsize], off)

            try:
                t0 = time.perf_counter()
                if allocate:
                    os.posix_fallocate(fd, 0, size)
                threads = [threading.Thread(target=writer) for _ in range(inflight)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                os.fdatasync(fd)
                return size / (time.perf_counter() - t0) / 1e6
            finally:
                os.close(fd)

        writes = {"buffered": lambda: write(False, 1, False),
                  "direct_1_in_flight": lambda: write(True, 1, False),
                  "direct_2_in_flight": lambda: write(True, 2, False),
                  "direct_1_in_flight_allocated": lambda: write(True, 1, True),
                  "direct_2_in_flight_allocated": lambda: write(True, 2, True),
                  "direct_4_in_flight_allocated": lambda: write(True, 4, True)}
        got: dict[str, list[float]] = {k: [] for k in writes}
        for _ in range(1 if quick else rounds):
            for k, fn in writes.items():
                got[k].append(fn())
        for k, v in got.items():
            out[f"write_{k}_mb_s"] = [round(x) for x in v]
            out[f"write_{k}_mb_s_median"] = round(statistics.median(v))
    finally:
        chunk.release()
        mv.release()
        buf.close()
        shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    if "--budget" in sys.argv[1:]:
        print(json.dumps(budget("--quick" in sys.argv[1:]), indent=2))
    else:
        print(json.dumps(run("--quick" in sys.argv[1:]), indent=2))
