"""The tree cache file format: a whole tree (the one an EROFS image was written from) in columns that
load several times faster than parsing the image.

Why not marshal/pickle: an additional image store belongs to another user, and its caches are read
by us; a decoder of untrusted bytes must only ever build the tree model or refuse.  So every length
is checked against the bytes present, every row and entry number against the row count, and a bad
magic, version, checksum or truncation raises FormatError (the caller then reads the image).

Layout (little endian), after the header `HEAD` (magic, version, image sha256, image size, payload
length, xxh3-64 of the payload):
- `COUNTS`: rows (distinct inodes, breadth-first, root first; a hardlink group is one row),
  directories, entries, and flags (`HAS_KIDS`);
- fixed columns of `rows` values each: mode (u32), uid (u32), gid (u32), mtime_ns (i64), size (u64),
  rdev (u64);
- four sparse columns, each a count k, k row numbers (strictly increasing), then the k values:
  target (`SEP`: their total length u32 and the values joined by NUL, which no symlink target has),
  content (`LEN`: k lengths u32, then the bytes), digest (`FIX32`: 32 bytes each), payload (`SEP`, as
  UTF-8 with surrogateescape);
- sparse xattrs: a count k, k row numbers (strictly increasing), k pair counts, then for all pairs the
  name lengths, the value lengths (u32) and the bytes (name, value, name, value ...);
- directories: `dirs` row numbers (strictly increasing), `dirs` entry counts, the `entries` names
  (`SEP`); with `HAS_KIDS` `entries` row numbers, without it the entries are rows 1, 2, ... in
  that order (a tree without hardlinks).
With `WIDE_MTIME` (an mtime beyond +-292 years around 1970, which i64 nanoseconds cannot hold), the
mtime column is two: seconds (i64) and nanoseconds (u32, below 10^9), right after the other fixed
columns.  Values that do not fit even so are not encodable: `encode` raises ValueError and the cache
is simply not written.
"""

from __future__ import annotations

import gc
import struct
from collections import deque
from collections.abc import Sequence
from itertools import accumulate, compress, islice, repeat
from operator import add, attrgetter, is_not, itemgetter, lt, mul
from types import ModuleType

from flatmount.errors import FormatError
from flatmount.image.tree import Inode
from objects.compiled import load

MAGIC = b"FMTREE\x00\x00"
VERSION = 3          # 02 was a marshal payload (refused: different magic)
HEAD = struct.Struct("<8sI32sQQQ")   # magic, version, image sha256, image size, payload length, checksum
COUNTS = struct.Struct("<IIII")      # rows, directories, entries, flags
HAS_KIDS = 1
WIDE_MTIME = 2
NS = 1_000_000_000
_U32 = struct.Struct("<I")
# the fixed columns: (attribute, struct format letter)
FIXED = (("mode", "I"), ("uid", "I"), ("gid", "I"), ("mtime_ns", "q"), ("size", "Q"), ("rdev", "Q"))
SEP, LEN, FIX32 = "sep", "len", "fix32"      # how a column's values are laid out (above)
SPARSE = (("target", SEP), ("content", LEN), ("digest", FIX32), ("payload", SEP))

_ENTRIES = attrgetter("entries")
_XATTRS = attrgetter("xattrs")


# The decoder: compiled (flatmount/image/_ctree.c, built where a C compiler is) unless absent or
# FLATMOUNT_PURE=1 (objects/compiled.py); `_decode` below is its specification and the fallback.  It fills in the Inode slots
# named here through their descriptors (no __init__ runs), so it is used only while they are these.
_SLOT_NAMES = ("mode", "uid", "gid", "mtime_ns", "size", "rdev", "xattrs", "target", "content", "digest",
               "payload", "entries")
_SLOTS = tuple(Inode.__dict__[name] for name in _SLOT_NAMES) \
    if sorted(Inode.__slots__) == sorted(_SLOT_NAMES) else ()
_ctree = load("flatmount.image._ctree") if _SLOTS else None   # None: not built, or FLATMOUNT_PURE


