"""Layer trees merged into one flat tree: the OCI changeset rules (see flatmount.flatten) as pure
tree code, copy-on-write, no store."""

from __future__ import annotations

import gc
from collections.abc import Sequence

from flatmount.image.tree import OPAQUE_XATTR, S_IFDIR, S_IFMT, Inode
from flatmount.image.treecache import compiled_tree
from flatmount.sources.whiteouts import WHITEOUT_RDEV, WHITEOUT_TYPE, is_opaque_xattrs

DEFAULT_ROOT_MODE = S_IFDIR | 0o755


def default_root() -> Inode:
    """The root of an empty chain: 0755 root:root, mtime 0."""
    return Inode(DEFAULT_ROOT_MODE)


def root_has_attributes(root: Inode) -> bool:
    """False for a layer root that is exactly an importer's default (no `./` entry in the tar)."""
    return not (root.mode == DEFAULT_ROOT_MODE and root.uid == 0 and root.gid == 0
                and root.mtime_ns == 0 and all(k == OPAQUE_XATTR for k in root.xattrs))


def apply_layer(base: Inode, layer: Inode) -> Inode:
    """The tree `layer` (whiteouts and opaque markers allowed) applied on top of the flat tree `base`.

    Neither input is modified; the result shares untouched subtrees and leaves with them.
    """
    if not base.is_dir or not layer.is_dir:
        raise ValueError("apply_layer needs two directory roots")
    compiled = compiled_tree()
    enabled = gc.isenabled()
    gc.disable()  # thousands of new dicts, none cyclic: no rescans of the (big) trees meanwhile
    try:
        # the compiled merge (flatmount/image/_ctree.c) where it is built and the trees are of the
        # common kind it takes; else (None) the Python code, its specification
        root = compiled[0].merge(base, layer, Inode, compiled[1], OPAQUE_XATTR) if compiled else None
        if root is None:
            root = _merge_dir(base, layer)
        # nor after: the new inodes and dicts join the old generation at once (freeze then unfreeze;
        # see tree_from_cache), so the next young collections do not walk them all
        gc.freeze()
        gc.unfreeze()
    finally:
        if enabled:
            gc.enable()
    if not root_has_attributes(layer):
        root.mode, root.uid, root.gid, root.mtime_ns = base.mode, base.uid, base.gid, base.mtime_ns
        root.xattrs = dict(base.xattrs)
    return root


def flatten_trees(layers: Sequence[Inode]) -> Inode:
    """Layer trees (base first) merged into one tree without whiteouts or opaque markers."""
    root = default_root()
    for layer in layers:
        root = apply_layer(root, layer)
    return root


_RECURSE_MAX = 200  # directory levels merged by recursion; deeper ones by `_merge_deep`'s explicit stack


def _merge_dir(below: Inode | None, upper: Inode, depth: int = 0) -> Inode:
    """A new directory with `upper`'s attributes over `below`'s children (None: nothing below).

    Recursion is the fastest walk in CPython 3.11 (this is flatten's hot path), so it is used for the
    first `_RECURSE_MAX` levels; subtrees below that are merged with an explicit stack, so a layer may
    nest directories to any depth without RecursionError.
    """
    merged = _merged_shell(below, upper)
    entries = merged.entries
    depth += 1
    for name, child in upper.entries.items():
        fmt = child.mode & S_IFMT
        if fmt == S_IFDIR:
            old = entries.get(name)
            old = old if old is not None and old.mode & S_IFMT == S_IFDIR else None
            entries[name] = _merge_dir(old, child, depth) if depth < _RECURSE_MAX else _merge_deep(old, child)
        elif fmt == WHITEOUT_TYPE and child.rdev == WHITEOUT_RDEV:   # (is_whiteout_mode, inlined)
            entries.pop(name, None)
        else:
            entries[name] = child
    return merged


def _merge_deep(below: Inode | None, upper: Inode) -> Inode:
    """`_merge_dir` without recursion: an explicit stack of (new entries, upper entries) to merge."""
    root = _merged_shell(below, upper)
    stack = [(root.entries, upper.entries)]
    while stack:
        entries, upper_entries = stack.pop()
        for name, child in upper_entries.items():
            fmt = child.mode & S_IFMT
            if fmt == S_IFDIR:
                old = entries.get(name)
                new = _merged_shell(old if old is not None and old.mode & S_IFMT == S_IFDIR else None, child)
                entries[name] = new
                if child.entries:
                    stack.append((new.entries, child.entries))
            elif fmt == WHITEOUT_TYPE and child.rdev == WHITEOUT_RDEV:   # (is_whiteout_mode, inlined)
                entries.pop(name, None)
            else:
                entries[name] = child
    return root


def _merged_shell(below: Inode | None, upper: Inode) -> Inode:
    """`upper`'s attributes (without the opaque marker) over `below`'s children, not yet merged."""
    xattrs = upper.xattrs
    opaque = is_opaque_xattrs(xattrs)
    if OPAQUE_XATTR in xattrs:
        xattrs = {k: v for k, v in xattrs.items() if k != OPAQUE_XATTR}
    else:
        xattrs = dict(xattrs)
    entries = {} if opaque or below is None else dict(below.entries)
    return Inode(upper.mode, uid=upper.uid, gid=upper.gid, mtime_ns=upper.mtime_ns, xattrs=xattrs,
                 entries=entries)
