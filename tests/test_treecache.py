"""The tree cache format (flatmount.image.treecache): versioned, symmetric, and safe on hostile bytes."""

from __future__ import annotations

import contextlib
import gzip
import struct

import pytest
import xxhash
from conftest import shared_data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.errors import FormatError
from flatmount.image import treecache
from flatmount.image.tree import S_IFDIR, S_IFREG, Inode, inodes
from tests.conftest import require_compiled
from tests.corruption import damaged
from tests.test_erofs import every_type_tree, trees

DIGEST = "ab" * 32


# --- both decoders: the compiled one (flatmount/image/_ctree.c) and its Python specification -------

def _compiled():
    """flatmount.image._ctree; its absence fails under CI (the Python fallback would hide a broken
    build) and skips elsewhere."""
    return require_compiled("flatmount.image._ctree")


@contextlib.contextmanager
def _decoder(module):
    old = treecache._ctree
    treecache._ctree = module
    try:
        yield
    finally:
        treecache._ctree = old


def _same_tree(a: Inode, b: Inode) -> None:
    """Equal trees with the same hardlink groups (the encoder writes the same bytes for both), whose
    inodes each own their xattrs dict (as Inode() gives them)."""
    assert a == b
    assert treecache.encode(a, DIGEST, 7) == treecache.encode(b, DIGEST, 7)
    for t in (a, b):
        nodes = list(inodes(t))
        assert len({id(x.xattrs) for x in nodes}) == len(nodes)
        assert all(type(x.payload) in (str, type(None)) and type(x.mode) is int for x in nodes)


def _decode_both(data: bytes, digest: str = DIGEST, size: int = 7) -> Inode:
    """`treecache.decode` by the Python decoder and by the compiled one: the same tree, or both
    refuse (the compiled one's FormatError is raised)."""
    out: list = []
    for module in (None, _compiled()):
        with _decoder(module):
            try:
                out.append(treecache.decode(data, digest, size))
            except FormatError as e:
                out.append(e)
    py, c = out
    if isinstance(py, FormatError) or isinstance(c, FormatError):
        assert isinstance(py, FormatError) and isinstance(c, FormatError), (py, c)
        raise c
    _same_tree(py, c)
    return c


def _reseal(data: bytes | bytearray) -> bytes:
    """`data` with its header's payload length and checksum made to fit its (altered) payload: only
    the decoder's own checks stand between such bytes and a tree."""
    head = treecache.HEAD
    magic, version, dg, size, _plen, _check = head.unpack_from(data)
    payload = bytes(data[head.size:])
    return head.pack(magic, version, dg, size, len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def _decode_or_refuse(data: bytes) -> Inode | None:
    try:
        return _decode_both(data)
    except FormatError:
        return None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees(max_nodes=40))
def test_random_trees_round_trip(root):
    data = treecache.encode(root, DIGEST, 7)
    back = _decode_both(data)
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
    assert _decode_both(data, DIGEST, 7) == tree
    with pytest.raises(FormatError, match="another image"):
        _decode_both(data, "cd" * 32, 7)
    with pytest.raises(FormatError, match="another image"):
        _decode_both(data, DIGEST, 8)
    with pytest.raises(FormatError, match="truncated"):
        _decode_both(data[:-1], DIGEST, 7)
    with pytest.raises(FormatError, match="truncated"):
        _decode_both(data[:10], DIGEST, 7)
    with pytest.raises(FormatError, match="older format"):
        _decode_both(b"FMTREE02" + data[8:], DIGEST, 7)
    newer = bytearray(data)
    struct.pack_into("<I", newer, 8, treecache.VERSION + 1)
    with pytest.raises(FormatError, match="version"):
        _decode_both(bytes(newer), DIGEST, 7)


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
            _decode_both(bad, DIGEST, 7)
    # a file (row 2) listed as a directory; the root listed twice (a cycle)
    tail = struct.pack("<2I", 0, 1) + struct.pack("<2I", 1, 1)
    i = data.rindex(tail)
    for dirs in (struct.pack("<2I", 0, 2), struct.pack("<2I", 0, 0)):
        buf = bytearray(data)
        buf[i:i + 8] = dirs
        with pytest.raises(FormatError):
            _decode_both(_reseal(buf), DIGEST, 7)
    # entry names that no directory may hold
    for name in (b".", b"/", b"\0"):
        buf = bytearray(data)
        j = buf.rindex(b"d\0f")
        buf[j:j + 1] = name
        with pytest.raises(FormatError):
            _decode_both(_reseal(buf), DIGEST, 7)


