"""EROFS writer/reader: known answers, round trips, fsck.erofs on every image, real kernel mounts.

Hostile-input tests (truncations, bit flips, crafted images) are in test_erofs_hostile.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.errors import CorruptImageError, FormatError
from flatmount.image import format as fmt
from flatmount.image.reader import Image, collect_objects, read_tree
from flatmount.image.tree import Inode, walk
from flatmount.image.writer import dir_size, image_bytes, write_image
from tests import pin_trees
from tests.conftest import require_root, require_tool, shared_data
from tests.pin_trees import DIGEST, T0, every_type_tree, layer_tree, load_pins  # noqa: F401 (others import them from here)

S_IFREG = stat.S_IFREG


# --- helpers -------------------------------------------------------------------------------------------
def fsck(path: Path) -> None:
    tool = require_tool("fsck.erofs")
    r = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"fsck.erofs failed on {path}:\n{r.stdout}\n{r.stderr}"


def write_checked(tmp_path: Path, root: Inode, name: str = "img.erofs", **kw) -> tuple[Path, bytes]:
    """Write, fsck, and check determinism; returns the path and bytes."""
    data = image_bytes(root, **kw)
    assert image_bytes(root, **kw) == data
    path = tmp_path / name
    write_image(root, path, **kw)
    assert path.read_bytes() == data
    assert len(data) % fmt.BLKSZ == 0
    fsck(path)
    return path, data


def link_groups(root: Inode) -> list[list[bytes]]:
    groups: dict[int, list[bytes]] = defaultdict(list)
    for path, node in walk(root):
        if not node.is_dir:
            groups[id(node)].append(path)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def assert_round_trip(root: Inode, data: bytes) -> Inode:
    back = Image(data).root()
    assert back == root
    assert link_groups(back) == link_groups(root)
    for path, node in walk(back):  # directory sizes are what dump writers print
        if node.is_dir:
            assert node.size == dir_size(node.entries) or path == b"/"
    return back


@contextlib.contextmanager
def mounted(image: Path, mnt: Path):
    require_root()
    require_tool("mount")
    mnt.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "erofs", "-o", "ro", str(image), str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:  # kernels without file-backed erofs mounts
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


def child_nid(img: Image, rec, name: bytes) -> int:
    """nid of an entry, through the reader's block search (white box)."""
    img._dirents_seen = 0
    hit = img._find(rec, name)
    assert hit is not None, name
    return hit[0]


def raw_xattrs(img: Image, path: bytes) -> dict[bytes, bytes]:
    """The xattrs as stored (escaped), through the reader's record parser (white box)."""
    rec = img._rec(img._root_nid)
    for name in [p for p in path.split(b"/") if p]:
        rec = img._rec(child_nid(img, rec, name))
    return dict(img._xattrs(rec))


def escaped(xattrs: dict[bytes, bytes]) -> dict[bytes, bytes]:
    return {(b"trusted.overlay.overlay." + k[16:] if k.startswith(b"trusted.overlay.") else k): v
            for k, v in xattrs.items()}


# --- format --------------------------------------------------------------------------------------------
def test_struct_sizes_pinned():
    assert fmt.SUPERBLOCK.size == 128
    assert fmt.INODE_COMPACT.size == 32
    assert fmt.INODE_EXTENDED.size == 64
    assert fmt.DIRENT.size == 12
    assert fmt.COMPOSEFS_HEADER.size == 32
    assert fmt.XATTR_IBODY_HEADER.size == 12
    assert fmt.XATTR_ENTRY.size == 4
    assert fmt.SUPERBLOCK.pack(*fmt.Superblock()) [:4] == b"\xe2\xe1\xf5\xe0"


@pytest.mark.parametrize("name,bit", [
    (b"trusted.overlay.metacopy", 31), (b"trusted.overlay.redirect", 17), (b"security.selinux", 11),
    (b"system.posix_acl_access", 30), (b"trusted.overlay.opaque", 20),
    (b"trusted.overlay.overlay.whiteout", 4), (b"user.overlay.whiteout", 9),
])
def test_xattr_filter_bits(name, bit):
    assert xxhash.xxh32_intdigest(b"", 0) == 0x02CC5D05
    assert xxhash.xxh32_intdigest(b"abc", 0) == 0x32D153FF
    assert fmt.xattr_filter_bit(*fmt.xattr_split(name)) == bit


def test_crc32c_linux_vector():
    assert fmt.crc32c_linux(b"123456789") == 0x1CF96D7C


@pytest.mark.parametrize("size,bits", [(1, 12), (4096, 12), (4097, 13), (10000, 14), (5 << 30, 33),
                                       (1 << 60, 43)])
def test_chunk_bits(size, bits):
    assert fmt.chunk_bits(size) == bits