def compiled_tree() -> tuple[ModuleType, tuple] | None:
    """The compiled tree code in use (flatmount/image/_ctree.c: the decoder above and flatten's layer
    merge) and the Inode slot descriptors it fills in; None where the Python code runs instead."""
    return None if _ctree is None else (_ctree, _SLOTS)


def _checksum(payload) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(payload)


# --- encoding -------------------------------------------------------------------------------------

_NAME, _CHILD = itemgetter(0), itemgetter(1)


def _walk(root: Inode) -> tuple[list[Inode], list[int], list[int], list[bytes], list[int] | None]:
    """(rows, dirs, counts, names, kids): breadth-first; `kids` None when every name is a new inode.

    Each directory's names in sorted order (the image's): the decoded tree's dicts come out sorted,
    and the writer's sort of each directory, the next time this tree is written (as a flattened
    chain's prefix), has nothing to move where the top layer did not add a name (~15% of its walk,
    `_collect`, for the 64k-inode chain)."""
    nodes = [root]
    dirs: list[int] = []
    counts: list[int] = []
    names: list[bytes] = []
    seen_dirs: set[int] = set()
    for i, node in enumerate(nodes):
        ents = node.entries
        if ents is not None:
            if id(node) in seen_dirs:
                break
            seen_dirs.add(id(node))
            dirs.append(i)
            counts.append(len(ents))
            items = sorted(ents.items(), key=_NAME)
            names.extend(map(_NAME, items))
            nodes.extend(map(_CHILD, items))
    else:
        if len(set(map(id, nodes))) == len(nodes):
            return nodes, dirs, counts, names, None
    # hardlinks: an inode gets a row at its first name only
    nodes = [root]
    index = {id(root): 0}
    get = index.get
    dirs, counts, names, kids = [], [], [], []
    seen_dirs = set()
    for i, node in enumerate(nodes):
        ents = node.entries
        if ents is not None:
            if id(node) in seen_dirs:
                raise ValueError("a directory is reachable twice (hardlinked directory or cycle)")
            seen_dirs.add(id(node))
            dirs.append(i)
            counts.append(len(ents))
            items = sorted(ents.items(), key=_NAME)
            names.extend(map(_NAME, items))
            for c in map(_CHILD, items):
                j = get(id(c))
                if j is None:
                    j = index[id(c)] = len(nodes)
                    nodes.append(c)
                kids.append(j)
    return nodes, dirs, counts, names, kids


def _array(fmt: str, values: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(values)}{fmt}", *values)
    except struct.error as e:
        raise ValueError(f"tree cache: value out of range ({e})") from None


def _values(how: str, values: Sequence[bytes]) -> list[bytes]:
    """The encoded column of `values` (see the module doc)."""
    if how == LEN:
        return [_array("I", list(map(len, values))), b"".join(values)]
    if how == FIX32:
        if not set(map(len, values)) <= {32}:
            raise ValueError("tree cache: a digest is not 32 bytes")
        return [b"".join(values)]
    blob = b"\0".join(values)
    if blob.count(b"\0") != max(len(values) - 1, 0):
        raise ValueError("tree cache: a name, target or payload contains NUL")
    return [_U32.pack(len(blob)), blob]


