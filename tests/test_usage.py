"""usage: exact figures on stores built through the real import path, with known shared/unique bytes."""

from __future__ import annotations

import json
import os

import pytest

from flatmount.cli import main
from flatmount.errors import NotFoundError
from flatmount.usage import object_refs, parse_object, share, top, usage
from tests.conftest import require_root
from tests.maint_helpers import content, new_store, objpath, pull_image, unmount_all_under, xyz_store

# Layers: A is the base of x and y; C holds a copy of B's b1 (same object, two layers); D stands alone.
A = {"a/a1": content("a1", 1000), "a/a2": content("a2", 2000), "a/small": b"inline, no object"}
B = {"b1": content("b1", 3000)}
C = {"c1": content("c1", 4000), "c/dup": content("b1", 3000)}
D = {"d1": content("d1", 5000)}


@pytest.fixture
def store(tmp_path):
    s = xyz_store(tmp_path, A, B, C, D)
    yield s
    s.close()


def by_name(report) -> dict:
    return {i.names[0].split(":")[0]: i for i in report.images}


def test_usage_exact(store):
    r = usage(store)
    assert (r.objects, r.stored_bytes) == (5, 15000)
    assert (r.referenced_objects, r.referenced_bytes) == (5, 15000)
    assert r.logical_bytes == 6000 + 10000 + 5000
    assert r.dedup_ratio == pytest.approx(21000 / 15000, abs=1e-4)
    assert (r.unreferenced_objects, r.unreferenced_bytes, r.missing_objects) == (0, 0, 0)
    assert (r.image_count, r.layer_count) == (3, 4)
    imgs = by_name(r)
    x, y, z = imgs["x"], imgs["y"], imgs["z"]
    # x = a1 a2 b1, all shared with y (b1 through y's other layer C)
    assert (x.objects, x.total_bytes, x.unique_bytes, x.shared_bytes) == (3, 6000, 0, 6000)
    assert (y.objects, y.total_bytes, y.unique_bytes, y.shared_bytes) == (4, 10000, 4000, 6000)
    assert (y.unique_objects, y.shared_objects) == (1, 3)
    assert (z.objects, z.total_bytes, z.unique_bytes, z.shared_bytes) == (1, 5000, 5000, 0)
    assert (x.layers, y.layers, z.layers) == (2, 2, 1)
    assert all(i.additional_bytes == 0 and i.missing_objects == 0 for i in r.images)


def test_unique_bytes_is_what_rmi_and_gc_free(store):
    from flatmount.gc import gc

    y = by_name(usage(store))["y"]
    before = usage(store).stored_bytes
    store.remove_image("y")
    res = gc(store, grace_s=0)
    assert res.object_bytes_freed == y.unique_bytes == 4000
    assert usage(store).stored_bytes == before - y.unique_bytes
    # with y gone, x's objects are its own
    x = by_name(usage(store))["x"]
    assert (x.unique_bytes, x.shared_bytes) == (6000, 0)


def test_unreferenced_and_missing(store):
    orphan = content("orphan", 777)
    store.objects.put_bytes(orphan)
    os.unlink(store.objects_dir / objpath(C["c1"]))
    r = usage(store)
    assert (r.objects, r.stored_bytes) == (5, 15000 - 4000 + 777)
    assert (r.unreferenced_objects, r.unreferenced_bytes) == (1, 777)
    assert r.missing_objects == 1
    y = by_name(r)["y"]
    assert (y.objects, y.total_bytes, y.unique_bytes, y.missing_objects) == (3, 6000, 0, 1)


def test_share_pairs(store):
    r = share(store)
    pairs = {frozenset((p.a.split(":")[0], p.b.split(":")[0])): (p.objects, p.bytes) for p in r.pairs}
    assert pairs == {frozenset("xy"): (3, 6000), frozenset("xz"): (0, 0), frozenset("yz"): (0, 0)}
    assert r.pairs[0].bytes == 6000  # most shared first


def test_top(store):
    r = top(store, 2)
    assert [(t.object, t.size, t.images) for t in r.largest] == [
        (objpath(D["d1"]), 5000, 1), (objpath(C["c1"]), 4000, 1)]
    shared = [(t.object, t.images) for t in r.most_shared]
    assert shared == [(objpath(B["b1"]), 2), (objpath(A["a/a2"]), 2)]  # ties broken by size
    assert {lbl.split(":")[0] for lbl in r.most_shared[0].image_labels} == {"x", "y"}


def test_parse_object():
    h = "ab" + "c" * 62
    want = "ab/" + "c" * 62
    for text in (h, "sha256:" + h, want, "/var/lib/flatmount/objects/" + want, h.upper()):
        assert parse_object(text) == want
    for bad in ("", "abc", "zz/" + "c" * 62, h + "0"):
        with pytest.raises(NotFoundError):
            parse_object(bad)


