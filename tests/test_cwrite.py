"""The compiled fast paths of `mkimage --from-dump` (flatmount/image/_cwrite.c) against the pure-Python
code they stand in for: the same trees and the same bytes on every input, the same errors (the C
gives up and Python words them), and FLATMOUNT_PURE=1 turning them off."""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.errors import FlatmountError
from flatmount.image import accel, dump
from flatmount.image.dump import dump_bytes, parse_dump
from flatmount.image.tree import Inode
from tests import pin_trees
from tests.conftest import ROOT, shared_data
from tests.cwrite_helpers import require_cwrite, use
from tests.test_dump import REJECTIONS, hardlink_groups, trees
from tests.test_erofs import shared_content_trees
from tests.test_erofs import trees as erofs_trees

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WSETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse_with(impl: str, data: bytes):
    """("ok", tree) or ("error", class, message, line) of parse_dump with the implementation `impl`."""
    saved = use(impl)
    try:
        return ("ok", parse_dump(data))
    except FlatmountError as e:
        return ("error", type(e), str(e), getattr(e, "offset", None))
    finally:
        accel.CWRITE = saved


def native_tree(data: bytes) -> Inode | None:
    """The compiled parser's own answer (None: it gave up), hardlinks resolved as parse_dump does."""
    got = require_cwrite().parse_dump(data, Inode, dump._Fixup)
    if got is None:
        return None
    root, fixups = got
    if fixups:
        dump._resolve_hardlinks(root, fixups)
    return root


def same_outcome(data: bytes) -> None:
    a, b = parse_with("python", data), parse_with("native", data)
    assert a[0] == b[0], (a, b)
    if a[0] == "ok":
        assert a[1] == b[1]
        assert hardlink_groups(a[1]) == hardlink_groups(b[1])
        assert dump_bytes(a[1]) == dump_bytes(b[1])
    else:
        assert a == b


