"""Big puts write the way this host does best (objects.writemode): measured once per boot and directory."""

from __future__ import annotations

import io
import mmap
import os

import pytest

from objects import ObjectStore, writemode
from objects.digest import fsverity_digest


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    monkeypatch.setattr(writemode, "_chosen", {})
    monkeypatch.setattr(writemode, "_unmeasured", {})


def _big() -> bytes:
    return os.urandom(3 << 20) + b"tail"  # three chunks and an unaligned tail


def _opened_direct(store: ObjectStore, monkeypatch) -> list[bool]:
    """Whether each temp file of a big put was opened O_DIRECT (a put may also open the spare for the
    next one, in the same mode: objects.store._take_temp)."""
    seen: list[bool] = []
    real = store._open_temp

    def spy(fanout=None, direct=False):
        seen.append(direct)
        return real(fanout, direct)

    monkeypatch.setattr(store, "_open_temp", spy)
    return seen


def test_first_big_put_measures_and_records(tmp_path):
    data = _big()
    with ObjectStore(tmp_path / "o") as store:
        assert store.put(io.BytesIO(data)) == fsverity_digest(data)
        store.sync()
    line = (tmp_path / "o" / writemode.STATE_FILE).read_text().split()
    assert line[0] in ("direct", "buffered")
    assert line[1] == writemode.boot_id()
    assert line[2].startswith("direct=") and line[3].startswith("buffered=")
    assert os.listdir(tmp_path / "o" / ".tmp") == []  # the probe's files were anonymous
    others = {n for n in os.listdir(tmp_path / "o") if len(n) != 2}
    assert others <= {".tmp", writemode.STATE_FILE, ".verity"}  # (no probe or temp file left)


def test_the_probe_waits_for_enough_bytes_of_known_size(tmp_path, monkeypatch):
    """Puts of known size run O_DIRECT, unmeasured and unrecorded, until they add up to PROBE_AFTER
    (a small image's first pull never pays for the probe); the put that reaches it measures, once."""
    monkeypatch.setattr(writemode, "PROBE_AFTER", 7 << 20)
    probes = []
    monkeypatch.setattr(writemode, "measure", lambda dirfd: probes.append(dirfd) or (2.0, 1.0, 0.0))   # buffered
    state = tmp_path / "o" / writemode.STATE_FILE
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        datas = [_big(), _big(), _big(), _big()]   # 3 MiB each
        for i, data in enumerate(datas):
            assert store.put_async(io.BytesIO(data), size=len(data)).result() == fsverity_digest(data)
            assert len(probes) == (0 if i < 2 else 1)   # 3 + 3 < 7 MiB; the third reaches it
            assert state.exists() == (i >= 2)
        store.sync()
    assert seen[0] is True and seen[1] is True   # (the first two: O_DIRECT, as without a measurement)
    assert seen[-1] is False                     # then as measured
    assert state.read_text().split()[0] == "buffered"


@pytest.mark.parametrize(("direct_s", "buffered_s", "direct"), [(2.0, 1.0, False), (1.0, 1.2, True),
                                                                 (1.0, 2.0, True)])
def test_the_faster_way_is_used(tmp_path, monkeypatch, direct_s, buffered_s, direct):
    monkeypatch.setattr(writemode, "measure", lambda dirfd: (direct_s, buffered_s, 0.0))
    data = _big()
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        assert store.put(io.BytesIO(data)) == fsverity_digest(data)
        assert store.put(io.BytesIO(data[::-1])) == fsverity_digest(data[::-1])
        store.sync()
        assert seen[0] == direct and set(seen) == {direct}  # (the second put may take the spare the
        #                                                       first one opened: objects.store._take_temp)
        with open(store.path(fsverity_digest(data)), "rb") as f:
            assert f.read() == data
    assert (tmp_path / "o" / writemode.STATE_FILE).read_text().split()[0] == ("direct" if direct else "buffered")


