"""Integrity hardening: failed-import rollback, damaged metadata DBs, verification of layer and
flattened images, re-pull repair.  Real files, real tars, real mounts."""

from __future__ import annotations

import os

import pytest

from flatmount.errors import LayerError
from flatmount.pull import pull
from tests.conftest import require_root
from tests.maint_helpers import (
    content,
    layer_tar,
    new_store,
    objpath,
    primary_objects,
    pull_image,
    unmount_all_under,
)


@pytest.fixture
def store(tmp_path):
    s = new_store(tmp_path / "store")
    yield s
    s.close()
    assert not unmount_all_under(tmp_path), "a test left a mount behind"


def _unreadable(merged: str, files: dict[str, bytes]) -> list[str]:
    bad = []
    for name, data in files.items():
        try:
            with open(os.path.join(merged, name), "rb") as f:
                if f.read() != data:
                    bad.append(name)
        except OSError:
            bad.append(name)
    return bad


# --- item 1: a failed import removes only what it created --------------------------------------------

@pytest.mark.parametrize("nfiles", [50, 400])   # 400: past objects.bulk.START_AFTER, helper processes
def test_failed_import_keeps_objects_a_live_mount_reads(store, tmp_path, nfiles):
    """Pull x, mount it, rmi x, then at once a pull that fails (truncated tar) whose files include x's
    content: its rollback must not delete x's objects (it found them stored, it did not create them),
    and must delete the objects it did create."""
    require_root()
    files = {f"f/{i}": content(f"x{i}", 100 + i) for i in range(nfiles)}
    pull_image(store, tmp_path, "x", [files])
    x_objects = {objpath(v) for v in files.values()}
    lease = store.mount("x")
    merged = lease.__enter__()
    try:
        store.remove_image("x")
        # the same contents under other names, then new ones; cut inside the last new file
        other = {f"g/{i}": v for i, v in enumerate(files.values())}
        fresh = {f"h/{i}": content(f"new{i}", 300 + i) for i in range(20)}
        data = layer_tar({**other, **fresh})
        cut = data.rindex(fresh["h/19"][:64]) + 100
        (tmp_path / "bad.tar").write_bytes(data[:cut])
        with pytest.raises(LayerError, match="truncated|ends inside"):
            pull(store, f"tar:{tmp_path / 'bad.tar'}", "bad")
        assert _unreadable(merged, files) == []
        present = primary_objects(store)
        assert x_objects <= present
        # what the failed import created itself is gone again
        assert not present & {objpath(v) for v in fresh.values()}
    finally:
        lease.__exit__(None, None, None)


# --- item 4: a 0-byte or damaged metadata DB --------------------------------------------------------

def _files(root) -> dict[str, int]:
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            if not n.startswith("flatmount.db") and "/tmp/" not in p and "/.tmp/" not in p:
                out[os.path.relpath(p, root)] = os.lstat(p).st_size
    return out


def _damaged_store(tmp_path, how: str):
    """A store with images x and y whose DB is then emptied (0 bytes) or has one zeroed refs page."""
    import sqlite3

    s = new_store(tmp_path / "store")
    pull_image(s, tmp_path, "x", [{f"f/{i}": content(f"x{i}", 100 + i) for i in range(400)}])
    pull_image(s, tmp_path, "y", [{"y": content("y", 500)}])
    s.close()   # (the last connection checkpoints the WAL into the DB file)
    db = tmp_path / "store" / "flatmount.db"
    assert not os.path.exists(f"{db}-wal") or os.path.getsize(f"{db}-wal") == 0
    if how == "empty":
        db.write_bytes(b"")
    else:
        with sqlite3.connect(db) as c:
            page = c.execute("SELECT pageno FROM dbstat WHERE name = 'refs' AND pagetype = 'leaf' "
                             "ORDER BY pageno LIMIT 1 OFFSET 1").fetchone()[0]
            size = c.execute("PRAGMA page_size").fetchone()[0]
        c.close()
        with open(db, "r+b") as f:
            f.seek((page - 1) * size)
            f.write(bytes(size))
    return new_store(tmp_path / "store")


@pytest.mark.parametrize("how", ["empty", "zeroed-page"])
def test_damaged_db_is_reported_and_refused(tmp_path, how):
    """fsck reports the DB (SQLite's integrity check, or empty while the store holds data); gc, rmi and
    writes refuse with a clear error; nothing in the store is removed."""
    import subprocess
    import sys

    from flatmount.errors import StoreError
    from flatmount.fsck import fsck
    from flatmount.gc import gc

    s = _damaged_store(tmp_path, how)
    try:
        before = _files(s.root)
        res = fsck(s)
        assert not res.ok and res.counts.get("corrupt-db", 0) >= 1, res.problems
        with pytest.raises(StoreError, match="empty|malformed"):
            gc(s, grace_s=0)
        with pytest.raises(StoreError, match="empty|malformed"):
            s.remove_image("y")
        with pytest.raises(StoreError, match="empty|malformed"):
            pull(s, f"oci:{tmp_path / 'oci-y'}:t", "again")
        assert _files(s.root) == before
    finally:
        s.close()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for args in (["gc"], ["rmi", "y"], ["fsck"]):
        r = subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"),
                            "--runroot", str(tmp_path / "run"), *args], capture_output=True, text=True,
                           cwd=root, env={**os.environ, "PYTHONPATH": root})
        assert r.returncode == (1 if args == ["fsck"] else 3), (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
    assert _files(tmp_path / "store") == before
