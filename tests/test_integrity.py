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
    refs_as_text,
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


# --- item 5: corruption is found, not served ---------------------------------------------------------

def _flip(path, offset: int | None = None) -> None:
    """Flip one byte (in place: same size; mtime and ctime change as with any write)."""
    size = os.path.getsize(path)
    off = size // 2 if offset is None else offset
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x20]))


def _content_offset(path, data: bytes) -> int:
    with open(path, "rb") as f:
        return f.read().index(data)


@pytest.mark.parametrize("tree_cache", [True, False])
def test_damaged_layer_image_found_by_fsck_and_refused_by_flatten(store, tmp_path, tree_cache):
    """A flipped byte in a layer image (here inside an inline file, so the image still parses): fsck
    reports it, flatten refuses to use it (with or without its tree cache), a re-pull repairs it."""
    from flatmount.errors import CorruptImageError
    from flatmount.flatten import flatten_image
    from flatmount.fsck import fsck
    from flatmount.store.paths import layer_cache_path

    inline = b"inline text that is stored inside the layer image"
    info = pull_image(store, tmp_path, "x", [{"etc/small": inline, "big": content("big", 5000)}])
    lid = info["layer_ids"][0]
    path = store.layer_image_path(lid)
    if not tree_cache:
        os.unlink(layer_cache_path(path))
    assert fsck(store).ok
    _flip(path, _content_offset(path, inline) + 3)
    res = fsck(store)
    assert [p.kind for p in res.problems if p.severity == "error"] == ["corrupt-layer-image"]
    with pytest.raises(CorruptImageError, match="damaged"):
        flatten_image(store, "x")
    # the same pull again rewrites the layer image from the source (item 6)
    pull(store, f"oci:{tmp_path / 'oci-x'}:t", "x")
    assert fsck(store).ok
    merged_tree = flatten_image(store, "x")
    from flatmount.image.reader import read_tree

    assert read_tree(merged_tree.path).entries[b"etc"].entries[b"small"].content == inline


def test_damaged_flat_image_is_not_mounted(store, tmp_path):
    """A flipped byte in a cached flattened image (inside an inline file: the kernel would mount it
    and serve the wrong bytes) is refused at mount."""
    from flatmount.errors import CorruptImageError
    from flatmount.flatten import flatten_image

    require_root()
    small = b"a small file, inline in the flattened image"
    files = {"etc/conf": content("conf", 3000), "etc/small": small}
    pull_image(store, tmp_path, "x", [files])
    flat = flatten_image(store, "x")
    with store.mount("x") as merged:
        assert _unreadable(merged, files) == []
    _flip(flat.path, _content_offset(flat.path, small) + 4)
    with pytest.raises(CorruptImageError, match="damaged"):
        with store.mount("x") as merged:
            assert _unreadable(merged, files) == []   # (what the old code served)
    assert store.mounts() == []


def test_mount_hashes_a_flat_image_only_after_it_was_written(store, tmp_path):
    """The verification is cached with the file's identity: flatten records what it wrote, an
    untouched image is not hashed again, a touched one is."""
    from flatmount.flatten import flatten_image
    from flatmount.store.integrity import verify_flat_image

    pull_image(store, tmp_path, "x", [{"etc/conf": content("conf", 3000)}])
    flat = flatten_image(store, "x")
    assert verify_flat_image(store, flat.path, flat.digest) is False   # flatten recorded it as verified
    os.utime(flat.path)   # written to (here: only its times): hashed again, still good
    assert verify_flat_image(store, flat.path, flat.digest) is True
    assert verify_flat_image(store, flat.path, flat.digest) is False


def test_damaged_prefix_image_does_not_flow_into_a_longer_chain(store, tmp_path):
    """flatten of a longer chain starts from the cached image of its prefix: without the prefix's tree
    cache that image is read, and must first match its name."""
    from flatmount.errors import CorruptImageError
    from flatmount.flatten import flatten_image
    from flatmount.store.paths import derived_paths, wait_derived

    a = {"a": content("a", 3000), "a.txt": b"a small file with text inside the image"}
    pull_image(store, tmp_path, "base", [a])
    prefix = flatten_image(store, "base")
    wait_derived()
    for p in derived_paths(prefix.path):
        if os.path.exists(p):
            os.unlink(p)
    _flip(prefix.path, _content_offset(prefix.path, b"a small file") + 2)
    # a fresh process's view: nothing of the prefix in memory
    from flatmount import flatten as flatten_mod
    flatten_mod._trees.clear()
    pull_image(store, tmp_path, "top", [a, {"b": content("b", 3000)}])
    with pytest.raises(CorruptImageError, match="damaged"):
        flatten_image(store, "top")


