"""flatmount.sources.layers: layer tarballs -> layer tree + objects, checked against trees written down by hand."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tarfile
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.errors import DigestMismatchError, LayerError
from flatmount.image.tree import OPAQUE_XATTR, Inode, lookup, walk
from flatmount.sources.layers import read_tar, verify
from objects import ObjectStore
from tests.tarbuild import NS, Tar, bad_tars, compress


@pytest.fixture
def objects(tmp_path):
    with ObjectStore(tmp_path / "objects") as store:
        yield store


def check_objects(objects: ObjectStore, t: Tar) -> None:
    for digest, data in t.blobs.items():
        with objects.open(digest) as f:
            assert f.read() == data


def full_tar(fmt: int) -> Tar:
    """Every entry type tar knows, xattrs, ns mtimes, long names and links, big ids."""
    t = Tar(fmt=fmt, root_mtime=1_700_000_000)
    t.dir("etc/", mode=0o755, mtime=1_700_000_001)
    t.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n" * 10, mtime=1_700_000_002)
    t.file("etc/empty", b"")
    t.file("etc/exact64", b"6" * 64)
    t.file("etc/65", b"6" * 65, mode=0o600)
    t.file("etc/setuid", b"#!/bin/sh\n", mode=0o4755)
    t.symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
    t.hardlink("etc/passwd-", "etc/passwd")
    t.hardlink("etc/empty-link", "etc/empty")
    t.dir("dev/", mode=0o755)
    t.device("dev/null", "c", 1, 3, mode=0o666)
    t.device("dev/sda", "b", 8, 0)
    t.fifo("dev/initctl", mode=0o600)
    long_dir = "d" * 90 + "/" + "e" * 90
    t.file(long_dir + "/" + "f" * 120, b"long name content " * 10)
    t.symlink("longlink", "/" + "t" * 200)
    t.hardlink("long-hardlink", long_dir + "/" + "f" * 120)
    if fmt == tarfile.PAX_FORMAT:
        t.file("usr/bin/ping", b"\x7fELF" + b"\0" * 200, mode=0o755,
               xattrs={"security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00" + b"\0" * 12,
                       "user.comment": "caf\u00e9"},
               pax={"mtime": "1700000000.123456789"})
        t.dir("ns/", pax={"mtime": "1700000000.000000001"})
        t.file("bigids", b"x", uid=3_000_000, gid=4_000_000)
        t.file("caf\u00e9/\u00fcml\u00e4ut", b"unicode name")
    t.whiteout("etc/.wh.shadow")
    t.file("opt/app/new", b"n")
    t.whiteout("opt/app/.wh..wh..opq")     # opaque marker after a sibling
    t.whiteout("srv/.wh..wh..opq")         # before any sibling
    t.file("srv/data", b"d" * 100)
    return t


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_every_entry_type(objects, fmt, kind):
    t = full_tar(fmt)
    tar = t.bytes()
    blob = compress(tar, kind)
    layer = read_tar(io.BytesIO(blob), objects, label="t")
    expected = t.tree()
    assert layer.tree == expected
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert layer.diff_size == len(tar)
    assert layer.compressed_digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert layer.compressed_size == len(blob)
    assert layer.compression == kind
    tree = layer.tree
    assert lookup(tree, "etc/passwd-") is lookup(tree, "etc/passwd")
    assert lookup(tree, "etc/empty-link") is lookup(tree, "etc/empty")
    assert lookup(tree, "long-hardlink") is lookup(tree, "d" * 90 + "/" + "e" * 90 + "/" + "f" * 120)
    assert lookup(tree, "etc/shadow").is_whiteout
    assert lookup(tree, "opt/app").is_opaque and lookup(tree, "srv").is_opaque
    assert lookup(tree, "etc/exact64").content == b"6" * 64
    assert lookup(tree, "etc/65").digest is not None and lookup(tree, "etc/65").content is None
    assert lookup(tree, "/").mtime_ns == 1_700_000_000 * NS
    if fmt == tarfile.PAX_FORMAT:
        assert lookup(tree, "usr/bin/ping").mtime_ns == 1_700_000_000_123_456_789
        assert lookup(tree, "ns").mtime_ns == 1_700_000_000_000_000_001
        assert lookup(tree, "bigids").uid == 3_000_000
        assert lookup(tree, "usr/bin/ping").xattrs[b"user.comment"] == "caf\u00e9".encode()
    check_objects(objects, t)
    verify(layer, blob_digest=layer.compressed_digest, blob_size=len(blob), diff_id=layer.diff_id)


def test_implicit_parents_and_default_root(objects):
    t = Tar(root=False)
    t.file("a/b/c", b"c", mtime=500)
    t.dir("a/", mode=0o700, mtime=600, uid=5)   # explicit entry after its children: attributes only
    tree = read_tar(io.BytesIO(t.bytes()), objects).tree
    assert tree == t.tree()
    root = lookup(tree, "/")
    assert (root.mode, root.uid, root.gid, root.mtime_ns, root.xattrs) == (0o40755, 0, 0, 0, {})
    a, b = lookup(tree, "a"), lookup(tree, "a/b")
    assert (a.mode & 0o7777, a.uid, a.mtime_ns) == (0o700, 5, 600 * NS)
    assert (b.mode, b.uid, b.mtime_ns) == (0o40755, 0, 500 * NS)


def test_absolute_and_dot_names_normalised(objects):
    t = Tar(root=False)
    t.raw(_info("/etc/abs"), b"abs")
    t.raw(_info("./etc/dot"), b"dot")
    t.raw(_info("etc//double/./x"), b"x")
    tree = read_tar(io.BytesIO(t.bytes()), objects).tree
    assert sorted(p for p, _ in walk(tree)) == [b"/", b"/etc", b"/etc/abs", b"/etc/dot", b"/etc/double",
                                                 b"/etc/double/x"]


def _info(name, type_=tarfile.REGTYPE, **kw):
    ti = tarfile.TarInfo(name)
    ti.type = type_
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def test_whiteout_and_entry_of_same_name(objects):
    t = Tar()
    t.whiteout(".wh.f")
    t.file("f", b"new file")             # whiteout hides only the lower f: the new one stands
    t.dir("d/")
    t.whiteout(".wh.d")                  # lower d deleted, this layer's d stands -> opaque
    t.file("d/x", b"x")
    tree = read_tar(io.BytesIO(t.bytes()), objects).tree
    assert tree == t.tree()
    assert lookup(tree, "f").content == b"new file"
    assert lookup(tree, "d").is_opaque and lookup(tree, "d/x") is not None


def test_char_0_0_is_a_whiteout_and_other_devices_are_not(objects):
    t = Tar()
    t.device("gone", "c", 0, 0)
    t.device("null", "c", 1, 3)
    tree = read_tar(io.BytesIO(t.bytes()), objects).tree
    assert lookup(tree, "gone").is_whiteout
    assert not lookup(tree, "null").is_whiteout and lookup(tree, "null").rdev == os.makedev(1, 3)


def test_overlay_xattrs_dropped_libarchive_xattrs_read(objects):
    t = Tar()
    t.raw(_info("f", pax_headers={
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.user.overlay.redirect": "/x",
        "SCHILY.xattr.user.keep": "schily",
        "LIBARCHIVE.xattr.user.keep": base64.b64encode(b"libarchive\x00\xff").decode().rstrip("="),
        "LIBARCHIVE.xattr.user.%41%3d": base64.b64encode(b"v").decode(),
    }), b"data")
    t.raw(_info("d", tarfile.DIRTYPE, pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y"}))
    tree = read_tar(io.BytesIO(t.bytes()), objects).tree
    assert lookup(tree, "f").xattrs == {b"user.keep": b"libarchive\x00\xff", b"user.A=": b"v"}
    assert not lookup(tree, "d").is_opaque


def test_multi_member_gzip_and_multi_frame_zstd(objects):
    t = Tar()
    t.file("a", b"a" * 1000)
    t.file("b", b"b" * 100)
    tar = t.bytes()
    half = len(tar) // 2
    gz = compress(tar[:half], "gzip") + compress(tar[half:], "gzip") + b"\0" * 64  # padded like some tools
    zs = compress(tar[:half], "zstd") + compress(tar[half:], "zstd")
    for blob in (gz, zs):
        layer = read_tar(io.BytesIO(blob), objects)
        assert layer.tree == t.tree()
        assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_padding_after_end_of_archive_counts_in_diff_id(objects):
    t = Tar()
    t.file("a", b"a")
    tar = t.bytes() + b"\0" * 20480
    layer = read_tar(io.BytesIO(tar), objects)
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert layer.diff_size == len(tar)


def test_empty_archive_is_an_empty_layer(objects):
    tar = Tar(root=False).bytes()
    layer = read_tar(io.BytesIO(tar), objects)
    assert layer.tree == Inode.directory() and layer.entries == 0


@pytest.mark.parametrize("case", bad_tars(), ids=lambda c: c[0])
def test_bad_input(objects, case):
    _name, data, message = case
    with pytest.raises(LayerError, match=message):
        read_tar(io.BytesIO(data), objects, label="bad")


def test_verify_reports_each_mismatch(objects):
    t = Tar()
    t.file("a", b"a")
    tar = t.bytes()
    layer = read_tar(io.BytesIO(tar), objects)
    good = "sha256:" + hashlib.sha256(tar).hexdigest()
    verify(layer, blob_digest=good, blob_size=len(tar), diff_id=good)
    with pytest.raises(DigestMismatchError, match="bytes"):
        verify(layer, blob_size=len(tar) + 1)
    with pytest.raises(DigestMismatchError, match="blob digest"):
        verify(layer, blob_digest="sha256:" + "0" * 64)
    with pytest.raises(DigestMismatchError, match="diff_id"):
        verify(layer, diff_id="sha256:" + "0" * 64)


def test_big_file_streams_with_bounded_memory(objects):
    """48 MiB of content in a gzip layer: Python's peak allocation stays far below the content size."""
    size = 48 << 20

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        ti = tarfile.TarInfo("big")
        ti.size = size
        tf.addfile(ti, io.BytesIO(bytes(size)))
    blob = compress(raw.getvalue(), "gzip")
    del raw
    tracemalloc.start()
    try:
        layer = read_tar(io.BytesIO(blob), objects)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lookup(layer.tree, "big").size == size
    assert peak < 16 << 20, f"peak Python allocation {peak >> 20} MiB while importing a {size >> 20} MiB file"


