"""fsck: every planted problem is found; --repair fixes what it can and says what it cannot."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from flatmount.api import open_store
from flatmount.cli import main
from flatmount.flatten import flatten_image
from flatmount.fsck import ERROR, NOTICE, fsck
from flatmount.store import reftable
from tests.conftest import require_root
from tests.maint_helpers import content, new_store, objpath, primary_objects, pull_image, unmount_all_under

A = {"a/a1": content("a1", 1000), "a/a2": content("a2", 2000)}
B = {"b1": content("b1", 3000)}
D = {"d1": content("d1", 5000), "d2": content("d2", 600)}


@pytest.fixture
def store(tmp_path):
    s = new_store(tmp_path / "store")
    pull_image(s, tmp_path, "x", [A, B])
    pull_image(s, tmp_path, "z", [D])
    yield s
    s.close()
    assert not unmount_all_under(tmp_path), "a test left a mount behind"


def kinds(res, severity=None) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in res.problems:
        if severity is None or p.severity == severity:
            out.setdefault(p.kind, []).append(p)
    return out


def readonly(store):
    return open_store(store.root, runroot=store.runroot, readonly=True)


def test_clean_store(store):
    flatten_image(store, "x")
    res = fsck(store)
    assert res.ok and res.problems == ()
    assert (res.objects, res.objects_verified, res.layers, res.flat_images) == (5, 5, 3, 1)


def test_corrupt_object_is_quarantined(store):
    victim = objpath(B["b1"])
    path = store.objects_dir / victim
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"X")  # same size, different content
    res = fsck(store)
    assert not res.ok and [p.subject for p in kinds(res)["corrupt-object"]] == [victim]
    res = fsck(store, repair=True)
    (p,) = kinds(res)["corrupt-object"]
    assert p.repaired and "quarantine" in p.note
    assert (store.root / "quarantine" / victim.replace("/", "")).exists() and not path.exists()
    # x needs it: now it is missing, which no repair can fix
    (m,) = kinds(res)["missing-object"]
    assert m.subject == victim and not m.repaired and "x:latest" in m.detail
    assert not res.ok and fsck(store).remaining == fsck(store, repair=True).remaining
    # the content comes back with a new pull of the same image (layer already recorded: put it again)
    store.objects.put_bytes(B["b1"])
    assert fsck(store).ok


def test_missing_object_names_images(store):
    os.unlink(store.objects_dir / objpath(D["d1"]))
    res = fsck(store, repair=True)
    (m,) = kinds(res)["missing-object"]
    assert m.subject == objpath(D["d1"]) and "z:latest" in m.detail and not m.repaired
    assert not res.ok and m.severity == ERROR


def test_orphans_are_notices(store):
    store.objects.put_bytes(content("orphan", 300))
    (store.layers_dir / f"{'e' * 64}.erofs").write_bytes(b"x")
    (store.root / "images" / f"{'f' * 64}.erofs").write_bytes(b"y")
    res = fsck(store, repair=True)
    k = kinds(res)
    assert [p.subject for p in k["orphan-object"]] == [objpath(content("orphan", 300))]
    assert len(k["orphan-layer-file"]) == 1 and len(k["orphan-image-file"]) == 1
    assert all(p.severity == NOTICE and "gc" in p.note for p in res.problems)
    assert res.ok


def test_temp_leftovers(store):
    ro = readonly(store)
    leftovers = [store.tmp_dir / "import-123-abc", store.objects_dir / ".tmp" / "999-dead-0",
                 store.tmp_dir / "image-x.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "objects").mkdir()
    leftovers[1].write_bytes(b"half an object")
    leftovers[2].write_bytes(b"half an image")
    res = fsck(ro)  # nobody holds the GC lock: every unlocked tmp entry is a leftover
    assert sorted(p.subject for p in kinds(res)["temp-leftover"]) == sorted(map(str, leftovers))
    assert res.ok and all(p.exists() for p in leftovers)
    with store.gc_lock(shared=True):  # a writer is active: only entries older than a day count
        res = fsck(ro)
        assert "temp-leftover" not in kinds(res)
        old = time.time() - 2 * 86400
        os.utime(leftovers[2], (old, old))
        assert [p.subject for p in kinds(fsck(ro))["temp-leftover"]] == [str(leftovers[2])]
    ro.close()
    res = fsck(store, repair=True)
    assert all(p.repaired for p in kinds(res)["temp-leftover"]) and len(kinds(res)["temp-leftover"]) == 3
    assert not any(p.exists() for p in leftovers)


def test_flocked_tmp_entry_is_in_use(store):
    import fcntl

    d = store.tmp_dir / "import-live"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        res = fsck(store, repair=True)
        assert "temp-leftover" not in kinds(res) and d.exists()
    finally:
        os.close(fd)


def test_stale_lease(store, tmp_path):
    flat = flatten_image(store, "z")
    top = store.runroot / "mounts" / "0123456789abcdef"
    (top / "merged").mkdir(parents=True)
    with store.transaction() as db:
        db.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                   ("0123456789abcdef", flat.digest, "z", str(top / "merged"), 999999, None, time.time()))
    res = fsck(store)
    (p,) = kinds(res)["stale-lease"]
    assert p.subject == "0123456789abcdef" and not res.ok and "not mounted" in p.detail
    res = fsck(store, repair=True)
    assert kinds(res)["stale-lease"][0].repaired and res.ok
    assert not top.exists() and store.connect().execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    # another boot's lease is stale too
    with store.transaction() as db:
        db.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                   ("old", flat.digest, "z", str(tmp_path / "nowhere"), 1, str(uuid.uuid4()), time.time()))
    assert "another boot" in kinds(fsck(store))["stale-lease"][0].detail


def test_live_lease_is_fine(store):
    require_root()
    from flatmount.mount import mount

    with mount(store, "x") as merged:
        res = fsck(store, repair=True)
        assert res.ok and res.leases == 1 and "stale-lease" not in kinds(res)
        assert os.path.ismount(merged)


def test_bad_refs_are_rebuilt(store):
    x = store.resolve_image("x")
    flat = flatten_image(store, "x")
    owner = "layer:" + x.top_layer
    with store.transaction() as db:
        reftable.delete_owner(db, owner)
        reftable.insert_paths(db, "flat:" + flat.digest, [objpath(D["d1"])])
    res = fsck(store)
    k = kinds(res)
    assert [p.subject for p in k["refs-missing"]] == [owner]
    # a flat image's rows (as earlier versions wrote them) are dangling: flat images hold none now
    assert [p.subject for p in k["dangling-refs"]] == ["flat:" + flat.digest]
    assert not res.ok
    res = fsck(store, repair=True)
    assert all(p.repaired for p in res.problems) and res.ok
    assert reftable.objects_of(store.connect(), owner) == [objpath(B["b1"])]
    assert not any(o.startswith("flat:") for o in reftable.owners(store.connect()))
    assert fsck(store).problems == ()


def test_missing_and_corrupt_flat_images(store):
    fx = flatten_image(store, "x")
    fz = flatten_image(store, "z")
    os.unlink(fx.path)
    with open(fz.path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    res = fsck(store)
    k = kinds(res)
    assert [p.subject for p in k["missing-flat-image"]] == [fx.chain_key]
    assert [p.subject for p in k["corrupt-flat-image"]] == [fz.chain_key]
    res = fsck(store, repair=True)
    assert res.ok and all(p.repaired for p in res.problems if p.severity == ERROR)
    assert store.connect().execute("SELECT count(*) FROM flat_images").fetchone()[0] == 0
    owners = reftable.owners(store.connect())
    assert not any(o.startswith("flat:") for o in owners)
    assert (store.root / "quarantine" / f"image-{fz.digest}.erofs").exists()
    # re-made on demand
    assert not flatten_image(store, "x").reused and fsck(store).problems == ()


def test_unrepairable_records(store):
    z = store.resolve_image("z")
    os.unlink(store.layer_image_path(z.top_layer))
    with store.transaction() as db:
        db.execute("INSERT INTO names VALUES ('ghost:latest', ?)", ("9" * 64,))
        db.execute("INSERT INTO images(id, top_layer) VALUES (?, ?)", ("8" * 64, "7" * 64))
    res = fsck(store, repair=True)
    k = kinds(res)
    assert [p.subject for p in k["missing-layer-image"]] == [z.top_layer]
    assert not k["missing-layer-image"][0].repaired
    assert [p.subject for p in k["dangling-image"]] == ["8" * 64]
    assert k["dangling-name"][0].repaired  # a name pointing nowhere is dropped
    assert not res.ok


def test_sample(store):
    assert fsck(store, sample=2).objects_verified == 2
    assert fsck(store, sample=0.5).objects_verified == 3
    assert fsck(store, sample=1.0).objects_verified == 5
    assert fsck(store, sample=0.01).objects_verified == 1


def test_additional_store_problems_are_not_repaired(tmp_path):
    ais_root = tmp_path / "ais"
    ais = new_store(ais_root)
    pull_image(ais, tmp_path / "a", "w", [A])
    ais.close()
    bad = ais_root / "objects" / objpath(A["a/a1"])
    with open(bad, "r+b") as f:
        f.write(b"Z")
    s = new_store(tmp_path / "store", additional=[str(ais_root)])
    pull_image(s, tmp_path, "v", [A, B])
    res = fsck(s, repair=True)
    (p,) = kinds(res)["corrupt-object"]
    assert p.store_root == str(ais_root) and not p.repaired and "read-only" in p.note
    assert bad.exists() and not res.ok
    s.close()


def test_cli_exit_codes(store, capsys):
    root = ["--root", str(store.root), "--runroot", str(store.runroot)]
    assert main(["fsck", *root]) == 0
    capsys.readouterr()
    x = store.resolve_image("x")
    with store.transaction() as db:
        reftable.delete_owner(db, "layer:" + x.top_layer)
    assert main(["fsck", "--json", *root]) == 1
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and out["counts"] == {"refs-missing": 1}
    assert main(["fsck", "--repair", *root]) == 0
    assert "repaired  refs-missing" in capsys.readouterr().out
    assert main(["fsck", "--sample", "50%", "--json", *root]) == 0
    assert json.loads(capsys.readouterr().out)["objects_verified"] == 3
    assert main(["fsck", "--sample", "1", *root]) == 0
    assert "1 of 5 objects verified" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fsck", "--sample", "150%", *root])
    assert primary_objects(store)  # nothing was deleted by any of this