def test_pure_env_turns_the_compiled_code_off():
    require_cwrite()
    code = "from flatmount.image import accel; print(accel.CWRITE is None, accel.PURE)"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for value, want in (("1", "True True"), ("0", "False False"), (None, "False False")):
        env.pop("FLATMOUNT_PURE", None)
        if value is not None:
            env["FLATMOUNT_PURE"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
        assert " ".join(out) == want, value


@pytest.mark.parametrize("name", pin_trees.DUMPS)
def test_cs9_dumps_parse_the_same(name):
    data = gzip.decompress(shared_data(name).read_bytes())
    fast = native_tree(data)
    assert fast is not None                      # the compiled parser takes composefs' own dumps
    ok, slow = parse_with("python", data)
    assert ok == "ok" and fast == slow
    assert dump_bytes(fast) == dump_bytes(slow) == data


PIN_TREES = [pin_trees.every_type_tree, pin_trees.layer_tree, pin_trees.cfs_no_newline,
             pin_trees.cfs_chardev_nonzero_size, pin_trees.cfs_longlink,
             lambda: pin_trees.cfs_bigfile(1 << 40, {b"user.x": b"y"})]


@pytest.mark.parametrize("make", PIN_TREES, ids=range(len(PIN_TREES)))
def test_composefs_test_trees_parse_the_same(make):
    data = dump_bytes(make())
    fast = native_tree(data)
    assert fast is not None
    assert fast == parse_with("python", data)[1]
    same_outcome(data)


@pytest.mark.parametrize(("text", "lineno", "fragment"), REJECTIONS,
                         ids=[f"r{i}" for i in range(len(REJECTIONS))])
def test_bad_dumps_give_up_and_python_words_the_error(text, lineno, fragment):
    data = text.encode()
    got = require_cwrite().parse_dump(data, Inode, dump._Fixup)
    assert got is None or got[1]    # gave up, or left `@` lines whose resolution (Python) fails
    same_outcome(data)


@SETTINGS
@given(trees())
def test_random_trees_parse_the_same(root):
    data = dump_bytes(root)
    fast = native_tree(data)
    assert fast is not None and fast == root
    assert hardlink_groups(fast) == hardlink_groups(root)
    same_outcome(data)


# bytes that make a valid dump invalid, or valid in another way, when they replace one of its bytes
EDIT_BYTES = st.sampled_from([b" ", b"\\", b"\n", b"@", b"-", b"/", b".", b"=", b"0", b"7", b"9", b"x",
                              b"a", b"", b"  ", b"\\x", b"\\x2d", b"\\x00", b"\\n", b"12", b"\x00"])


@SETTINGS
@given(trees(), st.lists(st.tuples(st.integers(0, 10**6), EDIT_BYTES), min_size=1, max_size=4))
def test_edited_dumps_give_the_same_tree_or_error(root, edits):
    data = bytearray(dump_bytes(root))
    for pos, new in edits:
        pos %= len(data)
        data[pos:pos + 1] = new
    same_outcome(bytes(data))


@pytest.mark.parametrize("text", [
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n",
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/b 0 @100644 1 0 0 0 0.0 /a - -\n/a 0 100644 1 0 0 0 0.0 - - -",
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/b 0 @100644 1 0 0 0 0.0 /c - -\n/c 0 @100644 1 0 0 0 0.0 /b - -\n",
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/b 0 @100644 1 0 0 0 0.0 /nope - -\n",
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/d 0 40755 2 0 0 0 0.0 - - -\n/b 0 @100644 1 0 0 0 0.0 /d - -\n",
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - -\n/b 0 @100644 1 0 0 0 0.0 /a/../a - -\n",
    b"/ 0 40755 2 0 0 0 -1.5 - - - \n/a\\x20b 3 100644 1 0 0 0 -0.999999999 - a\\x00b - user.k\\x3d=\\x3d\n",
    b"/ 0 40755 2 0 0 0 99999999999.0 - - -\n",
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - " + b"a" * 63 + b"\n",
    b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 0.0 - - " + b"A" * 64 + b"\n",
])
def test_hardlinks_and_corner_cases_the_same(text):
    same_outcome(text)


# --- the writer --------------------------------------------------------------------------------------

def write_with(impl: str, root: Inode, **kw):
    """("ok", image bytes) or ("error", class, message) of image_bytes with the implementation `impl`."""
    from flatmount.image.writer import image_bytes

    saved = use(impl)
    try:
        return ("ok", image_bytes(root, **kw))
    except FlatmountError as e:
        return ("error", type(e), str(e))
    finally:
        accel.CWRITE = saved


@contextlib.contextmanager
def compiled_emit_only():
    """Within: the Python emit pass fails the test if it runs (the compiled one must take the tree)."""
    from flatmount.image import writer

    def refuse(*a, **kw):
        raise AssertionError("the compiled emit_inodes gave up")

    saved = writer._emit_inodes_py
    writer._emit_inodes_py = refuse
    try:
        yield
    finally:
        writer._emit_inodes_py = saved


class Spy:
    """The compiled module, recording what each of its writer passes answered."""

    def __init__(self, real):
        self.real = real
        self.calls: list[tuple[str, object]] = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def collect(self, *a):
        got = self.real.collect(*a)
        self.calls.append(("collect", got is not None))
        return got

    def inode_fields(self, *a):
        got = self.real.inode_fields(*a)
        self.calls.append(("fields", None if got is None else len(got[0])))
        return got

    def place_inodes(self, *a):
        got = self.real.place_inodes(*a)
        self.calls.append(("place", got is not None))
        return got

    def emit_shared(self, *a):
        got = self.real.emit_shared(*a)
        self.calls.append(("shared", got))
        return got

    def repeated(self, *a):
        got = self.real.repeated(*a)
        self.calls.append(("repeated", got is not None))
        return got


def write_spied(root: Inode, **kw):
    """write_with("native") with the compiled module spied on: (outcome, calls)."""
    spy = Spy(require_cwrite())
    saved = accel.CWRITE
    from flatmount.image.writer import image_bytes

    accel.CWRITE = spy
    try:
        return ("ok", image_bytes(root, **kw)), spy.calls
    except FlatmountError as e:
        return ("error", type(e), str(e)), spy.calls
    finally:
        accel.CWRITE = saved


def same_image(root: Inode, **kw) -> bytes | None:
    """Both implementations give the same bytes or the same error; a valid tree is the compiled
    passes' own work (emit and placement do not give up on it)."""
    a = write_with("python", root, **kw)
    if a[0] == "ok":
        with compiled_emit_only():
            b, calls = write_spied(root, **kw)
        assert ("place", True) in calls and ("place", False) not in calls
    else:
        b = write_with("native", root, **kw)
    assert a == b
    return a[1] if a[0] == "ok" else None


PINS = pin_trees.load_pins()


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k in ("composefs", "flatmount") for n in sorted(PINS[k])])
def test_pinned_images_both_ways(kind, name):
    import hashlib

    if name in pin_trees.DUMPS:
        tree = parse_dump(shared_data(name).read_bytes())
    else:
        tree = pin_trees.build(name)
    img = same_image(tree)
    assert img is not None and hashlib.sha256(img).hexdigest() == PINS[kind][name]


