"""The compiled whole-image read and dump text (flatmount/image/_cread.c) against the Python reference.

Both paths run on the same inputs: the pinned trees (composefs's own test trees and ours), the cs9
images, hypothesis random trees, and damaged images.  They must give equal trees (hardlinks shared
alike), byte-identical dump text and, on damage, the same CorruptImageError message (the compiled
path gives up on anything it does not take and the Python reader decides, so the errors are always
the Python ones).  Under CI a missing compiled module fails these tests; it is never skipped there.
"""

from __future__ import annotations

import io
import os
import random
import stat
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.errors import CorruptImageError
from flatmount.image import accel
from flatmount.image import format as fmt
from flatmount.image import reader as reader_mod
from flatmount.image.dump import ROOT_WHITEOUTS, write_dump
from flatmount.image.reader import Image
from flatmount.image.tree import Inode, walk
from flatmount.image.writer import dir_size, image_bytes
from tests import pin_trees
from tests.conftest import require_compiled, shared_data
from tests.corruption import damaged
from tests.test_dump import trees as dump_trees
from tests.test_erofs import shared_content_trees
from tests.test_erofs import trees as image_trees
from tests.test_erofs_hostile import dir_tree, external_forms_tree

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def native():
    """The compiled module itself (whatever FLATMOUNT_PURE says: these tests compare both paths)."""
    mod = require_compiled("flatmount.image._cread")
    mod.setup(Inode)
    return mod


@contextmanager
def using(mod):
    """Run the reader and dump writer with `mod` as the compiled path (None: pure Python)."""
    saved = accel.CREAD
    accel.CREAD = mod
    try:
        yield
    finally:
        accel.CREAD = saved


def raw_read(native, data) -> Inode | None:
    """The compiled read alone: the tree, or None where it leaves the image to Python."""
    im = Image(data)
    return native.read_tree(im._d, im._meta, im._xbase, im._bits, im._epoch, im.superblock.build_time_nsec,
                            im._root_nid, im._filter, reader_mod._name_info)


def dump_with(mod, root: Inode) -> bytes:
    buf = io.BytesIO()
    with using(mod):
        write_dump(root, buf)
    return buf.getvalue()


def links(root: Inode) -> list[list[bytes]]:
    groups: dict[int, list[bytes]] = {}
    for path, node in walk(root):
        if not node.is_dir:
            groups.setdefault(id(node), []).append(path)
    return sorted(g for g in groups.values() if len(g) > 1)


def outcome(fn: Callable[[], Inode]) -> tuple:
    try:
        root = fn()
    except CorruptImageError as e:
        return ("error", str(e))
    return ("tree", root)


def assert_same_read(native, data, *, taken: bool | None = None) -> Inode | None:
    """Both paths read `data` alike (tree, hardlinks and dump, or the same error); `taken`: whether the
    compiled path must take the image itself (True) or leave it to Python (False)."""
    if taken is not None:
        try:
            got = raw_read(native, data)
        except CorruptImageError:   # the superblock is read by Python before either path
            got = None
        assert (got is not None) == taken
    with using(native):
        fast = outcome(lambda: Image(data).root())
    with using(None):
        slow = outcome(lambda: Image(data).root())
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "error":
        assert fast[1] == slow[1]
        return None
    assert fast[1] == slow[1]
    assert links(fast[1]) == links(slow[1])
    assert dump_with(native, fast[1]) == dump_with(None, slow[1])
    return fast[1]


def has_whiteouts(root: Inode) -> bool:
    return any(n.is_whiteout for _, n in walk(root))


# --- the module and its switch ---------------------------------------------------------------------

def test_layout_constants_match_format(native):
    assert (native.BLKSZ, native.DIRENT_SIZE, native.DIR_INLINE_MAX) == (fmt.BLKSZ, fmt.DIRENT_SIZE,
                                                                        fmt.DIR_INLINE_MAX)
    assert (native.INODE_COMPACT_SIZE, native.INODE_EXTENDED_SIZE, native.I_FORMAT_KNOWN) == (
        fmt.INODE_COMPACT_SIZE, fmt.INODE_EXTENDED_SIZE, fmt.I_FORMAT_KNOWN)
    assert (native.NAME_LEN, native.PATH_MAX, native.METACOPY_SIZE) == (fmt.NAME_LEN, fmt.PATH_MAX,
                                                                      fmt.METACOPY_SIZE)