def test_a_record_of_this_boot_is_reused_another_is_not(tmp_path, monkeypatch):
    root = tmp_path / "o"
    root.mkdir()
    (root / writemode.STATE_FILE).write_text(f"buffered {writemode.boot_id()} direct=1MB/s buffered=2MB/s\n")

    def no_probe(dirfd):
        raise AssertionError("measured although this boot's choice is recorded")

    monkeypatch.setattr(writemode, "measure", no_probe)
    with ObjectStore(root) as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {False}

    monkeypatch.setattr(writemode, "_chosen", {})
    (root / writemode.STATE_FILE).write_text("buffered 00000000-another-boot direct=1MB/s buffered=2MB/s\n")
    monkeypatch.setattr(writemode, "measure", lambda dirfd: (1.0, 3.0, 0.0))
    with ObjectStore(root) as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {True}
    assert (root / writemode.STATE_FILE).read_text().startswith(f"direct {writemode.boot_id()} ")


def test_symlinked_record_is_not_followed(tmp_path, monkeypatch):
    root = tmp_path / "o"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(f"buffered {writemode.boot_id()}\n")
    (root / writemode.STATE_FILE).symlink_to(elsewhere)
    monkeypatch.setattr(writemode, "measure", lambda dirfd: (1.0, 3.0, 0.0))
    with ObjectStore(root) as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {True}  # measured, not read through the link
    assert not (root / writemode.STATE_FILE).is_symlink()
    assert elsewhere.read_text() == f"buffered {writemode.boot_id()}\n"


def test_no_probe_means_o_direct_and_no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(writemode, "measure", lambda dirfd: None)
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {True}
    assert not (tmp_path / "o" / writemode.STATE_FILE).exists()


def test_a_forced_mode_skips_the_probe(tmp_path, monkeypatch):
    def no_probe(dirfd):
        raise AssertionError("measured although the mode was set")

    monkeypatch.setattr(writemode, "measure", no_probe)
    with ObjectStore(tmp_path / "o") as store:
        store.direct_io = False
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {False}


def _scripted_rounds(monkeypatch, rounds: list[tuple[float, float]], write_cpu: tuple[float, float],
                     hashing: float, flush_share: float = 0.0) -> None:
    """The probe's writes take the given (O_DIRECT, buffered) seconds, round after round, with
    `write_cpu` CPU seconds each way, the flush after them `flush_share` of that time, and hashing
    the probe's bytes takes `hashing` CPU seconds (nothing is written: only the decision is under
    test)."""
    times = [(t, cpu, t * flush_share) for pair in rounds for t, cpu in zip(pair, write_cpu, strict=True)]
    assert len(rounds) == writemode.ROUNDS
    monkeypatch.setattr(writemode, "_time_write", lambda dirfd, buf, direct: times.pop(0))
    monkeypatch.setattr(writemode, "_hash_seconds", lambda buf: hashing)


def test_a_buffered_host_is_recognised_through_noise(tmp_path, monkeypatch):
    """The second VM of issue 17 (O_DIRECT 350 MB/s, buffered 563 MB/s, both slower than hashing)
    with one lucky O_DIRECT round and one unlucky buffered round: buffered is chosen
    (best-against-worst kept O_DIRECT there)."""
    _scripted_rounds(monkeypatch, [(0.024, 0.015), (0.015, 0.015), (0.024, 0.021)], (0.0005, 0.004), 0.010)
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {False}
    line = (tmp_path / "o" / writemode.STATE_FILE).read_text().split()
    assert line[0] == "buffered" and line[2] == f"direct={writemode.PROBE_BYTES / 0.024 / 1e6:.0f}MB/s"


def test_a_direct_host_keeps_o_direct_through_noise(tmp_path, monkeypatch):
    """The development VM (O_DIRECT faster) with one slow O_DIRECT round and one lucky buffered one."""
    _scripted_rounds(monkeypatch, [(0.010, 0.014), (0.030, 0.006), (0.011, 0.015)], (0.0005, 0.004), 0.008)
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {True}


