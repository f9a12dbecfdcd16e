"""The tree cache format (flatmount.image.treecache): versioned, symmetric, and safe on hostile bytes."""

from __future__ import annotations

import struct

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.errors import FormatError
from flatmount.image import treecache
from flatmount.image.tree import S_IFDIR, S_IFREG, Inode
from tests.corruption import damaged
from tests.test_erofs import every_type_tree, trees

DIGEST = "ab" * 32


def _reseal(data: bytes | bytearray) -> bytes:
    """`data` with its header's payload length and checksum made to fit its (altered) payload: only
    the decoder's own checks stand between such bytes and a tree."""
    head = treecache.HEAD
    magic, version, dg, size, _plen, _check = head.unpack_from(data)
    payload = bytes(data[head.size:])
    return head.pack(magic, version, dg, size, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def _decode_or_refuse(data: bytes) -> Inode | None:
    try:
        return treecache.decode(data, DIGEST, 7)
    except FormatError:
        return None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(max_nodes=40))
def test_random_trees_round_trip(root):
    data = treecache.encode(root, DIGEST, 7)
    back = treecache.decode(data, DIGEST, 7)
    assert back == root
    assert treecache.encode(back, DIGEST, 7) == data     # symmetric: what is read writes the same bytes


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(max_nodes=25), st.data())
def test_corruption_never_crashes(root, data):
    """Flipped, inserted or removed bytes, truncation: the decoder refuses (FormatError) or returns
    a well-formed tree, and never raises anything else; with the checksum intact it always refuses."""
    good = treecache.encode(root, DIGEST, 7)
    head = treecache.HEAD.size
    buf = damaged(good, data, u32_from=head)
    if bytes(buf) != good:
        assert _decode_or_refuse(bytes(buf)) is None           # the checksum or header catches it
    if len(buf) >= head:
        tree = _decode_or_refuse(_reseal(buf))                 # only the decoder's own checks left
        if tree is not None:
            assert tree.is_dir
            treecache.encode(tree, DIGEST, 7)                  # a tree the model can hold


def test_header_refusals():
    tree = every_type_tree()
    data = treecache.encode(tree, DIGEST, 7)
    assert treecache.decode(data, DIGEST, 7) == tree
    with pytest.raises(FormatError, match="another image"):
        treecache.decode(data, "cd" * 32, 7)
    with pytest.raises(FormatError, match="another image"):
        treecache.decode(data, DIGEST, 8)
    with pytest.raises(FormatError, match="truncated"):
        treecache.decode(data[:-1], DIGEST, 7)
    with pytest.raises(FormatError, match="truncated"):
        treecache.decode(data[:10], DIGEST, 7)
    with pytest.raises(FormatError, match="older format"):
        treecache.decode(b"FMTREE02" + data[8:], DIGEST, 7)
    newer = bytearray(data)
    struct.pack_into("<I", newer, 8, treecache.VERSION + 1)
    with pytest.raises(FormatError, match="version"):
        treecache.decode(bytes(newer), DIGEST, 7)


def _payload_tree() -> tuple[Inode, bytes]:
    root = Inode(S_IFDIR | 0o755)
    root.entries[b"d"] = Inode(S_IFDIR | 0o755)
    root.entries[b"d"].entries[b"f"] = Inode.file(b"x")
    return root, treecache.encode(root, DIGEST, 7)


def test_structural_refusals():
    """Well-sealed files whose structure is wrong are refused with a reason, never half-used."""
    root, data = _payload_tree()
    head = treecache.HEAD.size
    rows, ndirs, nents, flags = treecache.COUNTS.unpack_from(data, head)
    assert (rows, ndirs, nents, flags) == (3, 2, 2, 0)

    def counts(*c):
        buf = bytearray(data)
        treecache.COUNTS.pack_into(buf, head, *c)
        return _reseal(buf)

    for bad in (counts(0, 0, 0, 0), counts(3, 2, 2, 4), counts(3, 4, 2, 0), counts(3, 2, 5, 0),
                counts(2**32 - 1, 2, 2**32 - 2, 0), counts(3, 2, 2, 1)):
        with pytest.raises(FormatError):
            treecache.decode(bad, DIGEST, 7)
    # a file (row 2) listed as a directory; the root listed twice (a cycle)
    tail = struct.pack("<2I", 0, 1) + struct.pack("<2I", 1, 1)
    i = data.rindex(tail)
    for dirs in (struct.pack("<2I", 0, 2), struct.pack("<2I", 0, 0)):
        buf = bytearray(data)
        buf[i:i + 8] = dirs
        with pytest.raises(FormatError):
            treecache.decode(_reseal(buf), DIGEST, 7)
    # entry names that no directory may hold
    for name in (b".", b"/", b"\0"):
        buf = bytearray(data)
        j = buf.rindex(b"d\0f")
        buf[j:j + 1] = name
        with pytest.raises(FormatError):
            treecache.decode(_reseal(buf), DIGEST, 7)


def test_hardlinked_directory_is_refused():
    """With explicit entry rows a directory reachable twice (or from itself) is refused."""
    root = Inode(S_IFDIR | 0o755)
    f = Inode.file(b"x")
    d = root.entries[b"d"] = Inode(S_IFDIR | 0o755)
    root.entries[b"a"] = f
    d.entries[b"b"] = f           # a hardlink: the file has explicit entry rows
    data = treecache.encode(root, DIGEST, 7)
    assert treecache.decode(data, DIGEST, 7) == root
    rows, ndirs, nents, flags = treecache.COUNTS.unpack_from(data, treecache.HEAD.size)
    assert flags == treecache.HAS_KIDS
    kids = struct.unpack_from(f"<{nents}I", data, len(data) - 4 * nents)
    for bad_kids in ((1, 2, 1), (2, 1, 1)):     # d (row 1) inside itself; d under two names
        buf = bytearray(data)
        struct.pack_into(f"<{nents}I", buf, len(buf) - 4 * nents, *bad_kids)
        with pytest.raises(FormatError):
            treecache.decode(_reseal(buf), DIGEST, 7)
    assert kids == (1, 2, 2)


def test_far_mtimes_round_trip():
    """mtimes i64 nanoseconds cannot hold (a tar may date a file in the year 3000) take the wide
    column; beyond i64 seconds nothing is truncated: no cache (ValueError)."""
    root = Inode(S_IFDIR | 0o755, mtime_ns=-5)
    root.entries[b"f"] = Inode(S_IFREG | 0o644, mtime_ns=32_503_680_000 * 10**9 + 7)
    root.entries[b"g"] = Inode(S_IFREG | 0o644, mtime_ns=-(1 << 70) - 3)
    data = treecache.encode(root, DIGEST, 7)
    assert treecache.COUNTS.unpack_from(data, treecache.HEAD.size)[3] & treecache.WIDE_MTIME
    assert treecache.decode(data, DIGEST, 7) == root


def test_unencodable_values_are_a_value_error():
    """Values beyond the format's widths: no cache is written (ValueError), nothing is truncated."""
    root = Inode(S_IFDIR | 0o755)
    root.entries[b"f"] = Inode(S_IFREG | 0o644, mtime_ns=(1 << 63) * 10**9)
    with pytest.raises(ValueError):
        treecache.encode(root, DIGEST, 7)
    root.entries[b"f"] = Inode(S_IFREG | 0o644, uid=1 << 32)
    with pytest.raises(ValueError):
        treecache.encode(root, DIGEST, 7)
    root.entries[b"f"] = Inode.symlink(b"a\0b")
    with pytest.raises(ValueError):
        treecache.encode(root, DIGEST, 7)
