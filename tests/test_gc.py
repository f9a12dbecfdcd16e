"""gc: exactly the unreferenced objects go; leased images, young objects and additional stores stay."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest

from flatmount.cli import main
from flatmount.errors import ReadOnlyStoreError, StoreError
from flatmount.flatten import flatten_image
from flatmount.fsck import fsck
from flatmount.gc import gc
from flatmount.store import reftable
from flatmount.store.leases import read_leases
from tests.conftest import require_root
from tests.maint_helpers import (
    content,
    new_store,
    objpath,
    primary_objects,
    pull_image,
    tree_hashes,
    unmount_all_under,
    xyz_store,
)

A = {"a/a1": content("a1", 1000), "a/a2": content("a2", 2000)}
B = {"b1": content("b1", 3000), "b/tiny": b"inline"}
C = {"c1": content("c1", 4000), "c/dup": content("b1", 3000)}
D = {"d1": content("d1", 5000), "d2": content("d2", 600)}
ALL = {objpath(v) for layer in (A, B, C, D) for v in layer.values() if len(v) > 64}


@pytest.fixture
def store(tmp_path):
    s = xyz_store(tmp_path, A, B, C, D)
    yield s
    s.close()
    assert not unmount_all_under(tmp_path), "a test left a mount behind"


def referenced(store) -> set[str]:
    return reftable.referenced(store.connect())


def objs(*layers) -> set[str]:
    return {objpath(v) for layer in layers for v in layer.values() if len(v) > 64}


def test_nothing_to_free(store):
    before = tree_hashes(store.root / "objects")
    res = gc(store, grace_s=0)
    assert (res.objects_removed, res.bytes_freed, res.objects_kept) == (0, 0, len(ALL))
    assert res.errors == () and not res.dry_run
    assert tree_hashes(store.root / "objects") == before


def test_removes_exactly_the_unreferenced(store):
    orphans = {objpath(content(f"orphan{i}", 100 + i)) for i in range(5)}
    for i in range(5):
        store.objects.put_bytes(content(f"orphan{i}", 100 + i))
    store.objects.sync()
    store.remove_image("z")
    assert primary_objects(store) == ALL | orphans
    dry = gc(store, dry_run=True, grace_s=0)
    assert primary_objects(store) == ALL | orphans  # dry run removes nothing
    res = gc(store, grace_s=0)
    gone = objs(D) | orphans
    assert res.objects_removed == dry.objects_removed == len(gone)
    assert res.object_bytes_freed == dry.object_bytes_freed == 5000 + 600 + sum(100 + i for i in range(5))
    assert primary_objects(store) == ALL - objs(D) == referenced(store)
    assert fsck(store).ok
    again = gc(store, grace_s=0)
    assert again.objects_removed == 0 and again.bytes_freed == 0


def test_grace_period_keeps_young_objects(store):
    store.objects.put_bytes(content("young", 300))
    res = gc(store, grace_s=3600)
    assert (res.objects_removed, res.objects_kept_recent, res.bytes_kept_recent) == (0, 1, 300)
    assert objpath(content("young", 300)) in primary_objects(store)
    res = gc(store, grace_s=0)
    assert res.objects_removed == 1 and objpath(content("young", 300)) not in primary_objects(store)


def test_flat_images_policy(store, tmp_path):
    """Kept: the flat image of a recorded image; removed: that of a removed image, even if a prefix."""
    base = pull_image(store, tmp_path, "base", [A])
    fx = flatten_image(store, "x")
    fbase = flatten_image(store, "base")
    fz = flatten_image(store, "z")
    store.remove_image("base")
    store.remove_image("z")
    assert store.has_layer(base["layer_ids"][0])  # still x's and y's base layer
    res = gc(store, grace_s=0)
    assert set(res.images_removed) == {fbase.digest, fz.digest}
    assert set(res.flat_rows_removed) == {fbase.chain_key, fz.chain_key}
    assert os.path.exists(fx.path) and not os.path.exists(fbase.path) and not os.path.exists(fz.path)
    rows = store.connect().execute("SELECT chain_key FROM flat_images").fetchall()
    assert rows == [(fx.chain_key,)]
    owners = reftable.owners(store.connect())
    assert not any(o.startswith("flat:") for o in owners)  # flat images hold no refs: their layers do
    assert res.refs_removed == 0   # no layer was removed: refs rows are only the layers'
    assert primary_objects(store) == ALL - objs(D)
    # the image of an image in use is re-used, a removed one is re-made on demand
    assert flatten_image(store, "x").reused
    assert fsck(store).ok


def test_orphan_files_and_dangling_refs(store):
    fake = "f" * 64
    layer_file = store.layers_dir / f"{'e' * 64}.erofs"
    layer_file.write_bytes(b"left by a killed import")
    image_file = store.root / "images" / f"{fake}.erofs"
    image_file.write_bytes(b"left by a killed flatten")
    store.objects.put_bytes(content("dangling", 500))
    with store.transaction() as db:
        reftable.insert_paths(db, "layer:" + "d" * 64, [objpath(content("dangling", 500))])
    res = gc(store, grace_s=3600)  # young files without records are kept within the grace period
    assert layer_file.exists() and image_file.exists()
    assert res.refs_removed == 1 and res.objects_kept_recent == 1
    res = gc(store, grace_s=0)
    assert not layer_file.exists() and not image_file.exists()
    assert res.layer_files_removed == ("e" * 64,) and res.images_removed == (fake,)
    assert res.objects_removed == 1
    assert primary_objects(store) == ALL


def test_leased_image_keeps_its_objects(store, tmp_path):
    require_root()
    from flatmount.mount import mount_image_ref, umount

    lease = mount_image_ref(store, "z")
    try:
        store.remove_image("z")  # the layer goes now; the lease alone must keep the objects
        assert reftable.owners_of(store.connect(), objpath(D["d1"])) == []
        from flatmount.usage import usage

        assert usage(store).unreferenced_objects == 0   # what gc would free: nothing the mount uses
        res = gc(store, grace_s=0)
        assert res.leases_live == 1 and res.objects_removed == 0 and res.images_removed == ()
        for name, data in D.items():
            with open(os.path.join(lease.merged, name), "rb") as f:
                assert f.read() == data
    finally:
        umount(store, lease.id)
    from flatmount.usage import usage

    assert usage(store).unreferenced_objects == 2
    res = gc(store, grace_s=0)
    assert res.objects_removed == 2 and len(res.images_removed) == 1
    assert primary_objects(store) == ALL - objs(D)


def test_stale_lease_pins_nothing(store, tmp_path):
    flat = flatten_image(store, "z")
    merged = tmp_path / "store-run" / "mounts" / "dead" / "merged"
    merged.mkdir(parents=True)
    with store.transaction() as db:
        db.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                   ("dead", flat.digest, "z", str(merged), 999999, str(uuid.uuid4()), time.time()))
    store.remove_image("z")
    assert [lease.stale_reason for lease in read_leases(store.connect())] == ["recorded on another boot"]
    res = gc(store, grace_s=0)
    assert res.leases_stale == 1 and res.leases_live == 0
    assert res.images_removed == (flat.digest,) and res.objects_removed == 2


def test_busy_mount_dir_keeps_lease_live(store, tmp_path):
    """A lease whose mount dir is flock'ed is a mount in progress: live although nothing is mounted."""
    import fcntl

    flat = flatten_image(store, "z")
    top = tmp_path / "store-run" / "mounts" / "busy"
    (top / "merged").mkdir(parents=True)
    with store.transaction() as db:
        db.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                   ("busy", flat.digest, "z", str(top / "merged"), os.getpid(), None, time.time()))
    store.remove_image("z")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = gc(store, grace_s=0)
        assert res.leases_live == 1 and res.objects_removed == 0 and res.images_removed == ()
    finally:
        os.close(fd)
    res = gc(store, grace_s=0)
    assert res.leases_stale == 1 and res.objects_removed == 2


