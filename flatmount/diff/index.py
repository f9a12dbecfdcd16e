"""The two sides a diff walks: `TreeIndex` (an in-memory tree, fingerprinted in one pass) and
`ImageIndex` (an image's index file, flatmount.image.diffindex, mapped and decoded per directory on
demand), and where index files live (beside a store's image, else in a cache directory).

An image's index is computed once (reading the whole image) and kept; later diffs map the index file
and decode only the records of directories whose fingerprints differ, and inside those only the
entries whose hashes differ, so their cost follows the size of the change.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from typing import Any

import xxhash

from flatmount.errors import FlatmountError
from flatmount.image import diffindex as dx
from flatmount.image.diffindex import dir_entries as _dir_entries
from flatmount.image.diffindex import dir_fingerprint as _dir_fingerprint
from flatmount.image.diffindex import dir_key as _dir_key
from flatmount.image.diffindex import walk_dirs as _walk_dirs
from flatmount.image.tree import Inode
from objects.paths import is_hex


class TreeIndex:
    """Fingerprints of every directory of an in-memory tree (keyed by `id()`: do not modify the tree
    while the index is in use) and its hardlink groups (inode id -> sorted paths), from one pass."""

    __slots__ = ("root", "fp", "links", "ndirs", "order")

    def __init__(self, root: Inode, *, keep_order: bool = False):
        if not root.is_dir:
            raise ValueError("a tree root must be a directory")
        self.root = root
        # sorted when the order is kept: index files are then the same whatever the dicts' order
        dirs, links = _walk_dirs(root, keep_order)
        self.ndirs = len(dirs)
        self.links = links
        fp: dict[int, bytes] = {}
        dkeys: dict[int, tuple] = {}
        for _path, d in reversed(dirs):            # children before parents
            names = sorted(d.entries)
            keys, _ = _dir_entries(d, names, fp, dkeys, links)
            dk = dkeys[id(d)] = _dir_key(d)
            fp[id(d)] = _dir_fingerprint(dk, names, keys)
        self.fp = fp
        self.order = dirs if keep_order else None

    def fingerprint(self, node: Inode | None = None) -> bytes:
        """The fingerprint of a directory of this tree (default: the root)."""
        return self.fp[id(self.root if node is None else node)]

    # The "side" interface the comparison walks.  A listing maps names to tokens that `_node` turns
    # into inodes: here the inodes themselves; directory handles are the directory inodes.
    def _root(self) -> tuple[Inode, Any]:
        return self.root, self.root

    def _fp(self, handle: Inode) -> bytes:
        return self.fp[id(handle)]

    def _listing(self, handle: Inode) -> dict[bytes, Inode]:
        return handle.entries

    @staticmethod
    def _node(token: Inode) -> Inode:
        return token

    def _child(self, node: Inode) -> Any:
        return node

    def _links(self, node: Inode) -> tuple[bytes, ...] | None:
        return self.links.get(id(node)) if self.links else None


class ImageIndex:
    """The directory records of one image (flatmount.image.diffindex), decoded per directory on demand.

    An image's index is computed once (reading the whole image) and kept in a cache directory under the
    xxh3-128 of the image bytes; later diffs map the index file and decode only the records of
    directories whose fingerprints differ, and inside those only the entries whose hashes differ, so
    their cost follows the size of the change.  A record found damaged while walking raises
    FormatError (`diff_images` then rebuilds the index from the image).
    """

    def __init__(self, data: bytes | mmap.mmap, image_id: bytes = bytes(16), image_size: int = 0):
        """`data`: what `to_bytes` returned (or a read-only map of an index file); FormatError (a
        ValueError) when it is not a whole index of this format version (for that image, if given)."""
        self.file = dx.IndexFile(data, None if image_id == bytes(16) else image_id, image_size)
        self.image_id, self.image_size = self.file.image_id, self.file.image_size
        self.data = data
        self.source: str | None = None                     # the cache file it was mapped from
        self._recs: dict[tuple, tuple] = {}
        self._listings: dict[tuple, dict[bytes, tuple]] = {}
        self._nodes: dict[tuple, Inode] = {}               # (record, entry) -> inode (ids stay valid)
        self._handles: dict[int, tuple] = {}               # id(directory inode) -> its record
        self._groups: dict[int, tuple[bytes, ...]] = {}    # id(inode) -> hardlink group paths
        self._root_handle = self.file.root                 # a record: (offset, length, fingerprint)
        self.root = dx.dir_node(self.file.root_key)

    @classmethod
    def from_tree(cls, root: Inode, image_id: bytes = bytes(16), image_size: int = 0) -> ImageIndex:
        return cls(dx.encode(root, image_id, image_size), image_id, image_size)

    def to_bytes(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageIndex:
        """Parse `to_bytes` output; FormatError (a ValueError) when it is not one."""
        return cls(data)

    @classmethod
    def for_image(cls, image: str | os.PathLike, cache_dir: str | os.PathLike | None | bool = None,
                  *, saved: bool = True) -> ImageIndex:
        """The index of an image file: the one beside it for a store's flattened image
        (`store_index_path`), else from the cache when present, else built and cached.

        `cache_dir`: None = `default_cache_dir()`, False = neither read nor write a cache (an index
        beside a store image is still used: it belongs to the store, not to the cache).  `saved=False`
        ignores saved indexes (built from the image, and cached again).
        """
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
                        image_id = xxhash.xxh3_128_digest(m)
                else:
                    image_id = xxhash.xxh3_128_digest(b"")
        except OSError as e:
            raise FlatmountError(f"cannot read image {path!r}: {e.strerror}") from None
        # a store's flattened image has its index beside it (flatten writes it, perhaps still in a
        # thread of this process); others use the cache
        if saved and store_index_path(path) is not None:
            from flatmount.store.paths import wait_derived

            wait_derived()
        for cache in (store_index_path(path), _cache_path(cache_dir, image_id)) if saved else ():
            if cache is None:
                continue
            try:
                with open(cache, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
                idx = cls(m, image_id, size)
                idx.source = cache
                return idx
            except (OSError, ValueError):
                pass
        image_data = _read_file(path)                     # index exactly the bytes read
        image_id, size = xxhash.xxh3_128_digest(image_data), len(image_data)
        data = dx.encode(_parse_image(path, image_data), image_id, size)
        cache = _cache_path(cache_dir, image_id)
        if cache is not None:
            _save_cache(cache, data)
        return cls(data, image_id, size)

    # The "side" interface (see TreeIndex): tokens are (record, entry number), handles are records.
    def _root(self) -> tuple[Inode, Any]:
        return self.root, self._root_handle

    def _fp(self, handle: tuple) -> bytes:
        return handle[2]

    def _rec(self, handle: tuple) -> tuple:
        """(sorted names, entry hashes, offsets position, items position, attributes) of a directory."""
        r = self._recs.get(handle)
        if r is None:
            r = self._recs[handle] = self.file.record(handle)
        return r

    def _names(self, handle: tuple) -> list[bytes]:
        return self._rec(handle)[0]

    def _listing(self, handle: tuple) -> dict[bytes, tuple]:
        lst = self._listings.get(handle)
        if lst is None:
            lst = self._listings[handle] = {name: (handle, i) for i, name in enumerate(self._names(handle))}
        return lst

    def _node(self, token: tuple) -> Inode:
        node = self._nodes.get(token)
        if node is None:
            handle, i = token
            item = self.file.item(self._rec(handle), handle, i)
            if item[0] == dx.DIR:                  # a directory: fingerprint, attributes, its record
                node = dx.dir_node(item[2])
                self._handles[id(node)] = (item[3], item[4], item[1])
            else:
                key = item[1]
                node = dx.leaf_node(key)
                if key[-1]:
                    self._groups[id(node)] = key[-1]
            self._nodes[token] = node
        return node

    def _child(self, node: Inode) -> Any:
        return self._handles[id(node)]

    def _links(self, node: Inode) -> tuple[bytes, ...] | None:
        return self._groups.get(id(node))


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FlatmountError(f"cannot read image {path!r}: {e.strerror}") from None


def _parse_image(path: str, data: bytes) -> Inode:
    from flatmount.errors import CorruptImageError
    from flatmount.image.reader import Image

    try:
        return Image(data).root()
    except CorruptImageError as e:
        raise CorruptImageError(f"{path}: {e}", e.offset) from None


def index_file_bytes(root: Inode, image_id: bytes, image_size: int) -> bytes:
    """The index file of the image whose xxh3-128 is `image_id` (`image_size` bytes), written from or
    read back as the tree `root`: what an image writer stores beside the image (`store_index_path`)."""
    return dx.encode(root, image_id, image_size)


def store_index_path(image: str | os.PathLike) -> str | None:
    """`<root>/images/<digest>.index` for a store's flattened image `<root>/images/<digest>.erofs`
    (flatten writes the index there, see flatmount.flatten), else None (a loose image file)."""
    d, name = os.path.split(os.path.abspath(os.fspath(image)))
    if os.path.basename(d) != "images" or not (name.endswith(".erofs") and is_hex(name[:-6], 64)):
        return None
    return os.path.join(d, name[:-len(".erofs")] + ".index")


CACHE_KEEP = 64   # index files kept in a cache directory (least recently written removed first)


def cache_index(root: Inode, image: bytes, cache_dir: str | os.PathLike | None = None) -> None:
    """Store the diff index of `image`, the bytes just written from tree `root`, so that diffing that
    image never has to read it back (an image writer calls this; best effort)."""
    image_id = xxhash.xxh3_128_digest(image)
    cache = _cache_path(cache_dir, image_id)
    if cache is not None and not os.path.exists(cache):
        _save_cache(cache, dx.encode(root, image_id, len(image)))


def _cache_path(cache_dir: str | os.PathLike | None | bool, image_id: bytes) -> str | None:
    if cache_dir is False:
        return None
    d = os.fspath(cache_dir) if cache_dir else default_cache_dir()
    return os.path.join(d, image_id.hex() + ".idx")


def default_cache_dir() -> str:
    """$FLATMOUNT_CACHE_DIR, else $XDG_CACHE_HOME/flatmount/diff-index, else ~/.cache/flatmount/..."""
    d = os.environ.get("FLATMOUNT_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flatmount", "diff-index")


def _save_cache(path: str, data: bytes) -> None:
    """Best effort: a cache that cannot be written only costs time.  Atomic (a temp file of a fresh
    name in the cache directory, renamed into place): a reader never maps half an index, and a name
    another user planted there (say, a symlink) is never written through."""
    from flatmount.atomic import AtomicFile

    d = os.path.dirname(path)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        with AtomicFile(d, durable=False, prefix=".idx-") as af:   # (not `*.idx`: not counted below)
            af.file.write(data)
            af.commit(path)
        names = [n for n in os.listdir(d) if n.endswith(".idx")]
        if len(names) > CACHE_KEEP:
            ages = sorted(names, key=lambda n: os.stat(os.path.join(d, n)).st_mtime_ns)
            for n in ages[:len(names) - CACHE_KEEP]:
                os.unlink(os.path.join(d, n))
    except OSError:
        pass


Side = TreeIndex | ImageIndex


def _side(x: Inode | Side) -> Side:
    if isinstance(x, TreeIndex | ImageIndex):
        return x
    if isinstance(x, Inode):
        return TreeIndex(x)
    raise TypeError(f"expected an Inode, TreeIndex or ImageIndex, not {type(x).__name__}")


def _side_lookup(side: Side, path: bytes) -> tuple[Inode, Any] | None:
    """(inode, directory handle or None) at `path` (b"" is the root), or None."""
    node, h = side._root()
    for name in path.split(b"/")[1:]:
        if node.entries is None:
            return None
        token = side._listing(h).get(name)
        if token is None:
            return None
        node = side._node(token)
        h = side._child(node) if node.entries is not None else None
    return node, h


def _side_walk(side: Side, path: bytes, handle: Any) -> Iterator[tuple[bytes, Inode, Any]]:
    """(path, inode, directory handle or None) for everything below a directory."""
    stack = [(path, handle)]
    while stack:
        p, h = stack.pop()
        for name, token in side._listing(h).items():
            c = side._node(token)
            cp = p + b"/" + name
            ch = side._child(c) if c.entries is not None else None
            yield cp, c, ch
            if ch is not None:
                stack.append((cp, ch))