# --- known answer: EROFS.md section 11 -----------------------------------------------------------------
def test_worked_example_section_11(tmp_path):
    root = Inode.directory(mtime_ns=T0)
    root.entries[b"f"] = Inode(S_IFREG | 0o644, size=10000, payload="ab/cdef", mtime_ns=T0)
    _, img = write_checked(tmp_path, root, root_whiteouts=False)
    assert len(img) == 4096
    sb = fmt.Superblock._make(fmt.SUPERBLOCK.unpack_from(img, 1024))
    assert (sb.root_nid, sb.inos, sb.build_time, sb.build_time_nsec, sb.blocks) == (36, 2, 1700000000, 0, 1)
    assert sb.feature_compat == 0x6 and sb.checksum == 0  # composefs writes no checksum (the example has one)
    assert img[:16] == struct.pack("<IIII", 0xD078629A, 1, 0, 0)
    c = fmt.INODE_COMPACT
    expect_root = (c.pack(0x0004, 6, 0o40755, 2, 40, 0, 0, 0, 0, 0, 0)
                   + struct.pack("<IB7s", 0xFFEFFFFF, 0, b"") + bytes([0x0E, 4, 1, 0]) + b"overlay.opaquey\0"
                   + fmt.DIRENT.pack(36, 0x24, 2, 0) + fmt.DIRENT.pack(36, 0x25, 2, 0)
                   + fmt.DIRENT.pack(40, 0x27, 1, 0) + b"...f")
    assert img[0x480:0x480 + len(expect_root)] == expect_root
    expect_f = (c.pack(0x0008, 0x0D, 0o100644, 1, 10000, 0, 2, 1, 0, 0, 0)
                + struct.pack("<IB7s", 0x7FFDFFFF, 0, b"")
                + bytes([0x10, 4, 0, 0]) + b"overlay.metacopy"
                + bytes([0x10, 4, 8, 0]) + b"overlay.redirect" + b"/ab/cdef" + b"\xff\xff\xff\xff")
    assert img[0x500:0x560] == expect_f
    back = Image(img).root()
    assert back.entries[b"f"].payload == "ab/cdef" and back.entries[b"f"].digest is None


# --- pinned digests (tests/pins.json; regenerate ours with tools/regen_pins.py, never by hand) -----------
PINS = load_pins()
COMPOSEFS_PINS = {k: v for k, v in PINS["composefs"].items() if k not in pin_trees.DUMPS}
OUR_PINS = {k: v for k, v in PINS["flatmount"].items() if k not in pin_trees.DUMPS}


@pytest.mark.parametrize("name", sorted(COMPOSEFS_PINS))
def test_composefs_known_answers(name, tmp_path):
    """Same tree, same bytes as mkcomposefs: digests pinned by composefs' own test suite
    (tests/assets/*.sha256 in containers/composefs)."""
    tree = pin_trees.build(name)
    path, img = write_checked(tmp_path, tree)
    assert hashlib.sha256(img).hexdigest() == COMPOSEFS_PINS[name]
    back = Image(img).root()
    if name == "chardev-nonzero-size":  # a whiteout's size is not kept (composefs writes 0 too)
        tree.entries[b"chardev"].size = 0
    assert back == tree


@pytest.mark.parametrize("name,want", [
    # composefs tests/assets/cs9-x86_64-minimal.json.gz.sha256_erofs (the same tree as the dump)
    ("cs9-x86_64-minimal.dump.gz", PINS["composefs"]["cs9-x86_64-minimal.dump.gz"]),
    # ours (no published composefs digest for it); 64,246 inodes
    ("cs9-x86_64-developer.dump.gz", PINS["flatmount"]["cs9-x86_64-developer.dump.gz"]),
])
def test_cs9_images(name, want, tmp_path):
    tree = pin_trees.load_dump(shared_data(name))
    path, img = write_checked(tmp_path, tree)
    assert hashlib.sha256(img).hexdigest() == want
    back = Image(img).root()
    assert back == tree
    assert len(img) / sum(1 for _ in walk(tree)) <= 160


@pytest.mark.parametrize("name", sorted(OUR_PINS))
def test_pinned_digests(name, tmp_path):
    """Change these only on purpose: a different digest means a different on-disk format."""
    _, img = write_checked(tmp_path, pin_trees.build(name))
    assert hashlib.sha256(img).hexdigest() == OUR_PINS[name]


# --- writer layout rules -----------------------------------------------------------------------------------
def test_every_type_round_trip(tmp_path):
    root = every_type_tree()
    _, img = write_checked(tmp_path, root)
    back = assert_round_trip(root, img)
    assert back.entries[b"huge"].size == 5 << 30
    assert back.entries[b"payload-only"].payload == "ab/cdef.file"
    assert back.entries[b"hard1"] is back.entries[b"dir"].entries[b"hard3"]
    im = Image(img)
    assert im.composefs_version == 0
    raw = raw_xattrs(im, b"/esc")
    assert raw == {b"trusted.overlay.overlay.custom": b"c", b"user.overlay.u": b"u"}
    assert raw_xattrs(im, b"/")[b"trusted.overlay.opaque"] == b"y"
    assert raw_xattrs(im, b"/hard1")[b"trusted.overlay.metacopy"] == fmt.METACOPY_HEADER + DIGEST
    assert raw_xattrs(im, b"/hard1")[b"trusted.overlay.redirect"] == b"/" + DIGEST.hex()[:2].encode() \
        + b"/" + DIGEST.hex()[2:].encode()
    assert raw_xattrs(im, b"/no-object") == {b"trusted.overlay.metacopy": b""}
    assert collect_objects(im) == {"ab/cdef.file", "00/" + DIGEST.hex()[2:],
                                   "01/" + bytes(range(1, 33)).hex()[2:]}


