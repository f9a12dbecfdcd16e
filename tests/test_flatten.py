"""flatten: OCI layer semantics on trees, checked by tables and against the kernel's own overlayfs."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_compiled, require_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layerdirs import extract, mount_overlay, umount

from flatmount.flatten import apply_layer, default_root, flatten_trees
from flatmount.image.tree import OPAQUE_XATTR, S_IFCHR, S_IFIFO, Inode, lookup, walk
from flatmount.sources.directory import scan_directory
from flatmount.store import paths as store_paths
from flatmount.store import reftable
from tests.test_erofs import trees as erofs_trees

# --- helpers --------------------------------------------------------------------------------------


def D(entries: dict | None = None, mode: int = 0o755, **kw) -> Inode:  # noqa: N802 - table shorthand
    d = Inode.directory(mode, **kw)
    d.entries.update({k.encode(): v for k, v in (entries or {}).items()})
    return d


def F(data: bytes = b"", mode: int = 0o644, **kw) -> Inode:  # noqa: N802
    return Inode.file(data, mode, **kw)


def L(target: str, **kw) -> Inode:  # noqa: N802
    return Inode.symlink(target.encode(), **kw)


def W() -> Inode:  # noqa: N802
    return Inode.whiteout()


def OPQ(entries: dict | None = None, **kw) -> Inode:  # noqa: N802
    d = D(entries, **kw)
    d.xattrs[OPAQUE_XATTR] = b"y"
    return d


def root(entries: dict | None = None, **kw) -> Inode:
    """A layer root with attributes of its own (mtime 1), like a tar with a `./` entry."""
    kw.setdefault("mtime_ns", 1)
    return D(entries, **kw)


def listing(tree: Inode) -> dict[str, str]:
    """path -> short description, the form the tables compare."""
    out = {}
    for path, node in walk(tree):
        if node.is_dir:
            desc = f"d{node.mode & 0o7777:o}"
        elif node.is_reg:
            desc = "f:" + (node.content or b"").decode()
        elif node.is_symlink:
            desc = "l:" + node.target.decode()
        else:
            desc = stat.filemode(node.mode)[0] + f"{os.major(node.rdev)}:{os.minor(node.rdev)}"
        out[path.decode()] = desc
    return out


def snapshot(tree: Inode) -> list:
    """Everything about a tree, identity of every inode included, for copy-on-write checks."""
    return [(p, id(n), n.attrs(), None if n.entries is None else sorted(n.entries)) for p, n in walk(tree)]


# --- semantics tables -----------------------------------------------------------------------------

BASE = root({
    "etc": D({"a": F(b"a"), "b": F(b"b"), "sub": D({"x": F(b"x")})}),
    "opt": D({"app": D({"one": F(b"1"), "two": F(b"2")})}),
    "f": F(b"file"),
    "l": L("etc"),
})

CASES = {
    "whiteout removes a file": (
        root({"etc": D({"a": W()})}),
        {"/etc/a": None, "/etc/b": "f:b"}),
    "whiteout removes a whole directory": (
        root({"opt": W()}),
        {"/opt": None, "/opt/app": None, "/opt/app/one": None}),
    "whiteout of a missing name is a no-op": (
        root({"nope": W(), "etc": D({"zz": W()})}),
        {"/nope": None, "/etc/zz": None, "/etc/a": "f:a"}),
    "opaque dir hides lower children": (
        root({"opt": D({"app": OPQ({"three": F(b"3")})})}),
        {"/opt/app": "d755", "/opt/app/one": None, "/opt/app/two": None, "/opt/app/three": "f:3"}),
    "opaque dir where nothing was below": (
        root({"new": OPQ({"k": F(b"k")})}),
        {"/new": "d755", "/new/k": "f:k"}),
    "directory meeting a directory keeps children, takes attributes": (
        root({"etc": D({"c": F(b"c")}, mode=0o700)}),
        {"/etc": "d700", "/etc/a": "f:a", "/etc/c": "f:c", "/etc/sub/x": "f:x"}),
    "file replaces a directory": (
        root({"opt": F(b"now a file")}),
        {"/opt": "f:now a file", "/opt/app": None}),
    "directory replaces a file": (
        root({"f": D({"in": F(b"in")})}),
        {"/f": "d755", "/f/in": "f:in"}),
    "symlink replaces a directory": (
        root({"etc": L("/elsewhere")}),
        {"/etc": "l:/elsewhere", "/etc/a": None}),
    "directory replaces a symlink": (
        root({"l": D({"x": F(b"x")})}),
        {"/l": "d755", "/l/x": "f:x"}),
    "fifo replaces a file; real device kept": (
        root({"f": Inode(S_IFIFO | 0o600), "null": Inode(S_IFCHR | 0o666, rdev=os.makedev(1, 3))}),
        {"/f": "p0:0", "/null": "c1:3"}),
    "whiteout inside a new directory vanishes": (
        root({"fresh": D({"gone": W(), "kept": F(b"k")})}),
        {"/fresh/gone": None, "/fresh/kept": "f:k"}),
    "opaque dir re-adding one lower name": (
        root({"etc": OPQ({"a": F(b"A2")})}),
        {"/etc/a": "f:A2", "/etc/b": None, "/etc/sub": None}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_semantics(name):
    layer, expect = CASES[name]
    before_base, before_layer = snapshot(BASE), snapshot(layer)
    out = listing(apply_layer(BASE, layer))
    for path, desc in expect.items():
        assert out.get(path) == desc, (path, out)
    # copy-on-write: neither input changed, not even by identity
    assert snapshot(BASE) == before_base
    assert snapshot(layer) == before_layer


def test_result_has_no_whiteouts_or_opaque_markers():
    layers = [BASE, root({"opt": OPQ({"z": W(), "y": OPQ({"q": W()})}), "etc": D({"a": W()})}, xattrs={
        OPAQUE_XATTR: b"y"})]
    out = flatten_trees(layers)
    for path, node in walk(out):
        assert not node.is_whiteout, path
        assert OPAQUE_XATTR not in node.xattrs, path
    # the opaque root hid everything from below: only the layer's own entries remain, whiteouts gone
    assert listing(out) == {"/": "d755", "/etc": "d755", "/opt": "d755", "/opt/y": "d755"}


def test_directory_attributes_replaced_entirely():
    base = root({"d": D({"c": F()}, mode=0o755, uid=1, gid=2, mtime_ns=5, xattrs={b"user.a": b"1"})})
    layer = root({"d": D(mode=0o1777, uid=3, gid=4, mtime_ns=9, xattrs={b"user.b": b"2"})})
    d = lookup(apply_layer(base, layer), "d")
    assert (d.mode, d.uid, d.gid, d.mtime_ns, d.xattrs) == (stat.S_IFDIR | 0o1777, 3, 4, 9, {b"user.b": b"2"})
    assert list(d.entries) == [b"c"]


def test_leaves_are_shared_not_copied_and_untouched_subtrees_shared():
    layer = root({"etc": D({"c": F(b"c")})})
    out = apply_layer(BASE, layer)
    assert out.entries[b"opt"] is BASE.entries[b"opt"]          # untouched subtree
    assert out.entries[b"etc"].entries[b"sub"] is BASE.entries[b"etc"].entries[b"sub"]
    assert out.entries[b"etc"] is not BASE.entries[b"etc"]      # on the changed path: new
    assert out.entries[b"etc"].entries[b"c"] is layer.entries[b"etc"].entries[b"c"]
    assert out is not BASE and out is not layer


# --- hardlinks ------------------------------------------------------------------------------------

def test_hardlinks_stay_shared_and_survive_replacement_of_one_name():
    h = F(b"shared", uid=7)
    base = root({"a": h, "d": D({"b": h}), "c": h})
    out1 = flatten_trees([base])
    assert out1.entries[b"a"] is lookup(out1, "d/b") is out1.entries[b"c"]
    out2 = apply_layer(out1, root({"a": F(b"new")}))
    assert out2.entries[b"a"] is not h
    assert lookup(out2, "d/b") is h and out2.entries[b"c"] is h
    out3 = apply_layer(out2, root({"d": D({"b": W()})}))
    assert lookup(out3, "d/b") is None and out3.entries[b"c"] is h


def test_hardlink_group_introduced_by_upper_layer():
    g = F(b"g")
    out = flatten_trees([BASE, root({"etc": D({"a": g}), "opt": D({"app": D({"one": g})})})])
    assert lookup(out, "etc/a") is lookup(out, "opt/app/one") is g
    assert lookup(out, "opt/app/two").content == b"2"


# --- root directory rule ----------------------------------------------------------------------------

def attrs(node: Inode) -> tuple:
    return node.mode, node.uid, node.gid, node.mtime_ns, node.xattrs


ROOT_CASES = {
    "no layer has a root entry: 0755 root:root mtime 0": (
        [D({"a": F()}), D({"b": F()})], (stat.S_IFDIR | 0o755, 0, 0, 0, {})),
    "topmost explicit root wins": (
        [root(mode=0o700, uid=1, mtime_ns=10), root(mode=0o750, uid=2, mtime_ns=20)],
        (stat.S_IFDIR | 0o750, 2, 0, 20, {})),
    "implicit top root keeps the root from below": (
        [root(mode=0o700, uid=1, mtime_ns=10, xattrs={b"user.r": b"1"}), D({"x": F()})],
        (stat.S_IFDIR | 0o700, 1, 0, 10, {b"user.r": b"1"})),
    "explicit root in the middle, implicit on top": (
        [root(mtime_ns=1), root(mode=0o555, mtime_ns=2), D()],
        (stat.S_IFDIR | 0o555, 0, 0, 2, {})),
    "opaque implicit root hides content but keeps attributes": (
        [root(mode=0o711, mtime_ns=3, entries={"a": F()}), OPQ({"b": F()})],
        (stat.S_IFDIR | 0o711, 0, 0, 3, {})),
    "xattrs alone make a root explicit": (
        [root(mode=0o700, mtime_ns=3), D(xattrs={b"user.x": b"y"})],
        (stat.S_IFDIR | 0o755, 0, 0, 0, {b"user.x": b"y"})),
}


@pytest.mark.parametrize("name", list(ROOT_CASES))
def test_root_rule(name):
    layers, expect = ROOT_CASES[name]
    out = flatten_trees(layers)
    assert attrs(out) == expect
    if "opaque" in name:
        assert list(out.entries) == [b"b"]


def test_empty_chain_and_default_root():
    assert flatten_trees([]) == default_root()
    assert attrs(default_root()) == (stat.S_IFDIR | 0o755, 0, 0, 0, {})


def test_apply_layer_rejects_non_directories():
    with pytest.raises(ValueError):
        apply_layer(F(), D())


# --- against the kernel: overlayfs of the layers as plain directories -------------------------------

NAMES = st.sampled_from([b"a", b"b", b"c", b"d"])
OWNERS = st.sampled_from([0, 1, 1000, 65534])
MTIMES = st.integers(1, 2**31).map(lambda s: s * 1_000_000_000) | st.integers(1, 2**40)
XATTRS = st.dictionaries(st.sampled_from([b"user.k1", b"user.k2", b"user.long.name"]),
                         st.binary(max_size=8), max_size=2)
DATA = st.sampled_from([b"", b"x", b"same", b"y" * 64, b"z" * 65, b"w" * 5000])


def _file(data: bytes, mode: int, uid: int, gid: int, mtime: int, xattrs: dict) -> Inode:
    if len(data) <= 64:
        return Inode.file(data, mode, uid=uid, gid=gid, mtime_ns=mtime, xattrs=xattrs)
    from objects.digest import fsverity_digest

    return Inode(stat.S_IFREG | mode, uid=uid, gid=gid, mtime_ns=mtime, size=len(data), xattrs=xattrs,
                 digest=fsverity_digest(data))


FILES = st.builds(_file, DATA, st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2711, 0o444]),
                  OWNERS, OWNERS, MTIMES, XATTRS)
LEAVES = st.one_of(
    FILES,
    st.builds(lambda t, u, g, m: Inode.symlink(t, uid=u, gid=g, mtime_ns=m),
              st.sampled_from([b"a", b"../b", b"/etc/passwd", b"c/d"]), OWNERS, OWNERS, MTIMES),
    st.just(None).map(lambda _: Inode.whiteout()),
    st.builds(lambda m: Inode(stat.S_IFIFO | 0o644, mtime_ns=m), MTIMES),
)
DIR_MODES = st.sampled_from([0o755, 0o700, 0o1777, 0o555, 0o2750])


def _dir(entries: dict, mode: int, uid: int, gid: int, mtime: int, xattrs: dict, opaque: bool) -> Inode:
    d = Inode.directory(mode, uid=uid, gid=gid, mtime_ns=mtime, xattrs=dict(xattrs), entries=dict(entries))
    if opaque:
        d.xattrs[OPAQUE_XATTR] = b"y"
    return d


def _dirs(children, opaque=None, min_size=0):
    return st.builds(_dir, st.dictionaries(NAMES, children, min_size=min_size, max_size=4), DIR_MODES,
                     OWNERS, OWNERS, MTIMES, XATTRS, st.booleans() if opaque is None else opaque)


TREES = st.recursive(LEAVES, _dirs, max_leaves=12)


@st.composite
def layer_trees(draw):
    """A layer: a root with attributes of its own (not opaque: the root rule has its table above),
    plus hardlinks made by pointing some names at another file of the same layer."""
    root_ = draw(_dirs(TREES, opaque=st.just(False), min_size=2))
    files = [(parent, name) for _, parent in walk(root_) if parent.entries is not None
             for name, n in sorted(parent.entries.items()) if n.is_reg]
    if len(files) >= 2:
        for _ in range(draw(st.integers(0, 2))):
            (pa, na), (pb, nb) = draw(st.permutations(files))[:2]
            pb.entries[nb] = pa.entries[na]
    return root_


def _blobs() -> dict[bytes, bytes]:
    """Content of the generated files that are too big to inline, by fs-verity digest."""
    from objects.digest import fsverity_digest

    return {fsverity_digest(d): d for d in (b"z" * 65, b"w" * 5000)}


def normalized(tree: Inode) -> tuple[dict, set]:
    """path -> comparable attributes (overlay's own xattrs dropped), and the hardlink groups."""
    out, groups = {}, {}
    for path, n in walk(tree):
        data = n.content or b"" if n.is_reg and n.digest is None else n.digest
        xattrs = sorted((k, v) for k, v in n.xattrs.items() if not k.startswith(b"trusted.overlay."))
        out[path] = (n.mode, n.uid, n.gid, n.mtime_ns, None if n.is_dir else n.size, n.rdev, xattrs,
                     n.target, data if n.is_reg else None)
        if not n.is_dir:
            groups.setdefault(id(n), []).append(path)
    return out, {frozenset(g) for g in groups.values() if len(g) > 1}


def assert_same_tree(actual: Inode, expected: Inode) -> None:
    a, ag = normalized(actual)
    e, eg = normalized(expected)
    assert sorted(a) == sorted(e)
    for path in e:
        assert a[path] == e[path], path
    assert ag == eg


def test_against_kernel_overlay(tmp_path_factory):
    require_root()

    @settings(max_examples=int(os.environ.get("FLATTEN_EXAMPLES", "25")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(layer_trees(), min_size=2, max_size=5))
    def check(layers):
        work = tmp_path_factory.mktemp("chain")
        blobs = _blobs()
        dirs = []
        for i, layer in enumerate(layers):
            d = str(work / f"l{i}")
            extract(layer, d, blobs)
            dirs.append(d)
        mnt = work / "ovl"
        mnt.mkdir()
        before = [snapshot(t) for t in layers]
        expected = flatten_trees(layers)
        assert [snapshot(t) for t in layers] == before
        (work / "empty").mkdir()  # overlayfs without an upper dir wants two lower layers at least
        mount_overlay([*dirs[::-1], str(work / "empty")], str(mnt))
        try:
            actual = scan_directory(mnt)
        finally:
            umount(str(mnt))
        assert_same_tree(actual, expected)
        check_image(expected, blobs, work)

    check()


def check_image(expected: Inode, blobs: dict[bytes, bytes], work) -> None:
    """The flattened tree written as an EROFS image and mounted reads back the same."""
    from flatmount.image.writer import write_image
    from flatmount.kernel.kmount import mount_image, umount_image
    from objects.paths import object_path

    objdir = work / "objects"
    for digest, data in blobs.items():
        p = objdir / object_path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    image = work / "flat.erofs"
    write_image(expected, str(image))
    mnt = work / "img"
    mnt.mkdir()
    mount_image(str(image), str(mnt), [str(objdir)])
    try:
        actual = scan_directory(mnt)
    finally:
        umount_image(str(mnt))
    assert_same_tree(actual, expected)


# --- store integration ----------------------------------------------------------------------------

BIG = [bytes([i]) * (1000 + i) for i in range(1, 4)]
CHAIN = [
    {"etc/os": b"base", "usr/bin/tool": BIG[0], "data/a": b"a"},
    {"data/a": b"<whiteout>", "data/b": b"b", "usr/bin/tool2": BIG[1]},
    {"etc/os": b"top", "etc/big": BIG[2]},
]


def chain_trees():
    from layerdirs import file_tree

    return [file_tree(files, mtime_ns=(i + 1) * 10**18) for i, files in enumerate(CHAIN)]


def image_files(root: Inode) -> set[str]:
    return {os.fsdecode(p) for p, n in walk(root) if not n.is_dir}


def test_flatten_image_writes_once_and_records_no_refs(tmp_path):
    from layerdirs import store_image

    from flatmount.api import open_store
    from flatmount.flatten import flatten_image
    from flatmount.image.reader import read_tree

    store = open_store(tmp_path / "p", runroot=tmp_path / "run")
    ids = store_image(store, chain_trees(), "chain", blobs=BIG)
    flat = flatten_image(store, "chain")
    assert not flat.reused and flat.chain_key == ids[-1] and flat.layers == tuple(ids)
    assert flat.path == str(tmp_path / "p" / "images" / f"{flat.digest}.erofs")
    import hashlib

    with open(flat.path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == flat.digest
    tree = read_tree(flat.path)
    assert image_files(tree) == {"/etc/os", "/etc/big", "/usr/bin/tool", "/usr/bin/tool2", "/data/b"}
    assert lookup(tree, "etc/os").content == b"top"
    db = store.connect()
    assert db.execute("SELECT digest FROM flat_images WHERE chain_key = ?", (ids[-1],)).fetchone() == (
        flat.digest,)
    # no refs rows of its own: every object it references is one of its chain's layers' (their refs)
    assert reftable.objects_of(db, "flat:" + flat.digest) == []
    from objects.paths import object_path

    used = {object_path(n.digest) for _, n in walk(tree) if n.digest}
    layer_refs = {o for (owner, o) in reftable.rows(db) if owner[6:] in ids}
    assert len(used) == 3 and used <= layer_refs
    from flatmount.store.paths import wait_derived

    wait_derived()   # its tree cache and diff index, written in the background
    assert os.listdir(tmp_path / "p" / "tmp") == []
    # second time: the cache, nothing written
    before = sorted(os.listdir(tmp_path / "p" / "images"))
    mtime = os.stat(flat.path).st_mtime_ns
    again = flatten_image(store, store.resolve_image("chain").id[:12])
    assert again.reused and again.digest == flat.digest and again.path == flat.path
    assert sorted(os.listdir(tmp_path / "p" / "images")) == before and os.stat(flat.path).st_mtime_ns == mtime


@pytest.mark.parametrize("prefix_in_memory", [False, True])
def test_longest_cached_prefix_gives_the_same_bytes(tmp_path, monkeypatch, prefix_in_memory):
    from layerdirs import store_image

    from flatmount import flatten
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image
    from flatmount.store import integrity as store_mod

    trees = chain_trees()
    a = open_store(tmp_path / "a", runroot=tmp_path / "run")
    ids = store_image(a, trees[:2], "two", blobs=BIG)
    store_image(a, trees[2:], "three", parent=ids[-1], blobs=BIG)
    two = flatten_image(a, "two")                  # caches the prefix (file, and tree in memory)
    assert (two.digest in flatten._trees) is True
    if not prefix_in_memory:
        monkeypatch.setattr(flatten.trees, "_trees", {})  # a new process: the prefix is read from its file
    asked = []
    orig = store_mod.read_layer_tree
    monkeypatch.setattr(store_mod, "read_layer_tree", lambda rec: asked.append(rec.id) or orig(rec))
    top = flatten_image(a, "three")
    assert len(asked) == 1 and asked[0] == top.chain_key   # only the layer above the cached prefix
    monkeypatch.setattr(store_mod, "read_layer_tree", orig)
    b = open_store(tmp_path / "b", runroot=tmp_path / "run")   # same chain, from scratch
    store_image(b, trees, "three", blobs=BIG)
    scratch = flatten_image(b, "three")
    assert scratch.chain_key == top.chain_key and scratch.digest == top.digest


def _helper_run(tmp_path, monkeypatch, name: str, in_child=None) -> tuple[str, str, list[int]]:
    """Flatten the test chain with the two-process writer forced (and `in_child(monkeypatch)` applied
    in the helper only, to make it fail), and again with one process; (digests, helper pids)."""
    from layerdirs import store_image

    from flatmount import flatten
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image

    trees = chain_trees()
    monkeypatch.setattr(flatten.helper, "HELPER_MIN_INODES", 0)
    monkeypatch.setattr(flatten.helper, "_helper_pays", lambda prefix, chain: True)  # even with 1 CPU
    pids: list[int] = []
    real_fork = os.fork

    def fork():
        pid = real_fork()
        if pid == 0 and in_child is not None:
            in_child(monkeypatch)
        elif pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    threads = []
    start = flatten.DERIVERS.start
    monkeypatch.setattr(flatten.DERIVERS, "start", lambda *a: threads.append(a) or start(*a))
    a = open_store(tmp_path / f"{name}-2", runroot=tmp_path / "run")
    store_image(a, trees, "chain", blobs=BIG)
    two = flatten_image(a, "chain")
    store_paths.wait_derived()
    # its tree cache and diff index: written by the helper when it wrote its half, else by a thread
    assert flatten.load_tree_cache(two.path) is not None and os.path.exists(store_paths.derived_paths(two.path)[1])
    assert bool(threads) == (in_child is not None)
    monkeypatch.setattr(os, "fork", real_fork)
    monkeypatch.setattr(flatten.helper, "HELPER", False)
    monkeypatch.setattr(flatten.helper, "_helper_pays", lambda prefix, chain: False)
    b = open_store(tmp_path / f"{name}-1", runroot=tmp_path / "run")
    store_image(b, trees, "chain", blobs=BIG)
    one = flatten_image(b, "chain")
    store_paths.wait_derived()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids), "helper process not reaped"
    with open(two.path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == two.digest
    return two.digest, one.digest, pids


def test_two_process_writer_writes_the_same_image(tmp_path, monkeypatch):
    two, one, pids = _helper_run(tmp_path, monkeypatch, "ok")
    assert len(pids) == 1 and two == one


def _fail_build(monkeypatch):
    from flatmount import flatten
    monkeypatch.setattr(flatten.imagecache, "_chain_tree", lambda *a, **k: 1 / 0)


def _hang(monkeypatch):
    from flatmount import flatten
    monkeypatch.setattr(flatten.imagecache, "_chain_tree", lambda *a, **k: time.sleep(3600))


def _die_while_writing(monkeypatch):
    from flatmount.image import writer

    emit = writer._emit_inodes
    monkeypatch.setattr(writer, "_emit_inodes",
                        lambda buf, lay, lo, hi: os._exit(3) if lo else emit(buf, lay, lo, hi))


def _other_tree(monkeypatch):
    from flatmount import flatten
    build = flatten.imagecache._chain_tree

    def other(*a, **k):
        tree = build(*a, **k)
        tree.entries[b"only-in-the-helper"] = Inode.file(b"x")
        return tree

    monkeypatch.setattr(flatten.imagecache, "_chain_tree", other)


@pytest.mark.parametrize("fail", [_fail_build, _hang, _die_while_writing, _other_tree])
def test_two_process_writer_without_its_helper(tmp_path, monkeypatch, fail):
    """The helper fails before the layout, hangs, dies half-way through writing, or lays out another
    tree: this process writes the whole image (killing the helper), the same bytes as alone."""
    two, one, pids = _helper_run(tmp_path, monkeypatch, fail.__name__, in_child=fail)
    assert len(pids) == 1 and two == one


def test_two_process_writer_when_fork_is_refused(tmp_path, monkeypatch):
    """No process to spare (fork fails): this process writes the image alone, nothing leaks."""
    import errno

    from layerdirs import store_image

    from flatmount import flatten
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image

    def refuse():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(flatten.helper, "_helper_pays", lambda prefix, chain: True)
    monkeypatch.setattr(os, "fork", refuse)
    a = open_store(tmp_path / "a", runroot=tmp_path / "run")
    store_image(a, chain_trees(), "chain", blobs=BIG)
    refused = flatten_image(a, "chain")
    monkeypatch.undo()
    monkeypatch.setattr(flatten.helper, "HELPER", False)
    b = open_store(tmp_path / "b", runroot=tmp_path / "run")
    store_image(b, chain_trees(), "chain", blobs=BIG)
    assert flatten_image(b, "chain").digest == refused.digest
    store_paths.wait_derived()
    a.close()
    b.close()
    assert len(os.listdir("/proc/self/fd")) == fds


HELPER_ORPHAN_CHILD = """
import os, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from flatmount import flatten
from flatmount.api import open_store
flatten.helper._helper_pays = lambda prefix, chain: True
build = flatten.imagecache._chain_tree
parent = os.getpid()

def slow_here(*a, **k):   # the parent builds slowly: the test kills it while the helper waits for it
    if os.getpid() == parent:
        print("forked", flush=True)
        time.sleep(60)
    return build(*a, **k)

flatten.imagecache._chain_tree = slow_here
store = open_store({store!r}, runroot={run!r}, config=os.devnull, additional=[])
flatten.flatten_image(store, "chain")
"""


def test_helper_of_a_killed_flatten_exits_and_holds_no_lock(tmp_path):
    """kill -9 of a flatten whose helper waits for it: the helper sees its pipes close and exits,
    and holds no GC lock meanwhile (it closed what it inherited)."""
    import fcntl
    import signal
    import subprocess
    import sys

    from layerdirs import store_image

    from flatmount.api import open_store

    store = open_store(tmp_path / "s", runroot=tmp_path / "run")
    store_image(store, chain_trees(), "chain", blobs=BIG)
    store.close()
    script = tmp_path / "orphan.py"
    root = Path(__file__).resolve().parent.parent
    script.write_text(HELPER_ORPHAN_CHILD.format(root=str(root), tests=str(root / "tests"),
                                                 store=str(tmp_path / "s"), run=str(tmp_path / "run")))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "forked"
        time.sleep(1.0)   # the helper has built its tree and waits for the parent's go
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = subprocess.run(["pgrep", "-f", str(script)], capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.05)
    else:
        for pid in left:
            os.kill(int(pid), signal.SIGKILL)
        raise AssertionError(f"helper still running: {left}")
    fd = os.open(tmp_path / "s" / "gc.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # nobody holds it any more
    finally:
        os.close(fd)


def test_helper_only_for_big_trees_and_when_memory_and_cpus_allow(monkeypatch):
    from types import SimpleNamespace

    from flatmount import flatten
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(flatten.helper, "_mem_available", lambda: 8 << 30)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.5, 0.5))
    big = [SimpleNamespace(inodes=15_000), SimpleNamespace(inodes=15_000)]
    assert not flatten.helper._helper_pays(None, big)   # off by default (see HELPER)
    monkeypatch.setattr(flatten.helper, "HELPER", True)
    assert flatten.helper._helper_pays(None, big)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 0.5, 0.5))
    assert not flatten.helper._helper_pays(None, big)                              # no CPU to spare
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 3.0, 3.0))
    assert flatten.helper._helper_pays(None, big)
    assert not flatten.helper._helper_pays(None, big[:1])                          # small
    assert not flatten.helper._helper_pays(None, [SimpleNamespace(inodes=None)])   # unknown
    monkeypatch.setattr(flatten.helper, "_mem_available", lambda: 100 << 20)
    assert not flatten.helper._helper_pays(None, big)                              # no room for a 2nd tree
    monkeypatch.setattr(flatten.helper, "_mem_available", lambda: 8 << 30)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not flatten.helper._helper_pays(None, big)                              # one CPU


