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
remaining layers; the new image is content-addressed (`images/<sha256>.erofs`) and recorded (its
`flat_images` row) under the shared GC lock.

A flattened image has no refs rows of its own: every object it references is an object of a layer of
its chain (flatten only drops files, it never makes content), and those layers' `layer:` refs (or, for
layers of an additional store, that store's records) pin them for as long as an image record names the
chain, which is also when gc keeps the flat image.  The one case beyond that, a mounted image whose
record was removed meanwhile, gc covers by reading the objects from the leased image file itself
(flatmount.gc).  This keeps flatten from writing one row per object (50,000 for a 64k-inode image)
for facts the layers already record.

Derived files.  Next to each image it writes, flatten keeps two caches named by the same digest:
`images/<digest>.tree` (the tree, `marshal`led as flat rows: loading it is several times faster than
parsing the image, which matters when the image is the cached prefix of a longer chain in a new
process) and `images/<digest>.index` (its `flatmount.diff.ImageIndex`, so the first diff of the image
reads neither the image nor builds anything).  Both are derived state: written after flatten returns by
a background thread (`_Derivers`), atomically (temp file in `tmp/`, rename; no fsync, a torn file
fails its checksum), each checked against the image's name and
size and its own xxh3 checksum before use, ignored (and rewritten where the store is writable) when
missing or damaged.  `derived_paths` names them; whoever removes an image removes those too.
"""

from __future__ import annotations

import contextlib
import gc
import marshal
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice, starmap
from operator import attrgetter, lt
from typing import TYPE_CHECKING

from flatmount.image.tree import OPAQUE_XATTR, S_IFCHR, S_IFDIR, S_IFMT, Inode
from flatmount.log import debug
from objects import usable_cpus

if TYPE_CHECKING:  # pragma: no cover
    from flatmount.store.core import Store

DEFAULT_ROOT_MODE = S_IFDIR | 0o755


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
    enabled = gc.isenabled()
    gc.disable()  # thousands of new dicts, none cyclic: no rescans of the (big) trees meanwhile
    try:
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
        elif fmt == S_IFCHR and child.rdev == 0:
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
            elif fmt == S_IFCHR and child.rdev == 0:
                entries.pop(name, None)
            else:
                entries[name] = child
    return root


def _merged_shell(below: Inode | None, upper: Inode) -> Inode:
    """`upper`'s attributes (without the opaque marker) over `below`'s children, not yet merged."""
    xattrs = upper.xattrs
    opaque = xattrs.get(OPAQUE_XATTR) == b"y"
    if OPAQUE_XATTR in xattrs:
        xattrs = {k: v for k, v in xattrs.items() if k != OPAQUE_XATTR}
    else:
        xattrs = dict(xattrs)
    entries = {} if opaque or below is None else dict(below.entries)
    return Inode(upper.mode, uid=upper.uid, gid=upper.gid, mtime_ns=upper.mtime_ns, xattrs=xattrs,
                 entries=entries)


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


TREE_SUFFIX = ".tree"     # images/<digest>.tree: the tree cache (see the module docstring)
INDEX_SUFFIX = ".index"   # images/<digest>.index: the diff index (flatmount.diff.ImageIndex)


def derived_paths(image_path: str | os.PathLike) -> tuple[str, str]:
    """The derived files of a flattened image `<root>/images/<digest>.erofs` (tree cache, diff index):
    remove them with the image.  They may be absent."""
    base = os.fspath(image_path)[: -len(".erofs")]
    return base + TREE_SUFFIX, base + INDEX_SUFFIX


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
        prefix, start, save = None, 0, False
        for i in range(len(ids) - 2, -1, -1):  # the longest cached proper prefix
            prefix = cached_flat_image(store, ids[i])
            if prefix is not None:  # its tree cache may be (re)written only in the primary store
                save = os.path.dirname(os.path.dirname(prefix)) == os.fspath(store.root)
                start = i + 1
                break
        layers = list(chain[start:])
        store.ensure_writable()
        helper = _Helper.start(store, lambda: _chain_tree(prefix, layers, save=False)) \
            if _helper_pays(prefix, chain) else None
        debug("flatten %s: %s", chain[-1].id[:12] if chain else "(empty chain)",
              "a forked helper writes half the image" if helper is not None else
              "this process writes the whole image (small chain, cached prefix or no helper)")
        try:
            if helper is not None:
                tree, buf = helper.image(lambda: _chain_tree(prefix, layers, save=save))
            else:
                tree, buf = _chain_tree(prefix, layers, save=save), None
            digest, path, size, image_id = _write_image_file(store, tree, buf)
            del buf
            _remember_tree(digest, tree)
            # not durable: a lost row costs one flatten again (the image is durable, named by content)
            from flatmount.store.integrity import record_verified

            st = os.lstat(path)   # (we hashed what we wrote: verified as of this identity, for mount)
            with store.transaction(durable=False) as db:  # no refs rows: the chain's layers hold its objects
                db.execute("INSERT OR REPLACE INTO flat_images(chain_key, digest, created) VALUES (?, ?, ?)",
                           (key, digest, time.time()))
                record_verified(db, os.path.abspath(path), digest, st)
            # derived files once the image is recorded: started earlier, their thread would take the
            # GIL from this one at every release (the record's I/O) for a switch interval each time
            if helper is None or not helper.derive(path, digest, size, image_id):
                DERIVERS.start(store, path, tree, digest, size, image_id)
        finally:
            if helper is not None:
                helper.close()
    return FlatImage(digest, path, key, ids, False)


def _chain_tree(prefix: str | None, layers: Sequence, *, save: bool) -> Inode:
    """The flattened tree of the flat image `prefix` (None: an empty root) with `layers` (records)
    applied in order.  Reads files only (no database): a helper process builds it too."""
    from flatmount.store.core import read_layer_tree

    tree = flat_tree(prefix, save=save) if prefix is not None else default_root()
    for layer in layers:
        tree = apply_layer(tree, read_layer_tree(layer))
    return tree


# --- two processes for one big image -------------------------------------------------------------
# Writing the image of a big tree is per-inode Python work that one core does.  When the tree has to
# be read from disk anyway (not in this process's memory), a forked helper reads and lays out the same
# tree and writes the second half of the inodes into a shared buffer while this process writes the
# first: the layout is deterministic, and the two check they agree on it before writing.  Once the
# image is recorded, the helper also writes its derived files (its tree is the same), so no thread
# of this process competes with the caller for the GIL.  The helper uses no database, lock or thread
# of this process; if it fails at any point, this process writes the image alone (and derives in a
# thread).  Forked before the tree exists, so the two share no memory they write to.
HELPER = True
HELPER_MIN_INODES = 20_000   # inodes in the chain's layers (an upper bound of the image's)
HELPER_SHARE = 0.5   # of the inodes (queue order), written by the helper
HELPER_BYTES_PER_INODE = 2048   # a generous bound of what one inode of a tree takes in memory
_DERIVE = struct.Struct("<32s16sQH")   # the derive order: image sha256, xxh3-128, size, path length


def _helper_pays(prefix: str | None, chain: Sequence) -> bool:
    if not HELPER or not hasattr(os, "fork") or usable_cpus() < 2:
        return False
    if prefix is not None and _digest_of(prefix) in _trees:
        return False   # the tree is in memory here: the helper would only start reading it
    inodes = sum(layer.inodes or 0 for layer in chain)
    # a second copy of the tree must fit with room to spare: never trade a flatten for a faster one
    return inodes >= HELPER_MIN_INODES and 4 * inodes * HELPER_BYTES_PER_INODE <= _mem_available()


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 when unknown: no helper then)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Helper:
    """A forked helper process building the same image (see above).  Use: `image()`, then once the
    image is recorded `derive()`; `close()` in any case."""

    def __init__(self, fd: int, down: int, up: int, pid: int) -> None:
        self.fd, self.down, self.up, self.pid = fd, down, up, pid
        self.started = time.monotonic()
        self.wrote = False   # it wrote its half and waits for the derive order

    @classmethod
    def start(cls, store: Store, build: Callable[[], Inode]) -> _Helper | None:
        """Fork the helper, which builds its tree with `build`; None if the system refuses (no
        memfd, no process to spare): this process then writes the image alone."""
        fds: list[int] = []
        try:
            fds.append(os.memfd_create("flatmount-image", os.MFD_CLOEXEC))
            fds += os.pipe()   # to the helper: go or not, then the derive order
            fds += os.pipe()   # from the helper: its layout, then done
            pid = os.fork()
        except OSError as e:
            for x in fds:
                os.close(x)
            debug("flatten: no helper process (%s): this process writes the whole image", e)
            return None
        fd, down_r, down_w, up_r, up_w = fds
        if pid == 0:
            _helper_main(store, build, fd, down_r, up_w)   # never returns
        os.close(down_r)
        os.close(up_w)
        return cls(fd, down_w, up_r, pid)

    def image(self, build: Callable[[], Inode]) -> tuple[Inode, object]:
        """(tree, image buffer): the tree from `build` here, its image written half here, half there."""
        import mmap

        from flatmount.image.writer import image_buffer

        tree = build()
        agreed = False

        def hook(n: int, layout: bytes, size: int) -> tuple:
            nonlocal agreed
            os.ftruncate(self.fd, size)   # before the helper maps it
            # it does what this process did: waiting longer than that (say, on a lock a thread of
            # ours held when we forked) would cost more than writing its half here
            agreed = _read_exact(self.up, len(layout), max(0.5, time.monotonic() - self.started)) == layout
            with contextlib.suppress(OSError):   # (gone already)
                os.write(self.down, b"g" if agreed else b"n")
            self.started = time.monotonic()
            return mmap.mmap(self.fd, size), 0, _split(n) if agreed else n

        buf = image_buffer(tree, layout_hook=hook)
        if agreed and _read_exact(self.up, 1, max(0.5, 2 * (time.monotonic() - self.started))) == b"d":
            self.wrote = True
        elif agreed:
            debug("flatten: the helper failed half-way: this process writes the whole image")
            buf = image_buffer(tree)   # the helper failed half-way: all of it here
        else:
            debug("flatten: the helper's layout differs or came late: this process writes the whole image")
        return tree, buf

    def derive(self, path: str, digest: str, size: int, image_id: bytes) -> bool:
        """Have the helper write the derived files of the recorded image at `path`; False if it
        cannot (they are then for this process to write)."""
        if not self.wrote:
            return False
        p = os.fsencode(path)
        try:
            os.write(self.down, _DERIVE.pack(bytes.fromhex(digest), image_id, size, len(p)) + p)
        except OSError:
            return False
        DERIVERS.adopt(self.pid)
        self.pid = 0
        return True

    def close(self) -> None:
        for x in (self.fd, self.down, self.up):
            os.close(x)
        if self.pid:   # not deriving: it has nothing more to do for us
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
            # reaped in the background: its exit (freeing its tree) takes a while
            threading.Thread(target=_reap, args=(self.pid,), name="flatmount-reap", daemon=True).start()


def _helper_main(store: Store, build: Callable[[], Inode], fd: int, down_r: int, up_w: int) -> None:
    """The forked helper: build, send the layout, on "g" write the second half and send "d"; then
    on a derive order write the derived files.  Exits (never returns, never runs the parent's exit
    handlers)."""
    import mmap

    from flatmount.image.writer import image_buffer

    code = 1
    try:
        # keep nothing of the parent's open: not its ends of our pipes (we would never see them
        # close when it dies), not its GC lock (ours would hold it as long as we live), not its DB
        _close_all_but((0, 1, 2, fd, down_r, up_w))
        tree = build()

        def hook(n: int, layout: bytes, size: int) -> tuple:
            os.write(up_w, layout)
            if _read_exact(down_r, 1) != b"g":
                raise _Declined
            return mmap.mmap(fd, size), _split(n), n

        image_buffer(tree, layout_hook=hook)
        os.write(up_w, b"d")
        os.close(up_w)
        order = _read_exact(down_r, _DERIVE.size)
        if len(order) == _DERIVE.size:
            digest, image_id, size, plen = _DERIVE.unpack(order)
            path = os.fsdecode(_read_exact(down_r, plen))
            _Derivers.write_derived(store, path, tree, digest.hex(), size, image_id)
        code = 0
    except BaseException:  # noqa: BLE001, S110 - the parent sees no "d" and does it itself
        pass
    finally:
        os._exit(code)


def _close_all_but(keep: Sequence[int]) -> None:
    """Close every file descriptor of this process but `keep`."""
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        if n not in keep:
            with contextlib.suppress(OSError):   # (the listing's own, closed already)
                os.close(n)


class _Declined(Exception):
    """The parent laid the image out differently: the helper writes nothing."""


def _split(n: int) -> int:
    """Where the helper's inodes start: it writes the last HELPER_SHARE of them (both processes
    build the same tree and layout first, so an even split ends their writing together)."""
    return int(n * (1 - HELPER_SHARE))


def _read_exact(fd: int, n: int, timeout: float | None = None) -> bytes:
    """`n` bytes from a pipe, fewer if the writer closed it first or `timeout` seconds passed."""
    import select

    deadline = None if timeout is None else time.monotonic() + timeout
    out = b""
    while len(out) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
        b = os.read(fd, n - len(out))
        if not b:
            break
        out += b
    return out


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


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


def flat_tree(path: str, *, save: bool = False) -> Inode:
    """The tree of the flattened image at `path` (`.../<digest>.erofs`); do not modify it.

    From this process's memory, else from the image's tree cache, else read from the image (and,
    with `save`, for a writable store's image whose caller holds its GC lock shared, the tree cache
    written for next time)."""
    digest = _digest_of(path)
    tree = _trees.get(digest)
    if tree is None:
        tree = load_tree_cache(path)
        if tree is None:   # read from the image, once checked against its name
            import hashlib

            from flatmount.image.reader import Image
            from flatmount.store.integrity import damaged_flat_image, read_file

            data = read_file(path)[0]
            actual = hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise damaged_flat_image(digest, path, actual)
            tree = Image(data).root()
            if save:
                save_tree_cache(path, tree)
    _remember_tree(digest, tree)
    return tree


# --- the tree cache ------------------------------------------------------------------------------
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


def load_tree_cache(image_path: str | os.PathLike) -> Inode | None:
    """The tree cached next to the image `.../images/<digest>.erofs`, or None (missing, damaged, or
    not that image's)."""
    wait_derived()  # one this process is writing is worth waiting for
    path = os.fspath(image_path)
    try:
        size = os.stat(path).st_size
        with open(derived_paths(path)[0], "rb") as f:
            data = f.read()
    except OSError:
        return None
    return tree_from_cache(data, _digest_of(path), size)


def layer_cache_path(layer_image: str | os.PathLike) -> str:
    """`layers/<id>.tree` beside `layers/<id>.erofs`: the layer's tree cache (same format as a flat
    image's, keyed by the sha256 of the layer image, which a layer's name is not)."""
    path = os.fspath(layer_image)
    return path[: -len(".erofs")] + TREE_SUFFIX if path.endswith(".erofs") else path + TREE_SUFFIX


def load_layer_tree_cache(layer_image: str | os.PathLike) -> Inode | None:
    """The tree cached beside a layer image, or None (missing, damaged, or not that image's: the
    image is hashed to check, a few ms against the much longer parse it saves)."""
    import hashlib

    try:
        with open(layer_image, "rb") as f:
            data = f.read()
        with open(layer_cache_path(layer_image), "rb") as f:
            cache = f.read()
    except OSError:
        return None
    return tree_from_cache(cache, hashlib.sha256(data).hexdigest(), len(data))


def save_tree_cache(image_path: str | os.PathLike, tree: Inode) -> bool:
    """Write the tree cache next to a store's image (best effort; False when not written)."""
    path = os.fspath(image_path)
    try:
        size = os.stat(path).st_size
    except OSError:
        return False
    return _save_derived(path, derived_paths(path)[0], lambda: tree_cache_bytes(tree, _digest_of(path), size))


def _save_derived(image_path: str, dest: str, make) -> bool:
    """Write `make()` to `dest` beside a store image, atomically through the store's `tmp/` (which
    must exist: additional and foreign stores are never written); best effort."""
    from flatmount.atomic import AtomicFile

    tmp_dir = os.path.join(os.path.dirname(os.path.dirname(image_path)), "tmp")
    if not os.path.isdir(tmp_dir) or not os.access(tmp_dir, os.W_OK):
        return False
    try:
        data = make()
        with AtomicFile(tmp_dir, durable=False, prefix="derived-") as af:
            af.file.write(data)
            af.commit(dest)
    except (OSError, ValueError):
        return False
    return True


def write_flat_image(store: Store, tree: Inode, *, derived: bool = True) -> tuple[str, str]:
    """Write `tree` as `<root>/images/<sha256>.erofs` (temp in `<root>/tmp`, fsync, rename); with
    `derived`, its tree cache and diff index are then written beside it (`derived_paths`; best effort)
    by a background thread (`_Derivers`), so the caller can record and mount the image meanwhile.

    The caller holds `store.gc_lock(shared=True)` until the image is recorded (GC and `clean_tmp`
    treat files nobody records as garbage once that lock is free)."""
    digest, path, size, image_id = _write_image_file(store, tree)
    if derived:
        DERIVERS.start(store, path, tree, digest, size, image_id)
    return digest, path


def _write_image_file(store: Store, tree: Inode, buf=None) -> tuple[str, str, int, bytes]:
    """`write_flat_image` without its derived files: (digest, path, size, xxh3-128 of the image).
    `buf`: the image of `tree` if already built."""
    import hashlib

    import xxhash

    from flatmount.atomic import AtomicFile

    store.ensure_writable()
    if buf is None:
        from flatmount.image.writer import image_buffer

        buf = image_buffer(tree)
    with AtomicFile(store.tmp_dir, prefix="flat-") as af:
        af.file.write(buf)
        # the image's names (sha256 for the file, xxh3-128 for the diff index) while it is fsynced
        digest, image_id = af.sync_while(lambda: (hashlib.sha256(buf).hexdigest(), xxhash.xxh3_128_digest(buf)))
        path = af.commit(flat_image_path(store.root, digest))  # same bytes if it existed: content-addressed
    return digest, path, len(buf), image_id


class _Derivers:
    """Background writers of flattened images' derived files (tree cache, diff index).

    They are caches: nothing needs them to be there, so flatten returns (and the image can be
    recorded and mounted) while they are built, about as long again as writing the image takes.
    Each writer holds the store's GC lock shared while it writes (like any writer of the store), and
    writes nothing if the image is gone by then.  A writer is a thread of this process, or the helper
    process that wrote half of a big image (`_Helper`, adopted here).  The threads are not daemons
    (the interpreter waits for them at exit; a helper finishes on its own); `wait()` waits for both,
    which whatever reads derived files in this process (`load_tree_cache`, flatmount.diff) and
    whatever may remove them (`Store.close`, gc, fsck) does first, never while holding the GC lock
    exclusively."""

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []
        self._helpers: list[int] = []   # pids
        self._lock = threading.Lock()

    MAX_PENDING = 2  # a process flattening image after image waits for older writers beyond this

    def start(self, store: Store, path: str, tree: Inode, digest: str, size: int, image_id: bytes) -> None:
        t = threading.Thread(target=self.write_derived, args=(store, path, tree, digest, size, image_id),
                             name="flatmount-derived", daemon=False)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            backlog = self._threads[: max(0, len(self._threads) - self.MAX_PENDING + 1)]
        for old in backlog:  # bounded: each holds its tree in memory until it is done
            old.join()
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def adopt(self, pid: int) -> None:
        """A helper process (our child) now writing derived files: waited for like the threads."""
        with self._lock:
            self._helpers.append(pid)
            backlog = self._helpers[: max(0, len(self._helpers) - self.MAX_PENDING)]
            del self._helpers[: len(backlog)]
        for old in backlog:  # bounded: each holds a tree in memory until it is done
            _reap(old)

    def wait(self) -> None:
        """Wait for every pending derived-file writer of this process."""
        with self._lock:
            threads, self._threads = self._threads, []
            helpers, self._helpers = self._helpers, []
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join()
        for pid in helpers:
            _reap(pid)

    @staticmethod
    def write_derived(store: Store, path: str, tree: Inode, digest: str, size: int, image_id: bytes) -> None:
        """Write the tree cache and diff index of the image at `path` (best effort, never raises)."""
        from flatmount.diff import index_file_bytes

        tree_path, index_path = derived_paths(path)
        try:
            with store.gc_lock(shared=True):
                enabled = gc.isenabled()
                gc.disable()  # both build many objects, none cyclic
                try:
                    for dest, make in ((tree_path, lambda: tree_cache_bytes(tree, digest, size)),
                                       (index_path, lambda: index_file_bytes(tree, image_id, size))):
                        if not os.path.exists(path):
                            return  # removed meanwhile (gc): nothing to derive it for
                        _save_derived(path, dest, make)
                finally:
                    if enabled:
                        gc.enable()
        except Exception:  # noqa: BLE001 - best effort: a missing cache is rebuilt when needed
            pass


DERIVERS = _Derivers()
wait_derived = DERIVERS.wait