def test_progress_reports_bytes_and_entries(objects):
    t = Tar()
    for i in range(5):
        t.file(f"f{i}", bytes([i]) * 1000)
    calls = []
    data = t.bytes()
    read_tar(io.BytesIO(data), objects, progress=lambda b, n: calls.append((b, n)))
    # (a batch of stored files is reported once, at its end: a terminal line is redrawn at most
    # every 0.2 s anyway)
    assert calls[-1][1] == 6 and calls[-1][0] >= 6 * 1024
    assert all(b2 >= b1 and n2 > n1 for (b1, n1), (b2, n2) in zip(calls, calls[1:], strict=False))


# --- property: any tree written as a tar reads back as itself ----------------------------------------

_names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x24F, blacklist_characters="/"),
                 min_size=1, max_size=12).filter(lambda s: s not in (".", "..") and not s.startswith(".wh."))
_entry = st.tuples(
    st.lists(_names, min_size=1, max_size=3),
    st.sampled_from(["file", "dir", "symlink", "fifo"]),
    st.integers(0, 200),                    # content size (around the 64-byte inline limit)
    st.integers(0, 0o7777),
    st.integers(-(2**33), 2**34),           # mtime seconds (pax for the odd ones)
    st.integers(0, NS - 1),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_entry, max_size=12), st.sampled_from(["none", "gzip", "zstd"]))