def test_fsck_finds_a_damaged_object(store, tmp_path):
    """Without kernel fs-verity an object is served as stored: fsck recomputes every digest."""
    from flatmount.fsck import fsck

    data = content("obj", 9000)
    pull_image(store, tmp_path, "x", [{"f": data}])
    _flip(store.objects_dir / objpath(data))
    res = fsck(store)
    assert [(p.kind, p.subject) for p in res.problems if p.severity == "error"] == [
        ("corrupt-object", objpath(data))]


# --- item 6: a re-pull repairs ------------------------------------------------------------------------

@pytest.mark.parametrize("lose", ["object", "layer-image"])
def test_repull_repairs_a_layer_that_lost_an_object_or_its_image(store, tmp_path, lose):
    """After an object (or a layer image) is lost, `pull oci:` of the same image imports the damaged
    layer again instead of calling it present: fsck is clean and the image mounts whole again."""
    from flatmount.fsck import fsck
    from flatmount.store.paths import layer_cache_path

    base = {"lib/a": content("a", 4000), "lib/b": content("b", 70000)}
    top = {"app/c": content("c", 5000)}
    info = pull_image(store, tmp_path, "x", [base, top])
    lost_layer = info["layer_ids"][0]
    if lose == "object":
        os.unlink(store.objects_dir / objpath(base["lib/b"]))
    else:
        os.unlink(store.layer_image_path(lost_layer))
        os.unlink(layer_cache_path(store.layer_image_path(lost_layer)))
    assert not fsck(store).ok
    res = pull(store, f"oci:{tmp_path / 'oci-x'}:t", "x")
    assert res.imported == (lost_layer,) and res.present == (info["layer_ids"][1],)
    assert fsck(store).ok
    assert objpath(base["lib/b"]) in primary_objects(store)
    again = pull(store, f"oci:{tmp_path / 'oci-x'}:t", "x")   # now really present
    assert again.imported == () and len(again.present) == 2
    require_root()
    with store.mount("x") as merged:
        assert _unreadable(merged, {**base, **top}) == []


def test_repull_of_a_tar_layer_restores_its_object(store, tmp_path):
    from flatmount.fsck import fsck

    data = content("t", 9000)
    (tmp_path / "l.tar").write_bytes(layer_tar({"t": data}))
    pull(store, f"tar:{tmp_path / 'l.tar'}", "t")
    os.unlink(store.objects_dir / objpath(data))
    assert not fsck(store).ok
    pull(store, f"tar:{tmp_path / 'l.tar'}", "t")   # (the tar is read whole: its puts restore the object)
    assert objpath(data) in primary_objects(store)
    assert fsck(store).ok


def test_schema_1_store_is_read_as_additional_and_upgraded_as_primary(tmp_path):
    """A store written before layer digests (schema 1): read as an additional store as is (no digest
    to check), upgraded in place when opened as the primary; its layers keep working."""
    import sqlite3

    from flatmount.flatten import flatten_image
    from flatmount.fsck import fsck
    from flatmount.store.records import SCHEMA_VERSION

    old = new_store(tmp_path / "old")
    pull_image(old, tmp_path, "x", [{"f": content("f", 3000)}])
    old.close()
    refs_as_text(tmp_path / "old" / "flatmount.db")
    with sqlite3.connect(tmp_path / "old" / "flatmount.db") as c:
        c.execute("ALTER TABLE layers DROP COLUMN image_digest")
        c.execute("DROP TABLE verified")
        c.execute("PRAGMA user_version=1")
    c.close()
    s = new_store(tmp_path / "primary", additional=[str(tmp_path / "old")])
    try:
        (layer,) = s.layers()
        assert layer.image_digest is None and layer.store_root == str(tmp_path / "old")
        assert flatten_image(s, "x").path
    finally:
        s.close()
    s = new_store(tmp_path / "old")
    try:
        assert s.connect().execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert s.layers()[0].image_digest is None
        assert flatten_image(s, "x").path and fsck(s).ok
        # fsck --repair records the digest its tree cache from import proves
        res = fsck(s, repair=True)
        assert [(p.kind, p.repaired) for p in res.problems] == [("layer-digest-missing", True)]
        import hashlib

        with open(s.layer_image_path(layer.id), "rb") as f:
            assert s.layers()[0].image_digest == hashlib.sha256(f.read()).hexdigest()
        assert fsck(s).problems == ()
    finally:
        s.close()


