"""The shortcuts of flatten's new-process path (issue 17, target 4) against the code they stand in
for: the bulk sharing of repeated digests' xattrs (`writer._share_repeated`) gives the layout and bytes
of the item-by-item count; the derived-file thread leaves the GIL to flatten's caller; the writer's
layout can be left to the caller to free."""

from __future__ import annotations

import gc
import os
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.flatten.imagefile import _Stream, aligned_buffer
from flatmount.flatten.imagefile import direct_images as _REAL_DIRECT_IMAGES
from flatmount.flatten.imagefile import set_direct as _REAL_SET_DIRECT
from flatmount.image import accel
from flatmount.image.dump import parse_dump
from flatmount.image.tree import Inode
from tests import pin_trees
from tests.conftest import compiled_missing, shared_data
from tests.cwrite_helpers import use

_REAL_STREAM_WRITE = _Stream._write
_REAL_PWRITE = os.pwrite
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the bulk sharing of repeated digests ---------------------------------------------------------

_LAYOUT_FIELDS = ("shared", "shared_off", "shared_size", "keyinfo", "has_acl", "mc_sh", "rd_sh")
_POOL = [bytes([k]) * 31 + bytes([255 - k]) for k in range(6)]
# names around the metacopy/redirect ones in bytes order, values shared or not
_XATTRS = [(b"user.a", b"1"), (b"user.a", b"22"), (b"security.capability", b"\x01\x02"),
           (b"trusted.overlay.metacopx", b"v"), (b"trusted.overlay.redirecz", b"/v"), (b"trusted.p", b"")]


@st.composite
def digest_trees(draw) -> Inode:
    """Digest-only files (digests from a small pool: repeated, or unique), and directories, symlinks
    and inline files with xattrs of their own (shared or not) whose names sort before, between and
    after the metacopy and redirect names; sometimes a file with a digest and xattrs."""
    root = Inode.directory(0o755, mtime_ns=draw(st.integers(0, 3)))
    dirs = [root]
    for k in range(draw(st.integers(0, 40))):
        kind = draw(st.sampled_from(["digest", "digest", "digest", "unique", "dir", "symlink", "inline",
                                     "digest+xattrs"]))
        parent = draw(st.sampled_from(dirs))
        xattrs = dict(draw(st.lists(st.sampled_from(_XATTRS), max_size=2)))
        mtime = draw(st.integers(0, 3))
        name = b"n%d" % k
        if kind in ("digest", "unique", "digest+xattrs"):
            dg = draw(st.sampled_from(_POOL)) if kind != "unique" else bytes([k]) * 32
            node = Inode(0o100644, size=draw(st.integers(65, 1 << 20)), digest=dg, mtime_ns=mtime,
                         xattrs=xattrs if kind == "digest+xattrs" else None)
        elif kind == "dir":
            node = Inode.directory(0o755, mtime_ns=mtime, xattrs=xattrs)
            dirs.append(node)
        elif kind == "symlink":
            node = Inode.symlink(b"target%d" % k, mtime_ns=mtime, xattrs=xattrs)
        else:
            node = Inode.file(b"x" * draw(st.integers(0, 80)), mtime_ns=mtime, xattrs=xattrs)
        parent.entries[name] = node
    return root


def _layouts(root: Inode):
    """The layout of `root` after pass 3 with the bulk sharing (where it takes the tree) and with the
    item-by-item count alone, and the image bytes of each; (taken, bulk, general)."""
    from flatmount.image import writer

    use("native")   # (fails under CI when the compiled module is missing)
    out = []
    taken = []
    real = writer._share_repeated

    def spy(*a):
        got = real(*a)
        taken.append(got)
        return got

    for share in (spy, lambda *a: False):
        saved = accel.CWRITE
        writer._share_repeated = share
        try:
            lay = writer._queue_inodes(root, True)
            writer._inode_fields(lay)
            writer._share_xattrs(lay)
            fields = {f: getattr(lay, f) for f in _LAYOUT_FIELDS}
            fields["dg_items"] = {dg: lay.dg_items[dg] for dg in lay.mc_sh | lay.rd_sh}
            out.append((fields, writer.image_bytes(root)))
        finally:
            writer._share_repeated = real
            accel.CWRITE = saved
    return any(taken), out[0], out[1]


@SETTINGS
@given(digest_trees())
def test_bulk_sharing_is_the_item_by_item_count(root):
    _taken, bulk, general = _layouts(root)
    assert bulk == general