def test_random_trees_round_trip(objects, entries, kind):
    t = Tar()
    taken: dict[tuple[str, ...], str] = {}     # path -> type of its explicit entry
    implicit: set[tuple[str, ...]] = set()     # directories created for a missing parent
    for parts, typ, size, mode, sec, nsec in entries:
        path = tuple(parts)
        # keep only entries a valid layer may contain: no duplicate, nothing below a non-directory,
        # no non-directory where earlier entries needed a directory
        if path in taken or any(taken.get(path[:i], "dir") != "dir" for i in range(1, len(path))):
            continue
        if path in implicit and typ != "dir":
            continue
        taken[path] = typ
        implicit.discard(path)
        implicit.update(path[:i] for i in range(1, len(path)) if path[:i] not in taken)
        name = "/".join(path)
        pax = {"mtime": f"{sec}.{nsec:09d}"} if sec >= 0 else None
        mtime = max(sec, 0)
        if typ == "file":
            t.file(name, os.urandom(size), mode=mode, mtime=mtime, pax=pax)
        elif typ == "dir":
            t.dir(name + "/", mode=mode, mtime=mtime, pax=pax)
        elif typ == "symlink":
            t.symlink(name, "target-" + name, mtime=mtime)
        else:
            t.fifo(name, mode=mode, mtime=mtime)
    tar = t.bytes()
    layer = read_tar(io.BytesIO(compress(tar, kind)), objects)
    assert layer.tree == t.tree()
    assert re.fullmatch("sha256:[0-9a-f]{64}", layer.diff_id)
    check_objects(objects, t)