def encode(root: Inode, digest: str, image_size: int) -> bytes:
    """The tree cache file of `root`, the tree an image of sha256 `digest` (hex) and `image_size`
    bytes was written from or read back from.  ValueError if a value does not fit the format."""
    if not root.is_dir:
        raise ValueError("a tree root must be a directory")
    enabled = gc.isenabled()
    gc.disable()  # many short-lived lists, none cyclic
    try:
        nodes, dirs, counts, names, kids = _walk(root)
        flags = HAS_KIDS if kids is not None else 0
        parts = [b""]
        # each column in one C-speed pass, made when it is encoded and dropped after: no row tuples
        # and no table of all columns at once (their memory was the peak of big imports)
        for attr, fmt in FIXED:
            values = list(map(attrgetter(attr), nodes))
            if attr == "mtime_ns" and not -(1 << 63) <= min(values) <= max(values) < 1 << 63:
                flags |= WIDE_MTIME
                secs, nsecs = zip(*map(divmod, values, repeat(NS)), strict=True)
                wide = [_array("q", secs), _array("I", nsecs)]
                values = [0] * len(values)
            parts.append(_array(fmt, values))
        if flags & WIDE_MTIME:
            parts += wide
        parts.insert(1, COUNTS.pack(len(nodes), len(dirs), len(names), flags))
        for attr, how in SPARSE:   # (C-speed selection: most columns are mostly None)
            column = list(map(attrgetter(attr), nodes))
            present = list(map(is_not, column, repeat(None)))
            rows = list(compress(range(len(nodes)), present))
            vals = list(compress(column, present))
            if attr == "payload":   # one text, encoded once
                text = "\0".join(vals)
                if text.count("\0") != max(len(vals) - 1, 0):
                    raise ValueError("tree cache: a payload contains NUL")
                blob = text.encode("utf-8", "surrogateescape")
                parts += [_U32.pack(len(rows)), _array("I", rows), _U32.pack(len(blob)), blob]
                continue
            parts += [_U32.pack(len(rows)), _array("I", rows), *_values(how, vals)]
        del column, present, vals
        xrows = list(compress(range(len(nodes)), map(_XATTRS, nodes)))
        pairs = [kv for i in xrows for kv in nodes[i].xattrs.items()]
        parts += [_U32.pack(len(xrows)), _array("I", xrows), _array("I", [len(nodes[i].xattrs) for i in xrows]),
                  _array("I", [len(k) for k, _ in pairs]), _array("I", [len(v) for _, v in pairs]),
                  b"".join(b for kv in pairs for b in kv)]
        parts += [_array("I", dirs), _array("I", counts), *_values(SEP, names)]
        if kids is not None:
            parts.append(_array("I", kids))
    finally:
        if enabled:
            gc.enable()
    payload = b"".join(parts)
    del parts[1:]  # (the pieces: not held beside the payload and its copy below)
    parts[0] = HEAD.pack(MAGIC, VERSION, bytes.fromhex(digest), image_size, len(payload), _checksum(payload))
    return parts[0] + payload


# --- decoding -------------------------------------------------------------------------------------