def test_gc_drops_verified_rows_of_removed_images(store, tmp_path):
    from flatmount.flatten import flatten_image
    from flatmount.gc import gc

    pull_image(store, tmp_path, "x", [{"f": content("f", 3000)}])
    flat = flatten_image(store, "x")
    rows = lambda: [r[0] for r in store.connect().execute("SELECT path FROM verified")]  # noqa: E731
    assert rows() == [flat.path]
    store.remove_image("x")
    gc(store, grace_s=0)
    assert not os.path.exists(flat.path) and rows() == []


def test_cli_repull_after_fsck_quarantined_a_damaged_object(tmp_path):
    """The whole path for a damaged object without fs-verity: fsck finds it, `fsck --repair` moves
    it to quarantine (it is then missing), and `flatmount pull` of the image imports that layer
    again instead of saying "already present"; fsck is clean after."""
    import subprocess
    import sys

    s = new_store(tmp_path / "store")
    data = content("obj", 20000)
    info = pull_image(s, tmp_path, "x", [{"f": data}, {"g": content("g", 3000)}])
    s.close()
    _flip(tmp_path / "store" / "objects" / objpath(data))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flatmount", "--root", str(tmp_path / "store"),
                               "--runroot", str(tmp_path / "run"), *args], capture_output=True, text=True,
                              cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=120)

    r = cli("fsck")
    assert r.returncode == 1 and "corrupt-object" in r.stdout, r.stdout
    r = cli("fsck", "--repair")
    assert "quarantine" in r.stdout, r.stdout
    r = cli("pull", f"oci:{tmp_path / 'oci-x'}:t", "--name", "x")
    assert r.returncode == 0, r.stderr
    assert f"layer {info['layer_ids'][0][:12]}: imported" in r.stderr
    assert f"layer {info['layer_ids'][1][:12]}: already present" in r.stderr
    r = cli("fsck")
    assert r.returncode == 0, r.stdout


def test_diff_refuses_a_damaged_cached_image(store, tmp_path):
    from flatmount.errors import CorruptImageError
    from flatmount.flatten import flatten_image
    from flatmount.store.paths import derived_paths, wait_derived

    small = b"a small file, inline in the flattened image"
    pull_image(store, tmp_path, "a", [{"etc/small": small}])
    pull_image(store, tmp_path, "b", [{"etc/small": small, "etc/new": b"new"}])
    assert [str(c) for c in store.diff("a", "b")] == ["C /etc", "A /etc/new"]
    flat = flatten_image(store, "a")
    wait_derived()
    for p in derived_paths(flat.path):
        if os.path.exists(p):
            os.unlink(p)
    _flip(flat.path, _content_offset(flat.path, small) + 4)
    with pytest.raises(CorruptImageError, match="damaged"):
        store.diff("a", "b")


def test_fsck_finds_a_damaged_layer_image_recorded_without_digest(store, tmp_path):
    """A layer from before digests (image_digest NULL) whose image no longer matches the tree cache
    written from it at import is reported corrupt, and its digest is not recorded."""
    from flatmount.fsck import fsck

    inline = b"inline text that is stored inside the layer image"
    info = pull_image(store, tmp_path, "x", [{"etc/small": inline}])
    lid = info["layer_ids"][0]
    with store.transaction() as db:
        db.execute("UPDATE layers SET image_digest = NULL")
    path = store.layer_image_path(lid)
    _flip(path, _content_offset(path, inline) + 3)
    res = fsck(store, repair=True)
    assert [p.kind for p in res.problems if p.severity == "error"] == ["corrupt-layer-image"]
    assert store.layers()[0].image_digest is None