def test_hardlinked_directory_is_refused():
    """With explicit entry rows a directory reachable twice (or from itself) is refused."""
    root = Inode(S_IFDIR | 0o755)
    f = Inode.file(b"x")
    d = root.entries[b"d"] = Inode(S_IFDIR | 0o755)
    root.entries[b"a"] = f
    d.entries[b"b"] = f           # a hardlink: the file has explicit entry rows
    data = treecache.encode(root, DIGEST, 7)
    assert _decode_both(data, DIGEST, 7) == root
    rows, ndirs, nents, flags = treecache.COUNTS.unpack_from(data, treecache.HEAD.size)
    assert flags == treecache.HAS_KIDS
    kids = struct.unpack_from(f"<{nents}I", data, len(data) - 4 * nents)
    assert kids == (1, 2, 1)   # root: a (row 1), d (row 2), in name order; d: b (row 1, the same file)
    for bad_kids in ((1, 2, 2), (2, 2, 1)):     # d (row 2) inside itself; d under two names
        buf = bytearray(data)
        struct.pack_into(f"<{nents}I", buf, len(buf) - 4 * nents, *bad_kids)
        with pytest.raises(FormatError):
            _decode_both(_reseal(buf), DIGEST, 7)


def test_far_mtimes_round_trip():
    """mtimes i64 nanoseconds cannot hold (a tar may date a file in the year 3000) take the wide
    column; beyond i64 seconds nothing is truncated: no cache (ValueError)."""
    root = Inode(S_IFDIR | 0o755, mtime_ns=-5)
    root.entries[b"f"] = Inode(S_IFREG | 0o644, mtime_ns=32_503_680_000 * 10**9 + 7)
    root.entries[b"g"] = Inode(S_IFREG | 0o644, mtime_ns=-(1 << 70) - 3)
    data = treecache.encode(root, DIGEST, 7)
    assert treecache.COUNTS.unpack_from(data, treecache.HEAD.size)[3] & treecache.WIDE_MTIME
    assert _decode_both(data, DIGEST, 7) == root


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


def _hand_made(rows: list[tuple[int, int]], dirs: list[int], counts: list[int], names: list[bytes],
               kids: list[int] | None) -> bytes:
    """A sealed tree cache written field by field (rows: (mode, mtime_ns); no sparse columns, no
    xattrs): structures the encoder never makes."""
    n = len(rows)
    p = treecache.COUNTS.pack(n, len(dirs), len(names), treecache.HAS_KIDS if kids is not None else 0)
    modes, mtimes = zip(*rows, strict=True)
    p += struct.pack(f"<{n}I", *modes) + bytes(8 * n) + struct.pack(f"<{n}q", *mtimes) + bytes(16 * n)
    p += struct.pack("<I", 0) * 2 + struct.pack("<I", 0) * 2 + struct.pack("<2I", 0, 0)   # 4 sparse
    p += struct.pack("<I", 0)   # no xattrs (count; no rows, counts, lengths, bytes)
    blob = b"\0".join(names)
    p += struct.pack(f"<{len(dirs)}I", *dirs) + struct.pack(f"<{len(counts)}I", *counts)
    p += struct.pack("<I", len(blob)) + blob
    if kids is not None:
        p += struct.pack(f"<{len(kids)}I", *kids)
    return treecache.HEAD.pack(treecache.MAGIC, treecache.VERSION, bytes.fromhex(DIGEST), 7, len(p),
                               xxhash.xxh3_64_intdigest(p)) + p


def test_hand_made_structures():
    """A file root above a directory with explicit entry rows was an AttributeError out of the Python
    decoder (it walked the root's entries before checking it is a directory): now both refuse it."""
    reg, d = S_IFREG | 0o644, S_IFDIR | 0o755
    ok = _hand_made([(d, 1), (d, 2), (reg, 3)], [0, 1], [1, 2], [b"d", b"a", b"b"], [1, 2, 2])
    root = _decode_both(ok)
    assert root.entries[b"d"].entries[b"a"] is root.entries[b"d"].entries[b"b"]
    for bad in (_hand_made([(reg, 1), (d, 2), (reg, 3)], [1], [2], [b"a", b"b"], [2, 2]),
                _hand_made([(d, 1), (d, 2), (reg, 3)], [0, 1], [1, 2], [b"d", b"a", b"b"], [1, 1, 2]),
                _hand_made([(d, 1), (d, 2), (reg, 3)], [0, 1], [1, 2], [b"d", b"a", b"a"], [1, 2, 2]),
                _hand_made([(d, 1), (d, 2), (reg, 3)], [0, 1], [1, 1], [b"d", b"a"], [1, 1]),
                _hand_made([(d, 1), (d, 2), (d, 3)], [0, 1, 2], [1, 1, 0], [b"x", b"y"], [2, 1]),
                _hand_made([(d, 1), (d, 2), (reg, 3)], [0, 1], [1, 2], [b"d", b"a", b"b"], [1, 2, 3]),
                _hand_made([(d, 1), (reg, 2), (d, 3)], [0, 2], [1, 1], [b"d", b".."], None),
                _hand_made([(d, 1), (d, 2), (d, 3)], [0, 1, 2], [1, 0, 1], [b"a", b"b"], None),
                ok + b"\0"):
        with pytest.raises(FormatError):
            _decode_both(bad)


