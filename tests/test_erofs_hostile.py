"""The EROFS reader on hostile input: only CorruptImageError, never a hang or a bogus allocation."""

from __future__ import annotations

import os
import random
import stat
import struct
import time

import pytest

from flatmount.errors import CorruptImageError
from flatmount.image import format as fmt
from flatmount.image.reader import Image, collect_objects
from flatmount.image.tree import Inode
from flatmount.image.writer import image_bytes
from tests.test_erofs import child_nid, every_type_tree, layer_tree

MAX_SECONDS = 2.0  # per parse of a (small) damaged image


def exercise(data: bytes) -> None:
    """Everything a caller can do with an image; may raise only CorruptImageError."""
    im = Image(data)
    im.root()
    for p in ("/dir/hard2", "/dir/empty", "/etc/deleted.conf", "/d/!0300", "/d/zzz", "/nope", "/link/x"):
        im.lookup(p)
    collect_objects(im)


def check(data: bytes) -> None:
    t0 = time.perf_counter()
    try:
        exercise(data)
    except CorruptImageError:
        pass
    assert time.perf_counter() - t0 < MAX_SECONDS


def dir_tree() -> Inode:
    root = Inode.directory()
    d = Inode.directory()
    root.entries[b"d"] = d
    for i in range(400):
        d.entries[b"!%04d" % i] = Inode(stat.S_IFREG | 0o644, size=i + 100, digest=bytes([i % 256]) * 32)
    return root


@pytest.fixture(scope="module", params=["every-type", "layer", "dir"])
def image(request) -> bytes:
    tree = {"every-type": every_type_tree, "layer": layer_tree, "dir": dir_tree}[request.param]()
    data = image_bytes(tree)
    exercise(data)  # the undamaged image is fine
    return data


def test_truncations(image):
    n = len(image)
    cuts = sorted({*range(0, n, 37), *range(1000, 1300), n - 1, n - 4096, n - 4095})
    for cut in cuts:
        if 0 <= cut < n:
            with pytest.raises(CorruptImageError):  # the superblock's block count catches them all
                exercise(image[:cut])