def test_faster_buffered_writes_that_cost_the_hashing_cpu_keep_o_direct(tmp_path, monkeypatch):
    """The development VM on a busy afternoon: 8 MiB buffered writes ran faster than O_DIRECT ones in
    most rounds, but neither way is slower than hashing the same bytes, and buffered writes take
    CPU that hashing needs (imports ran at 0.63x with them): O_DIRECT stays."""
    _scripted_rounds(monkeypatch, [(0.012, 0.008), (0.021, 0.007), (0.006, 0.009)], (0.0005, 0.009), 0.0094)
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {True}


def test_buffered_imports_are_durable_before_they_are_recorded(tmp_path, monkeypatch):
    """On a host that chose buffered writes, a pull starts writeback of each big object while writing
    it (sync_file_range over all of its bytes) and makes every object durable (an fsync of each, or
    one syncfs) before the layer is committed: nothing is recorded that is not on disk."""
    import tarfile

    import flatmount
    from flatmount.store import batch as batch_mod
    from objects import store as store_mod

    monkeypatch.setattr(writemode, "measure", lambda dirfd: (2.0, 1.0, 0.0))   # buffered is twice as fast
    monkeypatch.setattr(writemode, "PROBE_AFTER", 0)   # (measured at the first big put, as a big layer's)
    sizes = [3 << 20, (5 << 20) + 4097, (1 << 20) + 1, 8000]
    contents = [os.urandom(n) for n in sizes]
    tar = tmp_path / "layer.tar"
    with tarfile.open(tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for i, data in enumerate(contents):
            ti = tarfile.TarInfo(f"f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

    writeback: dict[int, list[tuple[int, int]]] = {}
    real_start = store_mod._start_writeback

    def start_writeback(fd, offset, length):
        writeback.setdefault(os.fstat(fd).st_ino, []).append((offset, length))
        real_start(fd, offset, length)

    durable: set[int] = set()
    syncfs_calls: list[int] = []
    real_fsync, real_syncfs = os.fsync, store_mod._syncfs

    def fsync(fd):
        real_fsync(fd)
        durable.add(os.fstat(fd).st_ino)

    def syncfs(fd):
        ok = real_syncfs(fd)
        syncfs_calls.append(fd)
        return ok

    opened_direct: list[bool] = []
    real_open_temp = store_mod.ObjectStore._open_temp

    def open_temp(self, fanout=None, direct=False):
        opened_direct.append(direct)
        return real_open_temp(self, fanout, direct)

    at_commit: list[tuple[set[int], int]] = []
    real_commit = batch_mod.ImportBatch.commit

    def commit(self):
        at_commit.append((set(durable), len(syncfs_calls)))
        return real_commit(self)

    monkeypatch.setattr(store_mod, "_start_writeback", start_writeback)
    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    monkeypatch.setattr(store_mod, "_syncfs", syncfs)
    monkeypatch.setattr(store_mod.ObjectStore, "_open_temp", open_temp)
    monkeypatch.setattr(batch_mod.ImportBatch, "commit", commit)
    with flatmount.open_store(tmp_path / "store", runroot=tmp_path / "run", config=os.devnull,
                              additional=[]) as store:
        store.pull(f"tar:{tar}")
        objdir = store.objects_dir
    paths = [objdir / d.hex()[:2] / d.hex()[2:] for d in map(fsverity_digest, contents[:3])]
    assert opened_direct[:3] == [False] * 3   # the big puts were buffered
    for path, data in zip(paths, contents, strict=False):
        with open(path, "rb") as f:
            assert f.read() == data
        ranges = sorted(writeback[os.stat(path).st_ino])
        covered = 0
        for offset, length in ranges:   # contiguous from 0 to the end: every byte's writeback started
            assert offset == covered
            covered += length
        assert covered == len(data)
    assert len(at_commit) == 1
    synced_inodes, syncfs_before = at_commit[0]
    assert syncfs_before or {os.stat(p).st_ino for p in paths} <= synced_inodes


def test_the_probe_writes_o_direct_as_a_put_does(tmp_path, monkeypatch):
    """The O_DIRECT round of the probe measures what a big put does (objects.store.DIRECT_WRITERS):
    two writes in flight, into a file allocated first; one at a time it measured a slower disk than
    the puts see (1,000-1,300 against 1,500-1,700 MB/s here)."""
    import threading

    (tmp_path / "o").mkdir()
    lock = threading.Lock()
    state = {"active": 0, "most": 0, "sizes": []}
    both = threading.Event()
    real = os.pwritev

    def pwritev(fd, bufs, off):
        with lock:
            state["active"] += 1
            state["most"] = max(state["most"], state["active"])
            state["sizes"].append(os.fstat(fd).st_size)
            if state["active"] > 1:
                both.set()
        try:
            both.wait(2)  # (each write waits a little for another to run beside it)
            return real(fd, bufs, off)
        finally:
            with lock:
                state["active"] -= 1

    monkeypatch.setattr(os, "pwritev", pwritev)
    fd = os.open(tmp_path / "o", os.O_RDONLY | os.O_DIRECTORY)
    buf = mmap.mmap(-1, writemode.PROBE_WRITE)  # (page-aligned, as O_DIRECT needs)
    try:
        result = writemode._time_write(fd, buf, True)
    finally:
        buf.close()
        os.close(fd)
    assert result is not None
    assert state["most"] == 2
    assert all(size == writemode.PROBE_BYTES for size in state["sizes"])  # allocated before writing


@pytest.mark.parametrize(("flush_share", "direct"), [(0.47, False), (0.05, True)])
def test_a_host_caching_o_direct_writes_gets_buffered_writes(tmp_path, monkeypatch, flush_share, direct):
    """Today's VM (disk 400-500 MB/s): O_DIRECT rounds of 8 MiB spent about half their time in the
    flush after them, buffered ones were 1.3x faster.  Under MARGIN, yet buffered is chosen there,
    since the host caches O_DIRECT writes; where the flush is next to nothing, O_DIRECT stays."""
    _scripted_rounds(monkeypatch, [(0.026, 0.020)] * writemode.ROUNDS, (0.0005, 0.004), 0.010, flush_share)
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert set(seen) == {direct}
    line = (tmp_path / "o" / writemode.STATE_FILE).read_text().split()
    assert line[0] == ("direct" if direct else "buffered") and line[4] == f"direct-flush={flush_share:.2f}"


@pytest.mark.parametrize(("direct_s", "buffered_s", "share", "direct"), [
    (1.6, 1.0, 0.0, False), (1.4, 1.0, 0.0, True), (1.4, 1.0, 0.3, False), (1.07, 1.0, 0.73, False),
    (0.98, 1.0, 0.74, False), (0.8, 1.0, 0.5, True), (0.9, 1.0, 0.2, True)])
def test_choose_direct(direct_s, buffered_s, share, direct):
    assert writemode.choose_direct(direct_s, buffered_s, share) is direct


def test_the_probe_times_the_flush_of_its_writes(tmp_path):
    """A real round: its flush is timed apart, and is part of the round."""
    import mmap

    (tmp_path / "o").mkdir()
    fd = os.open(tmp_path / "o", os.O_RDONLY | os.O_DIRECTORY)
    buf = mmap.mmap(-1, writemode.PROBE_WRITE)
    try:
        for direct in (True, False):
            result = writemode._time_write(fd, buf, direct)
            if result is None:   # (O_DIRECT refused by this file system)
                assert direct
                continue
            seconds, _, flush = result
            assert 0 < flush <= seconds
    finally:
        buf.close()
        os.close(fd)