def test_inode_forms_and_order():
    root = every_type_tree()
    im = Image(image_bytes(root))
    sb = im.superblock
    assert sb.build_time * 10**9 + sb.build_time_nsec == -86400 * 10**9 + 7  # the minimum mtime
    r = im._rec(im._root_nid)
    assert im._root_nid == 36 and r.off == 1152
    # breadth-first: root's children (sorted) get inode numbers 1..N in name order, except /hard1,
    # whose group is queued at its first name in dump order, /dir/hard2
    names = sorted([*root.entries, *[b"%02x" % i for i in range(256) if b"%02x" % i not in root.entries]])
    names.remove(b"hard1")
    inos = []
    for name in names:
        off = im._meta + child_nid(im, r, name) * 32
        inos.append(struct.unpack_from("<I", im._d, off + 0x14)[0])  # i_ino, same offset in both forms
    assert inos == list(range(1, len(names) + 1))
    hard1 = struct.unpack_from("<I", im._d, im._meta + child_nid(im, r, b"hard1") * 32 + 0x14)[0]
    assert hard1 > len(names)


def test_hardlink_primary_is_first_in_dump_order():
    """The inode of a hardlink group is queued where its first path in depth-first name order is."""
    f = Inode.file(b"shared")
    root = Inode.directory()
    a = Inode.directory()
    root.entries[b"a"] = a
    a.entries[b"c"] = Inode.file(b"c")
    a.entries[b"deep"] = f     # /a/deep: first in dump order, but deeper
    root.entries[b"m"] = Inode.file(b"m")
    root.entries[b"z"] = f     # /z: first in breadth-first order
    im = Image(image_bytes(root, root_whiteouts=False))
    r = im._rec(im._root_nid)
    nid_z = child_nid(im, r, b"z")
    ino = struct.unpack_from("<I", im._d, im._meta + nid_z * 32 + 0x14)[0]
    # queue: root 0, a 1, m 2 (z is only a link), then a's children: c 3, deep 4
    assert ino == 4
    assert im._rec(nid_z).nlink == 2
    assert child_nid(im, im._rec(child_nid(im, r, b"a")), b"deep") == nid_z
    back = im.root()
    assert back.entries[b"z"] is back.entries[b"a"].entries[b"deep"]


def test_escape_and_whiteouts_layer(tmp_path):
    root = layer_tree()
    path, img = write_checked(tmp_path, root)
    im = Image(img)
    assert im.composefs_version == 1
    assert_round_trip(root, img)
    assert raw_xattrs(im, b"/etc") == {
        b"trusted.overlay.overlay.whiteouts": b"", b"user.overlay.whiteouts": b"",
        b"trusted.overlay.overlay.opaque": b"x", b"user.overlay.opaque": b"x"}
    assert raw_xattrs(im, b"/etc/deleted.conf") == {b"trusted.overlay.overlay.whiteout": b"",
                                                     b"user.overlay.whiteout": b""}
    assert raw_xattrs(im, b"/opaque") == {b"trusted.overlay.overlay.opaque": b"y"}
    # deviation from libcomposefs: an opaque dir with whiteouts stays opaque ("y", not "x")
    assert raw_xattrs(im, b"/opaque-with-whiteout")[b"trusted.overlay.overlay.opaque"] == b"y"
    assert im.lookup("/etc/deleted.conf").is_whiteout
    assert im.lookup("/7f").is_whiteout        # a source whiteout named like a root marker stays
    assert im.lookup("/7e") is None            # the writer's own marker does not
    assert im.lookup("/opaque").is_opaque


def test_no_whiteouts_means_version_0():
    assert Image(image_bytes(Inode.directory())).composefs_version == 0


def test_root_whiteouts_inherit_selinux():
    root = Inode.directory(xattrs={b"security.selinux": b"ctx"}, uid=5, mtime_ns=7)
    im = Image(image_bytes(root))
    rec = im._rec(child_nid(im, im._rec(im._root_nid), b"00"))
    assert (rec.mode, rec.iu, rec.uid) == (stat.S_IFCHR | 0o644, 0, 5)
    assert dict(im._xattrs(rec)) == {b"security.selinux": b"ctx"}
    assert im.root() == root