def test_opaque_marker_value(objects):
    t = Tar()
    t.whiteout("d/.wh..wh..opq")
    tree = read_tar(io.BytesIO(t.bytes()), objects).tree
    assert lookup(tree, "d").xattrs == {OPAQUE_XATTR: b"y"}


# --- payloads read straight from the stream; small objects through the bulk writer ------------------

MIB = 1 << 20


class Trickle(io.RawIOBase):
    """A pipe-like stream: at most `step` bytes per read, so payloads straddle many short reads."""

    def __init__(self, data: bytes, step: int):
        self._f = io.BytesIO(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        chunk = self._f.read(min(len(b), self._step))
        b[: len(chunk)] = chunk
        return len(chunk)


@pytest.mark.parametrize("kind", ["none", "gzip"])
@pytest.mark.parametrize("step", [None, 70_001], ids=["file", "trickle"])
def test_payload_sizes_around_the_chunk_size(objects, monkeypatch, kind, step):
    """Content of every size class (inline, put_bytes/bulk, streamed put) reads back exactly, with the
    small files going through bulk helper processes once there are enough of them."""
    import objects.bulk as bulk_mod

    monkeypatch.setattr(bulk_mod, "START_AFTER", 3)
    started = []
    real_start = bulk_mod.BulkWriter._start
    monkeypatch.setattr(bulk_mod.BulkWriter, "_start", lambda self: started.append(1) or real_start(self))
    t = Tar()
    for i, size in enumerate([0, 1, 64, 65, 511, 512, 4096, 4097, MIB - 1, MIB, MIB + 1, 3 * MIB + 513]):
        t.file(f"sized/{i}", os.urandom(size))
    for i in range(20):
        t.file(f"small/{i}", os.urandom(100 + 37 * i))
    t.file("small/dup", t.blobs[next(iter(t.blobs))])  # content already stored: same digest
    tar = compress(t.bytes(), kind)
    src = io.BytesIO(tar) if step is None else io.BufferedReader(Trickle(tar, step))
    layer = read_tar(src, objects)
    assert layer.tree == t.tree()
    assert layer.compressed_digest == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert layer.diff_id == "sha256:" + hashlib.sha256(t.bytes()).hexdigest()
    assert layer.diff_size == len(t.bytes())
    check_objects(objects, t)
    assert started == [1]
    assert os.listdir(os.path.join(objects.root, ".tmp")) == []


def test_many_big_files_in_a_row(objects):
    """Big members one after another (each hashed and written while the next is read) and a hardlink
    to one of them: every digest lands on its node, hardlinked names share it."""
    t = Tar()
    sizes = [MIB + 1, 3 * MIB, 2 * MIB + 7, 5 * MIB + 4097, MIB + 512, 4 * MIB]
    for i, size in enumerate(sizes):
        t.file(f"big/{i}", os.urandom(size))
        t.file(f"small/{i}", os.urandom(200 + i))
    t.hardlink("big/link", "big/3")
    layer = read_tar(io.BytesIO(t.bytes()), objects)
    assert layer.tree == t.tree()
    assert lookup(layer.tree, "big/link") is lookup(layer.tree, "big/3")
    assert layer.diff_id == "sha256:" + hashlib.sha256(t.bytes()).hexdigest()
    check_objects(objects, t)
    assert os.listdir(os.path.join(objects.root, ".tmp")) == []


@pytest.mark.parametrize("source", ["file", "bytesio"])
def test_layer_sha256_deferred_to_the_object_pipeline(objects, monkeypatch, tmp_path, source):
    """An uncompressed layer's sha256 of big payloads is done by the object store's workers, each up
    to the chunk it read, in chunk order (HashingReader.defer_work): even when that lags behind the
    reading, no buffer is refilled before it is hashed, and the headers read in between are hashed
    in their place."""
    import time

    import flatmount.sources.layers as layers_mod
    import objects.store as store_mod

    real_settle = layers_mod.HashingReader.settle
    real_settle_blocks = layers_mod.HashingReader.settle_blocks
    settles = []

    def slow_settle(self, upto=None):
        time.sleep(0.003)
        settles.append((upto, self._noted))
        real_settle(self, upto)

    def slow_settle_blocks(self, upto, chunk):  # (the same, with the chunk's block hashes in one pass)
        time.sleep(0.003)
        settles.append((upto, self._noted))
        return real_settle_blocks(self, upto, chunk)

    monkeypatch.setattr(layers_mod.HashingReader, "settle", slow_settle)
    monkeypatch.setattr(layers_mod.HashingReader, "settle_blocks", slow_settle_blocks)
    t = Tar()
    for i, size in enumerate([20 * MIB + 3, MIB + 1, 9 * MIB + 4096, 2 * MIB]):
        t.file(f"big/{i}", os.urandom(size))
        t.file(f"small/{i}", os.urandom(300 + i))
    data = t.bytes()
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    with open(path, "rb") if source == "file" else io.BytesIO(data) as src:
        layer = read_tar(src, objects)
    assert any(upto is not None for upto, _ in settles)  # the workers settled chunk by chunk
    if store_mod.CHUNK_WORKERS > 1:  # and one settled only up to its chunk while the next was read
        assert any(upto is not None and upto < noted for upto, noted in settles)
    assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert layer.tree == t.tree()
    check_objects(objects, t)


def test_starting_a_put_does_not_wait_for_deferred_hashing():
    """The next file's put starts (defer_work) while a worker is still hashing the previous file's
    chunks for the diff_id (settle): the reading thread never waits for that hashing."""
    import threading
    import time

    from flatmount.sources.layers import HashingReader

    class SlowHash:
        def __init__(self):
            self.real = hashlib.sha256()

        def update(self, data):
            time.sleep(0.5)
            self.real.update(data)

    data = os.urandom(4096)
    reader = HashingReader(io.BytesIO(data))
    slow = reader._hash = SlowHash()
    reader.defer_work()
    assert reader.read(4096) == data  # handed out, hashing deferred
    worker = threading.Thread(target=reader.end)  # the previous file's last settle: 0.5 s of hashing
    worker.start()
    time.sleep(0.1)
    t0 = time.perf_counter()
    reader.defer_work()  # the next put starts
    waited = time.perf_counter() - t0
    worker.join()
    reader.end()
    assert waited < 0.2, f"defer_work waited {waited:.2f} s for the hashing"
    assert slow.real.digest() == hashlib.sha256(data).digest()


@pytest.mark.parametrize("cut", [512 + 1000, 512 + MIB + 5, 512 + 2 * MIB + 4096])
def test_truncated_inside_a_big_file(objects, cut):
    t = Tar(root=False)
    t.file("big", os.urandom(3 * MIB))
    with pytest.raises(LayerError, match="ends inside this file"):
        read_tar(io.BytesIO(t.bytes()[:cut]), objects, label="cut")
    assert list(objects) == []
    assert os.listdir(os.path.join(objects.root, ".tmp")) == []


def test_failing_bulk_helper_fails_the_layer(objects, monkeypatch):
    """A helper that cannot store objects: read_tar raises ObjectStoreError and no helper is left."""
    import objects.bulk as bulk_mod
    from objects import ObjectStoreError

    monkeypatch.setattr(bulk_mod, "START_AFTER", 0)
    monkeypatch.setattr(bulk_mod, "_CHILD", "import sys; sys.stdout.write('cannot store: broken'); sys.exit(1)")
    t = Tar()
    for i in range(50):
        t.file(f"f{i}", os.urandom(5000))
    with pytest.raises(ObjectStoreError, match="cannot store: broken"):
        read_tar(io.BytesIO(t.bytes()), objects)


def _header_blocks(ti: tarfile.TarInfo, fmt: int) -> list[bytes]:
    buf = ti.tobuf(fmt, "utf-8", "surrogateescape")
    return [buf[i:i + 512] for i in range(0, len(buf), 512)]


def _decoded(cls, block: bytes):
    try:
        ti = cls.frombuf(block, "utf-8", "surrogateescape")
    except Exception as e:  # noqa: BLE001 - the exact error is what is compared
        return type(e), str(e)
    return {a: getattr(ti, a, None) for a in ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type",
                                              "linkname", "uname", "gname", "devmajor", "devminor",
                                              "pax_headers", "sparse", "_sparse_structs")}