def test_bulk_sharing_takes_repeated_digests_among_shared_xattrs():
    """Repeated digests and shared xattrs of names on both sides of the metacopy/redirect names: the
    bulk path takes the tree (and agrees with the general one)."""
    root = Inode.directory(0o755)
    for k in range(12):
        root.entries[b"f%d" % k] = Inode(0o100644, size=1000, digest=_POOL[k % 3], mtime_ns=k % 2)
        root.entries[b"d%d" % k] = Inode.directory(0o755, xattrs=dict(_XATTRS[k % 3: k % 3 + 2]))
        root.entries[b"s%d" % k] = Inode.symlink(b"t", xattrs={b"trusted.p": b""})
    taken, bulk, general = _layouts(root)
    assert taken and bulk == general
    names = [k for k, _v in bulk[0]["shared"]]
    assert names == sorted(names, reverse=True) and b"user.a" in names and b"security.capability" in names


def test_bulk_sharing_takes_files_with_xattrs_of_their_own():
    """Files with a digest and xattrs of their own (a capability: their metacopy and redirect are
    items of their own, equal to digest-only files' ones where the content is the same, or used once
    otherwise): the bulk path takes them too, and agrees with the general one."""
    root = Inode.directory(0o755)
    for k in range(30):
        root.entries[b"f%d" % k] = Inode(0o100755, size=4000, digest=_POOL[k % 4], mtime_ns=1)
    cap = {b"security.capability": b"\x01\x00\x00\x02"}
    root.entries[b"ping"] = Inode(0o100755, size=4000, digest=_POOL[0], xattrs=dict(cap))      # shared content
    root.entries[b"arping"] = Inode(0o100755, size=4000, digest=_POOL[5], xattrs=dict(cap))    # its own
    root.entries[b"once"] = Inode(0o100755, size=4000, digest=_POOL[4], mtime_ns=1)            # used once...
    root.entries[b"clock"] = Inode(0o100755, size=4000, digest=_POOL[4], xattrs=dict(cap))     # ...and named
    taken, bulk, general = _layouts(root)
    assert taken and bulk == general
    assert bulk[0]["mc_sh"] >= {_POOL[0], _POOL[4]} and _POOL[5] not in bulk[0]["mc_sh"]


@pytest.mark.parametrize("name", sorted(pin_trees.DUMPS))
def test_bulk_sharing_on_the_cs9_dumps(name):
    taken, bulk, general = _layouts(parse_dump(shared_data(name).read_bytes()))
    assert bulk == general


@pytest.mark.parametrize("name", sorted(n for n in pin_trees.load_pins()["composefs"] if n not in pin_trees.DUMPS))
def test_bulk_sharing_on_the_composefs_test_trees(name):
    _taken, bulk, general = _layouts(pin_trees.build(name))
    assert bulk == general


# --- the derived-file thread and the layout ---------------------------------------------------------

def test_derived_writer_starts_after_start_returned():
    """`DerivedWriters.start` returns with the GIL: the writer's target runs only once the caller
    let go of it (before, the new thread ran its target at once, and the caller, whose result was
    ready, waited for the GIL: a switch interval or a whole C call of the writer)."""
    from flatmount.store.paths import DerivedWriters

    writers = DerivedWriters()
    returned = []
    seen = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(5.0)   # (no forced switch: only a release of the GIL lets the thread run)
    try:
        writers.start(lambda: seen.append(bool(returned)))
        returned.append(True)
    finally:
        sys.setswitchinterval(interval)
        writers.wait()
    assert seen == [True]
    assert not [t for t in threading.enumerate() if t.name == "flatmount-derived"]


def test_image_buffer_leaves_the_layout_to_the_caller():
    """`image_buffer(keep=)`: the same bytes; the layout handed over, already in the old generation
    (a young collection would otherwise walk all of it)."""
    from flatmount.image import writer

    root = parse_dump(shared_data("cs9-x86_64-minimal.dump.gz").read_bytes())
    keep: list = []
    buf = writer.image_buffer(root, keep=keep)
    assert bytes(buf) == writer.image_bytes(root)
    (lay,) = keep
    assert len(lay.nodes) > 10000
    young = {id(o) for o in gc.get_objects(generation=0)}
    assert id(lay.nodes) not in young and id(lay.dnames) not in young


# --- the compiled tree cache decoder's shared integers ------------------------------------------------