@pytest.mark.parametrize("n", [0, 1, 100, 339, 340, 341, 1000, 5000])
def test_big_directories(tmp_path, n):
    root = Inode.directory()
    d = Inode.directory()
    root.entries[b"d"] = d
    for i in range(n):
        d.entries[b"entry-%06d" % i] = Inode.file(b"")
    _, img = write_checked(tmp_path, root)
    im = Image(img)
    back = assert_round_trip(root, img)
    assert back.entries[b"d"].size == dir_size(d.entries)
    for i in (0, n // 3, n // 2, n - 1):
        if n:
            assert im.lookup(b"/d/entry-%06d" % i) == Inode.file(b"")
    assert im.lookup(b"/d/entry-") is None
    assert im.lookup(b"/d/zzz") is None
    assert im.lookup(b"/d/entry-%06d" % n) is None


def test_dir_size_rules():
    assert dir_size([]) == 27
    assert dir_size([b"f"]) == 40
    # a tail over half a block is not inlined: the directory becomes one full block
    names = [b"%08d" % i for i in range(102)]      # 2 + 102 entries of 20 bytes = 2067 bytes
    assert dir_size(names) == 4096
    names = [b"%08d" % i for i in range(100)]
    assert dir_size(names) == 27 + 100 * 20


@pytest.mark.parametrize("size", [1, 63, 64, 65, 2048, 2049, 4096, 4097, 6000, 9000])
def test_inline_content_sizes(tmp_path, size):
    root = Inode.directory()
    root.entries[b"f"] = Inode.file(bytes(i % 251 for i in range(size)), xattrs={b"user.x": b"y" * 100})
    _, img = write_checked(tmp_path, root)
    assert_round_trip(root, img)


@pytest.mark.parametrize("tlen", [1, 100, 3000, 3990, 4000, 4095])
def test_symlink_lengths(tmp_path, tlen):
    root = Inode.directory()
    root.entries[b"l"] = Inode.symlink(b"t" * tlen, xattrs={b"trusted.pad": b"p" * 200})
    _, img = write_checked(tmp_path, root)
    assert_round_trip(root, img)


def test_shared_xattr_rules():
    """A (name, value) used by more than one inode is shared; composefs orders the area descending."""
    root = Inode.directory()
    for i in range(3):
        root.entries[b"f%d" % i] = Inode.file(b"x", xattrs={b"user.common": b"same", b"user.own": b"%d" % i})
    im = Image(image_bytes(root, root_whiteouts=False))
    rec = im._rec(child_nid(im, im._rec(im._root_nid), b"f1"))
    shared_count = im._d[rec.xoff + 4]
    assert shared_count == 1
    assert im.root() == root


def test_many_shared_xattrs_cap():
    """At most 128 shared ids per inode; the rest stays inline."""
    xs = {b"user.k%03d" % i: b"v" for i in range(200)}
    root = Inode.directory()
    root.entries[b"a"] = Inode.file(b"1", xattrs=dict(xs))
    root.entries[b"b"] = Inode.file(b"2", xattrs=dict(xs))
    im = Image(image_bytes(root))
    rec = im._rec(child_nid(im, im._rec(im._root_nid), b"a"))
    assert im._d[rec.xoff + 4] == 128
    assert im.root() == root


def test_acl_flag():
    root = Inode.directory(xattrs={b"system.posix_acl_access": b"\x02\0\0\0"})
    assert Image(image_bytes(root)).header.flags == fmt.ComposefsFlags.HAS_ACL
    assert Image(image_bytes(Inode.directory())).header.flags == 0


def test_insertion_order_does_not_matter():
    a = every_type_tree()
    b = every_type_tree()
    b.entries = dict(reversed(list(b.entries.items())))
    b.xattrs = dict(reversed(list(b.xattrs.items())))
    assert image_bytes(a) == image_bytes(b)


@pytest.mark.parametrize("bad", [
    lambda r: r.entries.__setitem__(b"a/b", Inode.file(b"")),
    lambda r: r.entries.__setitem__(b"", Inode.file(b"")),
    lambda r: r.entries.__setitem__(b"..", Inode.file(b"")),
    lambda r: r.entries.__setitem__(b"x\0y", Inode.file(b"")),
    lambda r: r.entries.__setitem__(b"n" * 256, Inode.file(b"")),
    lambda r: r.entries.__setitem__(b"loop", r),
    lambda r: r.entries.__setitem__(b"s", Inode.symlink(b"")),
    lambda r: r.entries.__setitem__(b"s", Inode.symlink(b"t" * 4096)),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"1", xattrs={b"user." + b"k" * 256: b""})),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"1", xattrs={b"user.k": b"v" * 65536})),
    lambda r: r.entries.__setitem__(b"x", Inode(S_IFREG, size=5, digest=b"short")),
    lambda r: r.entries.__setitem__(b"x", Inode(stat.S_IFCHR, rdev=1 << 40)),
    lambda r: r.entries.__setitem__(b"x", Inode(0o170644)),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"", uid=1 << 32)),
])
def test_writer_rejects(bad):
    root = Inode.directory()
    d = Inode.directory()
    root.entries[b"d"] = d
    bad(root)
    with pytest.raises(FormatError):
        image_bytes(root)


