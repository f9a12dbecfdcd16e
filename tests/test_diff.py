"""flatmount.diff: change semantics (podman image diff), fingerprint skipping, layer export round trips,
the image index cache, `flatmount diff`, and a comparison with podman itself."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import cstorage_fixtures
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount import diff as D
from flatmount.cli import main
from flatmount.diff import Change, DiffStats, ImageIndex, TreeIndex, changes, diff_images, export_layer
from flatmount.diff.index import _side_lookup
from flatmount.errors import ObjectNotFoundError
from flatmount.flatten import flatten_trees
from flatmount.image.tree import (
    S_IFBLK,
    S_IFCHR,
    S_IFIFO,
    S_IFREG,
    S_IFSOCK,
    Inode,
    lookup,
    object_path,
    walk,
)
from flatmount.image.writer import image_bytes, write_image
from flatmount.sources.layers import read_tar
from flatmount.store import paths as store_paths
from objects import ObjectStore

podman_stores = cstorage_fixtures.podman_stores   # the session fixture, requested by name below

S = 1_000_000_000
DIG1 = bytes.fromhex("1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64")
DIG2 = bytes(range(32))


def d(entries: dict | None = None, mode: int = 0o755, **kw) -> Inode:
    """A directory; `entries` values are inodes or nested dicts (plain 0755 directories)."""
    ents = {(k.encode() if isinstance(k, str) else k): (d(v) if isinstance(v, dict) else v)
            for k, v in (entries or {}).items()}
    return Inode.directory(mode, entries=ents, **kw)


def f(data: bytes = b"x", **kw) -> Inode:
    return Inode.file(data, **kw)


def ext(digest: bytes = DIG1, size: int = 1000, **kw) -> Inode:
    return Inode(S_IFREG | 0o644, size=size, digest=digest, **kw)


def lines(chs: list[Change]) -> list[str]:
    return [str(c) for c in chs]


# --- what differs -------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, loose, strict", [
    # mtime: c/storage sameFsTimeSpec (same second, either nanosecond part 0) unless strict
    (f(mtime_ns=S + 5), f(mtime_ns=S), (), ("mtime",)),
    (f(mtime_ns=S), f(mtime_ns=S + 5), (), ("mtime",)),
    (f(mtime_ns=S + 5), f(mtime_ns=S + 6), ("mtime",), ("mtime",)),
    (f(mtime_ns=S), f(mtime_ns=2 * S), ("mtime",), ("mtime",)),
    (f(mtime_ns=-1), f(mtime_ns=-S), (), ("mtime",)),            # -1 ns is second -1, nsec 999999999
    (f(mtime_ns=-1), f(mtime_ns=0), ("mtime",), ("mtime",)),
    (d(mtime_ns=S), d(mtime_ns=3 * S), ("mtime",), ("mtime",)),   # directories too (overlay walker)
    # size: never for directories
    (d(size=4096), d(size=27), (), ()),
    (f(b"ab"), f(b"abc"), ("size", "content"), ("size", "content")),
    # content without reading objects: inline bytes, digest, object path
    (f(b"ab"), f(b"cd"), ("content",), ("content",)),
    (ext(DIG1), ext(DIG2), ("content",), ("content",)),
    (ext(DIG1), Inode(S_IFREG | 0o644, size=1000, payload=object_path(DIG1)), (), ("content",)),
    (ext(DIG1), Inode(S_IFREG | 0o644, size=1000, digest=DIG1, payload=object_path(DIG1)), (), ()),
    (Inode(S_IFREG | 0o644), Inode(S_IFREG | 0o644, content=b""), (), ()),
    # xattrs: c/storage compares security.capability and user.* only
    (f(xattrs={b"user.a": b"1"}), f(xattrs={b"user.a": b"2"}), ("xattrs",), ("xattrs",)),
    (f(), f(xattrs={b"security.capability": b"c"}), ("xattrs",), ("xattrs",)),
    (f(), f(xattrs={b"security.selinux": b"l"}), (), ("xattrs",)),
    (f(xattrs={b"trusted.x": b"1"}), f(xattrs={b"trusted.x": b"2"}), (), ("xattrs",)),
    (f(xattrs={b"system.posix_acl_access": b"1"}), f(), (), ("xattrs",)),
    # the rest
    (f(mode=0o644), f(mode=0o4644), ("mode",), ("mode",)),
    (f(uid=1), f(uid=2, gid=3), ("uid", "gid"), ("uid", "gid")),
    (Inode.symlink(b"a"), Inode.symlink(b"bc"), ("size", "target"), ("size", "target")),
    (Inode(S_IFCHR | 0o600, rdev=os.makedev(1, 3)), Inode(S_IFCHR | 0o600, rdev=os.makedev(1, 5)),
     ("rdev",), ("rdev",)),
    (Inode(S_IFCHR | 0o600, rdev=259), Inode(S_IFBLK | 0o600, rdev=259), ("type",), ("type",)),
    (f(b""), d(mode=0o644), ("type",), ("type",)),
    (Inode(S_IFIFO | 0o644), Inode(S_IFSOCK | 0o644), ("type",), ("type",)),
])
def test_compare_inodes(a, b, loose, strict):
    assert D.compare_inodes(a, b) == loose
    assert D.compare_inodes(a, b, strict=True) == strict


# --- what is listed, and in which order ---------------------------------------------------------

def test_copy_of_one_file_matches_podman():
    """STORES.md section 3: a COPY of one file.  podman printed `C /usr/share/doc`, `C /usr`,
    `C /usr/share`, `A /usr/share/doc/f.txt` (its overlay walker inserts the ancestors of an added path
    just before it); we print the same set depth first, parents before children."""
    a = d({"usr": {"share": {"doc": d({"old": f()}, mtime_ns=S)}}})
    b = d({"usr": {"share": {"doc": d({"old": f(), "f.txt": f(b"hi")}, mtime_ns=2 * S)}}})
    podman = ["C /usr/share/doc", "C /usr", "C /usr/share", "A /usr/share/doc/f.txt"]
    got = lines(changes(a, b))
    assert got == ["C /usr", "C /usr/share", "C /usr/share/doc", "A /usr/share/doc/f.txt"]
    assert sorted(got) == sorted(podman)
    assert changes(a, b)[2].fields == ("mtime",)          # /usr/share/doc changed itself
    assert changes(a, b)[0].fields == ()                  # /usr only as an ancestor


def test_opaque_replacement_differs_from_podman_on_purpose():
    """STORES.md section 3: a layer that replaced /opt/app (opaque dir) made podman print `C /opt`,
    `D /opt/app`, `C /opt/app/a`: its overlay walker calls the opaque directory deleted and lists the
    new children that existed below as changed.  A tree comparison says what actually differs: the
    directory is still there (C, its mtime changed), `a` changed, `b` is gone."""
    a = d({"opt": d({"app": d({"a": f(b"old"), "b": f()}, mtime_ns=S)}, mtime_ns=S)})
    b = d({"opt": d({"app": d({"a": f(b"new", mtime_ns=5 * S)}, mtime_ns=5 * S)}, mtime_ns=S)})
    assert lines(changes(a, b)) == ["C /opt", "C /opt/app", "C /opt/app/a", "D /opt/app/b"]


@pytest.mark.parametrize("a, b, want", [
    # an added directory: it and everything below it
    (d(), d({"n": {"x": f(), "s": {"y": f()}}}), ["A /n", "A /n/s", "A /n/s/y", "A /n/x"]),
    # a deleted directory: only itself, and its ancestors as C
    (d({"p": {"q": {"x": f(), "y": {}}}}), d({"p": {}}), ["C /p", "D /p/q"]),
    # a modified file: only the file (its unchanged parents are not listed)
    (d({"etc": {"passwd": f(b"a")}}), d({"etc": {"passwd": f(b"b")}}), ["C /etc/passwd"]),
    # file -> directory: C, and its children are added
    (d({"x": f()}), d({"x": {"c": f()}}), ["C /x", "A /x/c"]),
    # directory -> file: C, the old children are not listed
    (d({"x": {"c": f()}}), d({"x": f()}), ["C /x"]),
    # the root itself is never listed
    (d(mode=0o755), d(mode=0o700, mtime_ns=S), []),
    (d({"a": f()}), d({"a": f()}), []),
    # order: depth first, byte order per directory (`/a-b` after everything below `/a`)
    (d({"a": {"x": f()}, "a-b": f(), "B": f()}),
     d({"a": {"x": f(b"1"), "y": f()}, "a-b": f(b"2"), "B": f(b"3")}),
     ["C /B", "C /a", "C /a/x", "A /a/y", "C /a-b"]),
    # a deep addition lists every ancestor once
    (d({"a": {"b": {"c": {}}}}), d({"a": {"b": {"c": {"n": f(), "m": f()}}}}),
     ["C /a", "C /a/b", "C /a/b/c", "A /a/b/c/m", "A /a/b/c/n"]),
])
def test_listing(a, b, want):
    assert lines(changes(a, b)) == want


def test_json_records_and_text():
    a = d({"f": f(b"ab", uid=1, xattrs={b"user.k": b"v"}, mtime_ns=S)})
    b = d({"f": f(b"ab", uid=2, xattrs={b"user.k": b"w"}, mtime_ns=S)})
    (c,) = changes(a, b)
    assert c.to_json() == {"path": "/f", "kind": "C", "changed": {
        "uid": {"before": 1, "after": 2},
        "xattrs": {"before": {"user.k": "v"}, "after": {"user.k": "w"}}}}
    assert D.format_changes(changes(d(), d({"n": f()}))) == "A /n\n"
    hash(c)                                                    # frozen records are usable in sets


def test_strict_mode_sees_hardlink_groups():
    shared = f(b"same")
    a = d({"x": f(b"same"), "y": f(b"same")})
    b = d({"x": shared, "y": shared})
    assert changes(a, b) == []                                 # c/storage does not look at nlink
    got = changes(a, b, strict=True)
    assert lines(got) == ["C /x", "C /y"]
    assert got[0].fields == ("links",) and got[0].after == ((b"/x", b"/y"),)


def test_same_objects_with_other_hardlinks_are_compared():
    """A subtree shared by both trees (as flatten shares them) is skipped unless its hardlinks differ."""
    shared = f(b"s")
    sub = d({"x": shared})
    a = d({"sub": sub, "other": shared})
    b = d({"sub": sub, "other": f(b"s")})
    assert changes(a, b) == []
    assert lines(changes(a, b, strict=True)) == ["C /other", "C /sub/x"]


# --- cost: unchanged subtrees are skipped -------------------------------------------------------

def big_tree(ndirs: int = 60, nfiles: int = 40, seed: int = 0) -> Inode:
    return d({f"d{i:03}": d({f"f{j:03}": f(b"%d-%d-%d" % (seed, i, j), mtime_ns=S)
                             for j in range(nfiles)} | {"sub": d({"z": f()})})
              for i in range(ndirs)})


def test_identical_subtrees_are_not_visited():
    a, b = big_tree(), big_tree()                            # equal but distinct objects
    ia, ib = TreeIndex(a), TreeIndex(b)
    assert ia.fingerprint() == ib.fingerprint()
    st = DiffStats()
    assert changes(ia, ib, stats=st) == []
    assert (st.dirs_compared, st.entries_compared, st.subtrees_skipped) == (0, 0, 1)
    lookup(b, "d017/sub").entries[b"z"] = f(b"changed")
    ib = TreeIndex(b)
    st = DiffStats()
    assert lines(changes(ia, ib, stats=st)) == ["C /d017/sub/z"]
    # root (60 entries), /d017 (41 entries), /d017/sub (1 entry), on both sides; the other 59
    # directories (41 entries each) are never entered
    assert st.dirs_compared == 3
    assert st.entries_compared == 2 * (60 + 41 + 1)
    assert st.subtrees_skipped == 59


def test_image_index_reads_only_changed_directories():
    a, b = big_tree(), big_tree()
    lookup(b, "d005").entries[b"new"] = f()
    ia, ib = ImageIndex.from_tree(a), ImageIndex.from_tree(b)
    st = DiffStats()
    assert lines(changes(ia, ib, stats=st)) == ["C /d005", "A /d005/new"]
    assert len(ib._recs) == len(ia._recs) == 2              # 2 of 121 directory records decoded
    assert st.dirs_compared == 2
    assert st.entries_compared == 2 * 60 + 41 + 42          # by set arithmetic, not one by one


@pytest.mark.parametrize("seed", range(6))
def test_image_index_big_directories(seed):
    """The set and halving arithmetic over directory records finds exactly what a plain walk finds."""
    import random

    rng = random.Random(seed)
    names = [b"n%05d" % i for i in rng.sample(range(100000), 3000)]
    a = d({n: f(n) for n in names} | {"sub": {n: f(n) for n in names[:50]}})
    b = d({n: f(n) for n in names} | {"sub": {n: f(n) for n in names[:50]}})
    for n in rng.sample(names, rng.choice([0, 1, 7, 300])):
        b.entries[n] = f(b"changed")
    for n in rng.sample(names, rng.choice([0, 1, 5, 100])):
        b.entries.pop(n, None)
    for _ in range(rng.choice([0, 1, 9])):
        b.entries[b"m%05d" % rng.randrange(100000)] = f()
    if seed % 2:
        lookup(b, "sub").entries[names[3]] = f(b"x")
    want = changes(a, b)
    assert changes(ImageIndex.from_tree(a), ImageIndex.from_tree(b)) == want
    assert changes(ImageIndex.from_tree(a), b) == want


def test_fingerprints_cover_everything():
    """Any single field changed anywhere changes the root fingerprint."""
    base = TreeIndex(big_tree(5, 3)).fingerprint()
    for edit in [lambda n: setattr(n, "mtime_ns", n.mtime_ns + 1), lambda n: setattr(n, "uid", 7),
                 lambda n: n.xattrs.__setitem__(b"security.selinux", b"x"),
                 lambda n: setattr(n, "content", b"other")]:
        t = big_tree(5, 3)
        edit(lookup(t, "d003/f002"))
        assert TreeIndex(t).fingerprint() != base
    t = big_tree(5, 3)
    lookup(t, "d001").entries[b"f000"] = lookup(t, "d002/f000")   # a new hardlink group
    assert TreeIndex(t).fingerprint() != base


# --- layer export ---------------------------------------------------------------------------------

def members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), errors="surrogateescape") as tf:
        return tf.getmembers()


def export_bytes(a, b, dirs=(), compression=None) -> tuple[bytes, D.LayerExport]:
    buf = io.BytesIO()
    res = export_layer(a, b, buf, list(dirs), compression)
    return buf.getvalue(), res


def test_export_members():
    shared = f(b"hard", mtime_ns=S)
    a = d({"etc": d({"gone": f(), "dir": {"x": f()}, "keep": f(b"k")}, mtime_ns=S),
           "opt": d({"app": d({"a": f(b"old"), "b": f(), "c": f()})}, mtime_ns=S)})
    b = d({"etc": d({"keep": f(b"k"), "h1": shared, "h2": shared,
                     "new": f(b"n", mtime_ns=S + 5, xattrs={b"user.k": b"\xff\x00v"})}, mtime_ns=2 * S),
           "opt": d({"app": d({"a": f(b"new")}, mtime_ns=3 * S)}, mtime_ns=S)})
    data, res = export_bytes(a, b)
    got = [(m.name, m.type, m.mode, m.size, m.linkname) for m in members(data)]
    assert got == [
        ("etc", tarfile.DIRTYPE, 0o755, 0, ""),
        ("etc/.wh.dir", tarfile.REGTYPE, 0, 0, ""),
        ("etc/.wh.gone", tarfile.REGTYPE, 0, 0, ""),
        ("etc/h1", tarfile.REGTYPE, 0o644, 4, ""),
        ("etc/h2", tarfile.LNKTYPE, 0o644, 0, "etc/h1"),
        ("etc/new", tarfile.REGTYPE, 0o644, 1, ""),
        ("opt", tarfile.DIRTYPE, 0o755, 0, ""),
        ("opt/app", tarfile.DIRTYPE, 0o755, 0, ""),
        ("opt/app/.wh..wh..opq", tarfile.REGTYPE, 0, 0, ""),   # 1 entry + marker beat 1 + 2 whiteouts
        ("opt/app/a", tarfile.REGTYPE, 0o644, 3, ""),
    ]
    new = members(data)[5]
    assert new.pax_headers["mtime"] == "1.000000005"
    assert new.pax_headers["SCHILY.xattr.user.k"].encode("utf-8", "surrogateescape") == b"\xff\x00v"
    assert (res.entries, res.whiteouts, res.opaque_dirs) == (10, 2, 1)
    assert res.diff_id == res.digest == "sha256:" + hashlib.sha256(data).hexdigest()


def test_export_is_deterministic_and_compresses(tmp_path):
    a, b = big_tree(8, 5), big_tree(8, 5, seed=1)
    plain, r0 = export_bytes(a, b)
    assert export_bytes(big_tree(8, 5), big_tree(8, 5, seed=1))[0] == plain
    gz, r1 = export_bytes(a, b, compression="gzip")
    assert gz == export_bytes(a, b, compression="gzip")[0]
    assert gz[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"   # no name, mtime 0
    assert gzip.decompress(gz) == plain and r1.diff_id == r0.diff_id and r1.digest != r1.diff_id
    zs, r2 = export_bytes(a, b, compression="zstd")
    assert zs == export_bytes(a, b, compression="zstd")[0]
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zs) == plain
    assert r2.diff_id == r0.diff_id
    out = tmp_path / "layer.tar.gz"
    res = export_layer(a, b, out, [], "gzip")
    assert out.read_bytes() == gz and res.size == len(gz)
    assert [p.name for p in tmp_path.iterdir()] == ["layer.tar.gz"]


def test_export_streams_objects_and_names_missing_ones(tmp_path):
    objs = ObjectStore(str(tmp_path / "o1"))
    other = tmp_path / "o2"
    content = bytes(range(256)) * 3
    dig = objs.put_bytes(content)
    a = d()
    b = d({"big": Inode(S_IFREG | 0o755, size=len(content), digest=dig)})
    data, _ = export_bytes(a, b, [str(other), str(tmp_path / "o1")])
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        assert tf.extractfile("big").read() == content
    with pytest.raises(ObjectNotFoundError, match=object_path(dig)):
        export_bytes(a, b, [str(other)])
    out = tmp_path / "x.tar"
    with pytest.raises(ObjectNotFoundError):
        export_layer(a, b, out, [str(other)])
    assert not out.exists() and not list(tmp_path.glob(".x.tar*"))


def test_export_skips_sockets_like_cstorage():
    data, res = export_bytes(d(), d({"s": Inode(S_IFSOCK | 0o755), "f": f()}))
    assert [m.name for m in members(data)] == ["f"]
    assert res.skipped_sockets == (b"/s",)


def test_export_root_only_when_it_changed():
    a = d({"x": f()}, mtime_ns=S)
    assert [m.name for m in members(export_bytes(a, d({"x": f(b"2")}, mtime_ns=S))[0])] == ["x"]
    b = d({"x": f()}, mode=0o700, mtime_ns=2 * S)
    assert [(m.name, m.mode) for m in members(export_bytes(a, b)[0])] == [(".", 0o700)]


# --- property: export(A, B) applied on A gives B --------------------------------------------------

NAMES = [b"a", b"b", b"c", b"a-b", b"\xffz"]
XATTRS = [b"user.a", b"user.b", b"security.capability", b"security.selinux", b"trusted.t"]
MTIMES = [0, S, S + 500_000_000, 2 * S, -2 * S - 250_000_000, 1_700_000_000 * S + 123_456_789]


class Gen:
    """Random trees from one hypothesis data stream; file content > 64 bytes goes into `objects`."""

    def __init__(self, data, objects: ObjectStore):
        self.data = data
        self.objects = objects

    def pick(self, seq):
        return self.data.draw(st.sampled_from(seq))

    def attrs(self) -> dict:
        xattrs = {k: self.pick([b"", b"1", b"\x00\xff"])
                  for k in self.data.draw(st.lists(st.sampled_from(XATTRS), max_size=2, unique=True))}
        return {"uid": self.pick([0, 1000, 2**31]), "gid": self.pick([0, 7]),
                "mtime_ns": self.pick(MTIMES), "xattrs": xattrs}

    def leaf(self) -> Inode:
        kind = self.pick(["inline", "inline", "object", "empty", "symlink", "chr", "blk", "fifo"])
        mode = self.pick([0o644, 0o755, 0o4755, 0o600])
        if kind == "inline":
            return Inode.file(self.data.draw(st.binary(min_size=1, max_size=64)), mode, **self.attrs())
        if kind == "object":
            content = self.data.draw(st.binary(min_size=65, max_size=300))
            return Inode(S_IFREG | mode, size=len(content), digest=self.objects.put_bytes(content),
                         **self.attrs())
        if kind == "empty":
            return Inode(S_IFREG | mode, **self.attrs())
        if kind == "symlink":
            return Inode.symlink(self.pick([b"a", b"../x", b"/abs/target"]), **self.attrs())
        ftype = {"chr": S_IFCHR, "blk": S_IFBLK, "fifo": S_IFIFO}[kind]
        rdev = os.makedev(self.pick([1, 8]), self.pick([3, 300])) if kind != "fifo" else 0
        return Inode(ftype | mode, rdev=rdev, **self.attrs())

    def tree(self, depth: int = 0) -> Inode:
        node = Inode.directory(self.pick([0o755, 0o700, 0o1777]), **self.attrs())
        names = st.lists(st.sampled_from(NAMES), min_size=2 if depth == 0 else 0, max_size=5, unique=True)
        for name in self.data.draw(names):
            node.entries[name] = self.tree(depth + 1) if depth < 3 and self.pick([0, 1]) == 0 \
                else self.leaf()
        return node

    def mutate(self, node: Inode, depth: int = 0) -> Inode:
        """A copy of directory `node` with random edits; untouched children stay the same objects."""
        out = node.copy()
        if self.pick([0, 0, 1]):
            out.__init__(out.mode, entries=out.entries, **self.attrs())
        for name in list(out.entries):
            child = out.entries[name]
            what = self.pick(["keep", "edit", "keep", "delete", "replace", "edit"])
            if what == "delete":
                del out.entries[name]
            elif what == "replace":
                out.entries[name] = self.tree(depth + 1) if depth < 2 and self.pick([0, 1]) else self.leaf()
            elif what == "edit":
                if child.is_dir:
                    out.entries[name] = self.mutate(child, depth + 1)
                else:
                    c = child.copy()
                    if not c.is_symlink:               # symlinks are always 0777 on Linux
                        c.mode = (c.mode & ~0o7777) | self.pick([0o644, 0o640])
                    c.mtime_ns = self.pick(MTIMES)
                    out.entries[name] = c
        for name in self.data.draw(st.lists(st.sampled_from(NAMES), max_size=2, unique=True)):
            if name not in out.entries:
                out.entries[name] = self.leaf()
        return out

    def hardlinks(self, root: Inode) -> None:
        """Make a few regular files share one inode (across directories too)."""
        files = [(p, n) for p, n in walk(root) if n.is_reg]
        if len(files) < 2:
            return
        for _ in range(self.pick([0, 1, 2])):
            (p1, n1), (p2, _n2) = self.pick(files), self.pick(files)
            if p1 != p2:
                parent, _, name = p2.rpartition(b"/")
                lookup(root, parent or b"/").entries[name] = n1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_export_then_apply_gives_b(tmp_path_factory, data):
    objects = ObjectStore(str(tmp_path_factory.mktemp("objects")))
    g = Gen(data, objects)
    a = g.tree()
    a.mtime_ns = max(a.mtime_ns, 1)            # a root with attributes (see flatten's root rule)
    g.hardlinks(a)
    b = g.mutate(a)
    b.mtime_ns = max(b.mtime_ns, 1)
    g.hardlinks(b)
    tar, res = export_bytes(a, b, [objects.root])
    layer = read_tar(io.BytesIO(tar), objects)
    assert layer.diff_id == res.diff_id
    result = flatten_trees([a, layer.tree])
    assert result == b
    assert changes(result, b, strict=True) == []
    assert image_bytes(result) == image_bytes(b)
    # the same layer from the trees' image indexes
    assert export_bytes(ImageIndex.from_tree(a), ImageIndex.from_tree(b), [objects.root])[0] == tar
    assert changes(ImageIndex.from_tree(a), ImageIndex.from_tree(b)) == changes(a, b)


# --- images: the index cache and the CLI ----------------------------------------------------------

@pytest.fixture
def images(tmp_path, monkeypatch):
    """Two image files (old, new) with their object dir; the index cache under tmp_path."""
    monkeypatch.setenv("FLATMOUNT_CACHE_DIR", str(tmp_path / "cache"))
    objects = ObjectStore(str(tmp_path / "objects"))
    big = b"0123456789" * 20
    old = d({"etc": d({"conf": f(b"a=1"), "gone": f()}, mtime_ns=S), "bin": {"tool": f(b"t")}})
    new = d({"etc": d({"conf": f(b"a=2"), "big": ext(objects.put_bytes(big), len(big))}, mtime_ns=2 * S),
             "bin": {"tool": f(b"t")}})
    paths = tmp_path / "old.erofs", tmp_path / "new.erofs"
    write_image(old, paths[0])
    write_image(new, paths[1])
    return paths, old, new, tmp_path / "objects"


def test_image_index_cache(images, tmp_path, monkeypatch):
    (pa, pb), old, new, _ = images
    want = changes(old, new)
    assert lines(want) == ["C /etc", "A /etc/big", "C /etc/conf", "D /etc/gone"]
    assert diff_images(pa, pb) == want
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert len(cached) == 2
    import flatmount.image.reader as reader

    monkeypatch.setattr(reader.Image, "root", lambda self: pytest.fail("image read despite the cache"))
    assert diff_images(pa, pb) == want
    assert diff_images(pa, pb, cache_dir=tmp_path / "cache") == want
    # a stale or corrupt cache entry is ignored, never trusted
    for name in cached:
        (tmp_path / "cache" / name).write_bytes(b"junk")
    monkeypatch.undo()
    monkeypatch.setenv("FLATMOUNT_CACHE_DIR", str(tmp_path / "cache"))
    assert diff_images(pa, pb) == want
    assert diff_images(pa, pb, cache_dir=False) == want


def test_image_index_equals_tree_index():
    t = big_tree(6, 4)
    ix = ImageIndex.from_bytes(ImageIndex.from_tree(t).to_bytes())
    assert ix._fp(ix._root()[1]) == TreeIndex(t).fingerprint()
    assert changes(ix, TreeIndex(t)) == [] and changes(ix, big_tree(6, 4, seed=1)) == changes(t, big_tree(6, 4, seed=1))
    for junk in [b"", b"FMDIFX02" + bytes(40), ImageIndex.from_tree(t).to_bytes()[:60]]:
        with pytest.raises(ValueError):
            ImageIndex.from_bytes(junk)


def every_kind_tree() -> Inode:
    """Every file type, hardlinks across directories, odd names, xattrs incl. trusted.overlay.*."""
    shared = ext(DIG1, 5000, uid=1000, mtime_ns=-S - 1)
    return d({"etc": d({"h": f(b"box\n", mtime_ns=S + 1), "link": Inode.symlink(b"../x"),
                        "odd \xff\n=": f(b"-", mode=0o600), "empty": Inode(S_IFREG | 0o644)},
                       xattrs={b"trusted.overlay.opaque": b"y", b"user.x": b""}),
              "dev": {"null": Inode(S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
                      "sda": Inode(S_IFBLK | 0o660, rdev=os.makedev(8, 0)), "p": Inode(S_IFIFO | 0o644)},
              "usr": {"bin": {"tool": shared}, "lib": {"tool": shared},
                      "cap": f(b"c" * 64, xattrs={b"security.capability": b"\x01\x00"})}},
             mtime_ns=7 * S, xattrs={b"user.root": b"1"})


def test_index_from_tree_equals_index_from_image(tmp_path, monkeypatch):
    """`cache_index` may store the index of the tree an image was written from: it is the index of
    the image as read back, so a later diff never reads the image."""
    import xxhash

    from flatmount.image.reader import Image

    tree = every_kind_tree()
    data = image_bytes(tree)
    ident = xxhash.xxh3_128_digest(data)
    assert ImageIndex.from_tree(tree, ident, len(data)).to_bytes() == \
        ImageIndex.from_tree(Image(data).root(), ident, len(data)).to_bytes()
    img = tmp_path / "t.erofs"
    img.write_bytes(data)
    D.cache_index(tree, data, tmp_path / "cache")
    import flatmount.image.reader as reader

    monkeypatch.setattr(reader.Image, "root", lambda self: pytest.fail("image read despite the cache"))
    other = d({"etc": {"h": f(b"other")}})
    want = changes(tree, other)
    assert changes(ImageIndex.for_image(img, tmp_path / "cache"), ImageIndex.from_tree(other)) == want


def test_damaged_index_is_rebuilt(images, tmp_path):
    (pa, pb), *_ = images
    want = diff_images(pa, pb)
    files = sorted((tmp_path / "cache").iterdir())
    for damage in [lambda b: b[:-8], lambda b: b[:50] + bytes([b[50] ^ 1]) + b[51:],
                   lambda b: b[:-30] + b"\xff" * 30]:
        for p in files:
            p.write_bytes(damage(p.read_bytes()))
        with pytest.raises(ValueError):
            ImageIndex.from_bytes(files[0].read_bytes())
        assert diff_images(pa, pb) == want           # ignored and rebuilt
        assert ImageIndex.from_bytes(files[0].read_bytes())

def run(capsysbinary, *argv) -> tuple[int, bytes, bytes]:
    rc = main([str(a) for a in argv])
    out, err = capsysbinary.readouterr()
    return rc, out, err


def test_cli_image_files(images, capsysbinary, tmp_path):
    (pa, pb), old, new, objdir = images
    assert run(capsysbinary, "diff", pa, pb) == (
        0, b"C /etc\nA /etc/big\nC /etc/conf\nD /etc/gone\n", b"")
    assert run(capsysbinary, "diff", pa, pb, "--exit-code")[0] == 1
    assert run(capsysbinary, "diff", pa, pa, "--exit-code") == (0, b"", b"")
    rc, out, _ = run(capsysbinary, "diff", pa, pb, "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["differ"] is True
    assert doc["changes"][2] == {"path": "/etc/conf", "kind": "C", "changed": {
        "content": {"before": "inline:" + b"a=1".hex(), "after": "inline:" + b"a=2".hex()}}}
    assert doc["changes"] == [c.to_json() for c in changes(old, new)]
    out_tar = tmp_path / "l.tar.zst"
    rc, out, err = run(capsysbinary, "diff", pa, pb, "-o", out_tar, "--objects", objdir)
    assert rc == 0 and b"wrote" in err
    layer = read_tar(open(out_tar, "rb"), ObjectStore(str(objdir)))
    assert layer.compression == "zstd"
    assert flatten_trees([old, layer.tree]) == new


def test_cli_errors(images, capsysbinary, tmp_path):
    (pa, _pb), *_ = images
    junk = tmp_path / "junk.erofs"
    junk.write_bytes(b"\0" * 4096)
    rc, _, err = run(capsysbinary, "diff", pa, junk)
    assert rc == 3 and b"CorruptImageError" in err
    with pytest.raises(SystemExit) as e:
        main(["diff", str(pa), str(pa), "-o", str(tmp_path / "x.zip")])
    assert e.value.code == 2


def test_cli_store_images(tmp_path, capsysbinary, monkeypatch):
    """Names resolved in a store, flattened (cached images), diffed; the layer reproduces the image."""
    from flatmount.api import open_store
    from flatmount.store.batch import record_image, record_layer
    from flatmount.store.records import chain_id

    monkeypatch.setenv("FLATMOUNT_CACHE_DIR", str(tmp_path / "cache"))
    store = open_store(tmp_path / "root", runroot=tmp_path / "run")
    content = b"x" * 100
    dig = store.objects.put_bytes(content)
    store.objects.sync()
    l1 = d({"usr": {"bin": {"sh": ext(dig, 100, mtime_ns=S)}}, "etc": {"a": f(b"1")}}, mtime_ns=S)
    l2 = d({"etc": d({"b": f(b"2"), "a": Inode.whiteout()})}, mtime_ns=S)
    id1 = chain_id(None, "sha256:" + "1" * 64)
    id2 = chain_id(id1, "sha256:" + "2" * 64)
    with store.gc_lock(shared=True):
        record_layer(store, id1, None, "sha256:" + "1" * 64, l1)
        record_layer(store, id2, id1, "sha256:" + "2" * 64, l2)
    record_image(store, "a" * 64, id1, names=["localhost/base:latest"])
    record_image(store, "b" * 64, id2, names=["localhost/app:latest"])
    args = ("--root", tmp_path / "root", "--runroot", tmp_path / "run")
    want = changes(flatten_trees([l1]), flatten_trees([l1, l2]))
    assert lines(want) == ["C /etc", "D /etc/a", "A /etc/b"]
    rc, out, err = run(capsysbinary, "diff", "base", "app", *args)
    assert (rc, out.decode()) == (0, D.format_changes(want)), err
    rc, out, _ = run(capsysbinary, "diff", "localhost/app:latest", "base", "--json", *args)
    doc = json.loads(out)
    assert doc["a"]["id"] == "b" * 64 and [c["kind"] for c in doc["changes"]] == ["C", "A", "D"]
    tar = tmp_path / "up.tar"
    assert run(capsysbinary, "diff", "base", "app", "-o", tar, *args)[0] == 0
    layer = read_tar(open(tar, "rb"), store.objects)
    assert flatten_trees([flatten_trees([l1]), layer.tree]) == flatten_trees([l1, l2])
    store.close()


def test_store_images_use_the_index_flatten_wrote(tmp_path, monkeypatch):
    """A store's flattened image has its diff index beside it: its first diff reads no image and builds
    and caches nothing; a damaged beside index is ignored (and the user cache used instead)."""
    from flatmount import flatten
    from flatmount.api import open_store
    from flatmount.image import reader

    store = open_store(tmp_path / "root", runroot=tmp_path / "run")
    objects = store.objects
    big = b"0123456789" * 20
    old = d({"etc": d({"conf": f(b"a=1"), "gone": f()}, mtime_ns=S), "bin": {"tool": f(b"t")}})
    new = d({"etc": d({"conf": f(b"a=2"), "big": ext(objects.put_bytes(big), len(big))}, mtime_ns=2 * S),
             "bin": {"tool": f(b"t")}})
    with store.gc_lock(shared=True):
        pa = flatten.write_flat_image(store, old)[1]
        pb = flatten.write_flat_image(store, new)[1]
    store.close()
    assert D.store_index_path(pa) == store_paths.derived_paths(pa)[1] and os.path.exists(D.store_index_path(pa))
    assert D.store_index_path(tmp_path / "loose.erofs") is None
    want = changes(old, new)
    assert lines(want) == ["C /etc", "A /etc/big", "C /etc/conf", "D /etc/gone"]
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setattr(reader.Image, "root", lambda self: pytest.fail("image read despite its index"))
        ia = ImageIndex.for_image(pa, cache)
        assert ia.source == D.store_index_path(pa)
        assert diff_images(pa, pb, cache_dir=cache) == want
    assert not cache.exists()
    # the index of another image, or a damaged one, is never used
    with open(D.store_index_path(pb), "rb") as src:
        other = src.read()
    with open(D.store_index_path(pa), "wb") as dst:
        dst.write(other)
    assert diff_images(pa, pb, cache_dir=cache) == want
    assert ImageIndex.for_image(pa, cache).source == str(next(cache.iterdir()))
    with open(D.store_index_path(pb), "r+b") as fb:
        fb.seek(100)
        fb.write(b"\xff\xfe")
    assert diff_images(pa, pb, cache_dir=False) == want


# --- against podman -------------------------------------------------------------------------------

def test_matches_podman_image_diff(podman_stores, tmp_path, monkeypatch):
    """`flatmount diff PARENT CHILD` against `podman image diff CHILD` (which compares with the parent
    layer through the overlay driver) for every layer of the podman-built app image.

    Intended differences, all from podman's overlay walker (c/storage `overlay.Changes`):
    - a replaced (opaque) directory that exists on both sides is `D` there, and the new children that
      also existed below are `C` even when identical; we compare the trees: the directory is `C` (or
      unchanged), children are `A`/`C`/`D` by what differs;
    - a file that was only copied up (same attributes, same content) is `C` there, not here;
    - order: podman inserts ancestors just before an added path; we list depth first (compared as sets);
    - podman hides its container init mount points (libpod/diff.go `initInodes`: /dev, /proc, /sys,
      /run, /etc/hosts, ...) that `podman build` leaves in RUN layers; they are in the image, we list them.
    """
    from flatmount.api import open_store
    from flatmount.flatten import flatten_image
    from flatmount.sources.cstorage import pull_cstorage

    monkeypatch.setenv("FLATMOUNT_CACHE_DIR", str(tmp_path / "cache"))
    s = podman_stores
    env = s.env()
    store = open_store(tmp_path / "root", runroot=tmp_path / "run")
    all_images = json.loads(cstorage_fixtures.podman(
        env, "image", "inspect", *cstorage_fixtures.podman(env, "images", "-a", "-q", "--no-trunc").split()))
    app = next(i for i in all_images if "localhost/app:latest" in (i.get("RepoTags") or []))
    chain = app["RootFS"]["Layers"]
    by_layers = {tuple(i["RootFS"]["Layers"]): i["Id"] for i in all_images}
    ids = [by_layers[tuple(chain[:n])] for n in range(1, len(chain) + 1)]
    trees = []
    for iid in ids:
        pull_cstorage(store, "containers-storage:" + iid, storage_conf=s.main_conf)
        trees.append(ImageIndex.for_image(flatten_image(store, iid).path))
    seen_opaque = False
    try:
        for n in range(1, len(ids)):
            podman_out = cstorage_fixtures.podman(env, "image", "diff", ids[n]).split("\n")
            theirs = {tuple(line.split(" ", 1)) for line in podman_out if line}
            ours = {(c.kind, os.fsdecode(c.path)) for c in changes(trees[n - 1], trees[n])
                    if os.fsdecode(c.path) not in PODMAN_INIT_INODES}
            assert theirs and ours, n
            opaque = {p for k, p in theirs if k == "D" and _is_dir(trees[n], p) and _is_dir(trees[n - 1], p)}
            seen_opaque |= bool(opaque)

            def under(p: str, opaque: set[str] = opaque) -> bool:
                return any(p == o or p.startswith(o + "/") for o in opaque)
            # outside replaced directories: the same set, except podman's copy-up-only files
            copied_up = {p for k, p in theirs - ours if k == "C" and not under(p)
                         and _same_file(trees[n - 1], trees[n], p)}
            assert {x for x in ours if not under(x[1])} == \
                {x for x in theirs if not under(x[1]) and x[1] not in copied_up}, n
            # inside them: every addition podman saw is an addition here too, and what we call
            # deleted existed below and is gone
            for k, p in theirs:
                if under(p) and k == "A":
                    assert ("A", p) in ours
            for k, p in ours:
                if under(p) and p not in opaque:
                    assert k in "ACD"
                    if k == "D":
                        assert _exists(trees[n - 1], p) and not _exists(trees[n], p)
            for p in opaque:
                assert ("C", p) in ours or ("D", p) not in ours
        assert seen_opaque                         # the fixture replaces /opt/app in one RUN step
    finally:
        store.close()


PODMAN_INIT_INODES = {"/dev", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf", "/proc", "/run",
                      "/run/notify", "/run/.containerenv", "/run/secrets", "/run/podman-init", "/sys",
                      "/etc/mtab"}


def _exists(ix: ImageIndex, path: str) -> bool:
    return _side_lookup(ix, os.fsencode(path)) is not None


def _is_dir(ix: ImageIndex, path: str) -> bool:
    found = _side_lookup(ix, os.fsencode(path))
    return found is not None and found[0].is_dir


def _same_file(a: ImageIndex, b: ImageIndex, path: str) -> bool:
    fa, fb = _side_lookup(a, os.fsencode(path)), _side_lookup(b, os.fsencode(path))
    return fa is not None and fb is not None and not fa[0].is_dir and not D.compare_inodes(fa[0], fb[0])



@settings(max_examples=300, deadline=None)
@given(st.integers(0, 300), st.sampled_from([1, 16, 20]), st.lists(st.integers(0, 10_000), max_size=12),
       st.integers(0, 2**32))
def test_differing_chunks_compiled_and_python_agree(n, size, flips, seed):
    """The entry hashes two directories differ in: the compiled walk (flatmount/image/_cread.c) and the
    Python halving (its specification) find the same chunks, the ones a plain comparison finds."""
    import random

    from conftest import compiled_missing

    import flatmount.image.accel as accel

    changes_mod = __import__("flatmount.diff.changes", fromlist=["_differing_chunks"])
    a = random.Random(seed).randbytes(n * size)
    b = bytearray(a)
    for f in flips:
        if b:
            b[f % len(b)] ^= 1 + f % 255
    b = bytes(b)
    want = [i for i in range(n) if a[i * size:(i + 1) * size] != b[i * size:(i + 1) * size]]
    if accel.CREAD is None:
        compiled_missing("flatmount.image._cread")
    assert accel.CREAD.differing_chunks(a, b, size) == want
    saved, accel.CREAD = accel.CREAD, None
    try:
        assert sorted(changes_mod._differing_chunks(a, b, size)) == want
    finally:
        accel.CREAD = saved
    assert accel.CREAD.differing_chunks(a, b + b"x", size) is None          # lengths differ
    if size > 1:
        assert accel.CREAD.differing_chunks(a + b"x", b + b"y", size) is None   # not whole chunks
