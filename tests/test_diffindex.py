"""The diff index format (flatmount.image.diffindex): versioned, symmetric, and safe on hostile bytes."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.diff import ImageIndex, TreeIndex, changes
from flatmount.diff.index import _side_walk
from flatmount.errors import FormatError
from flatmount.flatten import flatten_trees
from flatmount.image import diffindex as dx
from flatmount.image.tree import S_IFDIR, S_IFREG, Inode
from tests.corruption import damaged
from tests.test_erofs import every_type_tree, trees

IMAGE_ID = bytes(range(16))


def _flat(root: Inode) -> Inode:
    return flatten_trees([root])      # an image's tree: no whiteouts


def _reseal(buf: bytes | bytearray) -> bytes:
    """`buf` with its checksum made to fit: only the decoder's own checks stand in the way."""
    buf = bytearray(buf)
    buf[dx.HEAD.size - 8:dx.HEAD.size] = struct.pack("<Q", dx.checksum(buf))
    return bytes(buf)


def _walk_all(ix: ImageIndex) -> int:
    root, h = ix._root()
    return sum(1 for _ in _side_walk(ix, b"", h))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(max_nodes=40, whiteouts=False), trees(max_nodes=40, whiteouts=False))
def test_random_trees_round_trip(a, b):
    a, b = _flat(a), _flat(b)
    data = dx.encode(a, IMAGE_ID, 99)
    ix = ImageIndex(data, IMAGE_ID, 99)
    assert ix._fp(ix._root()[1]) == TreeIndex(a).fingerprint()
    assert changes(ix, a) == [] and changes(ix, ImageIndex.from_tree(a)) == []
    assert changes(ix, b) == changes(a, b) == changes(ix, ImageIndex.from_tree(b))
    assert changes(b, ix, strict=True) == changes(b, a, strict=True)
    for k in [dx.leaf_key(n, None) for n in a.entries.values() if n.entries is None]:
        assert dx.decode_item(dx.encode_leaf(k)) == (dx.LEAF, k)
    assert dx.decode_dir_key(dx.encode_dir_key(dx.dir_key(a))) == dx.dir_key(a)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(max_nodes=25, whiteouts=False), st.data())
def test_corruption_never_crashes(root, data):
    """Flipped, inserted or removed bytes, truncation: opening refuses (FormatError); with the checksum
    made to fit, opening and walking and comparing refuse or finish, and never raise anything else
    nor loop."""
    root = _flat(root)
    good = dx.encode(root, IMAGE_ID, 99)
    buf = damaged(good, data)
    if bytes(buf) != good:
        with pytest.raises(FormatError):
            ImageIndex(bytes(buf), IMAGE_ID, 99)
    if len(buf) < dx.HEAD.size:
        return
    try:
        ix = ImageIndex(_reseal(buf))
        _walk_all(ix)
        changes(ix, root)
        changes(ImageIndex(_reseal(buf)), ImageIndex(good), strict=True)
    except FormatError:
        pass


def test_header_refusals():
    tree = _flat(every_type_tree())
    data = dx.encode(tree, IMAGE_ID, 99)
    assert changes(ImageIndex(data, IMAGE_ID, 99), tree) == []
    with pytest.raises(FormatError, match="another image"):
        ImageIndex(data, bytes(15) + b"\1", 99)
    with pytest.raises(FormatError, match="another image"):
        ImageIndex(data, IMAGE_ID, 98)
    with pytest.raises(FormatError, match="truncated"):
        ImageIndex(data[:20])
    with pytest.raises(FormatError, match="older format"):
        ImageIndex(b"FMDIFX03" + data[8:])
    newer = bytearray(data)
    struct.pack_into("<I", newer, 8, dx.VERSION + 1)
    with pytest.raises(FormatError, match="version"):
        ImageIndex(_reseal(newer))


def test_records_cannot_loop_or_leave_the_file():
    """A directory item naming its own record (a cycle), or a record outside the file, is refused
    while walking, however well the file is sealed."""
    root = Inode(S_IFDIR | 0o755)
    sub = root.entries[b"d"] = Inode(S_IFDIR | 0o755)
    sub.entries[b"f"] = Inode.file(b"x")
    data = dx.encode(root, IMAGE_ID, 99)
    ix = ImageIndex(data)
    node = ix._node((ix._root()[1], 0))
    off, ln, _fp = ix._child(node)
    loc = dx.LOCATION.pack(off, ln)
    i = data.rindex(loc)
    root_off, root_len = dx.HEAD.unpack_from(data)[4:6]
    for bad in (dx.LOCATION.pack(root_off, root_len), dx.LOCATION.pack(len(data) - 10, 100),
                dx.LOCATION.pack(0, 40)):
        buf = bytearray(data)
        buf[i:i + len(loc)] = bad
        with pytest.raises(FormatError):
            _walk_all(ImageIndex(_reseal(buf)))