def test_directory_hardlink_rejected():
    root = Inode.directory()
    d = Inode.directory()
    root.entries[b"a"] = d
    root.entries[b"b"] = d
    with pytest.raises(FormatError):
        image_bytes(root)


def test_read_tree_and_open(tmp_path):
    root = every_type_tree()
    path, _ = write_checked(tmp_path, root)
    assert read_tree(path) == root
    with Image.open(path) as im:
        assert im.lookup("/dir/hard2") == root.entries[b"hard1"]
        assert im.lookup("/dir/empty") == Inode.directory(mtime_ns=T0)
        assert im.lookup("/") == root
        assert im.lookup("/link/x") is None
        assert im.lookup("/00") is None
    assert collect_objects(path) == collect_objects(Image(path.read_bytes()))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError):
        Image.open(empty)


def test_input_and_output_kinds(tmp_path):
    import io

    root = every_type_tree()
    buf = io.BytesIO()
    write_image(root, buf)
    data = buf.getvalue()
    assert data == image_bytes(root)
    for form in (data, bytearray(data), memoryview(data), memoryview(bytearray(data))):
        im = Image(form)
        assert im.root() == root
        assert im.lookup(b"/\xff\xfe-not-utf8") == root.entries[b"\xff\xfe-not-utf8"]


def test_unknown_xattr_namespaces_round_trip():
    """Names outside the EROFS prefixes are stored whole with index 0, as libcomposefs does (the
    kernel does not list them); the reader gives them back unchanged."""
    root = Inode.directory()
    root.entries[b"f"] = Inode.file(b"x", xattrs={b"system.foo": b"1", b"lustre.x": b"2", b"user.ok": b"3"})
    im = Image(image_bytes(root))
    rec = im._rec(child_nid(im, im._rec(im._root_nid), b"f"))
    assert im._d[rec.xoff + 12 + 1] == 0  # first inline entry (lustre.x) has index 0
    assert im.root() == root


# --- hypothesis: random trees -----------------------------------------------------------------------------
NAMES = st.lists(st.integers(1, 255).filter(lambda c: c != 0x2F), min_size=1, max_size=12).map(bytes) \
    .filter(lambda b: b not in (b".", b".."))
XNAMES = st.sampled_from([b"user.a", b"user.bb", b"trusted.t", b"security.selinux", b"security.capability",
                          b"trusted.overlay.custom", b"user.overlay.u", b"system.posix_acl_default",
                          b"lustre.l", b"weird.ns"])
XVALUES = st.sampled_from([b"", b"v", b"value-2", bytes(range(40)), b"x" * 300])
XATTRS = st.dictionaries(XNAMES, XVALUES, max_size=4)
MTIMES = st.sampled_from([T0, T0, T0 + 1, T0 + 999_999_999, 0, -1, -86400 * 10**9 * 400 + 3, 1 << 62])
IDS = st.sampled_from([0, 0, 1, 1000, 65535, 65536, 2**32 - 1])
PERMS = st.integers(0, 0o7777)


