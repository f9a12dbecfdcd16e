"""The tree cache file format: a flattened (or layer) image's tree, stored beside the image so that
it loads several times faster than parsing the image (see flatmount.flatten's module docstring).
"""

from __future__ import annotations

import gc
import marshal
import struct
from itertools import islice, starmap
from operator import attrgetter, lt

from flatmount.image.tree import Inode

# Header, then marshal((rows, dirs, counts, names, kids)): `rows` one tuple per distinct inode in
# breadth-first order (root first; a hardlink group is one row) holding the first eleven arguments of
# Inode() (the xattrs as a dict); `dirs` the rows that are directories, `counts` their entry counts,
# `names`/`kids` all their entries (names, row numbers) in that order; `kids` is None for a tree
# without hardlinks, whose entries are then rows 1, 2, ... in that order (each directory's a slice).
# The checksum is xxh3-64 of everything after the header.  It holds the tree the image was written
# from, which the writer turns into the same bytes as the tree read back from the image (what the
# in-memory cache relies on too).  Version 02 (`kids` may be None); a cache of another version is
# ignored (and rewritten) like a damaged one.
_TREE_MAGIC = b"FMTREE02"
_TREE_HEAD = struct.Struct("<8s32sQQQ")   # magic, image sha256, image size, payload size, checksum
_ROW = attrgetter("mode", "uid", "gid", "mtime_ns", "size", "rdev", "xattrs", "target", "content",
                  "digest", "payload")
_ENTRIES = attrgetter("entries")


def tree_cache_bytes(root: Inode, digest: str, image_size: int) -> bytes:
    """The tree cache file of `root`, the tree an image of sha256 `digest` and `image_size` bytes was
    written from (or read back from)."""
    import xxhash

    enabled = gc.isenabled()
    gc.disable()
    try:
        walk = _rows_without_hardlinks(root) or _rows(root)
        # marshal version 2: no back-references (smaller work both ways than 4 for flat rows)
        payload = marshal.dumps((list(map(_ROW, walk[0])), *walk[1:]), 2)
    finally:
        if enabled:
            gc.enable()
    return _TREE_HEAD.pack(_TREE_MAGIC, bytes.fromhex(digest), image_size, len(payload),
                           xxhash.xxh3_64_intdigest(payload)) + payload


def _rows_without_hardlinks(root: Inode) -> tuple | None:
    """(nodes, dirs, counts, names, None) of a breadth-first walk that takes every name for a new
    inode (so whole directories are appended at C speed; the kids are rows 1, 2, ... in entry order),
    or None if the tree has hardlinks."""
    nodes = [root]
    dirs: list[int] = []
    counts: list[int] = []
    names: list[bytes] = []
    seen_dirs: set[int] = set()
    for i, node in enumerate(nodes):
        ents = node.entries
        if ents is not None:
            if id(node) in seen_dirs:   # a directory reachable twice: leave it to the exact walk
                return None
            seen_dirs.add(id(node))
            dirs.append(i)
            counts.append(len(ents))
            names.extend(ents)
            nodes.extend(ents.values())
    if len(set(map(id, nodes))) != len(nodes):
        return None
    return nodes, dirs, counts, names, None


def _rows(root: Inode) -> tuple:
    """The same walk with hardlinks: an inode gets a row at its first name only."""
    nodes = [root]
    index = {id(root): 0}
    get = index.get
    dirs: list[int] = []
    counts: list[int] = []
    names: list[bytes] = []
    kids: list[int] = []
    seen_dirs: set[int] = set()
    for i, node in enumerate(nodes):
        ents = node.entries
        if ents is not None:
            if id(node) in seen_dirs:
                raise ValueError("a directory is reachable twice (hardlinked directory or cycle)")
            seen_dirs.add(id(node))
            dirs.append(i)
            counts.append(len(ents))
            names.extend(ents)
            for c in ents.values():
                j = get(id(c))
                if j is None:
                    j = index[id(c)] = len(nodes)
                    nodes.append(c)
                kids.append(j)
    return nodes, dirs, counts, names, kids


def tree_from_cache(data: bytes, digest: str, image_size: int) -> Inode | None:
    """The tree in a tree cache file, or None if it is not one for that image or is damaged."""
    import xxhash

    h = _TREE_HEAD.size
    if len(data) < h:
        return None
    magic, dg, size, plen, check = _TREE_HEAD.unpack_from(data)
    if (magic != _TREE_MAGIC or dg.hex() != digest or size != image_size or plen != len(data) - h
            or xxhash.xxh3_64_intdigest(memoryview(data)[h:]) != check):
        return None
    enabled = gc.isenabled()
    gc.disable()  # tens of thousands of objects, none cyclic: do not let the GC rescan them meanwhile
    try:
        rows, dirs, counts, names, kids = marshal.loads(memoryview(data)[h:])
        nodes = list(starmap(Inode, rows))
        if len(dirs) != len(counts):
            return None
        if kids is None:   # no hardlinks: the entries are rows 1, 2, ... (each row below its parent)
            if (len(names) != len(nodes) - 1 or sum(counts) != len(names) or min(counts, default=0) < 0
                    or not all(map(lt, dirs, islice(dirs, 1, None)))):   # each directory once
                return None
            it = iter(names)
            p = 1
            for d, c in zip(dirs, counts, strict=True):
                node = nodes[d]
                if node.entries is None or not 0 <= d < p:
                    return None
                q = p + c
                node.entries = dict(zip(islice(it, c), nodes[p:q], strict=True))
                p = q
        else:
            if (len(names) != len(kids) or sum(counts) != len(kids)
                    or (kids and not 0 < min(kids) <= max(kids) < len(nodes))):
                return None
            at = nodes.__getitem__
            p = 0
            for d, c in zip(dirs, counts, strict=True):
                node = nodes[d]
                if node.entries is None:
                    return None
                q = p + c
                node.entries = dict(zip(names[p:q], map(at, kids[p:q]), strict=True))
                p = q
        root = nodes[0]
        if len(nodes) - list(map(_ENTRIES, nodes)).count(None) != len(dirs) or not root.is_dir:
            return None   # a directory row without its entries
        # the tree lives as long as it is used, and holds no cycles: file its objects with the old
        # ones at once (freeze then unfreeze moves every young object to the oldest generation),
        # rather than let the next young collections walk them all (10 ms for 60k inodes)
        gc.freeze()
        gc.unfreeze()
        return root
    except (EOFError, ValueError, TypeError, IndexError, OverflowError, AttributeError):
        return None
    finally:
        if enabled:
            gc.enable()


