"""ObjectStore: layout, atomic non-overwriting puts, batched sync, read-only use, concurrency."""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing
import os
import random
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import require_root, require_tool

import objects.store as store_mod
from objects import (
    InvalidDigestError,
    ObjectDigestMismatchError,
    ObjectNotFoundError,
    ObjectStore,
    ObjectStoreError,
    ReadOnlyObjectStoreError,
    digest_file,
    fsverity_digest,
)

MIB = 1 << 20
SIZES = [1, 65, 4096, 5000, MIB - 1, MIB, MIB + 1, 3 * MIB + 4097]


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1000003 + size).randbytes(size)


def tmp_entries(store: ObjectStore) -> list[str]:
    return os.listdir(os.path.join(store.root, ".tmp"))


@contextlib.contextmanager
def tiny_tmpfs(mnt: Path):
    """A 1 MiB tmpfs at `mnt` (to run out of space), unmounted afterwards whatever happens."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.fixture(params=["tmpfile", "named"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """A writable store, once with O_TMPFILE temp files and once with named ones (the fallback)."""
    s = ObjectStore(tmp_path / "objects")
    if request.param == "named":
        s._tmpfile = False
    yield s
    s.close()


class ShortReads(io.RawIOBase):
    """A raw stream returning at most `step` bytes per call, like a pipe."""

    def __init__(self, data: bytes, step: int) -> None:
        self._f = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = self._f.read(min(len(b), self._step))
        b[: len(chunk)] = chunk
        return len(chunk)


class ReadOnly:
    """A stream with read() only."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)


class Failing(io.RawIOBase):
    """Yields `good` bytes, then raises: a source broken mid-way."""

    def __init__(self, good: int) -> None:
        self._left = good

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._left <= 0:
            raise ConnectionResetError("source went away")
        n = min(len(b), self._left)
        b[:n] = b"x" * n
        self._left -= n
        return n


@pytest.mark.parametrize("size", SIZES)
def test_put_layout_and_content(store: ObjectStore, size: int) -> None:
    data = data_of(size)
    digest = store.put_bytes(data)
    assert digest == fsverity_digest(data)
    h = digest.hex()
    path = store.path(digest)
    assert path == f"{store.root}/{h[:2]}/{h[2:]}"
    assert Path(path).read_bytes() == data
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o755
    assert store.has(digest) and digest in store
    with store.open(digest) as f:
        assert f.read() == data
    assert store.verify(digest)
    assert tmp_entries(store) == []


@pytest.mark.parametrize("size", SIZES)
def test_put_stream_kinds(store: ObjectStore, tmp_path: Path, size: int) -> None:
    data = data_of(size, 1)
    expected = fsverity_digest(data)
    assert store.put(io.BytesIO(data)) == expected
    store.remove(expected)
    assert store.put(ShortReads(data, 10000)) == expected
    store.remove(expected)
    assert store.put(ReadOnly(data)) == expected
    store.remove(expected)
    src = tmp_path / "src"
    src.write_bytes(data)
    assert store.put_file(src) == expected
    assert Path(store.path(expected)).read_bytes() == data
    assert tmp_entries(store) == []


class DeferringSource(io.RawIOBase):
    """A stream with deferred work (the protocol of put_async): a sha256 of what it hands out,
    done in `settle(mark)` calls; it checks that every settle keeps order and comes before the
    memory it read is refilled (by hashing, at settle time, exactly what it handed out)."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)
        self.noted: list[memoryview] = []
        self.copies: list[bytes] = []  # what was handed out, for the check
        self.settled = 0
        self.sha = hashlib.sha256()
        self.ended = 0
        self.end_marks: list[int | None] = []  # the `upto` of each end()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            mv = memoryview(b)[:n]
            self.noted.append(mv)
            self.copies.append(bytes(mv))
        return n

    def defer_work(self) -> DeferringSource:
        return self

    def mark(self) -> int:
        return len(self.noted)

    def settle(self, upto: int | None = None) -> None:
        end = len(self.noted) if upto is None else upto
        while self.settled < end:
            mv = self.noted[self.settled]
            assert bytes(mv) == self.copies[self.settled], "buffer refilled before it was settled"
            self.sha.update(mv)
            self.settled += 1

    def end(self, upto: int | None = None) -> None:
        self.settle(upto)
        self.ended += 1
        self.end_marks.append(upto)


class DeferringSourceKnowingItsEnd(DeferringSource):
    """The same, telling how much it has left (as a tar member does); reading at the end is an error."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.size = len(data)

    @property
    def remaining(self) -> int:
        return self.size - self._f.tell()

    def readinto(self, b) -> int:
        assert self.remaining, "read past the end"
        return super().readinto(b)


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("size", [MIB + 1, 3 * MIB, 7 * MIB + 4095, 16 * MIB + 4097])
@pytest.mark.parametrize("source", [DeferringSource, DeferringSourceKnowingItsEnd])
def test_big_put_workers(store: ObjectStore, monkeypatch: pytest.MonkeyPatch, workers: int, size: int,
                         source: type[DeferringSource]) -> None:
    """Any number of workers reads, hashes and settles chunks in order: the same digest, the same
    deferred work, the object's bytes intact, whatever the interleaving (also when the put lets the
    caller go on right after the last chunk is read)."""
    monkeypatch.setattr(store_mod, "CHUNK_WORKERS", workers)
    data = data_of(size, workers)
    src = source(data)
    digest = store.put(src, size=size)
    assert digest == fsverity_digest(data)
    assert Path(store.path(digest)).read_bytes() == data
    assert src.sha.digest() == hashlib.sha256(data).digest() and src.ended == 1
    assert src.end_marks == [len(src.noted)]  # (its end() settles what it read, no further)
    assert tmp_entries(store) == []