def test_additional_store_never_touched(tmp_path):
    """AIS objects (even unreferenced ones) stay, byte for byte; the AIS is a read-only mount here."""
    require_root()
    ais_root = tmp_path / "ais"
    ais = new_store(ais_root)
    pull_image(ais, tmp_path / "a", "w", [A])
    pull_image(ais, tmp_path / "a", "gone", [D])
    ais.remove_image("gone")  # its objects are now garbage of the AIS: not ours to collect
    ais.close()
    before = tree_hashes(ais_root)
    ro = tmp_path / "ais-ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(ais_root), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        s = new_store(tmp_path / "store", additional=[str(ro)])
        pull_image(s, tmp_path, "v", [A, B])          # base layer from the AIS
        flatten_image(s, "w")                           # AIS image flattened into the primary cache
        s.objects.put_bytes(content("primary orphan", 200))
        res = gc(s, grace_s=0)
        assert res.errors == () and res.objects_removed == 1
        assert primary_objects(s) == objs(B)
        assert fsck(s).ok
        s.close()
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert tree_hashes(ais_root) == before


def test_primary_copy_needed_by_additional_store_is_kept(tmp_path):
    ais_root = tmp_path / "ais"
    ais = new_store(ais_root)
    pull_image(ais, tmp_path / "a", "w", [A])
    ais.close()
    lost = objpath(A["a/a1"])
    os.unlink(ais_root / "objects" / lost)  # the AIS lacks it; a copy in the primary serves its mounts
    s = new_store(tmp_path / "store", additional=[str(ais_root)])
    s.connect()  # a primary that has a database (its objects came from somewhere)
    s.objects.put_bytes(A["a/a1"])
    s.objects.put_bytes(content("orphan", 90))
    res = gc(s, grace_s=0)
    assert res.objects_kept_additional == 1 and res.objects_removed == 1
    assert primary_objects(s) == {lost}
    s.close()