@WSETTINGS
@given(erofs_trees())
def test_random_images_the_same(root):
    same_image(root)


@WSETTINGS
@given(shared_content_trees())
def test_shared_content_images_the_same(root):
    same_image(root)


@WSETTINGS
@given(trees())
def test_dump_trees_images_the_same(root):
    same_image(root)


@WSETTINGS
@given(erofs_trees(max_nodes=60), st.lists(st.integers(0, 100), min_size=1, max_size=3))
def test_image_slices_the_same(root, cuts):
    """The layout hook's slices (flatten writes an image in parts): each slice the same bytes."""
    from flatmount.image.writer import image_buffer

    def run(impl):
        saved = use(impl)
        try:
            n_size = []

            def hook(n, fingerprint, size):
                n_size.append((n, size))
                return bytearray(size), 0, n

            full = bytes(image_buffer(root, layout_hook=hook))
            n, size = n_size[0]
            bounds = sorted({0, n, *(c % (n + 1) for c in cuts)})
            parts = []
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                parts.append(bytes(image_buffer(root, layout_hook=lambda n, f, s, lo=lo, hi=hi: (bytearray(s), lo, hi))))
            return full, parts
        finally:
            accel.CWRITE = saved

    assert run("python") == run("native")


REJECT = [
    lambda r: r.entries.__setitem__(b"s", Inode.symlink(b"t" * 4096)),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"1", xattrs={b"user." + b"k" * 256: b""})),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"1", xattrs={b"user.k": b"v" * 65536})),
    lambda r: r.entries.__setitem__(b"x", Inode(0o100644, size=5, digest=b"short")),
    lambda r: r.entries.__setitem__(b"x", Inode(0o020644, rdev=1 << 40)),
    lambda r: r.entries.__setitem__(b"x", Inode(0o170644)),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"", uid=1 << 32)),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"", mtime_ns=1 << 70)),    # valid: seconds fit
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"", mtime_ns=-(1 << 70) - 1)),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"", mtime_ns=1 << 93)),    # seconds too large
    lambda r: r.entries.__setitem__(b"x", Inode(0o100644, size=1 << 64, payload="ab/cd")),
    lambda r: r.entries.__setitem__(b"x", Inode(0o100644, size=-1)),
    lambda r: r.entries.__setitem__(b"x", Inode.file(b"1", xattrs={b"user.%d" % k: b"v" * 60000 for k in range(5)})),
]


@pytest.mark.parametrize("bad", REJECT, ids=range(len(REJECT)))
def test_odd_trees_same_image_or_error(bad):
    root = Inode.directory(mtime_ns=5)
    root.entries[b"d"] = Inode.directory(mtime_ns=7)
    bad(root)
    same_image(root)


def walk_with(impl: str, root: Inode, root_whiteouts: bool):
    """writer._collect's queue with `impl`, the writer's own whiteouts (new objects each call) by name."""
    from flatmount.image import writer

    saved = use(impl)
    try:
        got = writer._collect(root, root_whiteouts, None)
    except FlatmountError as e:
        return ("error", str(e))
    finally:
        accel.CWRITE = saved
    nodes, dnames, dkids, nlink, wparents, raw, version, dups, nparent, dparent = got
    ids = ["raw" if id(x) in raw else id(x) for x in nodes]
    return ids, dnames, dkids, nlink, wparents, len(raw), version, dups, nparent, dparent


@WSETTINGS
@given(erofs_trees(max_nodes=60), st.booleans())
def test_queue_the_same(root, root_whiteouts):
    """The compiled walk queues a tree exactly as the Python walk, hardlinks (their later names in
    `dups`, nlink, whiteout parents) included; it takes every valid tree."""
    py = walk_with("python", root, root_whiteouts)
    assert walk_with("native", root, root_whiteouts) == py
    ents = dict(root.entries)
    got = require_cwrite().collect(Inode, root, ents, set())
    assert got is not None


def test_compiled_passes_take_the_cs9_tree():
    """On composefs' developer image the compiled passes leave (almost) nothing to Python."""
    root = parse_dump(shared_data("cs9-x86_64-developer.dump.gz").read_bytes())
    with compiled_emit_only():
        (ok, _img), calls = write_spied(root)
    assert ok == "ok"
    assert calls[0] == ("collect", True) and calls[2] == ("place", True)
    assert calls[1][0] == "fields" and calls[1][1] < 400   # the root, 4 inodes with xattrs, 00..ff, big dirs
    assert ("shared", True) in calls and ("shared", False) not in calls