def test_tree_cache_decoder_shares_equal_integers():
    """flatmount/image/_ctree.c gives equal integer fields one object (fewer allocations when a
    new process decodes a big prefix), without mixing up a signed mtime and an unsigned size of the
    same bit pattern, and the Python decoder (the specification) reads the same tree."""
    from flatmount.image import treecache
    from tests.test_treecache import DIGEST, _decode_both

    root = Inode.directory(0o755, mtime_ns=1_700_000_000 * 10**9)
    for k in range(300):
        root.entries[b"f%d" % k] = Inode(0o100644, uid=1000, gid=1000, mtime_ns=1_700_000_000 * 10**9,
                                         size=5000 + k % 3, digest=bytes([k % 256]) * 32)
    root.entries[b"neg"] = Inode(0o100600, mtime_ns=-1000, size=(1 << 64) - 1000, digest=b"\1" * 32)
    root.entries[b"pos"] = Inode(0o100600, mtime_ns=(1 << 63) - 1, size=1000, digest=b"\2" * 32)
    back = _decode_both(treecache.encode(root, DIGEST, 7))
    assert back == root
    files = [back.entries[b"f%d" % k] for k in range(300)]
    for field in ("mode", "uid", "mtime_ns"):
        assert len({id(getattr(f, field)) for f in files}) == 1, field
    assert len({id(f.size) for f in files}) == 3
    neg, pos = back.entries[b"neg"], back.entries[b"pos"]
    assert (neg.mtime_ns, neg.size, pos.mtime_ns, pos.size) == (-1000, (1 << 64) - 1000, (1 << 63) - 1, 1000)


# --- imports of a new process's flatten ----------------------------------------------------------------

def test_flatten_in_a_new_process_does_not_import_the_helper(tmp_path):
    """The forked helper is off (helper.HELPER): flatten does not import its module (~1 ms)."""
    from layerdirs import store_image

    from flatmount.api import open_store
    from tests.test_flatten import BIG, _store_child, chain_trees

    a = open_store(tmp_path / "a", runroot=tmp_path / "run")
    store_image(a, chain_trees(), "all", blobs=BIG)
    a.close()
    code = ("import sys\n"
            "from flatmount.api import open_store\n"
            "s = open_store(sys.argv[1], runroot=sys.argv[2])\n"
            "flat = s.flatten('all')\n"
            "print(flat.reused, 'flatmount.flatten.helper' in sys.modules)\n")
    assert _store_child(code, tmp_path).stdout.split() == ["False", "False"]


# --- the image written (O_DIRECT) and hashed while the writer emits it ---------------------------------

def _o_direct_works(directory) -> bool:
    import os

    try:
        fd = os.open(os.path.join(directory, "probe"), os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(directory, "probe"))
    return True


def _flatten_recording(tmp_path, name, monkeypatch, *, pwrite=None, set_direct=None, direct=None):
    """Flatten the test chain in a fresh store `name`; (image bytes, digest, [whether O_DIRECT was on
    for each write of a range]).  `pwrite`, `set_direct`: stand-ins for os.pwrite and
    imagefile.set_direct; `direct`: what imagefile.direct_images answers."""
    import fcntl
    import hashlib
    import os

    from layerdirs import store_image

    from flatmount.api import open_store
    from flatmount.flatten import imagefile
    from flatmount.store import paths as store_paths
    from tests.test_flatten import BIG, chain_trees

    flags: list[bool] = []

    def spy(self, chunk, off):
        flags.append(bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DIRECT))
        return _REAL_STREAM_WRITE(self, chunk, off)

    monkeypatch.setattr(imagefile._Stream, "_write", spy)
    monkeypatch.setattr(imagefile, "set_direct", set_direct or _REAL_SET_DIRECT)
    monkeypatch.setattr(imagefile, "direct_images", _REAL_DIRECT_IMAGES if direct is None else lambda store: direct)
    if pwrite is not None:
        monkeypatch.setattr(os, "pwrite", pwrite)
    store = open_store(tmp_path / name, runroot=tmp_path / "run")
    try:
        store_image(store, chain_trees(), "all", blobs=BIG)
        flat = store.flatten("all")
    finally:
        if pwrite is not None:
            monkeypatch.setattr(os, "pwrite", _REAL_PWRITE)
        store_paths.wait_derived()
        store.close()
    with open(flat.path, "rb") as f:
        data = f.read()
    assert hashlib.sha256(data).hexdigest() == flat.digest and not flat.reused
    return data, flat.digest, flags