def test_gc_refuses_additional_and_readonly(tmp_path, store):
    from flatmount.api import open_store

    ro = open_store(store.root, runroot=store.runroot, readonly=True)
    with pytest.raises(ReadOnlyStoreError):
        gc(ro)
    store.remove_image("z")
    res = gc(ro, dry_run=True, grace_s=0)  # a read-only dry run works and writes nothing
    assert res.objects_removed == 2 and primary_objects(store) == ALL
    ro.close()
    s = new_store(tmp_path / "p", additional=[str(store.root)])
    with pytest.raises(ReadOnlyStoreError):
        gc(s.additional[0])
    s.close()


def test_empty_and_missing_store(tmp_path):
    s = new_store(tmp_path / "nothing")
    res = gc(s)
    assert res.objects_removed == 0 and not (tmp_path / "nothing").exists()


def test_objects_without_database_are_refused(store):
    """A lost DB (or a wrong --root) must not turn every object into garbage."""
    store.close()
    os.rename(store.db_path, store.root / "moved.db")
    with pytest.raises(StoreError, match="no database"):
        gc(store, grace_s=0)
    assert primary_objects(store) == ALL


def test_cli(store, capsys):
    root = ["--root", str(store.root), "--runroot", str(store.runroot)]
    store.remove_image("z")
    assert main(["gc", "--dry-run", "--grace", "0", "--json", *root]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["objects_removed"] == 2 and primary_objects(store) == ALL
    assert main(["gc", "--grace", "0", *root]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed 2 objects (5.6 kB)")
    assert primary_objects(store) == ALL - objs(D)
    store.objects.put_bytes(content("young", 100))
    assert main(["gc", *root]) == 0
    assert "kept 1 unreferenced objects (100 B) changed in the last 600 s" in capsys.readouterr().out