def test_object_refs(store, tmp_path):
    from flatmount.flatten import flatten_image

    flat = flatten_image(store, "x")
    r = object_refs(store, objpath(B["b1"]))
    assert r.size == 3000 and r.locations == (str(store.objects_dir / objpath(B["b1"])),)
    kinds = {(u.kind, u.id) for u in r.users}
    x = store.resolve_image("x")
    y = store.resolve_image("y")
    assert kinds == {("layer", x.top_layer), ("layer", y.top_layer), ("flat", flat.digest),
                     ("image", x.id), ("image", y.id)}
    orphan = store.objects.put_bytes(content("nobody", 100)).hex()
    r = object_refs(store, orphan)
    assert r.users == () and not r.referenced and r.size == 100
    r = object_refs(store, "00" * 32)
    assert r.size is None and r.locations == () and r.users == ()


def test_object_refs_names_mounts(store, tmp_path):
    require_root()
    from flatmount.mount import mount

    try:
        with mount(store, "z") as merged:
            r = object_refs(store, objpath(D["d1"]))
            mounts = [u for u in r.users if u.kind == "mount"]
            assert len(mounts) == 1 and merged in mounts[0].detail and "live" in mounts[0].detail
    finally:
        assert not unmount_all_under(tmp_path)


def test_additional_store_counts_as_shared(tmp_path):
    E = {"e1": content("e1", 6000)}
    F = {"f1": content("f1", 7000)}
    ais = new_store(tmp_path / "ais")
    pull_image(ais, tmp_path / "a", "w", [E])
    ais.close()
    s = new_store(tmp_path / "store", additional=[str(tmp_path / "ais")])
    pull_image(s, tmp_path, "v", [E, F])
    assert s.layer(s.resolve_image("w").top_layer).store_root == str(tmp_path / "ais")
    r = usage(s)
    assert (r.objects, r.stored_bytes) == (1, 7000)
    assert (r.referenced_objects, r.referenced_bytes) == (2, 13000)
    assert (r.additional_objects, r.additional_bytes) == (1, 6000)
    assert r.logical_bytes == 13000 + 6000
    imgs = by_name(r)
    v, w = imgs["v"], imgs["w"]
    assert (v.total_bytes, v.unique_bytes, v.shared_bytes, v.additional_bytes) == (13000, 7000, 6000, 6000)
    assert (w.total_bytes, w.unique_bytes, w.shared_bytes, w.additional_bytes) == (6000, 0, 6000, 6000)
    assert w.store_root == str(tmp_path / "ais")
    refs = object_refs(s, objpath(E["e1"]))
    assert refs.locations == (str(tmp_path / "ais" / "objects" / objpath(E["e1"])),)
    assert {(u.kind, u.store_root) for u in refs.users} >= {("layer", str(tmp_path / "ais"))}
    assert {u.id for u in refs.users if u.kind == "image"} == {v.id, w.id}
    s.close()


def run_cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().out


def test_cli_reports(store, capsys):
    root = ["--root", str(store.root), "--runroot", str(store.runroot)]
    rc, out = run_cli(capsys, "objects", "images", "--json", *root)
    assert rc == 0
    imgs = {i["names"][0]: i for i in json.loads(out)}
    assert imgs["y:latest"]["unique_bytes"] == 4000 and imgs["x:latest"]["shared_bytes"] == 6000
    rc, out = run_cli(capsys, "objects", *root, "--json")
    assert rc == 0 and json.loads(out)["logical_bytes"] == 21000
    rc, out = run_cli(capsys, "objects", "usage", *root)
    assert rc == 0 and "dedup ratio 1.40 over 3 images" in out
    rc, out = run_cli(capsys, "objects", "images", *root)
    assert rc == 0 and out.splitlines()[0].split()[:2] == ["IMAGE", "ID"] and "y:latest" in out
    rc, out = run_cli(capsys, "objects", "refs", objpath(B["b1"]), *root, "--json")
    assert rc == 0 and {u["kind"] for u in json.loads(out)["users"]} == {"layer", "image"}
    rc, out = run_cli(capsys, "objects", "top", "-n", "1", *root, "--json")
    assert rc == 0 and json.loads(out)["largest"][0]["size"] == 5000
    rc, out = run_cli(capsys, "objects", "share", *root)
    assert rc == 0 and "6.0 kB" in out.splitlines()[1]
    with pytest.raises(SystemExit) as ei:          # a malformed digest is a usage error (issue 16)
        main(["objects", "refs", "nonsense", *root])
    assert ei.value.code == 2