def _with_checksum(block: bytes) -> bytes:
    b = bytearray(block)
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


@settings(max_examples=300, deadline=None)
@given(name=st.text(min_size=1, max_size=200), type_=st.sampled_from(
           [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
            tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, b"V"]),
       size=st.integers(0, 2**40), mtime=st.integers(-(2**35), 2**35), ids=st.integers(0, 2**25),
       fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       poke=st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=4),
       fix_checksum=st.booleans())
def test_fast_header_decoding_is_tarfiles(name, type_, size, mtime, ids, fmt, poke, fix_checksum):
    """_TarInfo.frombuf decodes every block (headers of each format, then with bytes poked into them)
    exactly as tarfile does: the same fields, or the same error."""
    from flatmount.sources.tarreader import _TarInfo

    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime, ti.uid, ti.gid = type_, size, mtime, ids, ids // 3
    ti.devmajor, ti.devminor, ti.linkname = ids % 4096, ids % 255, name[::-1]
    try:
        blocks = _header_blocks(ti, fmt)
    except ValueError:  # not representable in this format
        return
    for block in blocks:
        b = bytearray(block)
        for pos, value in poke:
            b[pos] = value
        for candidate in {bytes(b), _with_checksum(bytes(b)) if fix_checksum else bytes(b), bytes(512),
                          bytes(b[:300])}:
            assert _decoded(_TarInfo, candidate) == _decoded(tarfile.TarInfo, candidate)


