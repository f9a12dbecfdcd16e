"""The trees whose images the tests pin byte for byte (tests/pins.json), shared by the tests and by
tools/regen_pins.py, which recomputes the pins from them.

Three kinds: composefs's own test assets (rebuilt here as trees; their digests are the ones composefs
publishes in tests/assets/*.sha256, so only a change that still matches mkcomposefs may touch them),
the cs9 dumps of the shared data directory, and flatmount's own example trees.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from flatmount.image.tree import Inode

S_IFREG = stat.S_IFREG
T0 = 1_700_000_000 * 10**9
DIGEST = bytes(range(32))
REPO = Path(__file__).resolve().parent.parent
PINS_FILE = REPO / "tests" / "pins.json"
# the shared data directory: $FLATMOUNT_DATA, else ../shared/data beside the repository
DATA_DIR = Path(os.environ.get("FLATMOUNT_DATA", REPO.parent / "shared" / "data"))


def every_type_tree() -> Inode:
    """One of everything, with hardlinks, xattrs in three namespaces (some shared), odd names."""
    shared_sel = {b"security.selinux": b"system_u:object_r:usr_t:s0"}
    root = Inode.directory(mtime_ns=T0, xattrs=dict(shared_sel))
    sub = Inode.directory(0o750, uid=1000, gid=1000, mtime_ns=T0 + 5, xattrs={b"user.tag": b"dir"})
    root.entries[b"dir"] = sub
    sub.entries[b"empty"] = Inode.directory(mtime_ns=T0)
    hl = Inode(S_IFREG | 0o644, size=10000, digest=DIGEST, mtime_ns=T0,
               xattrs={b"user.a": b"1", **shared_sel})
    root.entries[b"hard1"] = hl
    sub.entries[b"hard2"] = hl
    sub.entries[b"hard3"] = hl
    root.entries[b"inline"] = Inode.file(b"hello world\n", mtime_ns=T0 + 123_456_789,
                                         xattrs={b"trusted.t": b"v", **shared_sel})
    root.entries[b"empty-file"] = Inode.file(b"", mtime_ns=T0)
    root.entries[b"payload-only"] = Inode(S_IFREG | 0o600, size=4096, payload="ab/cdef.file", mtime_ns=T0)
    root.entries[b"no-object"] = Inode(S_IFREG | 0o600, size=77, mtime_ns=T0)
    root.entries[b"huge"] = Inode(S_IFREG | 0o644, size=5 << 30, digest=bytes(range(1, 33)), mtime_ns=T0)
    root.entries[b"link"] = Inode.symlink(b"dir/hard2", mtime_ns=T0)
    root.entries[b"chr"] = Inode(stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3), mtime_ns=T0)
    root.entries[b"blk"] = Inode(stat.S_IFBLK | 0o660, rdev=os.makedev(259, 300), mtime_ns=T0)
    root.entries[b"fifo"] = Inode(stat.S_IFIFO | 0o644, mtime_ns=T0)
    root.entries[b"sock"] = Inode(stat.S_IFSOCK | 0o755, mtime_ns=T0)
    root.entries[b"old"] = Inode.file(b"1969", mtime_ns=-86400 * 10**9 + 7)
    root.entries[b"bigid"] = Inode.file(b"ids", uid=70000, gid=4_000_000_000, mtime_ns=T0)
    root.entries[b"esc"] = Inode.file(b"e", mtime_ns=T0, xattrs={b"trusted.overlay.custom": b"c",
                                                                 b"user.overlay.u": b"u"})
    root.entries[b"-dash +plus space"] = Inode.file(b"x", mtime_ns=T0)
    root.entries[b"\xff\xfe-not-utf8"] = Inode.file(b"y", mtime_ns=T0)
    root.entries[b"n" * 255] = Inode.file(b"long name", mtime_ns=T0)
    root.entries[b"ab"] = Inode.directory(mtime_ns=T0)  # a real root entry with a hex name
    return root


def layer_tree() -> Inode:
    """A layer: whiteouts (incl. a root-level hex-named one) and opaque directories."""
    root = Inode.directory(mtime_ns=T0)
    etc = Inode.directory(mtime_ns=T0)
    root.entries[b"etc"] = etc
    etc.entries[b"deleted.conf"] = Inode.whiteout(mtime_ns=T0)
    etc.entries[b"kept"] = Inode.file(b"k", mtime_ns=T0)
    opq = Inode.directory(mtime_ns=T0, xattrs={b"trusted.overlay.opaque": b"y"})
    root.entries[b"opaque"] = opq
    opq.entries[b"new"] = Inode.file(b"n", mtime_ns=T0)
    both = Inode.directory(mtime_ns=T0, xattrs={b"trusted.overlay.opaque": b"y"})
    root.entries[b"opaque-with-whiteout"] = both
    both.entries[b"gone"] = Inode.whiteout(mtime_ns=T0)
    root.entries[b"7f"] = Inode.whiteout(mtime_ns=T0)
    return root


def cfs_no_newline() -> Inode:
    # no-newline.dump: "/ 4096 40555 222 0 0 10 0.0 - - - trusted.foo1=bar-1 user.foo2=bar-2", /a, /b
    root = Inode.directory(0o555, xattrs={b"trusted.foo1": b"bar-1", b"user.foo2": b"bar-2"})
    root.entries[b"a"] = Inode.file(b"", 0o644)
    root.entries[b"b"] = Inode.file(b"", 0o644)
    return root


def cfs_chardev_nonzero_size() -> Inode:
    # honggfuzz-chardev-nonzero-size.dump: a whiteout (char 0:0) with size 1 -> format version 1
    root = Inode.directory(0o755)
    root.entries[b"chardev"] = Inode(stat.S_IFCHR | 0o777, size=1)
    return root


def cfs_bigfile(size: int, xattrs: dict[bytes, bytes]) -> Inode:
    # bigfile*.dump: a file so large that its 4 KiB NULL chunk map moves to a data block
    root = Inode.directory(0o755)
    root.entries[b"bigfile" if b"system.posix_acl_default" not in xattrs
                 else b"something-with-acls-and-overlay"] = Inode(S_IFREG | 0o777, size=size, xattrs=xattrs)
    return root


def cfs_longlink() -> Inode:
    # longlink.dump: symlinks of 4070 and 4095 bytes (the second stored in a data block)
    root = Inode.directory(0o555, mtime_ns=1633950376 * 10**9)
    root.entries[b"big-but-not-max-link"] = Inode.symlink(b"a" * 4070, 0o777)
    root.entries[b"max-link"] = Inode.symlink(b"a" * 4095, 0o777)
    return root


def one_external_tree() -> Inode:
    one = Inode.directory(mtime_ns=T0)
    one.entries[b"f"] = Inode(S_IFREG | 0o644, size=10000, digest=DIGEST, mtime_ns=T0)
    return one


def load_dump(path: Path) -> Inode:
    """A cs9 tree through the benchmark's small stand-alone loader (not flatmount.image.dump, so a
    bug there cannot move a pin)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_erofs", REPO / "tools" / "bench_erofs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.load_dump(path)


