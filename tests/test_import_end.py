"""The end of a layer import (ImportBatch.add_layer/commit), made faster for layers of many small
files (issue 17): the objects' sync overlaps building the image, one walk gives the object list and
the inode count, refs rows go in as one statement.  Same results, same errors."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from flatmount.api import open_store
from flatmount.errors import LayerError
from flatmount.image.tree import Inode, count_inodes, inodes
from flatmount.store import batch as batchmod
from flatmount.store import reftable
from flatmount.store.batch import ImportBatch, tree_objects
from objects.errors import ObjectStoreError
from objects.paths import OBJPATH_RE


def _reference_objects(tree: Inode) -> frozenset[str]:
    """The definition (the code before): every distinct inode, its object path if external."""
    out = set()
    for node in inodes(tree):
        if node.entries is None and node.is_reg and node.is_external:
            p = node.object_path
            if p is None or not OBJPATH_RE.fullmatch(p):
                raise LayerError(f"file references a malformed object path {p!r}")
            out.add(p)
    return frozenset(out)


def _digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(4, "little")).digest()


def _tree() -> Inode:
    root = Inode.directory()
    sub = Inode.directory()
    root.entries[b"sub"] = sub
    root.entries[b"empty"] = Inode.directory()
    shared = Inode(0o100644, size=100, digest=_digest(1))
    sub.entries[b"a"] = shared
    sub.entries[b"hardlink"] = shared                      # one inode, two names
    sub.entries[b"same-content"] = Inode(0o100644, size=100, digest=_digest(1))
    sub.entries[b"b"] = Inode(0o100600, size=200, digest=_digest(2))
    sub.entries[b"payload"] = Inode(0o100644, size=300, payload=hashlib.sha256(b"p").hexdigest()[:2] + "/"
                                    + hashlib.sha256(b"p").hexdigest()[2:])
    sub.entries[b"both"] = Inode(0o100644, size=300, digest=_digest(3), payload="ab/" + "c" * 62)
    sub.entries[b"inline"] = Inode.file(b"small")
    sub.entries[b"inline-with-digest"] = Inode(0o100644, size=5, content=b"small", digest=_digest(4))
    sub.entries[b"empty-file"] = Inode.file(b"")
    sub.entries[b"link"] = Inode.symlink(b"a")
    sub.entries[b"dev"] = Inode(0o20644, rdev=os.makedev(1, 3), digest=_digest(5))  # not a regular file
    sub.entries[b"wh"] = Inode.whiteout()
    return root


def test_object_list_and_count_are_the_definitions():
    tree = _tree()
    objs, count = batchmod._tree_refs(tree)
    assert objs == _reference_objects(tree) == tree_objects(tree)
    assert count == count_inodes(tree)
    assert "ab/" + "c" * 62 in objs and batchmod.object_path(_digest(3)) not in objs


@pytest.mark.parametrize("bad", [
    {"payload": "../../etc/passwd"},
    {"payload": "AB/" + "c" * 62},
    {"digest": b"\x01" * 31},
])
def test_malformed_object_paths_are_refused_as_before(bad):
    tree = _tree()
    tree.entries[b"sub"].entries[b"bad"] = Inode(0o100644, size=100, **bad)
    with pytest.raises(LayerError, match="malformed object path"):
        _reference_objects(tree)
    with pytest.raises(LayerError, match="malformed object path"):
        tree_objects(tree)


def _store(tmp_path):
    return open_store(str(tmp_path / "store"), runroot=str(tmp_path / "run"), config=os.devnull, additional=[])


def test_objects_sync_overlaps_building_the_image(tmp_path, monkeypatch):
    """The sync has started by the time the image is built (before: only after it was written)."""
    import flatmount.image.writer as writer

    store = _store(tmp_path)
    sync_started = threading.Event()
    seen: list[bool] = []
    real_sync, real_image = type(store.objects).sync, writer.image_bytes

    def sync(self):
        sync_started.set()
        return real_sync(self)

    def image_bytes(tree):
        seen.append(sync_started.wait(10))
        return real_image(tree)

    monkeypatch.setattr(type(store.objects), "sync", sync)
    monkeypatch.setattr(writer, "image_bytes", image_bytes)
    with ImportBatch(store) as batch:
        digest = batch.objects.put_bytes(b"x" * 5000)
        root = Inode.directory()
        root.entries[b"f"] = Inode(0o100644, size=5000, digest=digest)
        lid = batch.add_layer(root, parent=None, diff_id="sha256:" + "cd" * 32)
        batch.set_image("ef" * 32, lid)
        batch.commit()
    assert seen == [True]
    db = store.connect()
    assert reftable.rows(db) == [(f"layer:{lid}", batchmod.object_path(digest))]


def test_a_failed_sync_fails_add_layer(tmp_path, monkeypatch):
    store = _store(tmp_path)

    def sync(self):
        raise ObjectStoreError("cannot make objects durable: EIO (test)")

    with ImportBatch(store) as batch:
        digest = batch.objects.put_bytes(b"y" * 5000)
        root = Inode.directory()
        root.entries[b"f"] = Inode(0o100644, size=5000, digest=digest)
        monkeypatch.setattr(type(store.objects), "sync", sync)
        with pytest.raises(ObjectStoreError, match="EIO"):
            batch.add_layer(root, parent=None, diff_id="sha256:" + "cd" * 32)
        assert batch._layers == []


def test_refs_rows_of_a_big_layer(tmp_path):
    """Every object of a layer gets its refs row (one statement over a JSON array), once."""
    store = _store(tmp_path)
    with ImportBatch(store) as batch:
        digests = [batch.objects.put_bytes(i.to_bytes(4, "little") * 25) for i in range(3000)]
        root = Inode.directory()
        for i, d in enumerate(digests):
            root.entries[f"f{i}".encode()] = Inode(0o100644, size=100, digest=d)
        root.entries[b"again"] = Inode(0o100644, size=100, digest=digests[0])
        lid = batch.add_layer(root, parent=None, diff_id="sha256:" + "12" * 32)
        batch.set_image("34" * 32, lid)
        batch.commit()
    rows = sorted(reftable.rows(store.connect()))
    assert rows == sorted((f"layer:{lid}", batchmod.object_path(d)) for d in digests)


def _small_files_tar(n: int) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for i in range(n):
            data = hashlib.sha256(b"%d" % i).digest() * (40 + i % 50)
            ti = tarfile.TarInfo(f"d{i // 100}/f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_bulk_helpers_finish_while_the_layer_is_staged(tmp_path):
    """read_tar returns once the bulk helpers have their input, not once they stored it: the batch
    waits for them before the objects' sync (add_layer), so staging the layer image overlaps their
    last writes; every object is there and recorded at commit."""
    import io

    from flatmount.sources.layers import read_tar

    store = _store(tmp_path)
    with ImportBatch(store) as batch:
        layer = read_tar(io.BytesIO(_small_files_tar(800)), batch.objects)
        pending = list(batch._objects._closing)
        assert len(pending) == 1 and pending[0]._bulk._procs  # helpers not waited for yet
        lid = batch.add_layer(layer.tree, parent=None, diff_id=layer.diff_id)
        assert batch._objects._closing == [] and pending[0]._bulk._procs == []
        batch.set_image("ab" * 32, lid)
        batch.commit()
    objs = tree_objects(layer.tree)
    assert len(objs) == 800
    assert all(os.path.isfile(store.objects_dir / o) for o in objs)
    db = store.connect()
    assert len(reftable.rows(db)) == 800


def test_a_failure_after_read_tar_stops_the_helpers_and_rolls_back(tmp_path):
    """An import failing after read_tar (e.g. a digest mismatch): the helpers still storing are
    stopped under the import's GC lock, and every object they created is removed."""
    import io

    from flatmount.sources.layers import read_tar

    store = _store(tmp_path)
    with pytest.raises(LayerError, match="test"), ImportBatch(store) as batch:  # noqa: PT012
        read_tar(io.BytesIO(_small_files_tar(800)), batch.objects)
        procs = list(batch._objects._closing[0]._bulk._procs)
        assert procs
        raise LayerError("digest mismatch (test)")
    assert all(p.returncode is not None for p in procs)
    left = [p for p in store.objects_dir.rglob("*") if p.is_file() and OBJPATH_RE.fullmatch(
        p.relative_to(store.objects_dir).as_posix())]
    assert left == []



