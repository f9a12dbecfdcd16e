"""The compiled store loop of the bulk helpers (objects/_bulkstore.c) against its Python specification.

`bulkhelper._compiled_records` must leave the store exactly as `bulkhelper._records` does on the same
record stream (the same object files, contents and modes, the same digests reported as created, the
same error), on hand-made streams with every case the C hands back to Python (an object already
stored, a damaged one, a missing fan-out dir, a stream cut inside a record) and on random ones.
"""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import IN_CI, require_root, require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from objects import bulkhelper
from objects.bulk import START_AFTER
from objects.bulkwire import RECORD as _RECORD
from objects.digest import fsverity_digest
from objects.errors import ObjectStoreError
from objects.paths import object_path
from objects.store import ObjectStore

ROOT = Path(__file__).resolve().parent.parent


def _compiled():
    """The compiled module; under CI its absence is a failure (a broken build must not hide behind
    the fallback)."""
    if bulkhelper._bulkstore is None:
        msg = "objects._bulkstore is not built (pip install -e . builds it with a C compiler)"
        if os.environ.get("FLATMOUNT_PURE", "") not in ("", "0"):
            msg = "FLATMOUNT_PURE is set: objects._bulkstore is not loaded"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return bulkhelper._bulkstore


def _stream(contents: list[bytes]) -> bytes:
    return b"".join(_RECORD.pack(fsverity_digest(c), len(c)) + c for c in contents)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below the object dir: relative path -> (content, permission bits)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel == ".verity":
                continue
            out[rel] = (p.read_bytes(), stat.S_IMODE(p.lstat().st_mode))
    return out


class _Pieces:
    """A pipe's reads: `readinto` gives at most `chunk` bytes at a time."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.f = io.BytesIO(data)
        self.chunk = chunk

    def readinto(self, b) -> int:
        with memoryview(b) as mv:
            return self.f.readinto(mv[:self.chunk])


def _run(which, root: Path, stream: bytes, prepare=None, chunk: int | None = None):
    """Store `stream` with `which` (_records or _compiled_records) into a new store at `root`; returns
    (store snapshot, created digests, error or None)."""
    old_umask = os.umask(0o022)  # what child_main sets
    try:
        with ObjectStore(root) as store:
            if prepare is not None:
                prepare(store)
            store._tmpfile = store._probe_tmpfile()
            assert store._tmpfile
            new = bytearray()
            if which is bulkhelper._records:
                inp = io.BufferedReader(io.BytesIO(stream), buffer_size=chunk) if chunk else io.BytesIO(stream)
            else:
                inp = _Pieces(stream, chunk or 1 << 20)
            error = None
            try:
                for _ in which(store, inp, new):
                    pass
            except (bulkhelper._Truncated, ObjectStoreError) as e:
                error = type(e).__name__
    finally:
        os.umask(old_umask)
    return _snapshot(root), bytes(new), error


def _both(tmp_path: Path, stream: bytes, prepare=None, chunk: int | None = None):
    _compiled()
    want = _run(bulkhelper._records, tmp_path / "py", stream, prepare, chunk)
    got = _run(bulkhelper._compiled_records, tmp_path / "c", stream, prepare, chunk)
    assert got == want
    return got


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_same_objects_as_python(tmp_path: Path) -> None:
    contents = [_data(n, i) for i, n in enumerate([65, 100, 4096, 4097, 8192, 70_000, 1 << 20])]
    contents += [_data(300 + i, 100 + i) for i in range(600)]
    snap, created, error = _both(tmp_path, _stream(contents))
    assert error is None
    assert len(snap) == len(contents) and created == b"".join(fsverity_digest(c) for c in contents)
    assert {m for _c, m in snap.values()} == {0o644}


def test_stored_damaged_and_missing_dirs(tmp_path: Path) -> None:
    """An object stored already (kept, not reported), a damaged one (replaced), fan-out dirs missing
    (made by the Python code the C hands the record to), in a stream read in small pieces."""
    good, damaged = _data(3000, 1), _data(5000, 2)
    fresh = [_data(2000, 10 + i) for i in range(300)]

    def prepare(store: ObjectStore) -> None:
        store.put_bytes(good)
        rel = store.path(fsverity_digest(damaged))
        os.makedirs(os.path.dirname(rel), exist_ok=True)
        Path(rel).write_bytes(damaged[:100])

    for chunk in (None, 1, 100, 4096, 100_000):
        sub = tmp_path / f"chunk-{chunk}"
        snap, created, error = _both(sub, _stream([good, *fresh[:150], damaged, *fresh[150:]]), prepare, chunk)
        assert error is None
        assert snap[object_path(fsverity_digest(damaged))][0] == damaged
        assert fsverity_digest(good) not in {created[i:i + 32] for i in range(0, len(created), 32)}


@pytest.mark.parametrize("cut", [1, 20, 36, 37, 500])
def test_stream_cut_inside_a_record(tmp_path: Path, cut: int) -> None:
    """The parent went away mid-record: the records before it stored, that one not, in both."""
    contents = [_data(1000 + i, i) for i in range(5)]
    stream = _stream(contents)
    last = _RECORD.size + len(contents[-1])
    snap, created, error = _both(tmp_path, stream[:len(stream) - last + min(cut, last - 1)])
    assert error == "_Truncated" and len(snap) == 4 and len(created) == 4 * 32


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 20_000), max_size=40), stored=st.sets(st.integers(0, 39), max_size=5),
       chunk=st.sampled_from([None, 1, 37, 512, 4096]), seed=st.integers(0, 1000))
def test_random_streams(tmp_path_factory: pytest.TempPathFactory, sizes: list[int], stored: set[int],
                        chunk: int | None, seed: int) -> None:
    contents = list({_data(n, seed * 100 + i): None for i, n in enumerate(sizes)})  # each once, as sent

    def prepare(store: ObjectStore) -> None:
        for i in stored:
            if i < len(contents):
                store.put_bytes(contents[i])

    _both(tmp_path_factory.mktemp("r"), _stream(contents), prepare, chunk)


_PULL = """
import sys
sys.path.insert(0, sys.argv[1])
from objects.store import ObjectStore
from objects import bulk as bulkwriter, bulkhelper
import random
if len(sys.argv) > 4:  # this many helpers, whatever the CPUs
    bulkwriter.helper_count = lambda cpus=None: int(sys.argv[4])