@pytest.mark.parametrize("name", ["cs9-x86_64-minimal.dump.gz", "cs9-x86_64-developer.dump.gz"])
def test_cs9_trees_decode_alike(name):
    """composefs's cs9 trees (22k and 64k inodes, hardlinks): the same tree from both decoders, and
    damaged copies (resealed, so only the decoders' own checks see it) refused by both or read alike."""
    from flatmount.image.dump import parse_dump

    with gzip.open(shared_data(name), "rb") as f:
        root = parse_dump(f)
    data = treecache.encode(root, DIGEST, 7)
    assert _decode_both(data) == root
    import random

    rnd = random.Random(17)
    head = treecache.HEAD.size
    for _ in range(12):
        buf = bytearray(data)
        pos = rnd.randrange(head, len(buf) - 4)
        if rnd.random() < 0.5:
            buf[pos] ^= rnd.randrange(1, 256)
        else:
            struct.pack_into("<I", buf, pos, rnd.choice([0, 1, 255, 1 << 20, 2**32 - 1]))
        with contextlib.suppress(FormatError):
            _decode_both(_reseal(buf))


def test_compiled_decoder_checks_its_slots():
    """The compiled decoder fills in slots only of the class whose descriptors it is given."""
    _ctree = _compiled()
    data = treecache.encode(every_type_tree(), DIGEST, 7)

    class Other:
        __slots__ = treecache._SLOT_NAMES

    for cls, slots in ((Other, treecache._SLOTS), (Inode, treecache._SLOTS[:-1]),
                       (Inode, (*treecache._SLOTS[:-1], treecache._SLOTS[0])), (Inode, (Inode.is_dir,) * 12)):
        with pytest.raises(TypeError):
            _ctree.decode(data, treecache.HEAD.size, cls, slots)
    with pytest.raises(ValueError, match="truncated"):
        _ctree.decode(data, len(data) + 1, Inode, treecache._SLOTS)


def test_flatmount_pure_turns_the_compiled_decoder_off():
    import os
    import subprocess
    import sys

    _compiled()
    code = "from flatmount.image import treecache; print(treecache._ctree is not None)"
    root = str(treecache.__file__).rsplit("/flatmount/", 1)[0]
    for env, expect in (({"FLATMOUNT_PURE": "1"}, "False"), ({}, "True")):
        e = {k: v for k, v in os.environ.items() if k != "FLATMOUNT_PURE"}
        out = subprocess.run([sys.executable, "-c", code], env={**e, **env, "PYTHONPATH": root}, cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == expect


def test_decoded_directories_list_their_names_in_order():
    """Names are encoded sorted (the image's order), whatever order the tree's dicts had: the writer
    then finds the prefix of a chain already in order."""
    root = Inode(S_IFDIR | 0o755)
    for name in (b"zeta", b"a", b"m", b"B"):
        d = root.entries[name] = Inode(S_IFDIR | 0o755)
        for sub in (b"y", b"x", b"\xff", b"-"):
            d.entries[sub] = Inode.file(name + sub)
    hard = root.entries[b"m"].entries[b"x"]
    root.entries[b"a"].entries[b"link"] = hard   # (a hardlink: the explicit entry rows)
    for tree in (root, root.entries[b"zeta"]):
        for module in (_compiled(), None):
            with _decoder(module):
                decoded = treecache.tree_from_cache(treecache.encode(tree, DIGEST, 7), DIGEST, 7)
            assert decoded == tree
            todo = [decoded]
            while todo:
                node = todo.pop()
                assert list(node.entries) == sorted(node.entries)
                todo.extend(c for c in node.entries.values() if c.entries is not None)
