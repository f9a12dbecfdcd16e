"""Flatten a layer chain into one tree (OCI changeset semantics) and cache its EROFS image in the store.

Tree semantics (`apply_layer`), applied layer by layer from the base up:
- a whiteout (char 0:0) removes the lower entry of that name; whiteouts never reach the result;
- an opaque directory (`trusted.overlay.opaque` = `y`) hides every lower child; the marker itself is
  dropped from the result;
- a directory meeting a lower directory replaces its attributes (mode, owner, mtime, all xattrs) and
  keeps the lower children not overridden;
- any other entry replaces whatever was there, whatever its type (file <-> dir <-> symlink ...);
- hardlinks are shared `Inode` objects: a group from one layer stays one group; when a later layer
  replaces one of its names, the other names keep the old inode.

Root directory rule.  The root is a directory like any other: the flattened root takes mode, owner,
mtime and xattrs from the topmost layer whose root carries attributes of its own.  A layer root that is
exactly the default an importer gives a tar without a `./` entry (0755, root:root, mtime 0, no xattrs
besides an opaque marker) carries none and keeps the attributes from below; with no layer carrying
any, the root is 0755 root:root with mtime 0.  This is the OCI rule (`./` is an ordinary directory
entry) and, for layers whose root always has attributes (c/storage `diff/` dirs, plain directories),
exactly what the kernel overlay of those layers shows.  We do not copy c/storage's tar-without-`./`
result (0555 with the `diff/` dir's creation time): it depends on when a layer was unpacked, so the
same chain would give different images in different stores.  The price: a `./` entry that explicitly
sets exactly those defaults on top of a lower root with other attributes is taken as absent.

Copy-on-write: input trees are never modified (layer trees and cached images may be shared); the
result shares every untouched subtree and every leaf inode with its inputs, and only directories that
a layer mentions are new objects.  Layer trees must not share inodes with each other (an object
reachable from two layers would become a hardlink).

Store side (`flatten_image`): a flattened image is cached per chain under its top layer id (layer ids
already encode the whole chain) in `flat_images`, in the primary or any additional store.  A chain
whose image is not cached starts from the image of its longest cached prefix and applies only the
remaining layers; the new image is content-addressed (`images/<sha256>.erofs`) and recorded together
with the objects it references in one transaction, under the shared GC lock.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flatmount.tree import OPAQUE_XATTR, S_IFCHR, S_IFDIR, Inode

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store import Store

DEFAULT_ROOT_MODE = S_IFDIR | 0o755
_FMT = 0o170000  # file type bits of st_mode


# --- pure tree code -------------------------------------------------------------------------------

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
    root = _merge_dir(base, layer)
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


def _merge_dir(below: Inode | None, upper: Inode) -> Inode:
    """A new directory with `upper`'s attributes over `below`'s children (None: nothing below)."""
    xattrs = upper.xattrs
    opaque = xattrs.get(OPAQUE_XATTR) == b"y"
    if OPAQUE_XATTR in xattrs:
        xattrs = {k: v for k, v in xattrs.items() if k != OPAQUE_XATTR}
    else:
        xattrs = dict(xattrs)
    entries = {} if opaque or below is None else dict(below.entries)
    for name, child in upper.entries.items():
        fmt = child.mode & _FMT
        if fmt == S_IFDIR:
            old = entries.get(name)
            entries[name] = _merge_dir(old if old is not None and old.mode & _FMT == S_IFDIR else None,
                                       child)
        elif fmt == S_IFCHR and child.rdev == 0:
            entries.pop(name, None)
        else:
            entries[name] = child
    return Inode(upper.mode, upper.uid, upper.gid, upper.mtime_ns, xattrs=xattrs, entries=entries)


# --- store integration ----------------------------------------------------------------------------

@dataclass(frozen=True)
class FlatImage:
    """A flattened image of one chain: `path` is `<store>/images/<digest>.erofs`."""

    digest: str                 # sha256 hex of the image bytes
    path: str
    chain_key: str              # the top layer id
    layers: tuple[str, ...]     # layer ids, base first
    reused: bool                # True when the cached image was used and nothing was written


def flat_image_path(store_root: str | os.PathLike, digest: str) -> str:
    return os.path.join(os.fspath(store_root), "images", digest + ".erofs")


def cached_flat_image(store: Store, chain_key: str) -> str | None:
    """Path of the cached image for `chain_key` in the primary or any additional store, if present."""
    for s in (store, *store.additional):
        try:
            row = s.connect().execute(
                "SELECT digest FROM flat_images WHERE chain_key = ?", (chain_key,)).fetchone()
        except Exception as e:  # a store whose DB is unreadable just has no cache for us
            if _is_sqlite_error(e):
                continue
            raise
        if row is not None:
            path = flat_image_path(s.root, row[0])
            if os.path.exists(path):
                return path
    return None


def _is_sqlite_error(e: BaseException) -> bool:
    import sqlite3

    return isinstance(e, sqlite3.Error)


def _digest_of(path: str) -> str:
    return os.path.basename(path)[: -len(".erofs")]


def flatten_image(store: Store, ref: str) -> FlatImage:
    """The flattened image of image `ref` (name, id or id prefix), from the cache or freshly written."""
    image = store.resolve_image(ref)
    return flatten_chain(store, chain_of(store, image))


def chain_of(store: Store, image) -> list:
    """The layer records (base first) of an ImageRecord; an image without layers is an error."""
    from flatmount.errors import StoreError

    if image.top_layer is None:
        raise StoreError(f"image {image.id[:12]} has no layers: there is nothing to flatten")
    return store.layer_chain(image.top_layer)


def flatten_chain(store: Store, chain: Sequence) -> FlatImage:
    """The flattened image of a layer chain (LayerRecords, base first), cached per top layer id."""
    ids = tuple(layer.id for layer in chain)
    key = ids[-1]
    path = cached_flat_image(store, key)
    if path is not None:
        return FlatImage(_digest_of(path), path, key, ids, True)
    from flatmount.errors import ReadOnlyStoreError

    if store.readonly:
        raise ReadOnlyStoreError(f"the flattened image of layer {key} is not cached and the primary "
                                 f"store {store.root} is opened read-only")
    with store.gc_lock(shared=True):
        path = cached_flat_image(store, key)  # another process may have written it meanwhile
        if path is not None:
            return FlatImage(_digest_of(path), path, key, ids, True)
        tree, start = None, 0
        for i in range(len(ids) - 2, -1, -1):  # the longest cached proper prefix
            prefix = cached_flat_image(store, ids[i])
            if prefix is not None:
                tree, start = flat_tree(prefix), i + 1
                break
        if tree is None:
            tree = default_root()
        for layer_id in ids[start:]:
            tree = apply_layer(tree, store.layer_tree(layer_id))
        digest, path = write_flat_image(store, tree)
        _remember_tree(digest, tree)
        import time

        from flatmount.pull import tree_objects

        with store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO flat_images(chain_key, digest, created) VALUES (?, ?, ?)",
                       (key, digest, time.time()))
            db.executemany("INSERT OR IGNORE INTO refs(owner, object) VALUES (?, ?)",
                           [("flat:" + digest, o) for o in sorted(tree_objects(tree))])
    return FlatImage(digest, path, key, ids, False)


# Flattened trees of the last images this process read or wrote, by image digest: extending a chain
# by one layer then costs one apply_layer and one write, no read.  Safe to share: trees are never
# modified (copy-on-write everywhere).
TREE_CACHE_SIZE = 2
_trees: dict[str, Inode] = {}


def _remember_tree(digest: str, tree: Inode) -> None:
    _trees.pop(digest, None)
    _trees[digest] = tree
    while len(_trees) > TREE_CACHE_SIZE:
        del _trees[next(iter(_trees))]


def flat_tree(path: str) -> Inode:
    """The tree of the flattened image at `path` (`.../<digest>.erofs`); do not modify it."""
    digest = _digest_of(path)
    tree = _trees.get(digest)
    if tree is None:
        from flatmount.erofs.reader import read_tree

        tree = read_tree(path)
    _remember_tree(digest, tree)
    return tree


class _HashingFile:
    """A write-only file wrapper that hashes what goes through it (the image's sha256 = its name)."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, b) -> int:
        self.h.update(b)
        return self.f.write(b)


def write_flat_image(store: Store, tree: Inode) -> tuple[str, str]:
    """Write `tree` as `<root>/images/<sha256>.erofs` (temp in `<root>/tmp`, fsync, rename).

    The caller holds `store.gc_lock(shared=True)` until the image is recorded (GC and `clean_tmp`
    treat files nobody records as garbage once that lock is free)."""
    import hashlib
    import tempfile

    from flatmount.erofs.writer import write_image

    store.ensure_writable()
    images = os.path.join(os.fspath(store.root), "images")
    fd, tmp = tempfile.mkstemp(prefix="flat-", suffix=".erofs", dir=os.fspath(store.tmp_dir))
    try:
        with os.fdopen(fd, "wb") as f:
            h = hashlib.sha256()
            write_image(tree, _HashingFile(f, h))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        digest = h.hexdigest()
        path = flat_image_path(store.root, digest)
        os.rename(tmp, path)  # same bytes if it existed already: content-addressed
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return digest, path