def test_truncated_but_block_count_patched(image):
    """Truncate and lie about the size: the per-structure bounds checks must still hold."""
    n = len(image)
    for cut in range(1152, n, max(1, n // 300)):
        data = bytearray(image[:cut])
        blocks = cut // fmt.BLKSZ
        struct.pack_into("<I", data, fmt.SUPER_OFFSET + 0x24, blocks)
        check(bytes(data))


def test_bit_flips(image):
    rng = random.Random(len(image))
    meta_end = min(len(image), 16384)
    for _ in range(1500):
        data = bytearray(image)
        for _ in range(rng.choice((1, 1, 2, 4))):
            off = rng.randrange(fmt.SUPER_OFFSET, meta_end) if rng.random() < 0.9 else rng.randrange(len(data))
            data[off] ^= 1 << rng.randrange(8)
        check(bytes(data))


def test_random_byte_runs(image):
    rng = random.Random(7)
    for _ in range(400):
        data = bytearray(image)
        off = rng.randrange(fmt.SUPER_OFFSET + 128, min(len(data), 16384) - 16)
        data[off:off + 8] = rng.randbytes(8) if rng.random() < 0.5 else b"\xff" * 8
        check(bytes(data))


def test_garbage_after_superblock():
    rng = random.Random(1)
    base = bytearray(image_bytes(every_type_tree()))
    for _ in range(200):
        data = bytearray(base)
        data[fmt.SUPER_OFFSET + 128:] = rng.randbytes(len(data) - fmt.SUPER_OFFSET - 128)
        check(bytes(data))


@pytest.mark.parametrize("data", [b"", b"\0" * 100, b"\0" * 4096, b"\xff" * 8192])
def test_not_an_image(data):
    with pytest.raises(CorruptImageError):
        Image(data)


# --- crafted -------------------------------------------------------------------------------------------
def _nested() -> tuple[bytearray, Image]:
    root = Inode.directory()
    a = Inode.directory()
    root.entries[b"a"] = a
    a.entries[b"b"] = Inode.directory()
    a.entries[b"f"] = Inode.file(b"x")
    root.entries[b"s"] = Inode.symlink(b"target")
    data = bytearray(image_bytes(root, root_whiteouts=False))
    return data, Image(bytes(data))


def _dirent_off(im: Image, dir_rec, name: bytes) -> int:
    """Byte offset of the dirent for `name` in an inline directory."""
    names = sorted([b".", b"..", *[e[0] for e in im._block(dir_rec, 0, 1) if e[0] not in (b".", b"..")]])
    return dir_rec.data_off + 12 * names.index(name)


def _corrupts(data: bytearray, match: str | None = None) -> None:
    t0 = time.perf_counter()
    with pytest.raises(CorruptImageError, match=match):
        exercise(bytes(data))
    assert time.perf_counter() - t0 < MAX_SECONDS


def test_directory_cycle_to_root():
    data, im = _nested()
    a = im._rec(child_nid(im, im._rec(im._root_nid), b"a"))
    struct.pack_into("<Q", data, _dirent_off(im, a, b"b"), im._root_nid)
    _corrupts(data)


def test_directory_cycle_to_self_and_parent():
    for target in ("self", "parent"):
        data, im = _nested()
        a_nid = child_nid(im, im._rec(im._root_nid), b"a")
        a = im._rec(a_nid)
        struct.pack_into("<Q", data, _dirent_off(im, a, b"b"), a_nid if target == "self" else im._root_nid)
        _corrupts(data)


def test_dot_and_dotdot_checked():
    for name in (b".", b".."):
        data, im = _nested()
        a = im._rec(child_nid(im, im._rec(im._root_nid), b"a"))
        struct.pack_into("<Q", data, _dirent_off(im, a, name), 40 + 64)
        _corrupts(data)


def test_entry_beyond_image():
    data, im = _nested()
    a = im._rec(child_nid(im, im._rec(im._root_nid), b"a"))
    struct.pack_into("<Q", data, _dirent_off(im, a, b"f"), (1 << 64) - 1)
    _corrupts(data, "beyond the end")


def test_entry_type_mismatch():
    data, im = _nested()
    a = im._rec(child_nid(im, im._rec(im._root_nid), b"a"))
    data[_dirent_off(im, a, b"f") + 10] = fmt.FileType.DIR
    _corrupts(data, "type")


def test_unsorted_entries():
    data, im = _nested()
    a = im._rec(child_nid(im, im._rec(im._root_nid), b"a"))
    names_at = a.data_off + 12 * 4  # ".", "..", "b", "f" -> names "...bf"
    assert bytes(data[names_at:names_at + 5]) == b"...bf"
    data[names_at + 3:names_at + 5] = b"fb"
    _corrupts(data, "sorted")


def test_huge_directory_size():
    data, im = _nested()
    a = im._rec(child_nid(im, im._rec(im._root_nid), b"a"))
    struct.pack_into("<I", data, a.off + 8, 0xFFFFFFFF)
    _corrupts(data)


def test_huge_extended_sizes():
    root = Inode.directory()
    root.entries[b"f"] = Inode(stat.S_IFREG, size=5 << 30, uid=70000)  # extended, chunk-based
    root.entries[b"c"] = Inode.file(b"content", uid=70000)              # extended, inline
    data = bytearray(image_bytes(root))
    im = Image(bytes(data))
    for name in (b"f", b"c"):
        d2 = bytearray(data)
        rec = im._rec(child_nid(im, im._rec(im._root_nid), name))
        struct.pack_into("<Q", d2, rec.off + 8, (1 << 64) - 1)
        _corrupts(d2)
        # chunk bits 12 and a 2^63 size: 2^51 chunk entries must not be allocated or walked
        struct.pack_into("<Q", d2, rec.off + 8, 1 << 63)
        struct.pack_into("<H", d2, rec.off + 0x10, 0)
        _corrupts(d2)


def test_bad_symlink_size():
    data, im = _nested()
    s = im._rec(child_nid(im, im._rec(im._root_nid), b"s"))
    for size in (0, 5000, 0xFFFFFFFF):
        d2 = bytearray(data)
        struct.pack_into("<I", d2, s.off + 8, size)
        _corrupts(d2)


XATTR_DAMAGE = {
    "icount": lambda d, rec: struct.pack_into("<H", d, rec.off + 2, 0xFFFF),
    "shared count": lambda d, rec: d.__setitem__(rec.xoff + 4, 0xFF),
    "shared id": lambda d, rec: struct.pack_into("<I", d, rec.xoff + 12, 0xFFFFFFFF),
    "filter": lambda d, rec: struct.pack_into("<I", d, rec.xoff, 0xFFFFFFFF),
    "name index": lambda d, rec: d.__setitem__(rec.xoff + 16 + 1, 0x85),
    "value size": lambda d, rec: struct.pack_into("<H", d, rec.xoff + 16 + 2, 0xFFFF),
}


@pytest.mark.parametrize("case", sorted(XATTR_DAMAGE))
def test_xattr_damage(case):
    root = Inode.directory()
    for i in range(2):
        root.entries[b"f%d" % i] = Inode.file(b"x", xattrs={b"user.shared": b"s", b"user.own": b"%d" % i})
    data = bytearray(image_bytes(root))
    im = Image(bytes(data))
    rec = im._rec(child_nid(im, im._rec(im._root_nid), b"f0"))
    assert im._d[rec.xoff + 4] == 1  # one shared id, then the inline entry at xoff + 16
    XATTR_DAMAGE[case](data, rec)
    _corrupts(data)


@pytest.mark.parametrize("field,value", [
    (0x00, 0x12345678),          # magic
    (0x08, 0x7),                 # checksum flag, checksum 0
    (0x0C, 13),                  # blkszbits
    (0x24, 0xFFFFFF),            # blocks beyond the file
    (0x50, 0x2),                 # unsupported incompat feature
    (0x5A, 1),                   # dirblkbits
    (0x0E, 0xFFFF),              # root nid beyond the image
    (0x0E, 40),                  # root nid pointing at a non-directory
])
def test_superblock_damage(field, value):
    root = Inode.directory()
    root.entries[b"f"] = Inode.file(b"x")
    data = bytearray(image_bytes(root, root_whiteouts=False))
    off = fmt.SUPER_OFFSET + field
    if field in (0x0C, 0x5A):
        data[off] = value
    elif field == 0x0E:
        struct.pack_into("<H", data, off, value)
    else:
        struct.pack_into("<I", data, off, value)
    with pytest.raises(CorruptImageError):
        exercise(bytes(data))


def test_valid_checksum_accepted_bad_rejected():
    root = Inode.directory()
    data = bytearray(image_bytes(root))
    struct.pack_into("<I", data, fmt.SUPER_OFFSET + 8, 0x7)
    raw = bytearray(data[fmt.SUPER_OFFSET:fmt.BLKSZ])
    raw[4:8] = bytes(4)
    struct.pack_into("<I", data, fmt.SUPER_OFFSET + 4, fmt.crc32c_linux(bytes(raw)))
    assert Image(bytes(data)).root() == root
    data[fmt.SUPER_OFFSET + 4] ^= 1
    with pytest.raises(CorruptImageError, match="checksum"):
        Image(bytes(data))


def test_bad_composefs_header_version():
    data = bytearray(image_bytes(Inode.directory()))
    struct.pack_into("<I", data, 4, 2)
    with pytest.raises(CorruptImageError, match="header"):
        Image(bytes(data))


def test_shared_directory_blocks_are_bounded():
    """Thousands of directories pointing at one big block list: capped, not quadratic."""
    root = Inode.directory()
    big = Inode.directory()
    root.entries[b"big"] = big
    for i in range(560):  # two full blocks of "!..." names, then ".", ".." and the rest inline
        big.entries[b"!%04d" % i] = Inode.file(b"")
    for i in range(2000):
        root.entries[b"y%04d" % i] = Inode.directory()
    data = bytearray(image_bytes(root, root_whiteouts=False))
    im = Image(bytes(data))
    r = im._rec(im._root_nid)
    brec = im._rec(child_nid(im, r, b"big"))
    assert brec.layout == fmt.DataLayout.FLAT_INLINE and brec.size > 2 * fmt.BLKSZ
    nfull = brec.size // fmt.BLKSZ
    for i in range(2000):
        y = im._rec(child_nid(im, r, b"y%04d" % i))
        struct.pack_into("<I", data, y.off + 8, nfull * fmt.BLKSZ + y.size)  # its own tail stays last
        struct.pack_into("<I", data, y.off + 0x10, brec.iu)
    _corrupts(data, "more directory entries")


def test_whiteout_markers_need_a_whiteout_child():
    """Markers on a directory without whiteouts are the user's own xattrs and survive."""
    xs = {b"user.overlay.whiteouts": b"", b"trusted.overlay.whiteouts": b""}
    root = Inode.directory()
    root.entries[b"d"] = Inode.directory(xattrs=dict(xs))
    assert Image(image_bytes(root)).root() == root


# --- the reader's inline fast paths agree with its general path -------------------------------------
def external_forms_tree() -> Inode:
    """External files in every xattr form the whole-tree read decodes inline (metacopy and redirect
    inline; an empty metacopy shared with an inline redirect; both shared), compact and extended
    inodes, a hardlink, and the plain leaves it decodes inline too."""
    t = 1_700_000_000 * 10**9
    root = Inode.directory(mtime_ns=t)
    d = Inode.directory(mtime_ns=t)
    root.entries[b"d"] = d
    for i in range(4):   # unique digests: both inline; odd ones extended (their mtime differs)
        d.entries[b"inline%d" % i] = Inode(stat.S_IFREG | 0o644, size=100 + i, digest=bytes([i + 1]) * 32,
                                           mtime_ns=t + i % 2)
    for i in range(3):   # payload only: the empty metacopy is shared, each redirect inline
        d.entries[b"payload%d" % i] = Inode(stat.S_IFREG | 0o600, size=70, payload=f"ab/p{i}.file",
                                            mtime_ns=t + i % 2)
    for i in range(2):   # the same object twice: metacopy and redirect both shared
        d.entries[b"dup%d" % i] = Inode(stat.S_IFREG | 0o644, size=99, digest=b"\x77" * 32, mtime_ns=t)
    d.entries[b"hard"] = d.entries[b"inline0"]
    d.entries[b"other-xattr"] = Inode(stat.S_IFREG | 0o644, size=80, digest=b"\x55" * 32, mtime_ns=t,
                                      xattrs={b"user.a": b"1"})
    d.entries[b"empty"] = Inode.file(b"", mtime_ns=t)
    d.entries[b"small"] = Inode.file(b"hello", mtime_ns=t + 1)
    d.entries[b"link"] = Inode.symlink(b"small", mtime_ns=t)
    d.entries[b"fifo"] = Inode(stat.S_IFIFO | 0o600, mtime_ns=t)
    d.entries[b"dev"] = Inode(stat.S_IFCHR | 0o600, rdev=os.makedev(1, 3), mtime_ns=t)
    return root


def _leaf_state(n: Inode) -> tuple:
    return (n.attrs(), n.size, n.payload)


def test_fast_paths_equal_general_path():
    """Every leaf of a whole-tree read (inline decoding) equals a lookup of it (the general `_make`)."""
    tree = external_forms_tree()
    data = image_bytes(tree)
    im = Image(data)
    back = im.root()
    assert back == tree
    assert back.entries[b"d"].entries[b"hard"] is back.entries[b"d"].entries[b"inline0"]
    for name, node in back.entries[b"d"].entries.items():
        assert _leaf_state(im.lookup(b"/d/" + name)) == _leaf_state(node), name


def test_damaged_external_xattrs_fast_path_never_accepts_more():
    """Damage every byte of the leaves' inodes and xattr bodies and of the shared xattr area:
    whatever the whole-tree read accepts, the general path accepts too and decodes the same."""
    tree = external_forms_tree()
    data = image_bytes(tree)
    im = Image(data)
    d_rec = im._rec(child_nid(im, im._rec(im._root_nid), b"d"))
    names = sorted(n for n in tree.entries[b"d"].entries if n != b"hard")
    spots = set()
    sids = []
    for name in names:
        rec = im._rec(child_nid(im, d_rec, name))
        spots.update(range(rec.off, rec.xoff + rec.xsize))   # the inode and its xattrs
        if rec.xsize:
            count = im._d[rec.xoff + 4]
            sids += struct.unpack_from(f"<{count}I", im._d, rec.xoff + 12)
    shared_start = im._xbase + 4 * min(sids)
    spots.update(range(shared_start, shared_start + 4 * (max(sids) - min(sids)) + 64))  # shared xattrs
    checked = 0
    for pos in sorted(spots):
        for mask in ((0x01, 0x06, 0xFF)[pos % 3], 0x80):   # one low-bit change per byte, and the top bit
            damaged = bytearray(data)
            damaged[pos] ^= mask
            damaged = bytes(damaged)
            try:
                fast = Image(damaged).root().entries[b"d"].entries
            except CorruptImageError:
                continue
            general = Image(damaged)
            for name in names:
                try:
                    slow = general.lookup(b"/d/" + name)
                except CorruptImageError:
                    pytest.fail(f"byte {pos:#x} ^ {mask:#x}: the fast path accepted {name!r}, "
                                "the general path does not")
                assert _leaf_state(slow) == _leaf_state(fast[name]), (pos, mask, name)
            checked += 1
    assert checked > 100   # plenty of damage that is not structural (digests, redirect bytes, ...)