@pytest.mark.parametrize("pure,want", [("1", "None"), ("", "_cread")])
def test_flatmount_pure_switches_it_off(native, pure, want):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLATMOUNT_PURE": pure}
    out = subprocess.run([sys.executable, "-c", "from flatmount.image import accel; print(accel.CREAD)"],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert want in out


# --- valid images: composefs's test trees, ours, the cs9 images ------------------------------------

@pytest.mark.parametrize("name", sorted({*pin_trees.load_pins()["composefs"], *pin_trees.load_pins()["flatmount"]}))
def test_pinned_trees_read_and_dump_alike(native, name):
    tree = pin_trees.build(name)
    data = image_bytes(tree)
    back = assert_same_read(native, data, taken=not has_whiteouts(tree))
    assert back is not None
    assert dump_with(native, tree) == dump_with(None, tree)


@pytest.mark.parametrize("name", pin_trees.DUMPS)
def test_cs9_images_read_and_dump_alike(native, name, tmp_path):
    tree = pin_trees.load_dump(shared_data(name))
    path = tmp_path / "cs9.img"
    path.write_bytes(image_bytes(tree))
    with Image.open(path) as im:   # an mmap, as `flatmount dump` reads it
        with using(native):
            fast = im.root()
        with using(None):
            slow = im.root()
    assert raw_read(native, path.read_bytes()) is not None
    assert fast == slow == tree
    assert links(fast) == links(slow)
    text = dump_with(native, fast)
    assert text == dump_with(None, slow)
    assert text.count(b"\n") == sum(1 for _ in walk(tree))


def test_memoryview_input(native):
    data = image_bytes(external_forms_tree())
    with using(native):
        a = Image(memoryview(bytearray(data))).root()
    assert a == Image(data).root() == external_forms_tree()
    assert raw_read(native, memoryview(bytearray(data))) is not None


def test_layer_whiteouts_left_to_python(native):
    """Whiteout files to convert back: the compiled read gives up, the result is Python's."""
    tree = pin_trees.layer_tree()
    assert has_whiteouts(tree)
    back = assert_same_read(native, image_bytes(tree), taken=False)
    assert back == tree


# --- random trees ----------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=image_trees())
def test_random_images_read_alike(native, root):
    assert_same_read(native, image_bytes(root), taken=None if has_whiteouts(root) else True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=shared_content_trees())
def test_shared_xattr_images_read_alike(native, root):
    assert_same_read(native, image_bytes(root), taken=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(root=dump_trees())
def test_random_trees_dump_alike(native, root):
    assert native.dump(root) is not None   # any tree of the model: the compiled path takes it
    assert dump_with(native, root) == dump_with(None, root)


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.binary(min_size=1, max_size=255).filter(lambda n: n not in (b".", b".."))
                      | st.sampled_from(sorted(ROOT_WHITEOUTS)), max_size=600, unique=True), root=st.booleans())
def test_directory_sizes_as_the_writer_lays_them_out(native, names, root):
    """The compiled dump's directory sizes follow writer.dir_size (greedy blocks, inline tail)."""
    d = Inode.directory()
    for n in names:
        d.entries[n] = Inode.file(b"")
    top = Inode.directory()
    top.entries[b"d"] = d
    tree = d if root else top
    assert dump_with(native, tree) == dump_with(None, tree)
    size = int(native.dump(tree).split(b"\n")[0 if root else 1].split(b" ")[1])
    assert size == dir_size(d.entries.keys() | ROOT_WHITEOUTS if root else d.entries)


def test_dump_gives_up_where_python_raises(native):
    """Trees the Python writer refuses: the compiled one leaves them to it (same exception)."""
    empty_link = Inode.directory()
    empty_link.entries[b"l"] = Inode(stat.S_IFLNK | 0o777, target=b"")
    not_a_dir = Inode.file(b"x")
    str_name = Inode.directory()
    str_name.entries["s"] = Inode.file(b"x")
    for tree in (empty_link, not_a_dir, str_name):
        assert native.dump(tree) is None
        errors = []
        for mod in (native, None):
            with pytest.raises(Exception) as e:
                dump_with(mod, tree)
            errors.append((type(e.value), str(e.value)))
        assert errors[0] == errors[1]