with ObjectStore(sys.argv[2]) as s, s.bulk(helper=True) as bulk:
    rng = random.Random(5)
    for i in range(int(sys.argv[3])):
        bulk.put_bytes(rng.randbytes(100 + i))
    print(len(bulk._procs))
"""


@pytest.mark.parametrize("helpers", [1, 2])
@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_helpers_with_and_without_the_compiled_loop(tmp_path: Path, pure: bool, helpers: int) -> None:
    """Through BulkWriter's helper processes (one, as on 2 CPUs, or two, each object to one by its
    digest): the same store with FLATMOUNT_PURE=1 as without."""
    _compiled()
    env = dict(os.environ, FLATMOUNT_PURE="1" if pure else "0")
    started = subprocess.run([sys.executable, "-c", _PULL, str(ROOT), str(tmp_path / "s"), "700", str(helpers)],
                             check=True, env=env, capture_output=True, text=True).stdout.strip()
    assert started == str(helpers)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from objects import bulkhelper as b; " \
        "print(b._bulkstore is not None)"
    used = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert used == str(not pure)
    rng = random.Random(5)
    want = {object_path(fsverity_digest(c)): (c, 0o644)
            for c in (rng.randbytes(100 + i) for i in range(700))}
    assert _snapshot(tmp_path / "s") == want


def test_helpers_link_without_proc_paths(tmp_path: Path) -> None:
    """As root the compiled loop links each new object with linkat(fd, "", AT_EMPTY_PATH), not
    through a /proc/self/fd/N path the kernel must resolve (a fifth of the link's cost)."""
    require_root()
    _compiled()
    strace = require_tool("strace")
    out = tmp_path / "trace"
    subprocess.run([strace, "-f", "-e", "trace=linkat", "-o", str(out), sys.executable, "-c", _PULL, str(ROOT),
                    str(tmp_path / "s"), "900"], check=True, capture_output=True)
    links = [line for line in out.read_text().splitlines() if "linkat(" in line]
    empty = [line for line in links if "AT_EMPTY_PATH" in line]
    assert len(empty) >= 900 - START_AFTER, links[:5]
    # (the first START_AFTER puts are stored in-process by the Python code, plus the temp-file probes)
    assert sum("/proc/self/fd" in line for line in links) <= START_AFTER + 3, links[:5]


def test_linking_through_proc_paths(tmp_path: Path) -> None:
    """`path_link` (where the kernel refused AT_EMPTY_PATH): the same objects through /proc/self/fd/N."""
    bulkstore = _compiled()
    contents = [_data(1000 + i, 500 + i) for i in range(50)]
    stream = _stream(contents)
    want = _run(bulkhelper._records, tmp_path / "py", stream)
    old_umask = os.umask(0o022)
    try:
        with ObjectStore(tmp_path / "c") as store:
            for d in {object_path(fsverity_digest(c))[:2] for c in contents}:
                os.mkdir(tmp_path / "c" / d, 0o755)
            at, created, status, err, path_link = bulkstore.store_records(store._dirfd, stream, True)
    finally:
        os.umask(old_umask)
    assert (at, status, err, path_link) == (len(stream), 0, 0, True)
    assert (_snapshot(tmp_path / "c"), created, None) == want


def test_one_cpu_stays_the_callers() -> None:
    """A bulk writer starts a helper per CPU beside the importing process's own, one at least (it
    starts none on one CPU: BulkWriter) and MAX_HELPERS at most."""
    from objects.bulk import MAX_HELPERS, helper_count

    assert [helper_count(n) for n in (1, 2, 3)] == [1, 1, 2]
    assert helper_count(64) == MAX_HELPERS == 2
