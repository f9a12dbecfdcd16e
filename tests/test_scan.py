"""scan_directory: a real directory with every file type, xattrs, hardlinks and odd names -> tree."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import require_root

from flatmount.errors import LayerError
from flatmount.image.tree import count_inodes, lookup
from flatmount.sources.directory import scan_directory
from objects import ObjectStore
from objects.digest import fsverity_digest

BIG = bytes(i % 251 for i in range(5000))
NS = 1_700_000_000_123_456_789


@pytest.fixture
def src(tmp_path):
    """A directory with one of everything (needs root for devices and trusted.* xattrs)."""
    require_root()
    d = tmp_path / "src"
    d.mkdir()
    (d / "small").write_bytes(b"hello\n")
    (d / "exact64").write_bytes(b"x" * 64)
    (d / "big65").write_bytes(b"y" * 65)
    (d / "big").write_bytes(BIG)
    (d / "empty").write_bytes(b"")
    (d / "sub").mkdir(mode=0o750)
    (d / "sub" / "deep").mkdir()
    (d / "sub" / "deep" / "f").write_bytes(b"deep")
    os.symlink("../small", d / "sub" / "rel")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * 100)
    os.symlink(str(outside), d / "abs")                # must stay a symlink, never followed
    os.link(d / "big", d / "sub" / "big-link")
    os.link(d / "small", d / "small-link")
    os.mkfifo(d / "fifo", 0o600)
    os.mknod(d / "sock", stat.S_IFSOCK | 0o644)
    os.mknod(d / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(d / "disk", stat.S_IFBLK | 0o660, os.makedev(8, 1))
    os.mknod(d / "wh", stat.S_IFCHR, os.makedev(0, 0))
    name = b"caf\xe9-\xff\xfe \n"                        # not UTF-8, with space and newline
    with open(os.path.join(os.fsencode(d), name), "wb") as f:
        f.write(b"latin-1")
    os.setxattr(d / "small", "user.mime", b"text/plain")
    os.setxattr(d / "small", "trusted.overlay.opaque", b"y")
    os.setxattr(d / "small", "security.test", b"\x00\x01")
    os.setxattr(d / "sub", "user.empty", b"")
    os.setxattr(d / "sub" / "rel", "trusted.link", b"L", follow_symlinks=False)
    os.chown(d / "sub" / "deep" / "f", 1234, 5678)
    os.chmod(d / "big", 0o4755)
    os.utime(d / "small", ns=(NS, NS))
    os.utime(d / "empty", ns=(0, -86400 * 365 * 10**9 - 5))  # 1969, a nanosecond part
    os.utime(d / "sub" / "rel", ns=(0, 42), follow_symlinks=False)
    os.utime(d / "sub", ns=(0, 7))
    return d


def test_every_type(src):
    root = scan_directory(src)
    st = os.stat(src)
    assert root.is_dir and root.mode == st.st_mode and root.mtime_ns == st.st_mtime_ns
    small = lookup(root, "small")
    assert small.content == b"hello\n" and small.size == 6 and small.digest is None
    assert small.mtime_ns == NS
    assert small.xattrs == {b"user.mime": b"text/plain", b"trusted.overlay.opaque": b"y",
                            b"security.test": b"\x00\x01"}
    assert lookup(root, "exact64").content == b"x" * 64
    b65 = lookup(root, "big65")
    assert b65.content is None and b65.size == 65 and b65.digest == fsverity_digest(b"y" * 65)
    big = lookup(root, "big")
    assert big.digest == fsverity_digest(BIG) and big.size == len(BIG) and big.content is None
    assert big.mode == stat.S_IFREG | 0o4755
    empty = lookup(root, "empty")
    assert empty.size == 0 and empty.content is None and empty.digest is None and not empty.is_external
    assert empty.mtime_ns == -86400 * 365 * 10**9 - 5
    sub = lookup(root, "sub")
    assert sub.mode == stat.S_IFDIR | 0o750 and sub.xattrs == {b"user.empty": b""} and sub.mtime_ns == 7
    rel = lookup(root, "sub/rel")
    assert rel.is_symlink and rel.target == b"../small" and rel.size == 8 and rel.mtime_ns == 42
    assert rel.xattrs == {b"trusted.link": b"L"}
    ab = lookup(root, "abs")
    assert ab.is_symlink and ab.entries is None and ab.target.endswith(b"/outside")
    f = lookup(root, "sub/deep/f")
    assert (f.uid, f.gid, f.content) == (1234, 5678, b"deep")
    assert lookup(root, "fifo").ftype == stat.S_IFIFO and lookup(root, "fifo").mode & 0o7777 == 0o600
    assert lookup(root, "sock").ftype == stat.S_IFSOCK
    null = lookup(root, "null")
    assert null.ftype == stat.S_IFCHR and null.rdev == os.makedev(1, 3) and not null.is_whiteout
    disk = lookup(root, "disk")
    assert disk.ftype == stat.S_IFBLK and disk.rdev == os.makedev(8, 1)
    assert lookup(root, "wh").is_whiteout
    assert root.entries[b"caf\xe9-\xff\xfe \n"].content == b"latin-1"


def test_hardlinks_share_one_inode(src):
    root = scan_directory(src)
    assert lookup(root, "big") is lookup(root, "sub/big-link")
    assert lookup(root, "small") is lookup(root, "small-link")
    assert lookup(root, "exact64") is not lookup(root, "big65")
    # every name is its own inode except the two second names of hardlinks
    names = sum(len(n.entries) for n in _dirs(root))
    assert count_inodes(root) == names + 1 - 2


def _dirs(node):
    yield node
    for c in node.entries.values():
        if c.entries is not None:
            yield from _dirs(c)


def test_objects_are_stored(src, tmp_path):
    store = ObjectStore(str(tmp_path / "objects"))
    root = scan_directory(src, store)
    stored = set(store)
    expected = {fsverity_digest(BIG), fsverity_digest(b"y" * 65)}
    assert stored == expected                  # outside/secret (behind a symlink) was not stored
    for digest in expected:
        with store.open(digest) as f:
            data = f.read()
        assert fsverity_digest(data) == digest
    assert lookup(root, "big").object_path == store.path(fsverity_digest(BIG)).split("/objects/", 1)[1]
    # same tree with or without a store
    assert scan_directory(src) == root


def test_dump_roundtrip_of_scanned_tree(src):
    from flatmount.image.dump import dump_bytes, parse_dump

    root = scan_directory(src)
    back = parse_dump(dump_bytes(root))
    assert back == root
    assert back.entries[b"small-link"] is back.entries[b"small"]


def test_bytes_and_pathlike_paths(src):
    assert scan_directory(os.fsencode(src)) == scan_directory(src) == scan_directory(str(src))


def test_root_symlink_is_followed_but_inner_ones_not(src, tmp_path):
    link = tmp_path / "link-to-src"
    os.symlink(src, link)
    assert scan_directory(link) == scan_directory(src)


@pytest.mark.parametrize("what", ["missing", "file"])
def test_bad_root(tmp_path, what):
    p = tmp_path / "x"
    if what == "file":
        p.write_bytes(b"")
    with pytest.raises(LayerError):
        scan_directory(p)


@pytest.mark.parametrize("replacement", ["file", "symlink", "dir-symlink"])
def test_entry_swapped_during_scan_is_refused(tmp_path, replacement):
    """An entry replaced between lstat and open (by another file, or by a symlink out of the tree) is
    never read: the scan fails instead of following it."""
    d = tmp_path / "d"
    d.mkdir()
    if replacement == "dir-symlink":
        (d / "f").mkdir()
        (d / "f" / "inner").write_bytes(b"i")
    else:
        (d / "f").write_bytes(b"z" * 100)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * 100)
    import flatmount.sources.directory as scan

    real_stat = os.stat

    def swapping_stat(path, *a, **kw):
        st = real_stat(path, *a, **kw)
        if path == b"f" and kw.get("dir_fd") is not None:
            new = d / "f.new"
            if replacement == "file":
                new.write_bytes(b"other")            # a new file (new inode) takes its place
            else:
                os.symlink(outside if replacement == "dir-symlink" else outside / "secret", new)
            if (d / "f").is_dir() and not (d / "f").is_symlink():
                (d / "f" / "inner").unlink()
                (d / "f").rmdir()
            os.rename(new, d / "f")
        return st

    mp = pytest.MonkeyPatch()
    mp.setattr(scan.os, "stat", swapping_stat)
    try:
        with pytest.raises(LayerError, match="replaced|cannot open"):
            scan_directory(d)
    finally:
        mp.undo()


def test_deep_tree_keeps_few_descriptors(tmp_path):
    d = tmp_path / "deep"
    p = d
    for i in range(300):
        p = p / f"{i}"
    p.mkdir(parents=True)
    (p / "leaf").write_bytes(b"bottom")
    before = len(os.listdir("/proc/self/fd"))
    root = scan_directory(d)
    assert len(os.listdir("/proc/self/fd")) == before
    node = root
    for i in range(300):
        node = node.entries[f"{i}".encode()]
    assert node.entries[b"leaf"].content == b"bottom"