def test_sha512_blob_digest_with_direct_reads(objects):
    """Uncompressed input read with a sha512 blob digest: big payloads bypass the chunk reader, and
    the diff_id (sha256) still covers every byte."""
    from flatmount.sources.layers import HashingReader

    t = Tar()
    t.file("big", os.urandom(2 * MIB + 3))
    t.file("small", os.urandom(3000))
    tar = t.bytes()
    layer = read_tar(HashingReader(io.BytesIO(tar), "sha512"), objects)
    assert layer.compressed_digest == "sha512:" + hashlib.sha512(tar).hexdigest()
    assert layer.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    check_objects(objects, t)


def test_layer_sha256_and_block_hashes_in_one_pass(objects, monkeypatch, tmp_path):
    """Where the compiled SHA-256 stream is (objects.digest.StreamSha256), each chunk of a big payload
    is hashed for the diff_id and for fs-verity in one pass (HashingReader.settle_blocks), not
    twice; the digests are those of hashlib and of the pure-Python block hashes."""
    from conftest import require_native

    import objects.digest as digest_mod

    require_native()
    assert digest_mod.STREAM_BLOCKS, "objects._fsverity has no SHA-256 stream (this CPU has SHA-NI)"
    shared = []
    real = digest_mod.StreamSha256.update_blocks

    def spy(self, data):
        hashes = real(self, data)
        shared.append(len(data) if hashes is not None else 0)
        return hashes

    monkeypatch.setattr(digest_mod.StreamSha256, "update_blocks", spy)
    t = Tar()
    for i, size in enumerate([6 * MIB + 5, 3 * MIB + 4096, 2 * MIB]):
        t.file(f"big/{i}", os.urandom(size))
        t.file(f"small/{i}", os.urandom(100 + i))
    data = t.bytes()
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    with open(path, "rb") as src:
        layer = read_tar(src, objects)
    assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    check_objects(objects, t)
    # most of the 11 MiB: not the head of a member's first chunk (read with its header), and not a
    # chunk whose bytes another thread had to settle first (a race at most once or twice a layer)
    assert sum(shared) >= 8 * MIB


