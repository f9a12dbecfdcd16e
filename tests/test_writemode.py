"""Big puts write the way this host does best (objects.writemode): measured once per boot and directory."""

from __future__ import annotations

import io
import os

import pytest

from objects import ObjectStore, writemode
from objects.digest import fsverity_digest


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    monkeypatch.setattr(writemode, "_chosen", {})


def _big() -> bytes:
    return os.urandom(3 << 20) + b"tail"  # three chunks and an unaligned tail


def _opened_direct(store: ObjectStore, monkeypatch) -> list[bool]:
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


@pytest.mark.parametrize(("direct_s", "buffered_s", "direct"), [(2.0, 1.0, False), (1.0, 1.2, True),
                                                                 (1.0, 2.0, True)])
def test_the_faster_way_is_used(tmp_path, monkeypatch, direct_s, buffered_s, direct):
    monkeypatch.setattr(writemode, "measure", lambda dirfd: (direct_s, buffered_s))
    data = _big()
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        assert store.put(io.BytesIO(data)) == fsverity_digest(data)
        assert store.put(io.BytesIO(data[::-1])) == fsverity_digest(data[::-1])
        store.sync()
        assert seen == [direct, direct]
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
        assert seen == [False]

    monkeypatch.setattr(writemode, "_chosen", {})
    (root / writemode.STATE_FILE).write_text("buffered 00000000-another-boot direct=1MB/s buffered=2MB/s\n")
    monkeypatch.setattr(writemode, "measure", lambda dirfd: (1.0, 3.0))
    with ObjectStore(root) as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert seen == [True]
    assert (root / writemode.STATE_FILE).read_text().startswith(f"direct {writemode.boot_id()} ")


def test_symlinked_record_is_not_followed(tmp_path, monkeypatch):
    root = tmp_path / "o"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text(f"buffered {writemode.boot_id()}\n")
    (root / writemode.STATE_FILE).symlink_to(elsewhere)
    monkeypatch.setattr(writemode, "measure", lambda dirfd: (1.0, 3.0))
    with ObjectStore(root) as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert seen == [True]  # measured, not read through the link
    assert not (root / writemode.STATE_FILE).is_symlink()
    assert elsewhere.read_text() == f"buffered {writemode.boot_id()}\n"


def test_no_probe_means_o_direct_and_no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(writemode, "measure", lambda dirfd: None)
    with ObjectStore(tmp_path / "o") as store:
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert seen == [True]
    assert not (tmp_path / "o" / writemode.STATE_FILE).exists()


def test_a_forced_mode_skips_the_probe(tmp_path, monkeypatch):
    def no_probe(dirfd):
        raise AssertionError("measured although the mode was set")

    monkeypatch.setattr(writemode, "measure", no_probe)
    with ObjectStore(tmp_path / "o") as store:
        store.direct_io = False
        seen = _opened_direct(store, monkeypatch)
        store.put(io.BytesIO(_big()))
        assert seen == [False]