@st.composite
def trees(draw, max_nodes: int = 30, whiteouts: bool = True, kernel: bool = False) -> Inode:
    ids = IDS.filter(lambda x: x != 2**32 - 1) if kernel else IDS  # (uid_t)-1 shows as the overflow id

    def meta():
        return {"uid": draw(ids), "gid": draw(ids), "mtime_ns": draw(MTIMES), "xattrs": draw(XATTRS)}

    root = Inode.directory(draw(PERMS), **meta())
    dirs = [root]
    nondirs: list[Inode] = []
    kinds = ["dir", "inline", "empty", "external", "symlink", "chr", "blk", "fifo", "sock", "hardlink"]
    if whiteouts:
        kinds.append("whiteout")
    for _ in range(draw(st.integers(0, max_nodes))):
        parent = draw(st.sampled_from(dirs))
        name = draw(st.one_of(NAMES, st.just(b"L" * 255), st.sampled_from([b"00", b"7e", b"ff", b"-x", b"+y"])))
        if name in parent.entries:
            continue
        kind = draw(st.sampled_from(kinds))
        perm = draw(PERMS)
        if kind == "dir":
            xs = meta()
            if draw(st.booleans()):
                xs["xattrs"][b"trusted.overlay.opaque"] = b"y"
            node = Inode.directory(perm, **xs)
            dirs.append(node)
        elif kind == "hardlink" and nondirs:
            node = draw(st.sampled_from(nondirs))
        elif kind == "inline":
            node = Inode.file(draw(st.binary(min_size=1, max_size=100)), perm, **meta())
        elif kind == "external":
            node = Inode(S_IFREG | perm, size=draw(st.integers(1, 1 << 40)),
                         digest=draw(st.none() | st.binary(min_size=32, max_size=32)),
                         payload=draw(st.none() | st.sampled_from(["ab/cd", "12/" + "3" * 62])), **meta())
        elif kind == "symlink":
            node = Inode.symlink(draw(st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)),
                                 perm, **meta())
        elif kind in ("chr", "blk"):
            dev = os.makedev(draw(st.integers(0, 4095)), draw(st.integers(0, (1 << 20) - 1)))
            if kind == "chr" and dev == 0:
                dev = 1
            node = Inode((stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | perm, rdev=dev, **meta())
        elif kind == "whiteout":
            xs = meta()
            node = Inode.whiteout(uid=xs["uid"], gid=xs["gid"], mtime_ns=xs["mtime_ns"])
        else:
            t = {"fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK}.get(kind, S_IFREG)
            node = Inode(t | perm, **meta())
        parent.entries[name] = node
        if not node.is_dir:
            nondirs.append(node)
    return root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees())
def test_random_trees_round_trip(tmp_path_factory, root):
    img = image_bytes(root)
    assert image_bytes(root) == img
    assert_round_trip(root, img)


POOL_DIGESTS = [bytes([i]) * 32 for i in (0x00, 0x12, 0xAB, 0xFF)]   # few: many files share content
BIG_SIZES = st.sampled_from([1, 100, 4096, 1 << 20, (1 << 43) + 1, 9_000_000_000_000_000])


@st.composite
def shared_content_trees(draw) -> Inode:
    """Directories of external files drawn from a few digests, each given as a digest alone, with the
    payload derived from it spelled out, with another payload, or with more xattrs."""
    root = Inode.directory(0o755)
    for d in range(draw(st.integers(1, 4))):
        sub = root.entries[b"d%d" % d] = Inode.directory(0o755)
        for f in range(draw(st.integers(0, 12))):
            dg = draw(st.sampled_from(POOL_DIGESTS) | st.none())
            how = draw(st.sampled_from(["digest", "digest", "derived", "other", "xattrs"]))
            payload = None
            if how == "derived" and dg is not None:
                payload = dg.hex()[:2] + "/" + dg.hex()[2:]
            elif how == "other" or dg is None:
                payload = draw(st.sampled_from(["ab/cd", "12/" + "3" * 62, POOL_DIGESTS[1].hex()[:2] + "/"
                                                + POOL_DIGESTS[1].hex()[2:]]))
            xattrs = {b"user.x": draw(st.sampled_from([b"1", b"2"]))} if how == "xattrs" else None
            sub.entries[b"f%d" % f] = Inode(S_IFREG | 0o644, size=draw(BIG_SIZES), digest=dg,
                                           payload=payload, xattrs=xattrs, mtime_ns=draw(MTIMES))
    return root


@settings(max_examples=60, deadline=None)
@given(shared_content_trees())
def test_digest_only_files_as_if_spelled_out(root):
    """The writer makes a digest-only file's metacopy and redirect without item tuples (its fast
    path); the same file with the redirect spelled out as its payload takes the general path, and
    the two images must be the same bytes, whatever is shared with what."""
    img = image_bytes(root)
    for _path, node in walk(root):
        if node.is_reg and node.digest is not None and node.payload is None:
            node.payload = node.digest.hex()[:2] + "/" + node.digest.hex()[2:]
    assert image_bytes(root) == img
    assert_round_trip(root, img)


def _dump_order_primaries(root: Inode) -> dict[int, tuple[int, bytes]]:
    """The first (id(parent), name) of every inode in depth-first, name-sorted order: what the writer
    once computed for the whole tree whenever it had hardlinks (the reference for the shortcut)."""
    first: dict[int, tuple[int, bytes]] = {}
    stack = [(id(root), iter(sorted(root.entries.items())))]
    while stack:
        parent, it = stack[-1]
        for name, child in it:
            first.setdefault(id(child), (parent, name))
            if child.entries is not None:
                stack.append((id(child), iter(sorted(child.entries.items()))))
                break
        else:
            stack.pop()
    return first


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(max_nodes=60, whiteouts=False))
def test_hardlink_queue_order_matches_dump_order(root):
    """The writer walks once and re-walks only when a hardlink's first name in dump order is not the
    one that queued it: the result is the walk with every inode queued at its dump-order first name."""
    from flatmount.image import writer

    # (without the root whiteouts: each walk makes its own, so their ids differ)
    want = writer._collect(root, False, _dump_order_primaries(root))
    walk1 = writer._collect(root, False, None)
    primary = writer._primary_names(*(walk1[i] for i in (0, 1, 2, 7, 8, 9))) if walk1[7] else None
    got = walk1 if primary is None else writer._collect(root, False, primary)
    assert [id(n) for n in got[0]] == [id(n) for n in want[0]]
    assert got[1:4] == want[1:4]   # names, children, nlink