def test_compiled_count_of_repeated_digests_takes_digest_only_files():
    """Files known by their digest alone, some digests repeated: the compiled count takes them (and
    the image is the same as the Python passes write)."""
    root = Inode.directory(mtime_ns=5)
    for k in range(40):
        dg = bytes([k % 7]) * 32
        root.entries[b"f%d" % k] = Inode(0o100644, size=100 + k % 3, digest=dg, mtime_ns=5 + k % 2)
    assert same_image(root) is not None
    _, calls = write_spied(root)
    assert ("repeated", True) in calls and ("shared", True) in calls


def _big_uid(r):
    r.entries[b"u"] = Inode.file(b"x", uid=70000)


def _big_gid(r):
    r.entries[b"d"].entries[b"g"] = Inode.symlink(b"t", gid=65536)


def _big_file(r):
    r.entries[b"f"] = Inode(0o100644, size=1 << 33, digest=bytes(range(32)), mtime_ns=5)


def _many_links(r):
    f = Inode.file(b"y", mtime_ns=5)
    for k in range(U16_PLUS):
        r.entries[b"l%d" % k] = f


U16_PLUS = 0x10000


@pytest.mark.parametrize("extend", [_big_uid, _big_gid, _big_file, _many_links],
                         ids=["uid", "gid", "size", "nlink"])
def test_extended_inodes_from_the_compiled_fields(extend):
    """A uid, gid, nlink or size beyond the compact inode: the compiled field pass says so (its `rare`
    flag) and the inode becomes extended, as in Python; the pass takes the tree (it does not give up)."""
    root = Inode.directory(mtime_ns=5)
    root.entries[b"d"] = Inode.directory(mtime_ns=5)
    extend(root)
    img = same_image(root)
    (ok, img2), calls = write_spied(root)
    assert ok == "ok" and img2 == img
    assert ("fields", None) not in [c for c in calls if c[0] == "fields"]
    assert any(c[0] == "fields" for c in calls)


def test_compiled_fields_give_up_on_odd_ids_and_python_words_them():
    """mtime, uid or gid that is not a 64-bit int: the compiled pass changes nothing and Python runs."""
    for bad in (dict(mtime_ns=1 << 70), dict(uid=-(1 << 63) - 1), dict(gid=1 << 64), dict(mtime_ns="5")):
        root = Inode.directory(mtime_ns=5)
        root.entries[b"x"] = Inode.file(b"", **bad)
        same_image(root)
        _, calls = write_spied(root)
        assert ("fields", None) in calls
    # a negative uid is a 64-bit int: the compiled pass flags it and the Python check words the error
    root = Inode.directory(mtime_ns=5)
    root.entries[b"x"] = Inode.file(b"", uid=-1)
    assert same_image(root) is None
    _, calls = write_spied(root)
    assert ("fields", None) not in calls


def _linked_tree(first_deep: bool) -> Inode:
    """Hardlinks across depths (a file, a whiteout in two directories, a symlink with 3 names)."""
    root = Inode.directory(mtime_ns=5)
    a = root.entries[b"a"] = Inode.directory(mtime_ns=5)
    b = a.entries[b"b"] = Inode.directory(mtime_ns=6)
    f = Inode(0o100644, size=10, digest=bytes(range(32)), mtime_ns=5)
    wh = Inode(0o020000, rdev=0, mtime_ns=5)
    ln = Inode.symlink(b"/x", mtime_ns=7)
    b.entries[b"f"] = f
    root.entries[b"z" if first_deep else b"0"] = f
    a.entries[b"w"] = wh
    b.entries[b"w2"] = wh
    for d, n in ((root, b"l"), (a, b"l"), (b, b"l")):
        d.entries[n] = ln
    return root


@pytest.mark.parametrize("first_deep", [True, False])
@pytest.mark.parametrize("root_whiteouts", [True, False])
def test_compiled_walk_takes_hardlinks(first_deep, root_whiteouts):
    """The compiled walk takes a tree with hardlinks (nlink, `dups`, every parent of a hardlinked
    whiteout marked) as the Python walk does, and the image is the same."""
    root = _linked_tree(first_deep)
    py = walk_with("python", root, root_whiteouts)
    assert walk_with("native", root, root_whiteouts) == py
    assert py[7]   # dups
    assert require_cwrite().collect(Inode, root, dict(root.entries), set()) is not None
    same_image(root, root_whiteouts=root_whiteouts)
    _, calls = write_spied(root, root_whiteouts=root_whiteouts)
    assert ("collect", True) in calls