# pin name -> tree builder; the names are the keys of tests/pins.json
COMPOSEFS_TREES: dict[str, Callable[[], Inode]] = {
    "no-newline": cfs_no_newline,
    "chardev-nonzero-size": cfs_chardev_nonzero_size,
    "bigfile": lambda: cfs_bigfile(9000000000000000, {}),
    "bigfile-xattr": lambda: cfs_bigfile(9001899274941000, {b"user.foo": b""}),
    "bigfile-with-acl": lambda: cfs_bigfile(8960932074941261, {b"system.posix_acl_default": b"x",
                                                               b"user.foo": b"xxxxxx"}),
    "longlink": cfs_longlink,
}
EXAMPLE_TREES: dict[str, Callable[[], Inode]] = {
    "empty": Inode.directory,
    "every-type": lambda: every_type_tree(),
    "layer": lambda: layer_tree(),
    "one-external": one_external_tree,
}
# the shared data files (composefs dumps) the cs9 pins are built from
DUMPS = ("cs9-x86_64-minimal.dump.gz", "cs9-x86_64-developer.dump.gz")


def build(name: str, data_dir: Path = DATA_DIR) -> Inode:
    """The tree of pin `name` (a dump name reads `data_dir`)."""
    if name in DUMPS:
        return load_dump(data_dir / name)
    return {**COMPOSEFS_TREES, **EXAMPLE_TREES}[name]()


def load_pins(path: Path = PINS_FILE) -> dict[str, dict[str, str]]:
    """{"composefs": {name: sha256}, "flatmount": {name: sha256}} from the pin file."""
    with open(path) as f:
        data = json.load(f)
    return {"composefs": data["composefs"], "flatmount": data["flatmount"]}