def test_hardlink_deeper_in_dump_order_rewalks():
    f = Inode.file(b"x")
    root = Inode.directory()
    root.entries[b"z"] = f                                               # breadth-first: first
    root.entries[b"a"] = Inode.directory(entries={b"b": Inode.directory(entries={b"f": f})})  # dump order
    from flatmount.image import writer

    walk1 = writer._collect(root, True, None)
    assert writer._primary_names(*(walk1[i] for i in (0, 1, 2, 7, 8, 9))) is not None
    same_dir = Inode.directory(entries={b"a": f, b"b": f})
    walk2 = writer._collect(same_dir, True, None)
    assert walk2[7] and writer._primary_names(*(walk2[i] for i in (0, 1, 2, 7, 8, 9))) is None


@given(st.lists(st.integers(1, 255), max_size=400))
def test_dir_block_packing(lengths):
    """Greedy packing of dirents into blocks, as a plain loop does it."""
    from flatmount.image.writer import _dir_blocks

    names = [b"%06d" % i + b"x" * (n - 6) if n >= 6 else b"%0*d" % (n, i % 10 ** n) for i, n in enumerate(lengths)]
    starts, used, k = [0], 0, 0
    for name in names:
        if used + 12 + len(name) > fmt.BLKSZ:
            starts.append(k)
            used = 0
        used += 12 + len(name)
        k += 1
    nblocks = len(starts) - 1
    if used > fmt.DIR_INLINE_MAX:
        nblocks, used = nblocks + 1, 0
    assert _dir_blocks(names) == (starts, nblocks, used)


@given(st.lists(st.tuples(st.sampled_from([b"user.a", b"trusted.b", b"security.c"]),
                          st.binary(max_size=6)), unique=True))
def test_shared_xattr_order(items):
    from flatmount.image.writer import _shared_order

    assert _shared_order(items) == sorted(items, key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)