def test_hardlinked_directory_gives_up_and_python_words_it():
    root = Inode.directory(mtime_ns=5)
    d = root.entries[b"d"] = Inode.directory(mtime_ns=5)
    root.entries[b"e"] = d
    assert require_cwrite().collect(Inode, root, dict(root.entries), set()) is None
    got = write_with("native", root)
    assert got == write_with("python", root) and got[0] == "error" and "appears twice" in got[2]


# names that sort around b"." and b".." (which the walk adds to every directory)
_DOTTY = [b"-", b".-a", b".\x01", b".a", b"..a", b"...", b"a", b"\x01", b"\xff", b"A", b".", b".."]


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled"])
@pytest.mark.parametrize("root_whiteouts", [True, False])
def test_compiled_walk_orders_entries_of_any_dict_order(order, root_whiteouts):
    """The compiled walk lists a directory's names (and `.`, `..` among them) in bytes order whatever
    order its dict holds them in (it sorts only dicts not already in order)."""
    import random

    names = sorted(n for n in _DOTTY if n not in (b".", b".."))
    if order == "reversed":
        names.reverse()
    elif order == "shuffled":
        random.Random(17).shuffle(names)
    root = Inode.directory(mtime_ns=5)
    sub = root.entries[b"sub"] = Inode.directory(mtime_ns=6)
    for k, n in enumerate(names):
        root.entries[n] = Inode.file(b"x" * k, mtime_ns=5)
        sub.entries[n] = Inode.directory(mtime_ns=7) if k % 3 == 0 else Inode.symlink(b"/t" + n, mtime_ns=5)
    for ns in ([b"..a", b"-"], [b"..a"], [b"-"], [b".a"]):   # nothing between `.` and `..`, or only that
        d = root.entries[b"d" + b"".join(ns)] = Inode.directory(mtime_ns=5)
        for n in (ns if order == "sorted" else reversed(ns)):
            d.entries[n] = Inode.file(b"", mtime_ns=5)
    py = walk_with("python", root, root_whiteouts)
    assert walk_with("native", root, root_whiteouts) == py
    assert require_cwrite().collect(Inode, root, dict(root.entries), set()) is not None
    assert same_image(root, root_whiteouts=root_whiteouts) is not None


@WSETTINGS
@given(shared_content_trees(), st.sampled_from(["python", "native"]))
def test_shared_digests_as_the_shared_items_name_them(root, impl):
    """`_share_xattrs` names the digests whose derived metacopy / redirect is shared without parsing
    every shared item (and counts repeated digests with the compiled `repeated` where it may): the
    same sets as parsing every shared item of each key, as the writer once did."""
    from flatmount.image import writer

    saved = use(impl)
    try:
        lay = writer._queue_inodes(root, True)
        writer._inode_fields(lay)
        writer._share_xattrs(lay)
    finally:
        accel.CWRITE = saved
    for key, got in ((writer._MC, lay.mc_sh), (writer._RD, lay.rd_sh)):
        assert got == {dg for it in lay.shared_off if it[0] == key and (dg := writer._digest_of_item(it))}
    for dg, items in lay.dg_items.items():
        assert items == writer._digest_items(dg)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=3), max_size=300), st.lists(st.binary(max_size=3), max_size=8))
def test_repeated_counts_what_counter_counts(values, also):
    """`repeated(values, also)`: the counts of the values met more than once and of those in `also`
    met at all, as Counter counts them."""
    from collections import Counter

    rep = require_cwrite().repeated
    want = {v: c for v, c in Counter(values).items() if c > 1}
    assert rep(values) == want
    assert rep(values, also) == {**want, **{v: c for v, c in Counter(values).items() if v in also}}


def test_repeated_refuses_what_it_does_not_take():
    """Anything but lists of exact bytes: None (the Python count runs then)."""
    rep = require_cwrite().repeated
    assert rep([]) == {} and rep([b"a", b"b"]) == {} and rep([], [b"a"]) == {}
    assert rep([b"a", b"b", b"a"], [b"b", b"c"]) == {b"a": 2, b"b": 1}
    assert rep([b"a", "a"]) is None and rep((b"a",)) is None
    assert rep([b"a"], ["a"]) is None and rep([b"a"], (b"a",)) is None