def test_image_written_with_o_direct_is_the_same(tmp_path, monkeypatch):
    """Where the filesystem takes O_DIRECT the image is written with it, and its bytes are those of a
    buffered write (and those the writer makes of its tree read back)."""
    from flatmount.flatten import flat_tree
    from flatmount.image.writer import image_bytes

    data, digest, flags = _flatten_recording(tmp_path, "a", monkeypatch)
    assert flags and set(flags) == {_o_direct_works(tmp_path / "a" / "tmp")}
    data2, digest2, flags2 = _flatten_recording(tmp_path, "b", monkeypatch, direct=False)
    assert flags2 and not any(flags2)
    assert digest2 == digest and data2 == data
    assert image_bytes(flat_tree(str(tmp_path / "b" / "images" / (digest + ".erofs")))) == data


def test_image_write_falls_back_to_buffered(tmp_path, monkeypatch):
    """O_DIRECT refused for the file (tmpfs...), or refused half-way (EINVAL after a short write):
    the image is written buffered, the same bytes."""
    import errno

    data, digest, _ = _flatten_recording(tmp_path, "a", monkeypatch)
    refused, _, flags = _flatten_recording(tmp_path, "b", monkeypatch,
                                           set_direct=lambda fd, on: False if on else _REAL_SET_DIRECT(fd, on))
    assert flags and not any(flags)
    assert refused == data
    if not _o_direct_works(tmp_path / "a" / "tmp"):
        return
    calls = []

    def short_then_einval(fd, b, off):
        calls.append((len(b), off))
        if len(calls) == 1:
            return _REAL_PWRITE(fd, b[:8192], off)      # a short (aligned) write
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "refused")
        return _REAL_PWRITE(fd, b, off)

    half, _, flags = _flatten_recording(tmp_path, "c", monkeypatch, pwrite=short_then_einval)
    assert flags[0] is True
    assert calls[:3] == [(len(data), 0), (len(data) - 8192, 8192), (len(data) - 8192, 8192)]
    assert half == data


def test_buffered_write_mode_of_this_boot_keeps_images_buffered(tmp_path):
    """objects.writemode recorded buffered writes as faster for the store's objects on this boot:
    images are written buffered too; a record of another boot does not count."""
    from flatmount.api import open_store
    from flatmount.flatten.imagefile import direct_images
    from objects.writemode import STATE_FILE, boot_id

    store = open_store(tmp_path / "s", runroot=tmp_path / "run")
    try:
        store.ensure_writable()
        assert direct_images(store)
        state = store.objects_dir / STATE_FILE
        state.write_text(f"buffered {boot_id()} direct=1MB/s buffered=2MB/s\n")
        assert not direct_images(store)
        state.write_text("buffered 00000000-0000-0000-0000-000000000000 direct=1MB/s buffered=2MB/s\n")
        assert direct_images(store)
        state.write_text(f"direct {boot_id()} direct=2MB/s buffered=1MB/s\n")
        assert direct_images(store)
    finally:
        store.close()


def _final_ranges(root: Inode, monkeypatch, slice_min: int, slices: int):
    """image_buffer(final=) of `root`: (the image, [(end, bytes below end at that call)])."""
    from flatmount.image import writer

    monkeypatch.setattr(writer, "FINAL_SLICE", slice_min)
    monkeypatch.setattr(writer, "FINAL_SLICES", slices)
    seen: list[tuple[int, bytes]] = []
    buf = writer.image_buffer(root, final=lambda b, end: seen.append((end, bytes(b[:end]))))
    return bytes(buf), seen


def _check_final(img: bytes, seen: list) -> None:
    ends = [end for end, _ in seen]
    assert ends == sorted(ends) and ends[-1] == len(img) and all(end % 4096 == 0 for end in ends)
    for end, below in seen:
        assert below == img[:end]


@pytest.mark.parametrize("impl", ["native", "python"])
def test_final_ranges_hold_final_bytes_cs9(monkeypatch, impl):
    """What `final` is told is final is: the bytes below each `end` do not change afterwards (the
    threads writing and hashing them read them meanwhile); in slices of the cs9 minimal tree."""
    from flatmount.image.writer import image_bytes

    root = parse_dump(shared_data("cs9-x86_64-minimal.dump.gz").read_bytes())
    saved = use(impl)
    try:
        img, seen = _final_ranges(root, monkeypatch, 1000, 7)
    finally:
        accel.CWRITE = saved
    assert len(seen) == 7 and img == image_bytes(root)
    _check_final(img, seen)


