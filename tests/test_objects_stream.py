"""A layer's many medium files through one pipeline of big puts (objects.store): long-lived writer
threads fed by one queue of (file, chunk) items, chunks finished in order by whichever worker holds
the lane while the others read on, the next put's temp file opened ahead.  What a layer of such
files stores, and what a failure in one of them leaves."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import threading
import time

import pytest

import objects.store as store_mod
from flatmount.api import open_store
from flatmount.image.tree import lookup
from flatmount.sources.layers import read_tar
from objects import ObjectStore, ObjectStoreError
from objects.digest import fsverity_digest
from tests.tarbuild import Tar
from tests.test_objects_store import DeferringSource, record_dispatches

MIB = 1 << 20


def medium(i: int) -> bytes:
    """Content of the i-th medium file: 1-4 MiB, most with an unaligned tail."""
    return random.Random(i).randbytes(MIB + (i % 4) * MIB + (i * 4099) % (2 * MIB))


def tmp_entries(store: ObjectStore) -> list[str]:
    return os.listdir(os.path.join(store.root, ".tmp"))


@pytest.fixture
def objects(tmp_path):
    with ObjectStore(tmp_path / "objects") as store:
        yield store


def layer_of(contents: list[bytes]) -> Tar:
    t = Tar()
    for i, data in enumerate(contents):
        t.file(f"m/{i:02d}", data)
        t.file(f"s/{i:02d}", random.Random(1000 + i).randbytes(300 + i))  # (small files between them)
    return t


def test_no_writer_started_or_joined_per_file(objects, monkeypatch):
    """The writes of every file go to the same long-lived writer threads: no writer job per put
    (two were started and joined for each file), and the threads stay as many whatever the files."""
    dispatched = record_dispatches(monkeypatch)

    def writer_threads() -> int:
        return sum(th.name == "objects-writer" for th in threading.enumerate())

    for layer_no in range(2):
        contents = [medium(10 * layer_no + i) for i in range(8)]
        t = layer_of(contents)
        layer = read_tar(io.BytesIO(t.bytes()), objects)
        assert layer.tree == t.tree()
        if not layer_no:
            writers = writer_threads()
            assert writers >= 1
        for data in contents:
            with objects.open(fsverity_digest(data)) as f:
                assert f.read() == data
    assert writer_threads() == writers  # (the second layer's files: no new writer)
    assert dispatched.count("_put_large_job") == 16
    assert "_writer" not in dispatched and "_write_loop" not in dispatched, dispatched
    assert tmp_entries(objects) == []


def test_a_duplicate_and_a_stored_object_in_the_middle(objects):
    """Files 4 and 1 have the same content, file 6's is stored before the layer: every name gets its
    digest, the stored object is kept as it is (same inode, not reported as created), each object
    is whole, stored once, and no temp file is left."""
    contents = [medium(i) for i in range(10)]
    contents[4] = contents[1]
    stored = objects.put(io.BytesIO(contents[6]), size=len(contents[6]))
    ino = os.stat(objects.path(stored)).st_ino
    created = objects.watch_created()
    t = layer_of(contents)
    layer = read_tar(io.BytesIO(t.bytes()), objects)
    objects.unwatch_created(created)
    assert layer.tree == t.tree()
    assert layer.diff_id == "sha256:" + hashlib.sha256(t.bytes()).hexdigest()
    assert lookup(layer.tree, "m/04").digest == lookup(layer.tree, "m/01").digest
    for data in contents:
        path = objects.path(fsverity_digest(data))
        st = os.stat(path)
        assert st.st_size == len(data) and st.st_nlink == 1 and st.st_mode & 0o777 == 0o644
        with open(path, "rb") as f:
            assert f.read() == data
    assert os.stat(objects.path(stored)).st_ino == ino
    assert stored not in created and {fsverity_digest(d) for d in contents} - {stored} <= created
    assert tmp_entries(objects) == []


def _failing_writes(monkeypatch, data: bytes) -> list[int]:
    """Make every write of `data`'s chunks (recognised by their first 64 bytes at their offset) fail
    with EIO; returns the list the failed offsets are added to."""
    heads = {data[off:off + 64]: off for off in range(0, len(data), store_mod.READ_CHUNK)}
    failed: list[int] = []
    real, real_v = os.pwrite, os.pwritev

    def hit(buf, offset: int) -> bool:
        if heads.get(bytes(memoryview(buf)[:64])) == offset:
            failed.append(offset)
            return True
        return False

    def pwrite(fd, buf, offset):
        if hit(buf, offset):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buf, offset)

    def pwritev(fd, buffers, offset):
        if hit(buffers[0], offset):
            raise OSError(errno.EIO, "Input/output error")
        return real_v(fd, buffers, offset)

    monkeypatch.setattr(store_mod.os, "pwrite", pwrite)
    monkeypatch.setattr(store_mod.os, "pwritev", pwritev)
    return failed


@pytest.mark.parametrize("k", [0, 3, 7])
def test_a_write_failing_in_file_k(objects, monkeypatch, k):
    """A write error in the k-th of 8 medium files: read_tar raises ObjectStoreError, no object of
    that file and no temp file is left, the files before it are stored whole (read_tar removes
    nothing: the import's batch does, below), the store's next puts work."""
    contents = [medium(20 + i) for i in range(8)]
    failed = _failing_writes(monkeypatch, contents[k])
    t = layer_of(contents)
    with pytest.raises(ObjectStoreError, match="Input/output error"):
        read_tar(io.BytesIO(t.bytes()), objects)
    assert failed
    assert not objects.has(fsverity_digest(contents[k]))
    assert tmp_entries(objects) == []
    for data in contents[:k]:
        with objects.open(fsverity_digest(data)) as f:
            assert f.read() == data
    for data in contents[k + 1:]:  # (a put in flight beside it may have finished: whole, if stored)
        if objects.has(fsverity_digest(data)):
            assert objects.verify(fsverity_digest(data))
    monkeypatch.undo()
    layer = read_tar(io.BytesIO(t.bytes()), objects)
    assert layer.tree == t.tree()
    assert objects.verify(fsverity_digest(contents[k]))


@pytest.mark.parametrize("k", [2, 5])
def test_a_failed_pull_keeps_only_what_was_there(tmp_path, monkeypatch, k):
    """The same failure in a pull: the import removes the objects it created, and only those (the
    objects of a layer pulled before, among them the content of file 1, stay); no temp file is left."""
    contents = [medium(40 + i) for i in range(6)]
    first, tar = tmp_path / "first.tar", tmp_path / "layer.tar"
    t = Tar()
    t.file("kept", contents[1])
    first.write_bytes(t.bytes())
    tar.write_bytes(layer_of(contents).bytes())
    with open_store(str(tmp_path / "store"), runroot=str(tmp_path / "run"), config=os.devnull,
                    additional=[]) as store:
        store.pull(f"tar:{first}")
        with ObjectStore(store.objects_dir) as objs:
            before = set(objs)
            assert fsverity_digest(contents[1]) in before
            failed = _failing_writes(monkeypatch, contents[k])
            with pytest.raises(ObjectStoreError, match="Input/output error"):
                store.pull(f"tar:{tar}")
            assert failed
            assert set(objs) == before
            assert all(objs.verify(d) for d in before)
            assert tmp_entries(objs) == []


class _SlowFirstSettle(DeferringSource):
    """A source whose deferred work on its first chunk lasts until 4 chunks are read (at most 2 s):
    `reads_at_first_settle` tells how far the other worker got meanwhile."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads_at_first_settle: int | None = None

    def settle(self, upto: int | None = None) -> None:
        end = len(self.noted) if upto is None else upto
        if self.reads_at_first_settle is None and end:
            deadline = time.monotonic() + 2
            while len(self.noted) < 4 and time.monotonic() < deadline:
                time.sleep(0.002)
            self.reads_at_first_settle = len(self.noted)
        super().settle(upto)


def test_workers_read_on_while_a_chunk_is_finished(objects, monkeypatch):
    """While one worker finishes a chunk (here: the source's deferred work on it is slow), the
    other reads the next chunks instead of waiting for its own chunk's turn: a worker's chunk is
    finished by whichever worker holds the lane, in chunk order.  Same digest, same deferred work."""
    monkeypatch.setattr(store_mod, "CHUNK_WORKERS", 2)
    data = random.Random(7).randbytes(6 * MIB + 123)
    src = _SlowFirstSettle(data)
    digest = objects.put(src, size=len(data))
    assert digest == fsverity_digest(data)
    assert src.sha.digest() == hashlib.sha256(data).digest()
    assert src.reads_at_first_settle is not None and src.reads_at_first_settle >= 4
    assert tmp_entries(objects) == []


def test_the_next_file_never_waits_for_the_last_chunk_of_the_one_before(objects, monkeypatch):
    """The chunks of a layer's files are finished in one lane, in read order: the first chunk of a
    file is settled (the layer's sha256 with the block hashes, HashingReader.settle_blocks) right
    after the last chunk of the file before, by the thread that settled that one, never by a worker
    that sleeps until it is done (which cost a wake-up per file).  Settling each file's last chunk
    is slowed down here, so that the next file's first chunk is read meanwhile."""
    import flatmount.sources.pipeline as pipeline

    waited: list[int] = []
    real_settle, real_locked = pipeline.HashingReader.settle_blocks, pipeline.HashingReader._settle_blocks_locked

    def settle_blocks(self, upto, chunk):
        with self._claims_done:
            if self._claims and self._claims[0] < upto:  # an earlier chunk's claim still pending
                waited.append(upto)
        return real_settle(self, upto, chunk)

    def settle_locked(self, upto, chunk):
        if len(chunk) < store_mod.READ_CHUNK:  # (a file's last chunk)
            time.sleep(0.03)
        return real_locked(self, upto, chunk)

    monkeypatch.setattr(pipeline.HashingReader, "settle_blocks", settle_blocks)
    monkeypatch.setattr(pipeline.HashingReader, "_settle_blocks_locked", settle_locked)
    contents = [random.Random(60 + i).randbytes(2 * MIB + 100 * (i + 1)) for i in range(5)]
    t = Tar()
    for i, data in enumerate(contents):
        t.file(f"f{i}", data)
    layer = read_tar(io.BytesIO(t.bytes()), objects)
    assert layer.tree == t.tree()
    assert layer.diff_id == "sha256:" + hashlib.sha256(t.bytes()).hexdigest()
    assert waited == []
    for data in contents:
        assert objects.verify(fsverity_digest(data))