def test_consecutive_files_share_the_pass_to_their_last_chunk(objects, tmp_path):
    """A layer of files of a few MiB: the worker that starts the next file waits for the previous
    file's last chunk (HashingReader.claim) instead of hashing its bytes for the diff_id itself,
    which left that chunk's fs-verity hashes to be computed apart (a fifth of such a layer)."""
    from conftest import require_native

    import objects.digest as digest_mod

    require_native()
    assert digest_mod.STREAM_BLOCKS, "objects._fsverity has no SHA-256 stream (this CPU has SHA-NI)"
    real = digest_mod.StreamSha256.update_blocks
    shared = []

    def spy(self, data):
        hashes = real(self, data)
        shared.append(len(data) if hashes is not None else 0)
        return hashes

    t = Tar()
    sizes = [2 * MIB + MIB // 2 + 4096 * i for i in range(12)]
    for i, size in enumerate(sizes):
        t.file(f"f/{i}", os.urandom(size))
    data = t.bytes()
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    mp = pytest.MonkeyPatch()
    mp.setattr(digest_mod.StreamSha256, "update_blocks", spy)
    try:
        with open(path, "rb") as src:
            layer = read_tar(src, objects)
    finally:
        mp.undo()
    assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    check_objects(objects, t)
    assert sum(shared) >= 0.9 * sum(sizes), (sum(shared) / sum(sizes), shared)


def test_a_claim_never_settled_is_waited_for_once(tmp_path):
    """A chunk claimed by a pipeline that then stopped without settling it: the next chunk's
    settle_blocks waits for it at most CLAIM_WAIT, drops it, and no later one waits again; the
    stream's sha256 stays right."""
    import time

    import flatmount.sources.pipeline as pipeline_mod
    from flatmount.sources.layers import HashingReader

    payload = os.urandom(3 * MIB)
    path = tmp_path / "src"
    path.write_bytes(payload)
    with open(path, "rb") as f:
        r = HashingReader(f)
        r.defer_work()
        bufs = [bytearray(MIB) for _ in range(3)]
        r.readinto(bufs[0])
        r.claim()  # (its settle_blocks never comes)
        took = []
        for buf in bufs[1:]:
            r.readinto(buf)
            mark = r.claim()
            t0 = time.perf_counter()
            r.settle_blocks(mark, memoryview(buf))
            took.append(time.perf_counter() - t0)
        r.end()
        assert r.hexdigest() == hashlib.sha256(payload).hexdigest()
    assert took[0] >= pipeline_mod.CLAIM_WAIT * 0.9
    assert took[1] < pipeline_mod.CLAIM_WAIT / 2