def test_cache_in_additional_store_is_used_and_chains_cross_stores(tmp_path):
    from layerdirs import file_tree, store_image

    from flatmount.api import open_store
    from flatmount.errors import NotFoundError, ReadOnlyStoreError
    from flatmount.flatten import flatten_image

    ais_root = tmp_path / "ais"
    ais = open_store(ais_root, runroot=tmp_path / "run")
    ids = store_image(ais, chain_trees(), "base", blobs=BIG)
    in_ais = flatten_image(ais, "base")
    ais.close()
    os.chmod(ais_root, 0o555)  # nothing may write there from now on
    try:
        p = open_store(tmp_path / "p", additional=[ais_root], runroot=tmp_path / "run")
        got = flatten_image(p, "base")
        assert got.reused and got.path == in_ais.path and got.digest == in_ais.digest
        assert not os.path.exists(tmp_path / "p" / "images") or not os.listdir(tmp_path / "p" / "images")
        # a primary layer on top of the additional store's chain: prefix read from the AIS image
        store_image(p, [file_tree({"etc/os": b"mine", "new": BIG[0]}, mtime_ns=5 * 10**18)], "mine",
                    parent=ids[-1], blobs=BIG[:1])
        mine = flatten_image(p, "mine")
        assert not mine.reused and mine.path.startswith(str(tmp_path / "p" / "images"))
        assert mine.layers == (*ids, mine.chain_key)
        from flatmount.image.reader import read_tree

        assert lookup(read_tree(mine.path), "etc/os").content == b"mine"
        with pytest.raises(NotFoundError):
            flatten_image(p, "nonexistent")
        ro = open_store(tmp_path / "p", additional=[ais_root], runroot=tmp_path / "run", readonly=True)
        assert flatten_image(ro, "mine").reused
        os.unlink(mine.path)
        with pytest.raises(ReadOnlyStoreError):
            flatten_image(ro, "mine")
        assert not flatten_image(p, "mine").reused  # a recorded image whose file vanished is rebuilt
    finally:
        os.chmod(ais_root, 0o755)