def test_dump_gives_up_on_unusual_values(native):
    """Values outside what the compiled writer formats (big ints, bytearrays, subclasses): Python's text."""
    class Sub(Inode):
        __slots__ = ()

    cases = []
    for field, value in (("mtime_ns", 1 << 80), ("uid", 1 << 70), ("content", bytearray(b"abc")),
                         ("digest", bytearray(32))):
        t = Inode.directory()
        f = t.entries[b"f"] = Inode.file(b"")
        setattr(f, field, value)
        cases.append(t)
    sub = Inode.directory()
    sub.entries[b"f"] = Sub(stat.S_IFREG | 0o644)
    cases.append(sub)
    for tree in cases:
        assert native.dump(tree) is None
        assert dump_with(native, tree) == dump_with(None, tree)


# --- damage: the same errors either way, never a crash ---------------------------------------------

def _corpus() -> list[bytes]:
    return [image_bytes(t) for t in (pin_trees.every_type_tree(), external_forms_tree(), dir_tree(),
                                      pin_trees.layer_tree())]


@pytest.mark.parametrize("which", range(4))
def test_bit_flips_same_outcome(native, which):
    good = _corpus()[which]
    rng = random.Random(which)
    end = min(len(good), 16384)
    taken = 0
    for _ in range(1500):
        data = bytearray(good)
        for _ in range(rng.choice((1, 1, 2, 3))):
            off = rng.randrange(fmt.SUPER_OFFSET, end) if rng.random() < 0.9 else rng.randrange(len(data))
            data[off] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        data = bytes(data)
        assert_same_read(native, data)
        try:
            taken += raw_read(native, data) is not None
        except CorruptImageError:
            pass
    if which != 3:   # (the layer image always goes to Python)
        assert taken > 100   # plenty of damage the compiled path reads itself (names, digests, ...)


@pytest.mark.parametrize("which", range(4))
def test_truncated_and_patched_same_outcome(native, which):
    good = _corpus()[which]
    for cut in range(fmt.SUPER_OFFSET + 128, len(good), 97):
        data = bytearray(good[:cut])
        data[fmt.SUPER_OFFSET + 0x24:fmt.SUPER_OFFSET + 0x28] = (cut // fmt.BLKSZ).to_bytes(4, "little")
        assert_same_read(native, bytes(data))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), which=st.integers(0, 3))
def test_hypothesis_damage_same_outcome(native, data, which):
    assert_same_read(native, bytes(damaged(_CORPUS[which], data, u32_from=fmt.SUPER_OFFSET)))


_CORPUS = _corpus()


def test_no_references_leak(native, tmp_path):
    """Reading and dumping many times (also the give-up paths) leaves no memory behind."""
    good = image_bytes(external_forms_tree())
    bad = bytearray(good)
    bad[-100] ^= 0xFF
    layer = image_bytes(pin_trees.layer_tree())
    tree = external_forms_tree()

    def once():
        for d in (good, bytes(bad), layer):
            raw_read(native, d)
        native.dump(tree)
        native.dump(Inode.file(b"x"))

    for _ in range(20):
        once()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(300):
            once()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_setup_refuses_another_model(native):
    """A class whose slots are not the tree model's is refused (the compiled path would leave a new
    field unset), and the module keeps working with the real one."""
    class Other:
        __slots__ = ("mode", "uid")

    with pytest.raises(TypeError):
        native.setup(Other)
    native.setup(Inode)
    tree = external_forms_tree()
    assert native.dump(tree) == dump_with(None, tree)


@pytest.mark.parametrize("payload", ["ab/plain", "ab/caf\u00e9", "ab/\udcff\udcfe", "-", "", "ab/with space=x"])
def test_payload_encodings_dump_alike(native, payload):
    """Payloads: ASCII, other UTF-8, surrogate-escaped bytes, and the `-`/empty special cases."""
    tree = Inode.directory()
    tree.entries[b"f"] = Inode(stat.S_IFREG | 0o644, size=100, payload=payload, digest=b"\x01" * 32)
    tree.entries[b"g"] = tree.entries[b"f"]
    assert native.dump(tree) is not None
    assert dump_with(native, tree) == dump_with(None, tree)


def test_unencodable_payload_left_to_python(native):
    tree = Inode.directory()
    tree.entries[b"f"] = Inode(stat.S_IFREG | 0o644, size=100, payload="ab/\ud800")
    assert native.dump(tree) is None
    errors = []
    for mod in (native, None):
        with pytest.raises(UnicodeEncodeError) as e:
            dump_with(mod, tree)
        errors.append(str(e.value))
    assert errors[0] == errors[1]