def test_put_matches_fsverity_tool(store: ObjectStore) -> None:
    tool = require_tool("fsverity")
    digest = store.put(ShortReads(data_of(2 * MIB + 12345, 2), 300000))
    out = subprocess.run([tool, "digest", "--compact", store.path(digest)], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == digest.hex()


def test_existing_object_is_not_rewritten(store: ObjectStore) -> None:
    for size in (100, 3 * MIB):
        data = data_of(size, 3)
        digest = store.put_bytes(data)
        before = os.stat(store.path(digest))
        time.sleep(0.01)
        assert store.put(io.BytesIO(data)) == digest
        assert store.put_bytes(data) == digest
        after = os.stat(store.path(digest))
        assert (after.st_ino, after.st_mtime_ns, after.st_nlink) == (before.st_ino, before.st_mtime_ns, 1)
    assert tmp_entries(store) == []


def test_object_appearing_during_put_is_kept(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A concurrent put that wins between our existence check and our link: its object stays."""
    for size in (100, 3 * MIB):
        data = data_of(size, 8)
        digest = store.put_bytes(data)
        before = os.stat(store.path(digest))
        with monkeypatch.context() as m:
            m.setattr(store, "_existing_damaged", lambda rel, size: None)  # "not there yet"
            assert store.put_bytes(data) == digest
            assert store.put(io.BytesIO(data)) == digest
        after = os.stat(store.path(digest))
        assert (after.st_ino, after.st_mtime_ns, after.st_nlink) == (before.st_ino, before.st_mtime_ns, 1)
    assert tmp_entries(store) == []


def test_truncated_object_is_replaced(store: ObjectStore) -> None:
    """What a power failure before sync() can leave: a short file under the right name."""
    for size in (100, 3 * MIB):
        data = data_of(size, 4)
        digest = store.put_bytes(data)
        os.truncate(store.path(digest), 0)
        assert not store.verify(digest)
        assert store.put_bytes(data) == digest
        assert store.verify(digest)
    assert tmp_entries(store) == []


@pytest.mark.parametrize("hole", ["all", "tail", "allocated"])
def test_right_sized_object_without_its_data_is_replaced(store: ObjectStore, hole: str) -> None:
    """What a power failure before sync() can leave of a big put (its temp file allocated to its
    size before the writes, or delayed allocation): the right size, but a hole or allocated space
    never written (reads as zeros).  The next put of that content replaces it."""
    data = data_of(3 * MIB + 5, 65)
    digest = fsverity_digest(data)
    path = Path(store.path(digest))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if hole == "tail":
            os.write(fd, data[:MIB])
        if hole == "allocated":
            os.posix_fallocate(fd, 0, len(data))
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    assert not store.verify(digest)
    fd = os.open(path, os.O_RDONLY)  # (as after the reboot: none of it in the page cache, whose
    try:                             # pages read as zeros count as data for SEEK_HOLE)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert store.put(io.BytesIO(data), size=len(data)) == digest
    assert store.verify(digest) and path.read_bytes() == data
    before = os.stat(path).st_ino
    assert store.put(io.BytesIO(data), size=len(data)) == digest
    assert os.stat(path).st_ino == before  # (a whole one is kept)
    assert tmp_entries(store) == []


def test_modes_ignore_umask(store: ObjectStore) -> None:
    old = os.umask(0o077)
    try:
        digest = store.put_bytes(b"umask" * 100)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store.path(digest)).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(os.path.dirname(store.path(digest))).st_mode) == 0o755


def test_expected_digest(store: ObjectStore) -> None:
    for size in (10, 3 * MIB):
        data = data_of(size, 5)
        right = fsverity_digest(data)
        wrong = fsverity_digest(data + b"!")
        with pytest.raises(ObjectDigestMismatchError, match=wrong.hex()):
            store.put_bytes(data, expected=wrong)
        with pytest.raises(ObjectDigestMismatchError):
            store.put(io.BytesIO(data), expected=wrong.hex())
        assert not store.has(right)
        assert store.put(io.BytesIO(data), expected=right.hex()) == right
    assert tmp_entries(store) == []


def test_source_error_propagates_and_leaves_nothing(store: ObjectStore) -> None:
    with pytest.raises(ConnectionResetError):
        store.put(Failing(5 * MIB + 3))
    assert list(store) == []
    assert tmp_entries(store) == []


@pytest.mark.parametrize("size", [MIB + 1, 5 * MIB + 3])
def test_put_async_returns_once_read(store: ObjectStore, size: int) -> None:
    """put_async returns when the source is read; result() gives put's digest; the object is whole."""
    data = data_of(size, 21)
    src = io.BytesIO(data)
    pending = store.put_async(src, size=size)
    assert src.tell() == size           # read to its end before put_async returned
    assert pending.result() == fsverity_digest(data) == store.put(io.BytesIO(data), size=size)
    with store.open(pending.result()) as f:
        assert f.read() == data
    assert tmp_entries(store) == []


class _ExactStream:
    """A source that knows how much it has left (`remaining`, as a tar member does) and fails a read
    past its end."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.reads_at_end = 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def readinto(self, b) -> int:
        if not self.remaining:
            self.reads_at_end += 1
            raise AssertionError("read past the end")
        n = min(len(b), self.remaining)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("size", [MIB + 1, 3 * MIB, 4 * MIB + 4096])
def test_put_async_stops_reading_at_a_known_end(store: ObjectStore, size: int) -> None:
    """A source with `remaining` is not read again once it is at 0 (put_async returns while the last
    chunk is still hashed, and the caller reads on): also when the end falls on a chunk boundary."""
    data = data_of(size, 23)
    src = _ExactStream(data)
    pending = store.put_async(src, size=size)  # type: ignore[arg-type]
    assert src.remaining == 0
    assert pending.result() == fsverity_digest(data)
    assert src.reads_at_end == 0
    with store.open(pending.result()) as f:
        assert f.read() == data


def test_put_async_small_and_unknown_size(store: ObjectStore) -> None:
    for data in (b"", b"x" * 100, data_of(MIB, 3), data_of(2 * MIB, 4)):
        p = store.put_async(io.BytesIO(data))      # size unknown: sniffed from the first chunk
        assert p.done() or len(data) >= MIB   # small content is stored at once
        assert p.result() == fsverity_digest(data)


def test_put_async_overlaps_and_is_capped(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """ASYNC_PUTS big puts may be in flight at once (the first ones finishing while the next is
    read); one more waits for a slot."""
    held = threading.Event()
    real_existing = store_mod.ObjectStore._existing_damaged

    def slow_existing(self, rel, size):  # every put stalls once read and hashed, before publishing
        held.wait()
        return real_existing(self, rel, size)

    monkeypatch.setattr(store_mod.ObjectStore, "_existing_damaged", slow_existing)
    n = store_mod.ASYNC_PUTS
    assert n >= 2
    datas = [data_of(2 * MIB, 30 + k) for k in range(n + 1)]
    in_flight = [store.put_async(io.BytesIO(d), size=2 * MIB) for d in datas[:n]]  # read, not published
    assert not any(p.done() for p in in_flight)
    last: list = []
    t = threading.Thread(target=lambda: last.append(store.put_async(io.BytesIO(datas[n]), size=2 * MIB)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not last     # no slot while ASYNC_PUTS are in flight
    held.set()
    t.join()
    assert [p.result() for p in (*in_flight, last[0])] == [fsverity_digest(d) for d in datas]


def record_dispatches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the jobs objects.store hands its worker pool from now on (until the test ends)."""
    dispatched: list[str] = []
    real_run = store_mod._WORKERS.run

    def run(fn, *args):
        dispatched.append(getattr(fn, "__name__", repr(fn)))
        return real_run(fn, *args)

    monkeypatch.setattr(store_mod._WORKERS, "run", run)
    return dispatched


def test_helpers_go_from_one_put_to_the_next(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer of many medium files: the helper threads that hash chunks beside each put's own thread
    move on to the next put when one's chunks are taken, rather than going back to the pool to be
    woken again for the next file (which made every file start with one thread on a loaded machine).
    Hashing is slowed down so that each next put starts while the helper still hashes the last one."""
    monkeypatch.setattr(store_mod, "CHUNK_WORKERS", 2)
    real_hash = store_mod.hash_full_blocks

    def slow_hash(mv):
        time.sleep(0.03)
        return real_hash(mv)

    monkeypatch.setattr(store_mod, "hash_full_blocks", slow_hash)
    dispatched = record_dispatches(monkeypatch)
    datas = [data_of(3 * MIB + 4096 * k + 5, 40 + k) for k in range(6)]
    srcs = [DeferringSourceKnowingItsEnd(d) for d in datas]
    pending = [store.put_async(src, size=len(d)) for src, d in zip(srcs, datas, strict=True)]
    assert [p.result() for p in pending] == [fsverity_digest(d) for d in datas]
    for src, d in zip(srcs, datas, strict=True):
        assert src.sha.digest() == hashlib.sha256(d).digest() and src.ended == 1
        assert Path(store.path(fsverity_digest(d))).read_bytes() == d
    helpers = [n for n in dispatched if n not in ("_writer", "_put_large_job")]
    assert dispatched.count("_put_large_job") == 6
    # one helper started (one more each time a put found it between puts, which a loaded machine makes
    # likelier); a helper per put, as before, would be six
    assert len(helpers) <= len(datas) // 2, dispatched


def test_put_async_source_error_raised_at_once(store: ObjectStore) -> None:
    """A source that fails mid-way: put_async itself raises (the caller must not read on), after the
    put has cleaned up."""
    with pytest.raises(ConnectionResetError):
        store.put_async(Failing(5 * MIB + 3), size=6 * MIB)
    assert list(store) == []
    assert tmp_entries(store) == []


def test_put_async_failing_before_reading_raises_at_once(store: ObjectStore,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No temp file: the source was not read to its end, so put_async itself raises (the caller must
    not read on); at most the first chunk was read (put_async reads it while the pipeline starts)."""
    import errno as errno_mod

    def no_temp(*a, **k):
        raise OSError(errno_mod.EMFILE, "Too many open files")

    monkeypatch.setattr(store, "_open_temp", no_temp)
    src = io.BytesIO(data_of(3 * MIB, 8))
    with pytest.raises(ObjectStoreError, match="Too many open files"):
        store.put_async(src, size=3 * MIB)
    assert src.tell() <= MIB


def test_put_async_write_error_surfaces_in_result(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing write is the put's error: raised by result(), or by put_async itself when the put
    stopped before the source was read to its end (the caller must not read on from it)."""
    import errno as errno_mod

    def pwrite(fd, data, offset):
        raise OSError(errno_mod.EIO, "Input/output error")

    monkeypatch.setattr(store_mod.os, "pwrite", pwrite)
    monkeypatch.setattr(store_mod.os, "pwritev", lambda fd, buffers, offset: pwrite(fd, buffers, offset))
    src = io.BytesIO(data_of(4 * MIB, 7))
    with pytest.raises(ObjectStoreError, match="Input/output error"):
        store.put_async(src, size=4 * MIB).result()
    assert list(store) == [] and tmp_entries(store) == []


def test_digest_forms_and_errors(store: ObjectStore) -> None:
    digest = store.put_bytes(b"forms" * 50)
    h = digest.hex()
    for form in (digest, h, h.upper(), f"{h[:2]}/{h[2:]}"):
        assert store.has(form)
        assert store.path(form) == store.path(digest)
    with pytest.raises(InvalidDigestError):
        store.has("nothex")
    missing = fsverity_digest(b"missing")
    assert not store.has(missing)
    for call in (store.open, store.verify, store.remove):
        with pytest.raises(ObjectNotFoundError) as exc:
            call(missing)
        assert isinstance(exc.value, FileNotFoundError)
        assert missing.hex() in str(exc.value)
    store.remove(missing, missing_ok=True)
    store.remove(digest)
    assert not store.has(digest)


def test_verify_detects_corruption(store: ObjectStore) -> None:
    digest = store.put_bytes(data_of(10000, 6))
    path = store.path(digest)
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"\0")
    assert store.verify(digest) is False


def test_iter_skips_temp_and_malformed(store: ObjectStore) -> None:
    digests = {store.put_bytes(data_of(100 + i, 7)) for i in range(40)}
    root = Path(store.root)
    (root / ".tmp" / "leftover").write_bytes(b"x")
    (root / "README").write_text("not an object")
    (root / "zz").mkdir()
    (root / "zz" / ("0" * 62)).write_bytes(b"x")
    (root / "AB").mkdir()
    (root / "AB" / ("0" * 62)).write_bytes(b"x")
    some = next(iter(digests)).hex()
    fan = root / some[:2]
    (fan / ("0" * 61)).write_bytes(b"short")
    (fan / ("A" * 62)).write_bytes(b"upper")
    (fan / ("1" * 62 + ".tmp")).write_bytes(b"suffix")
    (fan / ("2" * 62)).mkdir()
    (fan / ("3" * 62)).symlink_to(store.path(some))
    listed = list(store)
    assert listed == sorted(digests)
    assert all(len(d) == 32 for d in listed)


def test_sync_fsyncs_each_file_and_dir_once(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", counting_fsync)
    monkeypatch.setattr(store_mod, "_syncfs", lambda fd: pytest.fail("few objects: no syncfs expected"))
    digests = [store.put_bytes(data_of(100, i)) for i in range(3)]
    store.put_bytes(data_of(100, 0))  # again: still only once
    assert synced == []  # puts do not fsync
    store.sync()
    files = {(os.stat(store.path(d)).st_dev, os.stat(store.path(d)).st_ino) for d in digests}
    dirs = {(os.stat(os.path.dirname(store.path(d))).st_dev, os.stat(os.path.dirname(store.path(d))).st_ino)
            for d in digests}
    # the root gained fan-out dirs; its parent gained the root (the store created it)
    created = {(st.st_dev, st.st_ino) for st in (os.stat(store.root), os.stat(os.path.dirname(store.root)))}
    assert len(synced) == len(set(synced))
    assert set(synced) == files | dirs | created
    synced.clear()
    store.sync()
    assert synced == []  # nothing put since


def test_sync_many_uses_one_syncfs(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = store_mod._syncfs
    monkeypatch.setattr(store_mod, "_syncfs", lambda fd: calls.append(fd) or real(fd))
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: pytest.fail("many objects: fsync per file not expected"))
    for i in range(200):
        store.put_bytes(data_of(200, i))
    store.sync()
    assert len(calls) == 1


def test_sync_tolerates_removed_objects(store: ObjectStore) -> None:
    digest = store.put_bytes(b"gone" * 100)
    store.remove(digest)
    store.sync()


def test_clean_temp(store: ObjectStore) -> None:
    tmp = Path(store.root, ".tmp")
    old, new = tmp / "old", tmp / "new"
    old.write_bytes(b"o")
    new.write_bytes(b"n")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert store.clean_temp(3600) == 1
    assert sorted(os.listdir(tmp)) == ["new"]
    assert store.clean_temp(0) == 1
    assert os.listdir(tmp) == []


def test_recreates_removed_tmp_dir(store: ObjectStore) -> None:
    store.put_bytes(b"first" * 30)
    os.rmdir(os.path.join(store.root, ".tmp"))
    digest = store.put_bytes(b"second" * 30)
    assert store.verify(digest)


def test_readonly_store(tmp_path: Path) -> None:
    with ObjectStore(tmp_path / "o") as rw:
        digest = rw.put_bytes(b"ro" * 100)
        rw.sync()
    os.rmdir(tmp_path / "o" / ".tmp")
    ro = ObjectStore(tmp_path / "o", readonly=True)
    assert not (tmp_path / "o" / ".tmp").exists()  # opening read-only writes nothing
    assert ro.has(digest) and ro.verify(digest) and list(ro) == [digest]
    for call in (lambda: ro.put_bytes(b"x"), lambda: ro.put(io.BytesIO(b"x")), lambda: ro.put_file(__file__),
                 lambda: ro.remove(digest), lambda: ro.clean_temp(0)):
        with pytest.raises(ReadOnlyObjectStoreError, match="read-only") as exc:
            call()
        assert isinstance(exc.value, PermissionError)
    ro.sync()  # nothing to do
    assert ro.has(digest)
    with pytest.raises(ObjectStoreError, match="does not exist"):
        ObjectStore(tmp_path / "nope", readonly=True)


def test_store_on_readonly_mount(tmp_path: Path) -> None:
    require_root()
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    with ObjectStore(src) as rw:
        digests = sorted(rw.put_bytes(data_of(5000, i)) for i in range(5))
        rw.sync()
    mnt.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(mnt)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        with pytest.raises(OSError):
            (mnt / "probe").write_bytes(b"x")
        ro = ObjectStore(mnt, readonly=True)
        assert list(ro) == digests
        assert all(ro.verify(d) for d in digests)
        with ro.open(digests[0]) as f:
            assert fsverity_digest(f.read()) == digests[0]
        with pytest.raises(ReadOnlyObjectStoreError):
            ro.put_bytes(b"y" * 100)
        os.rmdir(src / ".tmp")
        with pytest.raises(ObjectStoreError, match="read-only"):
            ObjectStore(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    s = ObjectStore(tmp_path / "o")
    digest = s.put_bytes(b"closed" * 20)
    s.close()
    assert s.has(digest)
    with pytest.raises(ObjectStoreError, match="closed"):
        s.put_bytes(b"more" * 20)
    with pytest.raises(ObjectStoreError, match="closed"):
        s.sync()


def test_error_classes() -> None:
    assert issubclass(ObjectNotFoundError, ObjectStoreError) and issubclass(ObjectNotFoundError, FileNotFoundError)
    assert issubclass(ReadOnlyObjectStoreError, PermissionError)
    assert issubclass(ObjectDigestMismatchError, ObjectStoreError)
    assert issubclass(InvalidDigestError, ValueError)


def shared_contents() -> list[bytes]:
    return [data_of(50 + 37 * i, 9) for i in range(150)] + [data_of(2 * MIB + i, 9) for i in range(3)]


def _concurrent_putter(root: str, tmpfile: bool, barrier: object) -> None:
    s = ObjectStore(root)
    if not tmpfile:
        s._tmpfile = False
    contents = shared_contents()
    barrier.wait()  # type: ignore[attr-defined]
    for data in contents:
        assert s.put_bytes(data) == fsverity_digest(data)
    for data in reversed(contents):
        assert s.put(io.BytesIO(data)) == fsverity_digest(data)
    s.sync()


@pytest.mark.parametrize("tmpfile", [True, False], ids=["tmpfile", "named"])
def test_concurrent_processes_put_same_objects(tmp_path: Path, tmpfile: bool) -> None:
    ctx = multiprocessing.get_context("fork")
    root = str(tmp_path / "objects")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_concurrent_putter, args=(root, tmpfile, barrier)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    s = ObjectStore(root, readonly=True)
    expected = sorted({fsverity_digest(d) for d in shared_contents()})
    assert list(s) == expected
    for d in expected:
        assert digest_file(s.path(d)) == d
        assert os.stat(s.path(d)).st_nlink == 1
    assert os.listdir(os.path.join(root, ".tmp")) == []


def test_concurrent_threads_put_same_objects(store: ObjectStore) -> None:
    contents = shared_contents()[::5]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for data in contents:
                store.put(io.BytesIO(data))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    store.sync()
    assert list(store) == sorted({fsverity_digest(d) for d in contents})
    assert all(store.verify(d) for d in store)


def test_put_bytes_accepts_buffers(store: ObjectStore) -> None:
    for size in (300, 2 * MIB + 5):
        data = data_of(size, 10)
        expected = fsverity_digest(data)
        assert store.put_bytes(bytearray(data)) == expected
        store.remove(expected)
        assert store.put_bytes(memoryview(data)) == expected
        assert Path(store.path(expected)).read_bytes() == data


def test_full_filesystem_is_a_store_error(tmp_path: Path) -> None:
    """ENOSPC while writing: ObjectStoreError naming the store, nothing half-written left behind."""
    require_root()
    with tiny_tmpfs(tmp_path / "small") as mnt:
        with ObjectStore(mnt / "objects") as s:
            for make in (lambda: s.put(io.BytesIO(data_of(3 * MIB, 11))),
                         lambda: s.put(io.BytesIO(data_of(3 * MIB, 14)), size=3 * MIB),  # (allocated first)
                         lambda: s.put_bytes(data_of(MIB, 12)) and s.put_bytes(data_of(MIB - 1, 13))):
                with pytest.raises(ObjectStoreError, match=str(mnt)) as exc:
                    make()
                assert "No space left" in str(exc.value)
            assert all(s.verify(d) for d in s)  # whatever made it in is whole
            assert tmp_entries(s) == []


def _record_pwrites(monkeypatch: pytest.MonkeyPatch, fail: Callable[[int, int], OSError | int | None]) -> list[tuple[bool, int, int]]:
    """Wrap os.pwrite and os.pwritev: record (O_DIRECT set?, offset, length) of each call;
    `fail(call_no, flags)` may return an OSError to raise or a byte count to write short."""
    import fcntl

    calls: list[tuple[bool, int, int]] = []
    real, real_v = os.pwrite, os.pwritev

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        calls.append((bool(flags & os.O_DIRECT), offset, len(data)))
        outcome = fail(len(calls), flags)
        if isinstance(outcome, OSError):
            raise outcome
        if isinstance(outcome, int):
            data = data[:outcome]
        return real(fd, data, offset)

    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        total = sum(len(b) for b in buffers)
        calls.append((bool(flags & os.O_DIRECT), offset, total))
        outcome = fail(len(calls), flags)
        if isinstance(outcome, OSError):
            raise outcome
        if isinstance(outcome, int):
            head, left = [], outcome
            for b in buffers:  # (slices of the aligned buffers: still fit for O_DIRECT)
                head.append(memoryview(b)[:left])
                left -= len(head[-1])
            return real_v(fd, head, offset) if outcome else 0
        return real_v(fd, buffers, offset)

    monkeypatch.setattr(store_mod.os, "pwrite", pwrite)
    monkeypatch.setattr(store_mod.os, "pwritev", pwritev)
    return calls


def test_buffered_big_puts_are_flushed_as_they_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffered, a big put's file is flushed (fdatasync) by the flusher thread, through a duplicate
    of its fd that is closed after: no fd is left, the object is intact."""
    real, flushed, lock = os.fdatasync, [], threading.Lock()

    def spy(fd: int) -> None:
        real(fd)
        with lock:
            flushed.append(threading.current_thread().name)

    monkeypatch.setattr(store_mod.os, "fdatasync", spy)
    fds_before = len(os.listdir("/proc/self/fd"))
    data = data_of(3 * store_mod.WRITEBACK_EVERY + 5, 21)
    with ObjectStore(tmp_path / "objects") as store:
        store.direct_io = False
        digest = store.put(io.BytesIO(data))
        store.sync()
    deadline = time.monotonic() + 10
    while (not store_mod._FLUSHER.idle() or len(os.listdir("/proc/self/fd")) > fds_before) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    assert Path(tmp_path / "objects" / store_mod.object_path(digest)).read_bytes() == data
    assert flushed and set(flushed) == {"objects-flusher"}
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_big_put_write_modes(store: ObjectStore, monkeypatch: pytest.MonkeyPatch, direct: bool) -> None:
    store.direct_io = direct
    monkeypatch.setattr(store_mod, "DIRECT_WRITERS", 1)  # (the order of one writer's calls; two: below)
    data = data_of(3 * MIB + 4097, 14)
    calls = _record_pwrites(monkeypatch, lambda n, flags: None)
    digest = store.put(io.BytesIO(data))
    assert digest == fsverity_digest(data) and Path(store.path(digest)).read_bytes() == data
    assert sum(length for _, _, length in calls) == len(data)
    if direct:  # whole blocks directly, the 1-byte tail through the page cache
        assert [d for d, _, _ in calls] == [True] * (len(calls) - 1) + [False]
        assert calls[-1][2] == 1
    else:
        assert not any(d for d, _, _ in calls)


@pytest.mark.parametrize("failure", ["einval", "short"])
def test_direct_write_falls_back_to_buffered(store: ObjectStore, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A file system that refuses O_DIRECT writes (EINVAL): the rest goes through the page cache, from
    exactly where the direct writes stopped.  A short direct write: the next one continues from there."""
    import errno as errno_mod

    def fail(n: int, flags: int) -> OSError | int | None:
        if n == 2 and flags & os.O_DIRECT:
            return OSError(errno_mod.EINVAL, "Invalid argument") if failure == "einval" else 8192
        return None

    store.direct_io = True  # (not measured: the probe's writes would meet the injected failure)
    monkeypatch.setattr(store_mod, "DIRECT_RUN", 1)  # one write per chunk (runs: the test below)
    monkeypatch.setattr(store_mod, "DIRECT_WRITERS", 1)  # (one writer's sequence of calls)
    calls = _record_pwrites(monkeypatch, fail)
    data = data_of(3 * MIB + 100, 15)
    digest = store.put(io.BytesIO(data))
    assert digest == fsverity_digest(data)
    assert Path(store.path(digest)).read_bytes() == data
    assert calls[0][0] and calls[1][0] and not calls[-1][0]
    if failure == "einval":
        assert calls[2] == (False, MIB, MIB)  # the refused chunk again, buffered
    else:
        assert calls[2] == (True, MIB + 8192, MIB - 8192)


@pytest.mark.parametrize("failure", [None, "einval", "short"])
def test_lagging_direct_writer_writes_runs(store: ObjectStore, monkeypatch: pytest.MonkeyPatch,
                                           failure: str | None) -> None:
    """An O_DIRECT writer that lags behind the hashing (its first write is slow) writes the chunks
    queued meanwhile in runs of up to DIRECT_RUN with one pwritev each; a run the file system
    refuses (EINVAL) or writes short goes on chunk by chunk from where it stopped.  The object is
    the same whatever happens."""
    import errno as errno_mod

    def fail(n: int, flags: int) -> OSError | int | None:
        if n == 1:
            time.sleep(0.2)  # the chunks hashed meanwhile queue up
        if n == 2 and failure == "einval":
            return OSError(errno_mod.EINVAL, "Invalid argument")
        if n == 2 and failure == "short":
            return MIB + 8192
        return None

    store.direct_io = True
    monkeypatch.setattr(store_mod, "DIRECT_WRITERS", 1)  # (one writer's sequence of calls)
    calls = _record_pwrites(monkeypatch, fail)
    data = data_of(9 * MIB + 100, 16)
    digest = store.put(io.BytesIO(data))
    assert digest == fsverity_digest(data)
    assert Path(store.path(digest)).read_bytes() == data
    lengths = [length for _, _, length in calls]
    assert 2 * MIB <= lengths[1] <= store_mod.DIRECT_RUN * MIB  # the backlog in one call
    run_offset = calls[1][1]
    if failure is None:  # every byte written once
        covered = 0
        for offset, length in sorted((offset, length) for _, offset, length in calls):
            assert offset == covered
            covered += length
        assert covered == len(data)
    elif failure == "einval":  # the refused run again, chunk by chunk
        assert calls[2] == (True, run_offset, MIB)
    else:  # the rest of the short run: the rest of its second chunk first
        assert calls[2] == (True, run_offset + MIB + 8192, MIB - 8192)


def _direct_supported(store: ObjectStore) -> bool:
    try:
        fd = os.open(os.path.join(store.root, ".tmp"), os.O_WRONLY | os.O_TMPFILE | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("size_known", [True, False], ids=["size", "no-size"])
def test_two_direct_writes_in_flight(store: ObjectStore, monkeypatch: pytest.MonkeyPatch,
                                     size_known: bool) -> None:
    """O_DIRECT puts keep two writes in flight (one left the virtual disk idle between writes, at
    0.7 of its rate): while one write is held up, the other writer writes the next chunk.  Every
    byte is written exactly once and the object is whole, with or without its size known (known:
    the temp file is allocated first, so ext4 can run the writes in parallel)."""
    assert _direct_supported(store)
    store.direct_io = True
    monkeypatch.setattr(store_mod, "DIRECT_RUN", 1)
    first_held = threading.Event()
    overlapped = threading.Event()
    lock = threading.Lock()
    active = [0]

    def fail(n: int, flags: int) -> None:
        with lock:
            active[0] += 1
            if active[0] > 1:
                overlapped.set()
        try:
            if n == 1:  # the first write waits (up to 5 s) until another one runs beside it
                first_held.set()
                overlapped.wait(5)
        finally:
            with lock:
                active[0] -= 1

    calls = _record_pwrites(monkeypatch, fail)
    data = data_of(6 * MIB + 12345, 61)
    digest = store.put(io.BytesIO(data), size=len(data) if size_known else None)
    assert overlapped.is_set(), calls
    assert digest == fsverity_digest(data)
    assert Path(store.path(digest)).read_bytes() == data
    covered = 0
    for offset, length in sorted((offset, length) for _, offset, length in calls):
        assert offset == covered
        covered += length
    assert covered == len(data)
    assert tmp_entries(store) == []


def test_direct_put_of_a_stream_shorter_than_its_size(store: ObjectStore) -> None:
    """The temp file of a put whose size is known is allocated to that size before writing: a
    stream that ends early gives an object of what was read, not one padded with zeros."""
    store.direct_io = True
    data = data_of(3 * MIB + 777, 62)
    digest = store.put(io.BytesIO(data), size=5 * MIB)
    assert digest == fsverity_digest(data)
    assert Path(store.path(digest)).read_bytes() == data
    assert os.stat(store.path(digest)).st_size == len(data)
    assert store.verify(digest)


@pytest.mark.parametrize("which", [1, 2, 5])
def test_one_of_two_direct_writers_failing(store: ObjectStore, monkeypatch: pytest.MonkeyPatch,
                                           which: int) -> None:
    """A write error in either writer fails the put with ObjectStoreError (naming the store); nothing
    is published or left behind, and the store's next put works (no thread waits forever)."""
    import errno as errno_mod

    store.direct_io = True
    monkeypatch.setattr(store_mod, "DIRECT_RUN", 1)

    armed = [True]

    def fail(n: int, flags: int) -> OSError | None:
        return OSError(errno_mod.EIO, "Input/output error") if armed[0] and n == which else None

    _record_pwrites(monkeypatch, fail)
    data = data_of(7 * MIB + 5, 63)
    with pytest.raises(ObjectStoreError, match="Input/output error"):
        store.put(io.BytesIO(data), size=len(data))
    assert list(store) == [] and tmp_entries(store) == []
    armed[0] = False
    digest = store.put(io.BytesIO(data), size=len(data))
    assert Path(store.path(digest)).read_bytes() == data


# --- bulk writer: small objects stored by helper processes -------------------------------------------

@pytest.mark.parametrize("helper", [True, False], ids=["helpers", "in-process"])
def test_bulk_put_bytes(store: ObjectStore, monkeypatch: pytest.MonkeyPatch, helper: bool) -> None:
    contents = [data_of(n, 20) for n in (1, 65, 4096, 5000, 70_000)] + [data_of(300, i) for i in range(200)]
    contents += contents[:10] + [data_of(MIB + 7, 21)]  # duplicates; one too big for a helper
    present = store.put_bytes(contents[3])  # already stored: not rewritten
    before = os.stat(store.path(present)).st_ino
    synced: list[int] = []
    monkeypatch.setattr(store_mod, "_syncfs", lambda fd: synced.append(fd) or True)
    with store.bulk(helper=helper) as bulk:
        digests = [bulk.put_bytes(c) for c in contents]
        assert bool(bulk._procs) == helper
    assert digests == [fsverity_digest(c) for c in contents]
    for d, c in zip(digests, contents, strict=True):
        assert Path(store.path(d)).read_bytes() == c
        assert stat.S_IMODE(os.stat(store.path(d)).st_mode) == 0o644
    assert os.stat(store.path(present)).st_ino == before
    assert list(store) == sorted(set(digests))
    assert tmp_entries(store) == []
    store.sync()  # every object the helpers stored is noted for sync()
    assert len(synced) == 1
    with pytest.raises(ObjectStoreError, match="closed"):
        bulk.put_bytes(b"late" * 100)


def test_bulk_helper_keeps_mode_and_replaces_damaged(store: ObjectStore) -> None:
    """The helpers link new objects without checking first: whatever the caller's umask, objects are
    0644; a good stored copy is kept (same inode, not reported created), a damaged one (wrong size)
    is replaced."""
    good, damaged, fresh = data_of(3000, 1), data_of(5000, 2), [data_of(2000, 10 + i) for i in range(50)]
    d_good = store.put_bytes(good)
    ino_good = os.stat(store.path(d_good)).st_ino
    d_damaged = fsverity_digest(damaged)
    os.makedirs(os.path.dirname(store.path(d_damaged)), exist_ok=True)
    Path(store.path(d_damaged)).write_bytes(damaged[:100])  # a cut-off copy
    old_umask = os.umask(0o077)
    try:
        created = store.watch_created()
        with store.bulk(helper=True) as bulk:
            digests = [bulk.put_bytes(c) for c in [good, damaged, *fresh]]
            assert bulk._procs
    finally:
        os.umask(old_umask)
    for d, c in zip(digests, [good, damaged, *fresh], strict=True):
        assert Path(store.path(d)).read_bytes() == c
        assert stat.S_IMODE(os.stat(store.path(d)).st_mode) == 0o644
    assert os.stat(store.path(d_good)).st_ino == ino_good
    assert d_good not in created and set(digests[2:]) <= created
    assert tmp_entries(store) == []


def test_bulk_helper_creations_reach_every_watcher(store: ObjectStore) -> None:
    """Two imports in one process watch the same store: each is told of every object the helpers
    created (the rollback of a failed one removes exactly those)."""
    first, second = store.watch_created(), store.watch_created()
    try:
        with store.bulk(helper=True) as bulk:
            digests = {bulk.put_bytes(data_of(1500, 100 + i)) for i in range(40)}
            assert bulk._procs
        assert digests <= first and digests <= second
    finally:
        store.unwatch_created(first)
        store.unwatch_created(second)


_SYSCALLS_CHILD = """
import os, random, sys
sys.path.insert(0, sys.argv[1])
from objects.store import ObjectStore
with ObjectStore(sys.argv[2]) as s, s.bulk(helper=True) as bulk:
    rng = random.Random(int(sys.argv[3]))
    for i in range(int(sys.argv[3])):
        bulk.put_bytes(rng.randbytes(1000 + i))
"""


def test_bulk_helper_syscalls_per_object(tmp_path: Path) -> None:
    """A helper stores a new object with open(O_TMPFILE), write, link and close: no existence check
    and no fstat per object (counted with strace over 300 and 900 objects: the difference is the
    per-object cost, start-up cancels out)."""
    strace = require_tool("strace")
    root = str(Path(__file__).resolve().parent.parent)
    counts = {}
    for n in (300, 900):
        out = tmp_path / f"strace-{n}"
        subprocess.run([strace, "-f", "-c", "-o", str(out), sys.executable, "-c", _SYSCALLS_CHILD, root,
                        str(tmp_path / f"store-{n}"), str(n)], check=True, capture_output=True)
        calls: dict[str, int] = {}
        for line in out.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                calls[parts[-1]] = int(parts[3])
        counts[n] = calls
    extra = {name: counts[900].get(name, 0) - counts[300].get(name, 0) for name in counts[900]}
    assert extra.get("linkat", 0) >= 600 and extra.get("openat", 0) >= 600
    checks = sum(extra.get(name, 0) for name in ("faccessat", "faccessat2", "access", "newfstatat", "fstat",
                                                  "statx"))
    assert checks < 60, extra


_HELPER_RSS_CHILD = """
import random, resource, sys
sys.path.insert(0, sys.argv[1])
from objects.store import ObjectStore
with ObjectStore(sys.argv[2]) as s, s.bulk(helper=True) as bulk:
    rng = random.Random(int(sys.argv[3]))
    for i in range(int(sys.argv[3])):
        bulk.put_bytes(rng.randbytes(600))
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_bulk_helper_memory_does_not_grow_per_object(tmp_path: Path) -> None:
    """A helper keeps 32 bytes per object it creates (its report), not a record per object: its
    peak RSS (the largest of the two) grows by well under 100 bytes per object from 2,000 objects
    to 22,000 (it was about 300)."""
    root = str(Path(__file__).resolve().parent.parent)
    peak = {}
    for n in (2000, 22000):
        out = subprocess.run([sys.executable, "-c", _HELPER_RSS_CHILD, root, str(tmp_path / f"s{n}"), str(n)],
                             check=True, capture_output=True, text=True).stdout
        peak[n] = int(out) * 1024
    per_object = (peak[22000] - peak[2000]) / 20000  # each helper gets about half of them
    assert per_object < 50, peak


def test_bulk_objects_noted_for_sync(store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few objects from helpers: sync() fsyncs each of them and its fan-out dir (and the root)."""
    store.sync()
    fsynced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(store_mod.os, "fsync", lambda fd: fsynced.append(os.fstat(fd).st_ino) or real(fd))
    with store.bulk(helper=True) as bulk:
        digests = {bulk.put_bytes(data_of(200, i)) for i in range(3)}
    store.sync()
    expected = {os.stat(store.path(d)).st_ino for d in digests}
    expected |= {os.stat(os.path.dirname(store.path(d))).st_ino for d in digests}
    expected.add(os.stat(store.root).st_ino)
    assert set(fsynced) == expected


def test_bulk_helper_failure_is_a_store_error(tmp_path: Path) -> None:
    """ENOSPC in a helper: ObjectStoreError naming the store, raised by a later put or by close()."""
    require_root()
    with tiny_tmpfs(tmp_path / "small") as mnt:
        with ObjectStore(mnt / "objects") as s:
            with pytest.raises(ObjectStoreError, match=str(mnt)) as exc:  # noqa: PT012
                with s.bulk(helper=True) as bulk:
                    for i in range(400):
                        bulk.put_bytes(data_of(20_000, i))
            assert "No space left" in str(exc.value)
            assert bulk._procs == []
            assert all(s.verify(d) for d in s)  # whatever made it in is whole
            assert tmp_entries(s) == []


def test_bulk_abort_stops_the_helpers(store: ObjectStore) -> None:
    bulk = store.bulk(helper=True)
    bulk.put_bytes(data_of(100, 1))
    procs = list(bulk._procs)
    assert procs
    bulk.abort()
    assert all(p.returncode is not None for p in procs) and bulk._procs == []
    with pytest.raises(ObjectStoreError, match="closed"):
        bulk.put_bytes(data_of(100, 2))
    with pytest.raises(RuntimeError), store.bulk(helper=True) as b2:
        b2.put_bytes(data_of(100, 3))
        procs = list(b2._procs)
        raise RuntimeError("import failed")
    assert all(p.returncode is not None for p in procs)


def test_bulk_refused_on_readonly_store(tmp_path: Path) -> None:
    ObjectStore(tmp_path / "o").close()
    with ObjectStore(tmp_path / "o", readonly=True) as s, pytest.raises(ReadOnlyObjectStoreError):
        s.bulk()


@pytest.mark.parametrize(("direct", "size_known"), [(True, True), (True, False), (False, True)])
def test_direct_temp_file_allocated_to_the_known_size(store: ObjectStore, monkeypatch: pytest.MonkeyPatch,
                                                      direct: bool, size_known: bool) -> None:
    """An O_DIRECT put whose size is known allocates its temp file to that size before the writes
    (so ext4 can run two at once); a buffered one, or one of unknown size, does not."""
    store.direct_io = direct
    calls: list[int] = []
    real = store_mod._fallocate

    def spy(fd: int, size: int) -> bool:
        calls.append(size)
        return real(fd, size)

    monkeypatch.setattr(store_mod, "_fallocate", spy)
    data = data_of(4 * MIB + 99, 64)
    digest = store.put(io.BytesIO(data), size=len(data) if size_known else None)
    assert Path(store.path(digest)).read_bytes() == data
    assert calls == ([len(data)] if direct and size_known else [])