def test_unsorted_names_are_refused_where_order_matters():
    root = Inode(S_IFDIR | 0o755, entries={b"a": Inode.file(b"1"), b"b": Inode.file(b"2")})
    data = dx.encode(root, IMAGE_ID, 99)
    i = data.rindex(b"a\0b")
    swapped = _reseal(data[:i] + b"b\0a" + data[i + 3:])
    other = Inode(S_IFDIR | 0o755, entries={b"a": Inode.file(b"1"), b"c": Inode.file(b"3")})
    with pytest.raises(FormatError, match="sorted"):
        changes(ImageIndex(swapped), ImageIndex.from_tree(other))


def test_wide_values_round_trip():
    """Integers beyond the fixed widths (a tree in memory may hold them) take the wide form."""
    f = Inode(S_IFREG | 0o644, mtime_ns=-(1 << 70), size=1 << 65, content=None, digest=b"\1" * 32)
    root = Inode(S_IFDIR | 0o755, mtime_ns=1 << 80, entries={b"f": f})
    ix = ImageIndex(dx.encode(root, IMAGE_ID, 99))
    assert changes(ix, root, strict=True) == []
    assert ix.root.mtime_ns == 1 << 80
    assert ix._node((ix._root()[1], 0)).size == 1 << 65


def test_old_marshal_index_is_refused(tmp_path):
    """An index of the former format (marshal records, magic FMDIFX03) is refused and rebuilt."""
    from flatmount.diff import diff_images
    from flatmount.image.writer import image_bytes

    tree = _flat(every_type_tree())
    img = tmp_path / "t.erofs"
    img.write_bytes(image_bytes(tree))
    cache = tmp_path / "cache"
    diff_images(img, img, cache_dir=cache)
    (idx,) = cache.iterdir()
    old = b"FMDIFX03" + idx.read_bytes()[8:]
    idx.write_bytes(old)
    assert diff_images(img, img, cache_dir=cache) == []
    assert idx.read_bytes()[:8] == dx.MAGIC


def test_sealed_but_broken_saved_index_is_rebuilt(tmp_path):
    """A cached index whose checksum holds but whose records do not: `diff_images` rebuilds it from
    the image and answers right."""
    from flatmount.diff import diff_images
    from flatmount.image.writer import image_bytes

    a = _flat(every_type_tree())
    b = _flat(every_type_tree())
    b.entries[b"dir"].entries[b"new"] = Inode.file(b"n")
    pa, pb = tmp_path / "a.erofs", tmp_path / "b.erofs"
    pa.write_bytes(image_bytes(a))
    pb.write_bytes(image_bytes(b))
    cache = tmp_path / "cache"
    want = diff_images(pa, pb, cache_dir=cache)
    assert [str(c) for c in want] == ["C /dir", "A /dir/new"]
    ida = cache / (xxhash.xxh3_128_digest(pa.read_bytes()).hex() + ".idx")
    data = ida.read_bytes()
    ix = ImageIndex(data)
    off = ix._child(ix._node(ix._listing(ix._root()[1])[b"dir"]))[0]
    buf = bytearray(data)
    struct.pack_into("<I", buf, off + 16, 2**31)           # /dir's record: its entry count
    ida.write_bytes(_reseal(buf))
    ImageIndex(ida.read_bytes())                           # (opens: only walking finds it)
    assert diff_images(pa, pb, cache_dir=cache) == want
    assert ida.read_bytes() == data                        # rebuilt


def test_cache_write_is_atomic_and_never_follows_a_planted_name(tmp_path):
    """The cache is written through a fresh temp file (flatmount.atomic): a symlink planted at the
    temp name the old code predicted (`<index>.<pid>.tmp`) is not written through, and the index
    lands as a regular file."""
    import os

    from flatmount.diff import diff_images
    from flatmount.image.writer import image_bytes

    tree = _flat(every_type_tree())
    img = tmp_path / "t.erofs"
    img.write_bytes(image_bytes(tree))
    cache = tmp_path / "cache"
    cache.mkdir()
    index = cache / (xxhash.xxh3_128_digest(img.read_bytes()).hex() + ".idx")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    os.symlink(victim, f"{index}.{os.getpid()}.tmp")
    assert diff_images(img, img, cache_dir=cache) == []
    assert victim.read_bytes() == b"keep me"
    assert index.is_file() and not index.is_symlink()
    assert ImageIndex(index.read_bytes()).image_id == xxhash.xxh3_128_digest(img.read_bytes())
    assert sorted(p.name for p in cache.iterdir() if not p.is_symlink()) == [index.name]   # no temp left