def test_commit_checks_only_objects_the_batch_did_not_store(tmp_path, monkeypatch):
    """add_layer notes which of the layer's objects its batch did not store (a set difference while
    the objects' sync runs); commit looks for those alone on disk, and still refuses a missing one.
    An object a later layer of the batch stores counts as stored at commit, as before."""
    from flatmount.errors import StoreError
    from objects.digest import fsverity_digest

    store = _store(tmp_path)
    path = batchmod.object_path
    with ImportBatch(store) as batch:  # an object that was there before the imports below
        before = batch.objects.put_bytes(b"b" * 3000)
        root = Inode.directory()
        root.entries[b"x"] = Inode(0o100644, size=3000, digest=before)
        batch.set_image("56" * 32, batch.add_layer(root, parent=None, diff_id="sha256:" + "aa" * 32))
        batch.commit()
    looked: list[str] = []
    real_isfile = batchmod.os.path.isfile

    def isfile(p):
        looked.append(os.path.relpath(p, store.objects_dir))
        return real_isfile(p)

    monkeypatch.setattr(batchmod.os.path, "isfile", isfile)
    later = fsverity_digest(b"l" * 3000)  # in no store until a later layer of the batch puts it
    with ImportBatch(store) as batch:
        ours = batch.objects.put_bytes(b"o" * 3000)
        root = Inode.directory()
        root.entries[b"ours"] = Inode(0o100644, size=3000, digest=ours)
        root.entries[b"before"] = Inode(0o100644, size=3000, digest=before)
        root.entries[b"later"] = Inode(0o100644, size=3000, digest=later)
        batch.set_image("78" * 32, batch.add_layer(root, parent=None, diff_id="sha256:" + "bb" * 32))
        assert batch._layers[-1].refs == b"".join(sorted({ours, before, later}))
        assert batch._layers[-1].unproven == {path(before), path(later)}
        with pytest.raises(StoreError, match=f"references object {path(later)}, which is not in"):
            batch.commit()
    assert path(ours) not in looked and path(later) in looked
    looked.clear()
    with ImportBatch(store) as batch:  # the same, with a second layer storing `later`
        root = Inode.directory()
        root.entries[b"before"] = Inode(0o100644, size=3000, digest=before)
        root.entries[b"later"] = Inode(0o100644, size=3000, digest=later)
        lid = batch.add_layer(root, parent=None, diff_id="sha256:" + "dd" * 32)
        assert batch._layers[-1].unproven == {path(before), path(later)}
        root2 = Inode.directory()
        root2.entries[b"l"] = Inode(0o100644, size=3000, digest=batch.objects.put_bytes(b"l" * 3000))
        top = batch.add_layer(root2, parent=lid, diff_id="sha256:" + "ee" * 32)
        assert batch._layers[-1].unproven == frozenset()
        batch.set_image("9a" * 32, top)
        batch.commit()
    assert looked == [path(before)]  # stored by this batch by the time of the commit: not looked for
    assert reftable.objects_of(store.connect(), f"layer:{lid}") == sorted([path(before), path(later)])


