"""A big put's temp file opened ahead by the put before it (objects.store `_take_temp`): why, see
there.  The content and the durability of objects are the same; these check that the spare is used,
closed with the store, never shared with a forked child, and never a named file left behind."""

from __future__ import annotations

import io
import os
import random
import time
from pathlib import Path

import pytest

from objects.digest import fsverity_digest
from objects.store import ObjectStore

MIB = 1 << 20


def data_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def io_of(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)


def wait_spare(store: ObjectStore) -> int:
    """The fd of the spare temp file, once the last put's thread has opened it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spare = next(iter(store._spare.values()), None)
        if spare is not None:
            return spare[1]
        time.sleep(0.001)
    raise AssertionError("no spare temp file was opened after a big put")


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    s = ObjectStore(tmp_path / "objects")
    yield s
    s.close()


def test_next_big_put_writes_into_the_spare(store: ObjectStore) -> None:
    first = data_of(3 * MIB + 5, 1)
    assert store.put(io_of(first), size=len(first)) == fsverity_digest(first)
    spare = wait_spare(store)
    ino = os.fstat(spare).st_ino
    second = data_of(2 * MIB + 4097, 2)
    digest = store.put(io_of(second), size=len(second))
    assert digest == fsverity_digest(second)
    st = os.stat(store.path(digest))
    assert st.st_ino == ino and st.st_size == len(second) and st.st_nlink == 1
    with open(store.path(digest), "rb") as f:
        assert f.read() == second
    assert os.listdir(os.path.join(store.root, ".tmp")) == []


def test_close_closes_the_spare(store: ObjectStore) -> None:
    data = data_of(2 * MIB, 3)
    store.put(io_of(data), size=len(data))
    spare = wait_spare(store)
    store.close()
    with pytest.raises(OSError):
        os.fstat(spare)
    assert store._spare == {}


def test_named_temp_files_get_no_spare(store: ObjectStore) -> None:
    store._tmpfile = False  # (no O_TMPFILE: a spare would be a named file left behind by a crash)
    for seed in (4, 5):
        data = data_of(2 * MIB + 1, seed)
        assert store.put(io_of(data), size=len(data)) == fsverity_digest(data)
    time.sleep(0.05)
    assert store._spare == {}
    assert os.listdir(os.path.join(store.root, ".tmp")) == []


def test_forked_child_opens_its_own_temp_file(store: ObjectStore) -> None:
    data = data_of(2 * MIB, 6)
    store.put(io_of(data), size=len(data))
    ino = os.fstat(wait_spare(store)).st_ino
    other = data_of(2 * MIB + 3, 7)
    pid = os.fork()
    if pid == 0:  # the child: its put must not write into the parent's spare
        code = 1
        try:
            digest = store.put(io_of(other), size=len(other))
            code = 0 if os.stat(store.path(digest)).st_ino != ino else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.fstat(wait_spare(store)).st_ino == ino  # (still the parent's, unused)