@SETTINGS
@given(digest_trees(), st.integers(1, 5), st.integers(1, 6))
def test_final_ranges_hold_final_bytes_random(root, slice_min, slices):
    from flatmount.image.writer import image_bytes

    with pytest.MonkeyPatch.context() as mp:
        img, seen = _final_ranges(root, mp, slice_min, slices)
    assert img == image_bytes(root)
    _check_final(img, seen)


def test_streamed_write_failure_leaves_nothing(tmp_path, monkeypatch):
    """A write that fails (ENOSPC) fails the flatten with that error, and leaves no temp file and no
    thread behind."""
    import errno
    import os

    def full(fd, b, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        _flatten_recording(tmp_path, "a", monkeypatch, pwrite=full)
    assert os.listdir(tmp_path / "a" / "tmp") == []
    assert not [t for t in threading.enumerate() if t.name == "flatmount-image"]


@pytest.mark.parametrize("direct", [False, True])
def test_buffered_ranges_are_flushed_as_they_are_written(tmp_path, monkeypatch, direct):
    """Written buffered, a range the writer catches up with is made durable at once (fdatasync, in
    the writer's thread, while the image is still being built), so the commit's fsync is left with
    the last; O_DIRECT writes are not flushed on the way.  The file holds the image's bytes."""
    real_fdatasync = os.fdatasync
    synced: list[int] = []

    def spy(fd):
        synced.append(os.fstat(fd).st_size)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    img = os.urandom(3 * 4096)
    buf = aligned_buffer(len(img))   # (page-aligned: O_DIRECT writes need it)
    buf[:] = img
    fd = os.open(tmp_path / "image", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        stream = _Stream(fd, direct and _REAL_SET_DIRECT(fd, True))
        stream.final(buf, 4096)
        deadline = time.monotonic() + 10
        while stream.queues[0] and time.monotonic() < deadline:   # (the writer took the first range)
            time.sleep(0.001)
        time.sleep(0.05)
        stream.final(buf, len(img))
        stream.finish()
    finally:
        os.close(fd)
    assert (tmp_path / "image").read_bytes() == img
    if stream.direct:
        assert synced == []
    else:
        assert synced and synced[0] == 4096


# --- small-object arenas with their pages allocated at once -------------------------------------------

# the arena allocator in place, through ctypes, and mincore(2): the start of both child scripts below
ARENA_PRELUDE = r"""
import ctypes, mmap, sys, time
from objects.compiled import load
arena = load("flatmount.flatten._carena")
if arena is None:
    print("missing"); sys.exit(0)
libc = ctypes.CDLL(None, use_errno=True)
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
ALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)

class Allocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ALLOC), ("free", FREE)]

SIZE, PAGE = 1 << 20, mmap.PAGESIZE
"""

ARENA_CHILD = ARENA_PRELUDE + r"""
def resident_pages():
    # a new arena from the arena allocator in place now: how many of its pages are resident at once
    a = Allocator()
    ctypes.pythonapi.PyObject_GetArenaAllocator(ctypes.byref(a))
    p = a.alloc(a.ctx, SIZE)
    vec = ctypes.create_string_buffer(SIZE // mmap.PAGESIZE)
    start = p & ~(mmap.PAGESIZE - 1)
    assert libc.mincore(start, SIZE - (start - p) - mmap.PAGESIZE, vec) == 0
    n = sum(b & 1 for b in vec.raw[:-1])
    a.free(a.ctx, p, SIZE)
    return n

off = resident_pages()
if sys.argv[1] == "push":
    arena.push(); arena.push(); arena.pop()   # nested: still pushed
on = resident_pages()
if sys.argv[1] == "push":
    arena.pop()
after = resident_pages()
try:
    arena.pop()
except RuntimeError:
    unbalanced = "refused"
else:
    unbalanced = "accepted"
full = SIZE // mmap.PAGESIZE - 2
print(off == 0, on >= full, after == 0, unbalanced)
"""


@pytest.mark.parametrize("mode", ["push", "none"])
def test_pushed_arenas_are_populated(mode):
    """Between push() and the last pop(), the arena allocator gives new arenas resident as a whole
    at once; before and after, and without push, not one page of them is (they fault in as they are
    used).  pop() without push() is refused."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = subprocess.run([sys.executable, "-c", ARENA_CHILD, mode], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "FLATMOUNT_PURE": ""}, check=True).stdout.split()
    if out == ["missing"]:
        compiled_missing("flatmount.flatten._carena")
    assert out == ["True", "True" if mode == "push" else "False", "True", "refused"]


RESERVE_CHILD = ARENA_PRELUDE + r"""
def allocator():
    a = Allocator()
    ctypes.pythonapi.PyObject_GetArenaAllocator(ctypes.byref(a))
    return a

def resident(p, size):   # pages of [p, p + size) resident; -1: not mapped
    vec = ctypes.create_string_buffer(size // PAGE)
    if libc.mincore(p, size, vec) != 0:
        return -1
    return sum(b & 1 for b in vec.raw)

arena.push(4 * SIZE)
a = allocator()
time.sleep(0.2)   # the populater is done by now
got = [a.alloc(a.ctx, SIZE) for _ in range(6)]
base = got[0]
print("in-order", [p - base for p in got[:4]] == [0, SIZE, 2 * SIZE, 3 * SIZE])
print("populated", all(resident(p, SIZE) == SIZE // PAGE for p in got[:4]))
print("beyond", all(not base <= p < base + 4 * SIZE for p in got[4:]))
ctypes.memset(got[1], 0x5A, SIZE)
a.free(a.ctx, got[2], SIZE)
again = a.alloc(a.ctx, SIZE)
print("reused", again == got[2])
a.free(a.ctx, again, SIZE)
a.free(a.ctx, got[3], SIZE)
arena.pop()
print("freed-unmapped", resident(got[2], SIZE) == -1 and resident(got[3], SIZE) == -1)
print("kept", ctypes.string_at(got[1], SIZE) == b"\x5a" * SIZE and resident(got[0], SIZE) == SIZE // PAGE)
b = allocator()   # the allocator before push: frees the reserve's arenas still held (munmap)
for p in (got[0], got[1], got[4], got[5]):
    b.free(b.ctx, p, SIZE)
print("unmapped", resident(got[1], SIZE) == -1)
# a reserve bigger than what is used: the rest is unmapped at pop; nested pushes keep it
arena.push(8 * SIZE)
c = allocator()
p = c.alloc(c.ctx, SIZE)
arena.push(); arena.pop()
q = c.alloc(c.ctx, SIZE)
arena.pop()
print("nested", q == p + SIZE and resident(q + SIZE, SIZE) == -1)
b.free(b.ctx, p, SIZE); b.free(b.ctx, q, SIZE)
# Python objects made under a reserve are whole after pop
arena.push(16 * SIZE)
data = [(str(i), i * 7, b"x" * (i % 50)) for i in range(200_000)]
arena.pop()
print("objects", all(d == (str(i), i * 7, b"x" * (i % 50)) for i, d in enumerate(data)))
"""


def test_a_reserve_hands_out_populated_arenas_and_unmaps_the_rest():
    """push(reserve): new arenas come from one mapping, in order, their pages resident (a thread
    populated them); a freed one is handed out again; at the last pop what no arena holds is unmapped,
    what one holds stays (contents kept) until it is freed; objects made meanwhile are intact."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    _carena()
    out = subprocess.run([sys.executable, "-c", RESERVE_CHILD], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "FLATMOUNT_PURE": ""})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split() for line in out.stdout.splitlines())
    assert lines == dict.fromkeys(["in-order", "populated", "beyond", "reused", "freed-unmapped", "kept",
                                   "unmapped", "nested", "objects"], "True")


def test_pure_env_turns_the_arena_populating_off():
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = "from objects.compiled import load; print(load('flatmount.flatten._carena') is None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "FLATMOUNT_PURE": "1"}).stdout.split()
    assert out == ["True"]


def _carena():
    from objects.compiled import load

    arena = load("flatmount.flatten._carena")
    if arena is None:
        compiled_missing("flatmount.flatten._carena")
    return arena


def test_populate_allocates_pages_and_changes_no_byte():
    import ctypes
    import mmap

    arena = _carena()
    size = 64 * mmap.PAGESIZE
    buf = mmap.mmap(-1, size)
    buf[5 * mmap.PAGESIZE: 5 * mmap.PAGESIZE + 3] = b"abc"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    anchor = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(anchor)

    def resident() -> int:
        vec = ctypes.create_string_buffer(size // mmap.PAGESIZE)
        assert libc.mincore(addr, size, vec) == 0
        return sum(b & 1 for b in vec.raw)

    before = resident()
    assert arena.populate(buf) is True
    assert before <= 2 and resident() == size // mmap.PAGESIZE
    assert buf[5 * mmap.PAGESIZE: 5 * mmap.PAGESIZE + 3] == b"abc" and bytes(buf).count(0) == size - 3
    with pytest.raises(BufferError):
        arena.populate(b"read-only")
    del anchor
    buf.close()


@pytest.mark.parametrize("hint", ["none", "small", "fits"])
def test_early_buffer_gives_the_same_image(tmp_path, monkeypatch, hint):
    """The image's buffer allocated early from a size hint: the same bytes whether the image fits
    the hint, does not (memory of its own), or there is none."""
    from flatmount.flatten import imagecache, imagefile

    _carena()
    data, digest, _ = _flatten_recording(tmp_path, "a", monkeypatch)
    allocs = []
    real = imagefile._EarlyBuffer.alloc

    def spy(self, size):
        got = real(self, size)
        allocs.append((len(self.buf), size, type(got).__name__))
        return got

    monkeypatch.setattr(imagefile._EarlyBuffer, "alloc", spy)
    size = {"none": 0, "small": 4096, "fits": 1 << 20}[hint]
    monkeypatch.setattr(imagecache, "_size_hint", lambda prefix, layers: size)
    data2, digest2, _ = _flatten_recording(tmp_path, "b", monkeypatch)
    assert (digest2, data2) == (digest, data)
    if hint == "none" or not _o_direct_works(tmp_path / "b" / "tmp"):
        assert allocs == []
    else:
        assert allocs == [(4096 if hint == "small" else 1 << 20, len(data),
                           "mmap" if hint == "small" else "memoryview")]


def test_writer_failure_half_way_leaves_nothing(tmp_path, monkeypatch):
    """The writer fails after its first slices were handed to the threads (a FormatError half-way):
    that error, no temp file, no thread left running."""
    import os

    from flatmount.errors import FormatError
    from flatmount.image import writer

    monkeypatch.setattr(writer, "FINAL_SLICE", 1)
    real = writer._emit_inodes
    calls = []

    def fail_third(*a, **k):
        calls.append(a[2])
        if len(calls) == 3:
            raise FormatError("no good")
        return real(*a, **k)

    monkeypatch.setattr(writer, "_emit_inodes", fail_third)
    threads = len(os.listdir("/proc/self/task"))
    with pytest.raises(FormatError, match="no good"):
        _flatten_recording(tmp_path, "a", monkeypatch)
    assert len(calls) == 3 and os.listdir(tmp_path / "a" / "tmp") == []
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/task")) > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) <= threads


def test_tree_cache_decoder_big_directories_and_a_directory_listed_twice():
    """Directories of more than a few entries get their entries dict made big enough at once by the
    compiled decoder: the same trees as the Python decoder, and the same refusals of a file listing a
    big directory twice (with entry rows, and in breadth-first order)."""
    from flatmount.errors import FormatError
    from flatmount.image.tree import S_IFDIR, S_IFREG
    from tests.test_treecache import _decode_both, _hand_made

    d, reg = S_IFDIR | 0o755, S_IFREG | 0o644
    names = [b"f%02d" % k for k in range(20)]
    # root -> dir "d" -> 20 files; then the same with "d" listed twice
    rows = [(d, 1), (d, 2)] + [(reg, 3)] * 20
    ok = _hand_made(rows, [0, 1], [1, 20], [b"d", *names], list(range(1, 22)))
    root = _decode_both(ok)
    assert sorted(root.entries[b"d"].entries) == names
    ok_bfs = _hand_made(rows, [0, 1], [1, 20], [b"d", *names], None)
    assert _decode_both(ok_bfs) == root
    twice = [_hand_made(rows, [0, 1, 1], [1, 10, 10], [b"d", *names], list(range(1, 22))),
             _hand_made(rows, [0, 1, 1], [1, 10, 10], [b"d", *names], None),
             _hand_made(rows, [0, 1, 1], [1, 0, 20], [b"d", *names], list(range(1, 22)))]
    for bad in twice:
        with pytest.raises(FormatError):
            _decode_both(bad)