@pytest.mark.parametrize("size", [1, 4096, 4097, (1 << 43) - 1, 1 << 43, (1 << 43) + 1, 5 << 43, 1 << 50])
def test_chunk_map_sizes(size):
    """The writer's inline chunk-size rule is `fmt.chunk_bits`: one chunk up to 2^43 bytes, then
    2^43-byte chunks."""
    root = Inode.directory()
    root.entries[b"f"] = Inode(S_IFREG | 0o644, size=size, digest=DIGEST)
    im = Image(image_bytes(root))
    rec = im._rec(child_nid(im, im._rec(im._root_nid), b"f"))
    bits = fmt.chunk_bits(size)
    assert rec.iu & fmt.CHUNK_FORMAT_BLKBITS_MASK == bits - fmt.BLKSZBITS
    nchunks = -(-size // (1 << bits))
    assert im._d[rec.data_off:rec.data_off + 4 * nchunks] == b"\xff" * 4 * nchunks
    assert im.root().entries[b"f"].size == size


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(root=trees(max_nodes=20))
def test_random_trees_fsck(tmp_path, root):
    path = tmp_path / "h.erofs"
    path.write_bytes(image_bytes(root))
    fsck(path)


# --- kernel -------------------------------------------------------------------------------------------------
def expected_stored_xattrs(node: Inode, is_root: bool, has_whiteout_child: bool) -> dict[bytes, bytes]:
    xs = escaped(node.xattrs)
    if node.is_whiteout:
        xs[b"trusted.overlay.overlay.whiteout"] = b""
        xs[b"user.overlay.whiteout"] = b""
    if node.is_external and node.size > 0 or (node.is_reg and node.content is None and node.size > 0):
        xs[b"trusted.overlay.metacopy"] = fmt.METACOPY_HEADER + node.digest if node.digest else b""
        if node.object_path:
            xs[b"trusted.overlay.redirect"] = b"/" + node.object_path.encode()
    if has_whiteout_child:
        xs[b"trusted.overlay.overlay.whiteouts"] = b""
        xs[b"user.overlay.whiteouts"] = b""
        xs.setdefault(b"trusted.overlay.overlay.opaque", b"x")
        xs[b"user.overlay.opaque"] = b"x"
    if is_root:
        xs[b"trusted.overlay.opaque"] = b"y"
    return xs


# The kernel lists no index-0 (unknown namespace) or lustre.* xattrs, and parses the values of
# security.capability and system.posix_acl_*: those are compared by the reader tests only.
_KERNEL_SKIP = (b"system.posix_acl", b"security.capability", b"lustre.", b"weird.")


def check_mount_matches(root: Inode, mnt: Path) -> None:
    """Every path of the tree, as the kernel sees it in a plain erofs mount of its image."""
    inos: dict[int, set[int]] = defaultdict(set)
    counts: dict[int, int] = defaultdict(int)
    for path, node in walk(root):
        p = os.path.join(os.fsencode(mnt), path.lstrip(b"/"))
        st_ = os.lstat(p)
        mode = node.mode if not node.is_whiteout else (S_IFREG | (node.mode & 0o7777))
        assert st_.st_mode == mode, path
        assert (st_.st_uid, st_.st_gid) == (node.uid, node.gid), path
        assert st_.st_mtime_ns == node.mtime_ns, path
        if node.is_dir:
            names = set(os.listdir(p))
            want = set(node.entries)
            if path == b"/":
                want |= {b"%02x" % i for i in range(256)}
            assert names == want, path
            assert st_.st_nlink == 2 + sum(c.is_dir for c in node.entries.values())
            assert st_.st_size == dir_size(node.entries if path != b"/" else want)
        elif node.is_symlink:
            assert os.readlink(p) == node.target
            assert st_.st_size == len(node.target)
        elif node.is_reg:
            assert st_.st_size == node.size
            with open(p, "rb") as f:
                head = f.read(4096)
            assert head == (node.content or bytes(min(node.size, 4096)))
        elif stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert st_.st_rdev == node.rdev
        if not node.is_dir:
            inos[id(node)].add(st_.st_ino)
            counts[id(node)] += 1
            assert st_.st_nlink == counts_total(root)[id(node)]
        whiteout_child = node.is_dir and any(c.is_whiteout for c in node.entries.values())
        want_x = expected_stored_xattrs(node, path == b"/", whiteout_child)
        if not (node.is_dir or node.is_reg or node.is_whiteout):  # user.* is not readable there
            want_x = {k: v for k, v in want_x.items() if not k.startswith(b"user.")}
        got = {}
        for k in os.listxattr(p, follow_symlinks=False):
            kb = os.fsencode(k)
            if kb.startswith(b"user.") and not (node.is_dir or node.is_reg or node.is_whiteout):
                continue
            if kb.startswith(_KERNEL_SKIP):
                continue
            got[kb] = os.getxattr(p, k, follow_symlinks=False)
        want_x = {k: v for k, v in want_x.items() if not k.startswith(_KERNEL_SKIP)}
        assert got == want_x, path
    assert all(len(s) == 1 for s in inos.values())


_COUNTS: list = [None, None]   # (root, its counts): keyed by the object itself, ids get reused


def counts_total(root: Inode) -> dict[int, int]:
    """How many names each inode of `root` has (its expected nlink)."""
    if _COUNTS[0] is not root:
        c: dict[int, int] = defaultdict(int)
        for _, node in walk(root):
            c[id(node)] += 1
        _COUNTS[:] = [root, c]
    return _COUNTS[1]


def test_kernel_mount_every_type(tmp_path):
    root = every_type_tree()
    path, _ = write_checked(tmp_path, root)
    with mounted(path, tmp_path / "mnt") as mnt:
        check_mount_matches(root, mnt)
        st_ = os.stat(mnt / "huge")
        assert st_.st_size == 5 << 30


def test_kernel_mount_layer(tmp_path):
    root = layer_tree()
    path, _ = write_checked(tmp_path, root)
    with mounted(path, tmp_path / "mnt") as mnt:
        check_mount_matches(root, mnt)


def test_kernel_mount_negative_build_time(tmp_path):
    """All inodes compact with a build_time before 1970."""
    t = -86400 * 10**9 * 1000 + 5
    root = Inode.directory(mtime_ns=t)
    root.entries[b"f"] = Inode.file(b"x", mtime_ns=t)
    root.entries[b"d"] = Inode.directory(mtime_ns=t)
    path, img = write_checked(tmp_path, root)
    assert Image(img).superblock.build_time < 0
    with mounted(path, tmp_path / "mnt") as mnt:
        check_mount_matches(root, mnt)


def test_kernel_mount_big_directory(tmp_path):
    root = Inode.directory()
    d = Inode.directory()
    root.entries[b"d"] = d
    for i in range(5000):
        d.entries[b"%d-name" % i] = Inode.symlink(b"target-%d" % i)
    path, _ = write_checked(tmp_path, root)
    with mounted(path, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt / "d")) == sorted(os.fsdecode(n) for n in d.entries)
        for i in range(0, 5000, 97):  # lookups go through the kernel's binary search
            assert os.readlink(mnt / "d" / f"{i}-name") == f"target-{i}"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                               HealthCheck.function_scoped_fixture])
@given(root=trees(max_nodes=15, kernel=True))
def test_kernel_mount_random(tmp_path, root):
    path = tmp_path / "k.erofs"
    path.write_bytes(image_bytes(root))
    with mounted(path, tmp_path / "mnt") as mnt:
        check_mount_matches(root, mnt)


def test_read_tree_files_the_tree_with_old_objects(tmp_path):
    """A whole tree read from an image holds no cycles: it must not be left for the next young GC
    collections to walk (a `dump` of a 64k-inode image paid for that right after the read)."""
    import gc

    root = Inode.directory(0o755)
    for i in range(3000):
        root.entries[b"f%d" % i] = Inode(stat.S_IFREG | 0o644, size=100, digest=bytes([i % 256]) * 32)
    path = tmp_path / "img.erofs"
    path.write_bytes(image_bytes(root))
    gc.disable()
    try:
        tree = read_tree(path)
        young = {id(o) for o in gc.get_objects(generation=0)}
        assert sum(1 for _, node in walk(tree) if id(node) in young) == 0
    finally:
        gc.enable()
    assert tree == root