def test_quick_gil_handoff_restores_the_interval_whatever_the_order(tmp_path):
    """Two threads in `_quick_gil_handoff` at once (e.g. the tree caches of two imports in one
    process), leaving in the other order than they came: the first in sets 0.2 ms, the last out
    restores what was there; an import leaves the interval as it found it."""
    import sys

    before = sys.getswitchinterval()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def a():
        with batchmod._quick_gil_handoff():
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with batchmod._quick_gil_handoff():
            b_in.set()
            a_out.wait()
            seen.append(sys.getswitchinterval())

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [pytest.approx(0.0002)] and sys.getswitchinterval() == before
    store = open_store(str(tmp_path / "s"), runroot=str(tmp_path / "r"), config=os.devnull, additional=[])
    try:
        with ImportBatch(store) as batch:
            root = Inode.directory()
            root.entries[b"f"] = Inode(0o100644, size=3000, digest=batch.objects.put_bytes(b"f" * 3000))
            batch.set_image("56" * 32, batch.add_layer(root, parent=None, diff_id="sha256:" + "12" * 32))
            batch.commit()
    finally:
        store.close()
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("size, expected", [(None, 256), (1 << 20, 256), (16 << 20, 16)])
def test_a_big_tarball_hands_its_small_files_to_the_helpers_early(tmp_path, monkeypatch, size, expected):
    """A tarball the caller says is big (`read_tar(size=)`, 16 MiB or more): its first 16 small
    files are stored in-process, the rest by the bulk helpers; otherwise the first 256 (a layer
    with a few files is not worth starting two processes).  The same objects either way."""
    import io

    from flatmount.sources.layers import read_tar
    from objects import bulk as bulkmod
    from objects.store import ObjectStore

    monkeypatch.setattr(bulkmod, "usable_cpus", lambda: 2)  # (what this counts, whatever the machine)
    in_process = []
    real = ObjectStore.put_bytes

    def put_bytes(self, data, expected=None):
        in_process.append(len(data))
        return real(self, data, expected)

    monkeypatch.setattr(ObjectStore, "put_bytes", put_bytes)
    store = _store(tmp_path)
    with ImportBatch(store) as batch:
        layer = read_tar(io.BytesIO(_small_files_tar(400)), batch.objects, size=size)
        batch.set_image("cd" * 32, batch.add_layer(layer.tree, parent=None, diff_id=layer.diff_id))
        batch.commit()
    assert len(in_process) == expected
    objs = tree_objects(layer.tree)
    assert len(objs) == 400 and all(os.path.isfile(store.objects_dir / o) for o in objs)