class _Cursor:
    """Reads a payload front to back; every read is bounds-checked (FormatError past the end)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FormatError("tree cache truncated")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def array(self, fmt: str, n: int) -> tuple:
        size = struct.calcsize(f"<{fmt}") * n
        if self.pos + size > len(self.data):
            raise FormatError("tree cache truncated")
        out = struct.unpack_from(f"<{n}{fmt}", self.data, self.pos)
        self.pos += size
        return out

    def u32(self) -> int:
        return self.array("I", 1)[0]

    def values(self, how: str, n: int, text: bool = False) -> list:
        """`n` values of a column laid out as `how`; with `text`, decoded (UTF-8, surrogateescape)."""
        if how == FIX32:
            blob = self.take(32 * n)
            return list(map(blob.__getitem__, map(slice, range(0, 32 * n, 32), range(32, 32 * n + 1, 32))))
        if how == LEN:
            lens = self.array("I", n)
            blob = self.take(sum(lens))
            offs = list(accumulate(lens, initial=0))
            return list(map(blob.__getitem__, map(slice, offs, islice(offs, 1, None))))
        blob = self.take(self.u32())
        if n == 0:
            if blob:
                raise FormatError("tree cache: values where none are listed")
            return []
        out = blob.decode("utf-8", "surrogateescape").split("\0") if text else blob.split(b"\0")
        if len(out) != n:
            raise FormatError("tree cache: value count does not match")
        return out

    def rows(self, n: int, limit: int) -> tuple:
        """`n` strictly increasing row numbers below `limit`."""
        rows = self.array("I", n)
        if rows and (rows[-1] >= limit or not all(map(lt, rows, islice(rows, 1, None)))):
            raise FormatError("tree cache: bad row numbers")
        return rows


def read_header(data: bytes) -> tuple[str, int]:
    """(sha256 hex, size) of the image a whole, intact tree cache of this version was made from;
    FormatError if `data` is not one (fsck uses it as a witness of what a layer image was)."""
    if len(data) < HEAD.size:
        raise FormatError("tree cache truncated")
    magic, version, dg, size, plen, check = HEAD.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("not a flatmount tree cache (or one of an older format)")
    if version != VERSION:
        raise FormatError(f"tree cache version {version} (this flatmount reads {VERSION})")
    if plen != len(data) - HEAD.size:
        raise FormatError("tree cache truncated")
    if _checksum(memoryview(data)[HEAD.size:]) != check:
        raise FormatError("tree cache does not match its checksum")
    return dg.hex(), size


def check_header(data: bytes, digest: str, image_size: int) -> None:
    """FormatError unless `data` is a whole, intact tree cache of this version for that image."""
    if read_header(data) != (digest, image_size):
        raise FormatError("tree cache of another image")


def decode(data: bytes, digest: str, image_size: int) -> Inode:
    """The tree in a tree cache file made by `encode` for that image; FormatError if it is not one
    (damaged, truncated, another version or another image's).  Do not modify the tree if it is shared."""
    data = bytes(data)
    check_header(data, digest, image_size)
    enabled = gc.isenabled()
    gc.disable()  # tens of thousands of objects, none cyclic: do not let the GC rescan them meanwhile
    try:
        root = _decode(_Cursor(data, HEAD.size)) if _ctree is None else _decode_compiled(data)
        # the tree lives as long as it is used, and holds no cycles: file its objects with the old
        # ones at once (freeze then unfreeze moves every young object to the oldest generation),
        # rather than let the next young collections walk them all
        gc.freeze()
        gc.unfreeze()
        return root
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise FormatError(f"corrupt tree cache: {e}") from None
    finally:
        if enabled:
            gc.enable()


def _decode_compiled(data: bytes) -> Inode:
    """`_decode` by flatmount.image._ctree: the same checks, the same tree, the same refusals."""
    try:
        return _ctree.decode(data, HEAD.size, Inode, _SLOTS)
    except ValueError as e:
        raise FormatError(str(e)) from None


def _decode(cur: _Cursor) -> Inode:
    n, ndirs, nents, flags = COUNTS.unpack(cur.take(COUNTS.size))
    if n == 0 or flags & ~(HAS_KIDS | WIDE_MTIME) or ndirs > n or (not flags & HAS_KIDS and nents != n - 1):
        raise FormatError("tree cache: bad counts")
    # (each element needs at least one byte: counts beyond the data are refused before allocating)
    if (n + ndirs + nents) * 4 > len(cur.data):
        raise FormatError("tree cache truncated")
    cols = [cur.array(fmt, n) for _attr, fmt in FIXED]
    if flags & WIDE_MTIME:
        secs, nsecs = cur.array("q", n), cur.array("I", n)
        if max(nsecs) >= NS:
            raise FormatError("tree cache: bad nanoseconds")
        cols[3] = list(map(add, map(mul, secs, repeat(NS)), nsecs))
    sparse = []
    for attr, how in SPARSE:
        k = cur.u32()
        col: list = [None] * n
        rows = cur.rows(k, n)
        vals = cur.values(how, k, text=attr == "payload")
        if k == n:
            col = vals
        else:
            deque(map(col.__setitem__, rows, vals), 0)   # (C speed)
        sparse.append(col)
    k = cur.u32()
    xrows = cur.rows(k, n)
    xcounts = cur.array("I", k)
    npairs = sum(xcounts)
    if npairs * 8 > len(cur.data):
        raise FormatError("tree cache truncated")
    klens, vlens = cur.array("I", npairs), cur.array("I", npairs)
    blob = cur.take(sum(klens) + sum(vlens))
    xcol: list = [None] * n
    p = 0
    it = iter(zip(klens, vlens, strict=True))
    for i, c in zip(xrows, xcounts, strict=True):
        if c == 0:
            raise FormatError("tree cache: an empty xattr set")
        d = {}
        for kl, vl in islice(it, c):
            q = p + kl
            d[blob[p:q]] = blob[q:q + vl]
            p = q + vl
        if len(d) != c:
            raise FormatError("tree cache: duplicate xattr names")
        xcol[i] = d
    # Inode(mode, uid, gid, mtime_ns, size, rdev, xattrs, target, content, digest, payload)
    nodes = list(map(Inode, *cols, xcol, *sparse))
    dirs = cur.rows(ndirs, n)
    counts = cur.array("I", ndirs)
    if sum(counts) != nents:
        raise FormatError("tree cache: entry counts do not add up")
    start = cur.pos + 4
    names = cur.values(SEP, nents)
    # no name is empty, `.`, `..` or has a `/` (searched in the NUL-joined names, at C speed)
    joined = b"\0" + cur.data[start:cur.pos] + b"\0"
    if nents and (b"\0\0" in joined or b"/" in joined or b"\0.\0" in joined or b"\0..\0" in joined):
        raise FormatError("tree cache: bad entry name")
    if any(nodes[d].entries is None for d in dirs) or n - list(map(_ENTRIES, nodes)).count(None) != ndirs:
        raise FormatError("tree cache: directory rows do not match the directory list")
    if flags & HAS_KIDS:
        kids = cur.array("I", nents)
        if kids and not 0 < min(kids) <= max(kids) < n:
            raise FormatError("tree cache: bad entry row numbers")
        at = nodes.__getitem__
        p = 0
        for d, c in zip(dirs, counts, strict=True):
            q = p + c
            ents = dict(zip(names[p:q], map(at, kids[p:q]), strict=True))
            if len(ents) != c:
                raise FormatError("tree cache: duplicate entry names")
            nodes[d].entries = ents
            p = q
        if not nodes[0].is_dir:
            raise FormatError("tree cache: the root is not a directory")
        _check_acyclic(nodes, dirs)
    else:
        it = iter(names)
        p = 1
        for d, c in zip(dirs, counts, strict=True):
            if not d < p:   # each directory is listed below its parent (breadth-first, no cycles)
                raise FormatError("tree cache: a directory before its parent")
            q = p + c
            ents = dict(zip(islice(it, c), nodes[p:q], strict=True))
            if len(ents) != c:
                raise FormatError("tree cache: duplicate entry names")
            nodes[d].entries = ents
            p = q
    if cur.pos != len(cur.data):
        raise FormatError("tree cache: trailing bytes")
    root = nodes[0]
    if not root.is_dir:
        raise FormatError("tree cache: the root is not a directory")
    return root


def _check_acyclic(nodes: list[Inode], dirs: Sequence[int]) -> None:
    """With explicit entry rows, a directory must be reachable exactly once from the root and never
    contain itself (no cycles, no hardlinked directories): the tree model's writers rely on it."""
    seen = {id(nodes[0])}
    stack = [nodes[0]]
    reached = 1
    while stack:
        d = stack.pop()
        for c in d.entries.values():
            if c.entries is not None:
                if id(c) in seen:
                    raise FormatError("tree cache: a directory reachable twice")
                seen.add(id(c))
                reached += 1
                stack.append(c)
    if reached != len(dirs):
        raise FormatError("tree cache: a directory unreachable from the root")


__all__ = ["COUNTS", "FIXED", "HAS_KIDS", "HEAD", "WIDE_MTIME", "MAGIC", "SPARSE", "VERSION", "check_header", "decode", "read_header",
           "encode"]


def tree_cache_bytes(root: Inode, digest: str, image_size: int) -> bytes:
    """The tree cache file of `root`, the tree an image of sha256 `digest` and `image_size` bytes was
    written from (or read back from).  ValueError if the tree does not fit the format."""
    return encode(root, digest, image_size)


def tree_from_cache(data: bytes, digest: str, image_size: int) -> Inode | None:
    """The tree in a tree cache file, or None if it is not one for that image, damaged or of
    another format version (the caller then reads the image)."""
    try:
        return decode(data, digest, image_size)
    except FormatError as e:
        from flatmount.log import debug

        debug("tree cache refused: %s", e)
        return None