def test_flatten_waits_for_a_running_gc(tmp_path):
    """Writing a new image happens under the shared GC lock: a GC holding it exclusively delays it."""
    import threading

    from layerdirs import store_image

    from flatmount.api import open_store
    from flatmount.flatten import flatten_image

    store = open_store(tmp_path / "p", runroot=tmp_path / "run")
    store_image(store, chain_trees(), "chain", blobs=BIG)
    gc = open_store(tmp_path / "p", runroot=tmp_path / "run")
    done = threading.Event()
    with gc.gc_lock(shared=False):
        t = threading.Thread(target=lambda: (flatten_image(store, "chain"), done.set()))
        t.start()
        assert not done.wait(0.5)
        assert os.listdir(tmp_path / "p" / "images") == []
    t.join(30)
    assert done.is_set()
    from flatmount.store.paths import wait_derived

    wait_derived()   # (written by a background thread once the image is recorded)
    assert sorted(os.path.splitext(n)[1] for n in os.listdir(tmp_path / "p" / "images")) == [
        ".erofs", ".index", ".tree"]   # the image and its derived files


# --- derived files: the tree cache (and the diff index) beside each flattened image -----------------

def test_tree_cache_round_trip_and_validation():
    from flatmount.image.treecache import tree_cache_bytes, tree_from_cache
    from tests.test_erofs import every_type_tree

    tree = every_type_tree()
    digest = "ab" * 32
    data = tree_cache_bytes(tree, digest, 12345)
    back = tree_from_cache(data, digest, 12345)
    assert back == tree
    assert back.entries[b"hard1"] is back.entries[b"dir"].entries[b"hard3"]   # hardlinks stay one inode
    assert back.entries[b"dir"].entries is not tree.entries[b"dir"].entries
    assert tree_from_cache(data, "cd" * 32, 12345) is None        # another image's
    assert tree_from_cache(data, digest, 12346) is None           # the image changed size
    assert tree_from_cache(data[:-1], digest, 12345) is None      # truncated
    for pos in (0, 60, len(data) // 2, len(data) - 1):              # damaged: checksum
        bad = bytearray(data)
        bad[pos] ^= 0x40
        assert tree_from_cache(bytes(bad), digest, 12345) is None
    # a well-formed file of the old (marshal) format is refused, never half-used
    import marshal
    import struct

    import xxhash

    old_head, old_magic = struct.Struct("<8s32sQQQ"), b"FMTREE02"
    for payload in ([], ([], [], [], [], []), ([(0o100644,) * 11], [0], [1], [b"x"], [0]),
                    ([(0o40755, 0, 0, 0, 0, 0, {}, None, None, None, None)], [0], [1], [b"x"], [-1])):
        blob = marshal.dumps(payload, 2)
        fake = old_head.pack(old_magic, bytes.fromhex(digest), 1, len(blob),
                             xxhash.xxh3_64_intdigest(blob)) + blob
        assert tree_from_cache(fake, digest, 1) is None


def test_flatten_uses_tree_cache_in_a_new_process(tmp_path, monkeypatch):
    """A prefix flattened earlier is loaded from its tree cache, not parsed; a missing or damaged cache
    is rebuilt from the image; the images are the same bytes either way."""
    from layerdirs import store_image

    from flatmount import flatten
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image
    from flatmount.image import reader
    from flatmount.store.paths import derived_paths

    trees = chain_trees()
    a = open_store(tmp_path / "a", runroot=tmp_path / "run")
    ids = store_image(a, trees[:2], "two", blobs=BIG)
    store_image(a, trees[2:], "three", parent=ids[-1], blobs=BIG)
    two = flatten_image(a, "two")
    tree_path, index_path = derived_paths(two.path)
    store_paths.wait_derived()   # (written by a background thread once the image is recorded)
    assert os.path.isfile(tree_path) and os.path.isfile(index_path)
    assert flatten.load_tree_cache(two.path) == reader.read_tree(two.path)
    assert os.listdir(tmp_path / "a" / "tmp") == []
    b = open_store(tmp_path / "b", runroot=tmp_path / "run")   # reference: the chain from scratch
    store_image(b, trees, "three", blobs=BIG)
    want = flatten_image(b, "three").digest

    def new_process(mode):
        root = tmp_path / f"a-{mode}"
        import shutil

        shutil.copytree(tmp_path / "a", root, symlinks=True)
        s = open_store(root, runroot=tmp_path / f"run-{mode}")
        tp = derived_paths(str(root / "images" / f"{two.digest}.erofs"))[0]
        if mode == "missing":
            os.unlink(tp)
        elif mode == "damaged":
            with open(tp, "r+b") as fh:
                fh.seek(os.path.getsize(tp) // 2)
                fh.write(b"\x00\x01\x02")
        monkeypatch.setattr(flatten.trees, "_trees", {})
        reads = []
        orig = reader.Image.root
        monkeypatch.setattr(reader.Image, "root", lambda self: reads.append(1) or orig(self))
        got = flatten_image(s, "three")
        monkeypatch.setattr(reader.Image, "root", orig)
        return got, reads, tp

    got, reads, _ = new_process("cached")
    assert got.digest == want and reads == []        # nothing parsed: the prefix and the new top
    for mode in ("missing", "damaged"):               # layer come from their tree caches
        got, reads, tp = new_process(mode)
        assert got.digest == want and len(reads) == 1   # the prefix image was parsed
        assert flatten.load_tree_cache(tp[: -len(".tree")] + ".erofs") is not None   # rewritten
    a.close()
    b.close()


def test_flatten_from_tree_caches_does_not_import_the_reader(tmp_path):
    """A new process extending a cached prefix by layers that have tree caches parses no image, so it
    does not import the EROFS reader either (its import alone cost more than decoding the caches)."""
    from layerdirs import store_image

    from flatmount.api import open_store
    from flatmount.flatten import flatten_image

    trees = chain_trees()
    a = open_store(tmp_path / "a", runroot=tmp_path / "run")
    ids = store_image(a, trees[:2], "two", blobs=BIG)
    store_image(a, trees[2:], "three", parent=ids[-1], blobs=BIG)
    flatten_image(a, "two")
    store_paths.wait_derived()
    a.close()
    code = ("import sys\n"
            "from flatmount.api import open_store\n"
            "from flatmount.store import paths\n"
            "s = open_store(sys.argv[1], runroot=sys.argv[2])\n"
            "flat = s.flatten('three')\n"
            "paths.wait_derived()\n"
            "s.close()\n"
            "print(flat.reused, 'flatmount.image.reader' in sys.modules)\n")
    r = _store_child(code, tmp_path)
    assert r.stdout.split() == ["False", "False"]


def test_flatten_leaves_the_store_cleaning_to_other_writers(tmp_path, monkeypatch):
    """Flatten (and its derived files) does not run the store's write-open cleaning (a DB check and
    scans of tmp/, objects/.tmp and layers/): what a crashed writer left goes at the next pull, rmi
    or gc write-open, and the image is the same."""
    from layerdirs import store_image

    from flatmount.api import open_store
    from flatmount.flatten import flatten_image
    from flatmount.store.core import Store

    trees = chain_trees()
    a = open_store(tmp_path / "a", runroot=tmp_path / "run")
    store_image(a, trees, "three", blobs=BIG)
    a.close()
    stale = tmp_path / "a" / "tmp" / "image-x.tmp"
    stale.write_bytes(b"x")
    calls = []
    clean = Store.clean_tmp
    monkeypatch.setattr(Store, "clean_tmp", lambda self: calls.append(1) or clean(self))
    s = open_store(tmp_path / "a", runroot=tmp_path / "run")
    flat = flatten_image(s, "three")
    store_paths.wait_derived()
    assert calls == [] and stale.exists()
    assert os.path.isfile(store_paths.derived_paths(flat.path)[0])
    b = open_store(tmp_path / "b", runroot=tmp_path / "run")   # the same chain, flattened after a pull's
    store_image(b, trees, "three", blobs=BIG)                   # write-open
    assert flatten_image(b, "three").digest == flat.digest
    calls.clear()
    s.ensure_writable()                                         # the next write-open cleans
    assert calls == [1] and not stale.exists()
    s.close()
    b.close()


def test_derived_files_backlog_is_bounded(tmp_path, monkeypatch):
    """Image after image: at most MAX_PENDING derived-file writers run (each holds its tree); all
    their files are there once waited for."""
    import threading
    import time

    from layerdirs import file_tree

    from flatmount import flatten
    from flatmount.api import open_store

    real = flatten.trees.tree_cache_bytes
    monkeypatch.setattr(flatten.trees, "tree_cache_bytes", lambda *a: time.sleep(0.2) or real(*a))
    store = open_store(tmp_path / "p", runroot=tmp_path / "run")
    paths = []
    for k in range(4):
        tree = file_tree({"etc/os": b"v%d" % k})
        with store.gc_lock(shared=True):
            paths.append(flatten.write_flat_image(store, tree)[1])
        alive = [t for t in threading.enumerate() if t.name == "flatmount-derived"]
        assert len(alive) <= flatten._Derivers.MAX_PENDING
    store_paths.wait_derived()
    assert all(os.path.isfile(p) for path in paths for p in store_paths.derived_paths(path))
    store.close()


def test_no_derived_files_written_into_an_additional_store(tmp_path):
    from layerdirs import store_image

    from flatmount import flatten
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image
    from flatmount.store.paths import derived_paths

    ais_root = tmp_path / "ais"
    ais = open_store(ais_root, runroot=tmp_path / "run")
    trees = chain_trees()
    ids = store_image(ais, trees[:2], "base", blobs=BIG)
    in_ais = flatten_image(ais, "base")
    store_image(ais, trees[2:], "top", parent=ids[-1], blobs=BIG)
    ais.close()
    os.unlink(derived_paths(in_ais.path)[0])
    before = sorted(os.listdir(ais_root / "images"))
    flatten._trees.clear()
    primary = open_store(tmp_path / "p", runroot=tmp_path / "run", additional=[str(ais_root)])
    top = flatten_image(primary, "top")
    assert not top.reused and top.path.startswith(str(tmp_path / "p"))
    store_paths.wait_derived()
    assert sorted(os.listdir(ais_root / "images")) == before            # nothing written there
    assert all(os.path.isfile(p) for p in derived_paths(top.path))      # the new image's are
    primary.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(erofs_trees(whiteouts=False))
def test_tree_cache_gives_the_image_bytes(tree):
    """The tree cache holds the tree an image was written from; written again it is the same image,
    as is the tree read back from the image: a chain flattened from either has the same digest."""
    from flatmount.image.reader import Image
    from flatmount.image.treecache import tree_cache_bytes, tree_from_cache
    from flatmount.image.writer import image_bytes

    data = image_bytes(tree)
    cached = tree_from_cache(tree_cache_bytes(tree, "00" * 32, len(data)), "00" * 32, len(data))
    assert image_bytes(cached) == data
    assert image_bytes(Image(data).root()) == data


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(erofs_trees(max_nodes=20), min_size=2, max_size=4))
def test_chain_over_a_decoded_prefix_gives_the_scratch_bytes(layers):
    """Random chains: the prefix's tree cache decoded by the compiled decoder and by the Python one,
    the top layer applied, written: the same bytes as the whole chain flattened from scratch."""
    from flatmount.image import treecache
    from flatmount.image.writer import image_bytes
    from tests.test_treecache import _compiled, _decoder

    want = image_bytes(flatten_trees(layers))
    prefix = flatten_trees(layers[:-1])
    size = len(image_bytes(prefix))
    cache = treecache.encode(prefix, "00" * 32, size)
    for module in (_compiled(), None):
        with _decoder(module):
            decoded = treecache.tree_from_cache(cache, "00" * 32, size)
        assert decoded is not None
        assert image_bytes(apply_layer(decoded, layers[-1])) == want


def test_applied_tree_is_filed_with_old_objects():
    """apply_layer builds new directories (dicts and inodes) with the GC paused; they hold no cycles
    and must not be left for the next young collections to walk (before the image is written)."""
    import gc

    base = Inode.directory(0o755)
    layer = Inode.directory(0o755)
    for d in range(200):
        sub = base.entries[b"d%d" % d] = Inode.directory(0o755)
        for f in range(10):
            sub.entries[b"f%d" % f] = Inode.file(b"x")
        layer.entries[b"d%d" % d] = Inode.directory(0o755, entries={b"new": Inode.file(b"y")})
    gc.disable()
    try:
        merged = apply_layer(base, layer)
        young = {id(o) for o in gc.get_objects(generation=0)}
        assert sum(1 for _, node in walk(merged) if id(node) in young) == 0
    finally:
        gc.enable()
    assert lookup(merged, b"/d7/new").content == b"y" and lookup(merged, b"/d7/f3").content == b"x"


def test_remembered_trees_are_freed_before_the_exit_collections(tmp_path):
    """A process that flattened drops its remembered trees at exit (after its derived-file writers)
    by reference counting, so the interpreter's shutdown collections do not walk a whole image's
    objects first.  Checked from an atexit handler registered before flatten (so it runs after ours):
    no Inode is alive there any more, and the derived files were written."""
    from layerdirs import store_image

    from flatmount.api import open_store

    trees = chain_trees()
    a = open_store(tmp_path / "a", runroot=tmp_path / "run")
    store_image(a, trees, "all", blobs=BIG)
    a.close()
    code = ("import atexit, gc, os, sys\n"
            "from flatmount.api import open_store\n"
            "from flatmount.image.tree import Inode\n"
            "from flatmount.store.paths import derived_paths\n"
            "def check():\n"
            "    alive = sum(1 for o in gc.get_objects() if type(o) is Inode)\n"
            "    have = [os.path.exists(p) for p in derived_paths(flat.path)]\n"
            "    print(alive, *have, flush=True)\n"
            "atexit.register(check)\n"
            "s = open_store(sys.argv[1], runroot=sys.argv[2])\n"
            "flat = s.flatten('all')\n"
            "assert not flat.reused\n")
    r = _store_child(code, tmp_path)
    assert r.stdout.split() == ["0", "True", "True"]


def _store_child(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter with the store at tmp_path/a (argv[1], runroot argv[2])."""
    root = str(Path(__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "run")], cwd=root,
                       env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


# --- the compiled merge (flatmount/image/_ctree.c) against the Python one ----------------------------

def _shape(node: Inode, inputs: set[int]) -> tuple:
    """What a merge result is, dict order and object identity included: an object of the inputs by
    its id (shared, not copied), a new directory by every slot and its entries in order."""
    if id(node) in inputs:
        return ("input", id(node))
    return ("new", node.mode, node.uid, node.gid, node.mtime_ns, node.size, node.rdev, list(node.xattrs.items()),
            node.target, node.content, node.digest, node.payload,
            None if node.entries is None else [(name, _shape(child, inputs)) for name, child in node.entries.items()])


def _ids(tree: Inode) -> set[int]:
    ids, todo = set(), [tree]
    while todo:
        node = todo.pop()
        ids.add(id(node))
        todo.extend((node.entries or {}).values())
    return ids


def _snapshot(tree: Inode) -> list:
    return [(path, n.mode, list(n.xattrs.items()), None if n.entries is None else list(n.entries))
            for path, n in walk(tree)]


def _merges():
    from flatmount.flatten import merge as merge_mod
    from flatmount.image import treecache

    require_compiled("flatmount.image._ctree")   # (its absence fails under CI)
    ctree, slots = treecache.compiled_tree()
    return merge_mod._merge_dir, lambda base, layer: ctree.merge(base, layer, Inode, slots, OPAQUE_XATTR)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_dirs(TREES), _dirs(TREES))
def test_compiled_merge_builds_what_the_python_merge_builds(base, layer):
    python, compiled = _merges()
    inputs = _ids(base) | _ids(layer)
    before = (_snapshot(base), _snapshot(layer))
    want = python(base, layer)
    got = compiled(base, layer)
    assert got is not None
    assert _shape(got, inputs) == _shape(want, inputs)
    assert (_snapshot(base), _snapshot(layer)) == before   # neither input changed


def test_compiled_merge_leaves_the_uncommon_to_the_python_code():
    """Anything but exact Inodes, dicts and bytes: None, nothing changed, and apply_layer's result
    is the Python code's."""
    python, compiled = _merges()

    class Sub(Inode):
        __slots__ = ()

    base = Inode.directory(0o755, entries={b"a": Inode.file(b"x")})
    for odd in ({b"s": Sub(stat.S_IFREG | 0o644)}, {"text": Inode.file(b"y")},
                {b"d": Inode.directory(0o700, xattrs={OPAQUE_XATTR: bytearray(b"y")})}):
        layer = Inode.directory(0o755, entries=odd)
        inputs = _ids(base) | _ids(layer)
        assert compiled(base, layer) is None
        assert _shape(apply_layer(base, layer), inputs) == _shape(python(base, layer), inputs)


def test_compiled_merge_takes_any_depth():
    """A layer nesting directories 5,000 deep (no recursion in C) over a base 3,000 deep."""
    python, compiled = _merges()
    base = layer = None
    for depth, top in ((3000, "base"), (5000, "layer")):
        root_ = node = Inode.directory(0o755)
        for _ in range(depth):
            child = Inode.directory(0o750)
            node.entries[b"d"] = child
            node = child
        node.entries[b"f"] = Inode.file(b"deep")
        if top == "base":
            base = root_
        else:
            layer = root_
    got = compiled(base, layer)
    node, depth = got, 0
    while b"d" in node.entries:
        node, depth = node.entries[b"d"], depth + 1
    assert depth == 5000 and node.entries[b"f"].content == b"deep"
