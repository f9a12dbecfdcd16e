"""Changes between two flattened trees (what `podman image diff` prints) and the layer tar that turns one
into the other, computed from metadata alone: no mount, no object reads (except `export_layer`, which
streams the content it has to write).

Semantics (containers/storage `pkg/archive`, checked in changes.go/changes_unix.go/changes_linux.go):
- a path present in both trees is changed (`C`) when its type, permission bits, uid, gid, rdev, mtime,
  size (non-directories), symlink target, regular-file content or compared xattrs differ.
  mtime: equal, or the same second with either nanosecond part 0 (c/storage `sameFsTimeSpec`: tar
  writers without sub-second precision).  Content: the inline bytes, or the object (fs-verity digest /
  object path); c/storage does not compare content at all (it trusts mtime and size), we do because
  it costs nothing here.  Xattrs: c/storage's `walkchunk` collects `security.capability` and every
  `user.*` xattr and compares those only (1.43 compared only the capability); so do we, unless
  `strict`.
- directories: size is never compared (c/storage: "not a good measure of change").  c/storage's naive
  `statDifferent` skips directory mtimes too, but its overlay walker (what `podman image diff` runs)
  compares them; we compare them like the overlay walker does.
- an added path is `A`, and so is everything below an added directory; a deleted path is `D`, its
  children are not listed.  A path whose type changed is `C`; if it became a directory, its children
  are `A`; if it stopped being one, the old children are not listed (c/storage `addChanges`).
- a directory whose own metadata is unchanged is not listed, except that every ancestor of an added or
  deleted path is listed as `C` (with no changed fields).  The root itself is never listed.
- order: depth first, parents before children, names in byte order (c/storage's naive walk follows
  Go map order; podman's overlay walk prints in walk order but inserts the ancestors of an added path
  right before it, e.g. `C /usr/share/doc`, `C /usr`, `C /usr/share`, `A /usr/share/doc/f.txt`;
  we print `C /usr`, `C /usr/share`, `C /usr/share/doc`, `A ...`).
- podman itself (libpod `GetDiff`) also drops its container init mount points (`/dev`, `/proc`, `/sys`,
  `/run`, `/etc/hosts`, `/etc/hostname`, `/etc/resolv.conf`, ...) that `podman build` leaves in every
  RUN layer; they are in the image, so we list them.  And podman's overlay walker calls a replaced
  (opaque) directory `D` and lists the new children that existed below as `C` even when identical, and
  a file that was only copied up as `C`; we say what differs between the two trees.

`strict=True` (used by `export_layer`) compares every field exactly: all xattrs, exact mtimes, object
digest and path, and hardlink groups (`links`: the set of names an inode has).

Cost grows with the size of the change: every directory gets an xxh3-128 fingerprint (bottom-up over its
own attributes, sorted names, the children's attributes and fingerprints) and the comparison never
enters a pair of directories with equal fingerprints.  For in-memory trees the fingerprints take one
pass per tree (`TreeIndex`).  For image files, `ImageIndex` keeps them, with every directory's entries
and one hash per entry, in an index file: a diff maps the two index files and decodes only the
directories whose fingerprints differ, and inside those only the entries whose hashes differ (found by
comparing hash arrays in C), so it never reads either image.  Where the index file is:
- a store's flattened image `<root>/images/<digest>.erofs` has it beside, `<digest>.index`, written
  by flatten with the image (`store_index_path`; `index_file_bytes` makes it), so even its first diff
  reads nothing but the two indexes;
- any other image file (or a store image without one: flattened before flatten wrote indexes, or in a
  damaged state) has it in a cache directory under the xxh3-128 of the image, built the first time
  (reading the image once); `cache_index` lets the writer of a loose image store it right away.
Every index is checked (checksum, and the xxh3-128 and size of the image at hand) before use.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import marshal
import mmap
import os
import re
import stat
import struct
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from typing import IO, Any

import xxhash

from flatmount.errors import FlatmountError, ObjectNotFoundError, VerityError
from flatmount.image.tree import S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode

FIELDS = ("type", "mode", "uid", "gid", "size", "mtime", "content", "xattrs", "target", "rdev", "links")
CAPABILITY_XATTR = b"security.capability"
OPAQUE_WHITEOUT = ".wh..wh..opq"
_NS = 1_000_000_000
_TYPE_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class Change:
    """One changed path.  `fields` names what differs for a `C` entry (empty when the directory is
    listed only because something below it was added or deleted); `before`/`after` hold those fields'
    values (JSON-friendly: ints, bytes, tuples) in the same order."""

    path: bytes
    kind: str                                  # 'A' added, 'C' changed, 'D' deleted
    fields: tuple[str, ...] = ()
    before: tuple[Any, ...] = ()
    after: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind} {os.fsdecode(self.path)}"

    def to_json(self) -> dict[str, Any]:
        """`{"path", "kind", "changed": {field: {"before", "after"}}}` with bytes as text."""
        changed = {f: {"before": _jsonable(f, b), "after": _jsonable(f, a)}
                   for f, b, a in zip(self.fields, self.before, self.after, strict=True)}
        return {"path": os.fsdecode(self.path), "kind": self.kind, "changed": changed}


def _jsonable(name: str, v: Any) -> Any:
    if name == "xattrs":                       # ((name, value), ...) -> {name: value}
        return {os.fsdecode(k): os.fsdecode(x) for k, x in v}
    if name == "links":
        return [os.fsdecode(p) for p in v]
    return os.fsdecode(v) if isinstance(v, bytes) else v


@dataclass
class DiffStats:
    """What a comparison touched: proof that unchanged subtrees are skipped."""

    dirs_compared: int = 0        # directory pairs whose entries were compared
    entries_compared: int = 0     # child pairs looked at inside those directories
    subtrees_skipped: int = 0     # directory pairs skipped because their fingerprints matched


# --- fingerprints ---------------------------------------------------------------------------------
# A directory's record is marshal((own attributes, [(name, child record)...] sorted by name)) where a
# child record is the full attribute tuple of a non-directory (`_leaf_key`) or (fingerprint, own
# attributes) of a directory; its fingerprint is xxh3-128 of that record.  So equal fingerprints mean
# equal subtrees (hardlink groups included), and an image's records are enough to diff it.

def _xattr_items(n: Inode) -> tuple | None:
    return tuple(sorted(n.xattrs.items())) if n.xattrs else None


def _leaf_key(n: Inode, links: dict[int, tuple[bytes, ...]]) -> tuple:
    """Everything that makes a non-directory differ (`_leaf_node` inverts it).  Content is normalised
    (b"" = None; the object path whether given or derived from the digest), so a tree read back from
    an image and the tree it was written from have equal records."""
    content = n.content or None
    objpath = n.object_path if content is None else None
    return (n.mode, n.uid, n.gid, n.mtime_ns, n.size, n.rdev, n.target, content, n.digest,
            objpath.encode("utf-8", "surrogateescape") if objpath is not None else None,
            _xattr_items(n), links.get(id(n)) if links else None)


def _dir_key(n: Inode) -> tuple:
    return (n.mode, n.uid, n.gid, n.mtime_ns, n.rdev, _xattr_items(n))


def _leaf_node(k: tuple) -> Inode:
    mode, uid, gid, mtime, size, rdev, target, content, digest, payload, xattrs, _links = k
    return Inode(mode, uid=uid, gid=gid, mtime_ns=mtime, size=size, rdev=rdev,
                 xattrs=dict(xattrs) if xattrs else None, target=target, content=content, digest=digest,
                 payload=payload.decode("utf-8", "surrogateescape") if payload is not None else None)


def _dir_entries(d: Inode, names: list[bytes], fp: dict[int, bytes], dkeys: dict[int, tuple],
                 links: dict[int, tuple[bytes, ...]]) -> tuple[list[tuple], list[tuple[int, int]]]:
    """The entry records of directory `d` (names sorted) whose subdirectories are done, and the
    (position, id) of those subdirectories."""
    ents = d.entries
    keys: list[tuple] = []
    subdirs: list[tuple[int, int]] = []
    append = keys.append
    for name in names:
        c = ents[name]
        if c.entries is not None:
            subdirs.append((len(keys), id(c)))
            append((fp[id(c)], dkeys[id(c)]))
        else:
            append(_leaf_key(c, links))
    return keys, subdirs


def _dir_fingerprint(dk: tuple, names: list[bytes], keys: list[tuple]) -> bytes:
    # marshal version 2: no back-references, so deterministic
    return xxhash.xxh3_128_digest(marshal.dumps((dk, list(zip(names, keys, strict=True))), 2))


def _dir_node(k: tuple) -> Inode:
    """A directory inode whose `entries` stay empty: its children are listed by the index."""
    mode, uid, gid, mtime, rdev, xattrs = k
    return Inode(mode, uid=uid, gid=gid, mtime_ns=mtime, rdev=rdev, xattrs=dict(xattrs) if xattrs else None,
                 entries={})


def _path_key(path: bytes) -> list[bytes]:
    """Depth-first order with parents first: compare component by component."""
    return path.split(b"/")


def _walk_dirs(root: Inode, sort: bool) -> tuple[list[tuple[bytes, Inode]], dict[int, tuple[bytes, ...]]]:
    """(path, directory) in pre-order (a parent before its descendants; with `sort`, children in
    name order), and the hardlink groups (inode id -> its sorted paths)."""
    dirs: list[tuple[bytes, Inode]] = []
    stack = [(b"", root)]
    seen: dict[int, int] = {}
    get = seen.get
    while stack:
        path, d = stack.pop()
        dirs.append((path, d))
        for name, c in (sorted(d.entries.items()) if sort else d.entries.items()):
            if c.entries is not None:
                stack.append((path + b"/" + name, c))
            else:
                k = id(c)
                seen[k] = get(k, 0) + 1
    links: dict[int, tuple[bytes, ...]] = {}
    multi = {k for k, v in seen.items() if v > 1}
    if multi:
        groups: dict[int, list[bytes]] = {}
        for path, d in dirs:
            for name, c in d.entries.items():
                if id(c) in multi:
                    groups.setdefault(id(c), []).append(path + b"/" + name)
        links = {k: tuple(sorted(v, key=_path_key)) for k, v in groups.items()}
    return dirs, links


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


# An image index file: header, then one record per directory (children before parents).  A record:
# head (the directory's TreeIndex fingerprint, entry count, sizes), marshal(own attributes), the sorted
# names joined by NUL, one xxh3-128 per entry (of its `_leaf_key`, or of (fingerprint, attributes) for a
# directory), n+1 offsets, and each entry's marshalled record (a directory's also says where its own
# record is).  Comparing two directories is then comparing hash arrays (same names) or set arithmetic
# on names, in C.  The header's checksum covers the whole file (xxh3 runs at memory speed).
_INDEX_MAGIC = b"FMDIFX03"
_INDEX_HEAD = struct.Struct("<8s16sQ"             # magic, xxh3-128 of the image, image size,
                            "QQ16s"               # root record: offset, length, fingerprint,
                            "Q")                  # xxh3-64 of everything else in the file
_REC_HEAD = struct.Struct("<16sIII")               # fingerprint, entries, len(attributes), len(names)
_OFFSETS = struct.Struct("<II")


class ImageIndex:
    """The directory records of one image (see above), decoded per directory on demand.

    An image's index is computed once (reading the whole image) and kept in a cache directory under the
    xxh3-128 of the image bytes; later diffs map the index file and decode only the records of
    directories whose fingerprints differ, and inside those only the entries whose hashes differ, so
    their cost follows the size of the change.
    """

    def __init__(self, data: bytes | mmap.mmap, image_id: bytes = bytes(16), image_size: int = 0):
        """`data`: what `to_bytes` returned (or a read-only map of an index file)."""
        if len(data) < _INDEX_HEAD.size:
            raise ValueError("diff index too short")
        magic, self.image_id, self.image_size, off, ln, fp, check = _INDEX_HEAD.unpack_from(data)
        if _index_checksum(data) != check:
            raise ValueError("diff index does not match its checksum")
        if magic != _INDEX_MAGIC:
            raise ValueError("not a flatmount diff index")
        if off + ln != len(data):                          # the root record comes last
            raise ValueError("truncated diff index")
        if image_id != bytes(16) and (image_id, image_size) != (self.image_id, self.image_size):
            raise ValueError("diff index of another image")
        self.data = data
        self._view = memoryview(data)                      # slices without copies
        self.source: str | None = None                     # the cache file it was mapped from
        self._recs: dict[tuple, tuple] = {}
        self._split: dict[tuple, list[bytes]] = {}
        self._listings: dict[tuple, dict[bytes, tuple]] = {}
        self._nodes: dict[tuple, Inode] = {}               # (record, entry) -> inode (ids stay valid)
        self._handles: dict[int, tuple] = {}               # id(directory inode) -> its record
        self._groups: dict[int, tuple[bytes, ...]] = {}    # id(inode) -> hardlink group paths
        self._root_handle = (off, ln, fp)                 # a record: (offset, length, fingerprint)
        try:
            _fp, _n, dkl, _nl = _REC_HEAD.unpack_from(data, off)
            p = off + _REC_HEAD.size
            self.root = _dir_node(marshal.loads(data[p:p + dkl]))
        except (struct.error, EOFError, TypeError, ValueError) as e:
            raise ValueError(f"corrupt diff index: {e}") from None

    @classmethod
    def from_tree(cls, root: Inode, image_id: bytes = bytes(16), image_size: int = 0) -> ImageIndex:
        return cls(_index_bytes(root, image_id, image_size), image_id, image_size)

    def to_bytes(self) -> bytes:
        return bytes(self.data)

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageIndex:
        """Parse `to_bytes` output; ValueError when it is not one."""
        return cls(data)

    @classmethod
    def for_image(cls, image: str | os.PathLike, cache_dir: str | os.PathLike | None | bool = None,
                  ) -> ImageIndex:
        """The index of an image file: the one beside it for a store's flattened image
        (`store_index_path`), else from the cache when present, else built and cached.

        `cache_dir`: None = `default_cache_dir()`, False = neither read nor write a cache (an index
        beside a store image is still used: it belongs to the store, not to the cache).
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
        if store_index_path(path) is not None:
            from flatmount.store.core import wait_derived

            wait_derived()
        for cache in (store_index_path(path), _cache_path(cache_dir, image_id)):
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
        data = _index_bytes(_parse_image(path, image_data), image_id, size)
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
        """(names joined by NUL, entry hashes, offsets position, items position) of a directory."""
        r = self._recs.get(handle)
        if r is None:
            off = handle[0]
            _fp, n, dkl, nl = _REC_HEAD.unpack_from(self.data, off)
            p = off + _REC_HEAD.size + dkl
            names = self.data[p:p + nl]
            p += nl
            r = self._recs[handle] = (names, self.data[p:p + 16 * n], p + 16 * n, p + 20 * n + 4)
        return r

    def _names(self, handle: tuple) -> list[bytes]:
        names = self._split.get(handle)
        if names is None:
            blob = self._rec(handle)[0]
            names = self._split[handle] = blob.split(b"\0") if blob else []
        return names

    def _listing(self, handle: tuple) -> dict[bytes, tuple]:
        lst = self._listings.get(handle)
        if lst is None:
            lst = self._listings[handle] = {name: (handle, i) for i, name in enumerate(self._names(handle))}
        return lst

    def _node(self, token: tuple) -> Inode:
        node = self._nodes.get(token)
        if node is None:
            handle, i = token
            _names, _hashes, offs, items = self._rec(handle)
            a, b = _OFFSETS.unpack_from(self.data, offs + 4 * i)
            item = marshal.loads(self._view[items + a:items + b])
            if len(item) == 4:                     # a directory: fingerprint, attributes, its record
                node = _dir_node(item[1])
                self._handles[id(node)] = (item[2], item[3], item[0])
            else:
                node = _leaf_node(item)
                if item[-1]:
                    self._groups[id(node)] = item[-1]
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


def _index_bytes(root: Inode, image_id: bytes, image_size: int) -> bytes:
    """The index file of a tree (see `ImageIndex`), in one bottom-up pass (the fingerprints are those
    of `TreeIndex`)."""
    dirs, links = _walk_dirs(root, True)
    dumps, h = marshal.dumps, xxhash.xxh3_128_digest
    fps: dict[int, bytes] = {}
    dkeys: dict[int, tuple] = {}
    parts = [b""]
    pos = _INDEX_HEAD.size
    where: dict[int, tuple[int, int]] = {}            # id(dir) -> (offset, length) of its record
    for _path, d in reversed(dirs):                # children first: a parent records where they are
        names = sorted(d.entries)
        keys, subdirs = _dir_entries(d, names, fps, dkeys, links)
        items = list(map(dumps, keys, repeat(2)))
        hashes = list(map(h, items))
        for k, cid in subdirs:                     # a directory's item also says where its record is
            items[k] = dumps(keys[k] + where[cid], 2)
        dk = dkeys[id(d)] = _dir_key(d)
        fp = fps[id(d)] = _dir_fingerprint(dk, names, keys)
        dkb = dumps(dk, 2)
        nb = b"\0".join(names)
        rec = b"".join([_REC_HEAD.pack(fp, len(names), len(dkb), len(nb)), dkb, nb, *hashes,
                        struct.pack(f"<{len(items) + 1}I", *accumulate(map(len, items), initial=0)),
                        *items])
        where[id(d)] = (pos, len(rec))
        parts.append(rec)
        pos += len(rec)
    parts[0] = _INDEX_HEAD.pack(_INDEX_MAGIC, image_id, image_size, *where[id(root)], fps[id(root)], 0)
    data = bytearray(b"".join(parts))
    data[_INDEX_HEAD.size - 8:_INDEX_HEAD.size] = struct.pack("<Q", _index_checksum(data))
    return bytes(data)


def index_file_bytes(root: Inode, image_id: bytes, image_size: int) -> bytes:
    """The index file of the image whose xxh3-128 is `image_id` (`image_size` bytes), written from or
    read back as the tree `root`: what an image writer stores beside the image (`store_index_path`)."""
    return _index_bytes(root, image_id, image_size)


_STORE_IMAGE_NAME = re.compile(r"[0-9a-f]{64}\.erofs")


def store_index_path(image: str | os.PathLike) -> str | None:
    """`<root>/images/<digest>.index` for a store's flattened image `<root>/images/<digest>.erofs`
    (flatten writes the index there, see flatmount.flatten), else None (a loose image file)."""
    d, name = os.path.split(os.path.abspath(os.fspath(image)))
    if os.path.basename(d) != "images" or not _STORE_IMAGE_NAME.fullmatch(name):
        return None
    return os.path.join(d, name[:-len(".erofs")] + ".index")


def _index_checksum(data) -> int:
    """xxh3-64 of an index file without its checksum field (the header's last 8 bytes)."""
    view = memoryview(data)
    h = xxhash.xxh3_64(view[:_INDEX_HEAD.size - 8])
    h.update(view[_INDEX_HEAD.size:])
    return h.intdigest()


CACHE_KEEP = 64   # index files kept in a cache directory (least recently written removed first)


def cache_index(root: Inode, image: bytes, cache_dir: str | os.PathLike | None = None) -> None:
    """Store the diff index of `image`, the bytes just written from tree `root`, so that diffing that
    image never has to read it back (an image writer calls this; best effort)."""
    image_id = xxhash.xxh3_128_digest(image)
    cache = _cache_path(cache_dir, image_id)
    if cache is not None and not os.path.exists(cache):
        _save_cache(cache, _index_bytes(root, image_id, len(image)))


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
    """Best effort: a cache that cannot be written only costs time."""
    d = os.path.dirname(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
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


def _differing_chunks(a: bytes, b: bytes, size: int) -> list[int]:
    """Indices of the `size`-byte chunks that differ between two equally long byte strings, by
    halving: k differences among n chunks cost about k*log(n/k) comparisons of slices, done in C."""
    out: list[int] = []
    stack = [(0, len(a) // size)]
    while stack:
        lo, hi = stack.pop()
        if a[lo * size:hi * size] == b[lo * size:hi * size]:
            continue
        if hi - lo <= 4:
            out.extend(i for i in range(lo, hi) if a[i * size:(i + 1) * size] != b[i * size:(i + 1) * size])
            continue
        mid = (lo + hi) // 2
        stack.append((lo, mid))
        stack.append((mid, hi))
    return out


def _drop_chunks(h: bytes, drop: list[int], size: int = 16) -> bytes:
    """`h` without the `size`-byte chunks at the (sorted) indices `drop`."""
    if not drop:
        return h
    parts, start = [], 0
    for i in drop:
        parts.append(h[start * size:i * size])
        start = i + 1
    parts.append(h[start * size:])
    return b"".join(parts)


def _undrop(k: int, drop: list[int]) -> int:
    """The original index of chunk `k` of `_drop_chunks(h, drop)`."""
    for i in drop:
        if i > k:
            break
        k += 1
    return k


def _pairs(sa: Side, ha: Any, sb: Side, hb: Any, stats: DiffStats, skip_same: bool
           ) -> Iterator[tuple[bytes, Any, Any]]:
    """(name, token in a or None, token in b or None) for the entries of two directories that may
    differ.  Two image indexes: added/deleted names by set arithmetic, then the entry hashes of the
    common names compared as arrays (`_differing_chunks`), so only differing entries are decoded;
    otherwise every name, less the inodes both trees share when `skip_same`."""
    if isinstance(sa, ImageIndex) and isinstance(sb, ImageIndex):
        blob_a, hsa, _, _ = sa._rec(ha)
        blob_b, hsb, _, _ = sb._rec(hb)
        stats.entries_compared += (len(hsa) + len(hsb)) // 16
        if blob_a == blob_b:                       # the same names: find the differing hashes
            names = sa._names(ha)
            for i in _differing_chunks(hsa, hsb, 16):
                yield names[i], (ha, i), (hb, i)
            return
        # names added or deleted; the hashes of the common names then line up again (both sorted)
        na, nb = sa._names(ha), sb._names(hb)
        set_a, set_b = set(na), set(nb)
        gone = sorted(bisect.bisect_left(na, x) for x in set_a - set_b)
        new = sorted(bisect.bisect_left(nb, x) for x in set_b - set_a)
        for i in gone:
            yield na[i], (ha, i), None
        for j in new:
            yield nb[j], None, (hb, j)
        for k in _differing_chunks(_drop_chunks(hsa, gone), _drop_chunks(hsb, new), 16):
            i, j = _undrop(k, gone), _undrop(k, new)
            yield na[i], (ha, i), (hb, j)
        return
    ea, eb = sa._listing(ha), sb._listing(hb)
    stats.entries_compared += len(ea) + len(eb)
    for name, xb in eb.items():
        xa = ea.get(name)
        if xa is xb and skip_same:
            continue
        yield name, xa, xb
    for name, xa in ea.items():
        if name not in eb:
            yield name, xa, None


# --- field comparison -----------------------------------------------------------------------------

def _compared_xattrs(n: Inode, strict: bool) -> tuple:
    if not n.xattrs:
        return ()
    if strict:
        return tuple(sorted(n.xattrs.items()))
    return tuple(sorted((k, v) for k, v in n.xattrs.items()
                        if k == CAPABILITY_XATTR or k.startswith(b"user.")))


def _same_mtime(a: int, b: int) -> bool:
    """c/storage sameFsTimeSpec: equal, or same second and either nanosecond part 0."""
    if a == b:
        return True
    sa, na = divmod(a, _NS)
    sb, nb = divmod(b, _NS)
    return sa == sb and (na == 0 or nb == 0)


def _same_content(a: Inode, b: Inode, strict: bool) -> bool:
    ca, cb = a.content or None, b.content or None
    if ca is not None or cb is not None:
        return ca == cb
    if a.digest != b.digest and (strict or (a.digest is not None and b.digest is not None)):
        return False
    return a.object_path == b.object_path


def _field_value(n: Inode, name: str, strict: bool, links: tuple[bytes, ...] | None) -> Any:
    if name == "type":
        return _TYPE_NAMES.get(n.mode & S_IFMT, oct(n.mode & S_IFMT))
    if name == "mode":
        return f"{n.mode & 0o7777:04o}"
    if name == "mtime":
        return n.mtime_ns
    if name == "content":
        if n.content:
            return b"inline:" + n.content.hex().encode()
        return n.object_path.encode() if n.object_path is not None else None
    if name == "xattrs":
        return _compared_xattrs(n, strict)
    if name == "rdev":
        return f"{os.major(n.rdev)}:{os.minor(n.rdev)}"
    if name == "links":
        return links or ()
    return getattr(n, name)


def compare_inodes(a: Inode, b: Inode, strict: bool = False, links_a: tuple[bytes, ...] | None = None,
                   links_b: tuple[bytes, ...] | None = None) -> tuple[str, ...]:
    """Names of the fields that differ between two inodes (own attributes only, never children).

    `links_a`/`links_b`: the sorted names of each inode's hardlink group (strict mode only)."""
    out = []
    fa, fb = a.mode & S_IFMT, b.mode & S_IFMT
    if fa != fb:
        out.append("type")
    if (a.mode ^ b.mode) & 0o7777:
        out.append("mode")
    if a.uid != b.uid:
        out.append("uid")
    if a.gid != b.gid:
        out.append("gid")
    if fa != S_IFDIR and fb != S_IFDIR and a.size != b.size:
        out.append("size")
    if not (a.mtime_ns == b.mtime_ns or (not strict and _same_mtime(a.mtime_ns, b.mtime_ns))):
        out.append("mtime")
    if fa == fb == S_IFREG and not _same_content(a, b, strict):
        out.append("content")
    if (a.xattrs or b.xattrs) and _compared_xattrs(a, strict) != _compared_xattrs(b, strict):
        out.append("xattrs")
    if a.target != b.target:
        out.append("target")
    if a.rdev != b.rdev:
        out.append("rdev")
    if strict and links_a != links_b:
        out.append("links")
    return tuple(out)


# --- the comparison -------------------------------------------------------------------------------

@dataclass
class _Raw:
    """One change with the inodes it involves (export needs them)."""

    path: bytes
    kind: str
    fields: tuple[str, ...]
    a: Inode | None
    b: Inode | None


def _walk_changes(sa: Side, sb: Side, strict: bool, stats: DiffStats) -> dict[bytes, _Raw]:
    """Every change keyed by path (unordered), ancestors of A/D entries included."""
    out: dict[bytes, _Raw] = {}
    adddel: list[bytes] = []
    _ra, ha = sa._root()
    _rb, hb = sb._root()
    stack: list[tuple[bytes, Any, Any]] = []
    if sa._fp(ha) != sb._fp(hb):
        stack.append((b"", ha, hb))
    else:
        stats.subtrees_skipped += 1
    la, lb = sa._links, sb._links
    # hardlink groups matter only in strict mode (an ImageIndex does not know in advance if it has any);
    # an inode object both trees share is then not necessarily unchanged
    any_links = strict and bool(getattr(sa, "links", True) or getattr(sb, "links", True))
    node_a, node_b = sa._node, sb._node
    while stack:
        path, da, db = stack.pop()
        stats.dirs_compared += 1
        for name, xa, xb in _pairs(sa, da, sb, db, stats, not any_links):
            p = path + b"/" + name
            if xb is None:
                out[p] = _Raw(p, "D", (), node_a(xa), None)
                adddel.append(p)
                continue
            cb = node_b(xb)
            if xa is None:
                out[p] = _Raw(p, "A", (), None, cb)
                adddel.append(p)
                if cb.entries is not None:
                    for cp, c, _h in _side_walk(sb, p, sb._child(cb)):
                        out[cp] = _Raw(cp, "A", (), None, c)
                continue
            ca = node_a(xa)
            a_dir, b_dir = ca.entries is not None, cb.entries is not None
            if a_dir and b_dir:
                hca, hcb = sa._child(ca), sb._child(cb)
                if sa._fp(hca) == sb._fp(hcb):     # fingerprints cover the directories' own attributes
                    stats.subtrees_skipped += 1
                    continue
            fields = (compare_inodes(ca, cb, strict, la(ca), lb(cb)) if any_links
                      else compare_inodes(ca, cb, strict))
            if fields:
                out[p] = _Raw(p, "C", fields, ca, cb)
            if b_dir:
                if a_dir:
                    stack.append((p, hca, hcb))
                else:
                    for cp, c, _h in _side_walk(sb, p, sb._child(cb)):
                        out[cp] = _Raw(cp, "A", (), None, c)
    done: set[bytes] = set()
    for p in adddel:
        parent = p[:p.rindex(b"/")]
        while parent and parent not in done:
            done.add(parent)
            if parent not in out:
                out[parent] = _Raw(parent, "C", (), None, None)
            parent = parent[:parent.rindex(b"/")]
    return out


def changes(a: Inode | Side, b: Inode | Side, *, strict: bool = False,
            stats: DiffStats | None = None) -> list[Change]:
    """What changed from tree `a` to tree `b`, as `podman image diff` lists it (see the module doc).

    `a`/`b`: in-memory trees, or their `TreeIndex` (reuse one across comparisons) or `ImageIndex`.
    `stats` records what the comparison visited.
    """
    sa, sb = _side(a), _side(b)
    raw = _walk_changes(sa, sb, strict, stats if stats is not None else DiffStats())
    out = []
    for p in sorted(raw, key=_path_key):
        r = raw[p]
        if not r.fields:
            out.append(Change(p, r.kind))
        else:
            la, lb = sa._links(r.a), sb._links(r.b)
            out.append(Change(p, r.kind, r.fields,
                              tuple(_field_value(r.a, f, strict, la) for f in r.fields),
                              tuple(_field_value(r.b, f, strict, lb) for f in r.fields)))
    return out


def diff_images(a: str | os.PathLike | ImageIndex, b: str | os.PathLike | ImageIndex, *,
                strict: bool = False, cache_dir: str | os.PathLike | None | bool = None,
                stats: DiffStats | None = None) -> list[Change]:
    """`changes` between two EROFS image files, through their (cached) `ImageIndex`."""
    ia = a if isinstance(a, ImageIndex) else ImageIndex.for_image(a, cache_dir)
    ib = b if isinstance(b, ImageIndex) else ImageIndex.for_image(b, cache_dir)
    return changes(ia, ib, strict=strict, stats=stats)


def format_changes(chs: Sequence[Change]) -> str:
    """The `podman image diff` text: one `K /path` line per change."""
    return "".join(f"{c}\n" for c in chs)


# --- layer export ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerExport:
    """What `export_layer` wrote."""

    entries: int                 # tar members, whiteouts and opaque markers included
    whiteouts: int               # `.wh.<name>` members
    opaque_dirs: int             # `.wh..wh..opq` members
    skipped_sockets: tuple[bytes, ...]   # sockets cannot be stored in a tar (c/storage skips them too)
    diff_id: str                 # sha256:<hex> of the uncompressed tar (the OCI diff_id)
    digest: str                  # sha256:<hex> of the bytes written (the OCI layer digest)
    size: int                    # bytes written
    compression: str | None


COMPRESSIONS = (None, "gzip", "zstd")


def export_layer(a: Inode | Side, b: Inode | Side, out: str | os.PathLike | IO[bytes],
                 object_dirs: Sequence[str], compression: str | None = None) -> LayerExport:
    """Write an OCI layer tar that turns flat tree `a` into flat tree `b` when applied on top of it.

    `a`/`b`: trees, or their `TreeIndex`/`ImageIndex`.  Members (depth first, names in byte order, so
    the same trees always give the same bytes): every new or changed entry of `b` with its `b`
    attributes, every parent directory of those, a `.wh.<name>` (mode 0, size 0) per deleted entry,
    and `.wh..wh..opq` in a directory of both trees when re-sending all of its `b` content is smaller
    than listing its deletions (a replaced directory).  The root (`./`) only when its attributes changed.
    Regular-file content comes from the inline bytes or from `XX/<62 hex>` in the first of
    `object_dirs` that has it (ObjectNotFoundError otherwise).  Hardlinks: every name of a `b` inode
    that is written is written, the first as a file, the others as tar hardlinks to it.  Xattrs and
    sub-second mtimes go into PAX records (`SCHILY.xattr.<name>`, `mtime`); uname/gname are empty;
    gzip has mtime 0 and no file name.  `out` is a binary file object or a path (written atomically).
    """
    if compression not in COMPRESSIONS:
        raise FlatmountError(f"unknown compression {compression!r} (choose gzip, zstd or none)")
    plan = _plan_layer(_side(a), _side(b))
    if isinstance(out, str | os.PathLike):
        return _write_atomically(os.fspath(out), lambda f: _write_layer(plan, f, object_dirs, compression))
    return _write_layer(plan, out, object_dirs, compression)


@dataclass
class _Plan:
    members: list[tuple[bytes, str, Inode | None, Any]] = field(default_factory=list)
    whiteouts: int = 0                             # (path, 'entry'|'whiteout'|'opaque', inode, link key)
    opaque: int = 0


def _plan_layer(sa: Side, sb: Side) -> _Plan:
    """Which paths go into the layer and how."""
    raw = _walk_changes(sa, sb, True, DiffStats())
    emit: dict[bytes, Inode] = {}
    deleted: list[bytes] = []
    for p, r in raw.items():
        if r.kind == "D":
            deleted.append(p)
        else:
            emit[p] = r.b if r.b is not None else _side_lookup(sb, p)[0]
    _close_links(emit, sb)
    opaque = _choose_opaque(sa, sb, emit, deleted)
    if opaque:
        deleted = [p for p in deleted if not any(p.startswith(o + b"/") for o in opaque)]
        _close_links(emit, sb)
    for p in [*emit, *deleted]:                    # parents of everything written, `b` attributes
        q = p[:p.rindex(b"/")]
        while q and q not in emit:
            emit[q] = _side_lookup(sb, q)[0]
            q = q[:q.rindex(b"/")]
    members: list[tuple[bytes, str, Inode | None, Any]] = [
        (p, "entry", n, sb._links(n) or id(n)) for p, n in emit.items()]
    root_a, root_b = sa._root()[0], sb._root()[0]
    if compare_inodes(root_a, root_b, True):
        members.append((b"", "entry", root_b, None))
    for p in deleted:
        i = p.rindex(b"/") + 1
        members.append((p[:i] + b".wh." + p[i:], "whiteout", None, None))
    members += [(o + b"/" + OPAQUE_WHITEOUT.encode(), "opaque", None, None) for o in opaque]
    members.sort(key=lambda m: _path_key(m[0]))
    return _Plan(members, len(deleted), len(opaque))


def _ancestors(p: bytes) -> Iterator[bytes]:
    """`/a/b/c` -> `/a/b`, `/a`, `` (the root)."""
    while p:
        p = p[:p.rindex(b"/")]
        yield p


def _choose_opaque(sa: Side, sb: Side, emit: dict[bytes, Inode], deleted: list[bytes]) -> list[bytes]:
    """Directories (in both trees, never the root) to write whole with `.wh..wh..opq`, deepest first:
    one is chosen when its whole `b` subtree plus the marker is fewer members than what would be
    written below it otherwise (entries, whiteouts and the markers of deeper choices), so a replaced
    directory becomes opaque and ties keep the smaller scope.  Adds the chosen subtrees to `emit`."""
    cost: dict[bytes, int] = {}                    # members that would be written below each directory
    for p in [*emit, *deleted]:
        for q in _ancestors(p):
            cost[q] = cost.get(q, 0) + 1
    candidates = {q for p in deleted for q in _ancestors(p) if q}
    dels = set(deleted)
    chosen: list[bytes] = []
    for d in sorted(candidates, key=lambda q: (-q.count(b"/"), _path_key(q))):
        fa, fb = _side_lookup(sa, d), _side_lookup(sb, d)
        if fa is None or fb is None or fa[1] is None or fb[1] is None:
            continue                               # not a directory on both sides
        current = cost[d]
        if _count_below(sb, d, fb[1], current) + 1 >= current:
            continue
        prefix = d + b"/"
        size = 0
        for p, n, _h in _side_walk(sb, d, fb[1]):
            emit.setdefault(p, n)
            size += 1
        dels.difference_update([p for p in dels if p.startswith(prefix)])
        chosen = [o for o in chosen if not o.startswith(prefix)] + [d]
        delta = size + 1 - current                 # the subtree and the marker replace the rest
        for q in (d, *_ancestors(d)):
            cost[q] += delta
    return chosen


def _count_below(side: Side, path: bytes, handle: Any, limit: int) -> int:
    """Entries below a directory; counting stops once `limit` is reached."""
    n = 0
    for _ in _side_walk(side, path, handle):
        n += 1
        if n >= limit:
            break
    return n


def _close_links(emit: dict[bytes, Inode], sb: Side) -> None:
    """A hardlink group is written whole: a tar hardlink can only point into the same layer."""
    for n in list(emit.values()):
        for p in sb._links(n) or ():
            if p not in emit:
                emit[p] = _side_lookup(sb, p)[0]


def _pax_time(ns: int) -> str:
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    sec, frac = divmod(ns, _NS)
    return f"{sign}{sec}.{frac:09d}" if frac else f"{sign}{sec}"


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _tarinfo(path: bytes, n: Inode) -> tarfile.TarInfo:
    name = "./" if not path else _text(path[1:])
    ti = tarfile.TarInfo(name + "/" if n.is_dir and path else name)
    ti.mode = n.mode & 0o7777
    ti.uid, ti.gid = n.uid, n.gid
    ti.uname = ti.gname = ""
    ti.mtime = n.mtime_ns // _NS
    pax: dict[str, str] = {}
    if n.mtime_ns % _NS or n.mtime_ns < 0:
        pax["mtime"] = _pax_time(n.mtime_ns)
    for k, v in sorted(n.xattrs.items()):
        pax["SCHILY.xattr." + _text(k)] = _text(v)
    ti.pax_headers = pax
    fmt = n.mode & S_IFMT
    if fmt == S_IFDIR:
        ti.type = tarfile.DIRTYPE
    elif fmt == S_IFREG:
        ti.type = tarfile.REGTYPE
        ti.size = n.size
    elif fmt == S_IFLNK:
        ti.type = tarfile.SYMTYPE
        ti.linkname = _text(n.target or b"")
    elif fmt == stat.S_IFCHR or fmt == stat.S_IFBLK:
        ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
        ti.devmajor, ti.devminor = os.major(n.rdev), os.minor(n.rdev)
    elif fmt == stat.S_IFIFO:
        ti.type = tarfile.FIFOTYPE
    else:
        raise FlatmountError(f"{os.fsdecode(path)}: file type {oct(fmt)} cannot be stored in a tar")
    return ti


def _whiteout_info(path: bytes) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(_text(path[1:]))
    ti.mode = 0
    ti.uname = ti.gname = ""
    return ti


def _safe_objpath(objpath: str, path: bytes) -> str:
    parts = objpath.split("/")
    if objpath.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise FlatmountError(f"{os.fsdecode(path)}: object path {objpath!r} is not below an object dir")
    return objpath


def _open_object(n: Inode, path: bytes, object_dirs: Sequence[str]) -> IO[bytes]:
    objpath = _safe_objpath(n.object_path, path)
    for d in object_dirs:
        try:
            f = open(os.path.join(d, objpath), "rb")
        except (FileNotFoundError, NotADirectoryError):
            continue
        size = os.fstat(f.fileno()).st_size
        if size != n.size:
            f.close()
            raise VerityError(f"object {objpath} in {d} has {size} bytes, {os.fsdecode(path)} needs {n.size}")
        return f
    raise ObjectNotFoundError(f"object {objpath} (content of {os.fsdecode(path)}) is in none of the "
                              f"object dirs: {', '.join(object_dirs) or '(none given)'}")


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `f`."""

    def __init__(self, f: IO[bytes]):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.f.write(b)
        n = len(b)
        self.size += n
        return n


def _write_layer(plan: _Plan, out: IO[bytes], object_dirs: Sequence[str],
                 compression: str | None) -> LayerExport:
    outer = _Hashing(out)
    if compression is None:
        inner, closer = outer, None
    elif compression == "gzip":
        import gzip

        closer = gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=0, compresslevel=6)
        inner = _Hashing(closer)
    else:
        import zstandard

        closer = zstandard.ZstdCompressor(level=3).stream_writer(outer, closefd=False)
        inner = _Hashing(closer)
    first_name: dict[Any, str] = {}               # hardlink group -> name written first
    sockets: list[bytes] = []
    tf = tarfile.open(fileobj=inner, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape")
    from flatmount.progress import step

    for i, (path, kind, n, link_key) in enumerate(plan.members):
        step("diff: writing the layer", i, len(plan.members))
        if kind != "entry":
            tf.addfile(_whiteout_info(path))
            continue
        if n.mode & S_IFMT == stat.S_IFSOCK:
            sockets.append(path)
            continue
        ti = _tarinfo(path, n)
        if ti.type == tarfile.REGTYPE:
            if link_key in first_name:        # a later name of a hardlink group already written
                ti.type, ti.size, ti.linkname = tarfile.LNKTYPE, 0, first_name[link_key]
                tf.addfile(ti)
                continue
            first_name[link_key] = ti.name
            if n.size == 0:
                tf.addfile(ti)
            elif n.content is not None:
                if len(n.content) != n.size:
                    raise FlatmountError(f"{os.fsdecode(path)}: inline content has {len(n.content)} "
                                         f"bytes, size says {n.size}")
                tf.addfile(ti, io.BytesIO(n.content))
            elif n.object_path is None:
                raise FlatmountError(f"{os.fsdecode(path)}: {n.size} bytes but neither content nor object")
            else:
                with _open_object(n, path, object_dirs) as f:
                    tf.addfile(ti, f)
        else:
            tf.addfile(ti)
    tf.close()
    diff_id = "sha256:" + inner.sha.hexdigest()
    if closer is not None:
        closer.close()
    return LayerExport(len(plan.members) - len(sockets), plan.whiteouts, plan.opaque, tuple(sockets),
                       diff_id, "sha256:" + outer.sha.hexdigest(), outer.size, compression)


def _write_atomically(path: str, write) -> Any:
    """Write through `write(f)` into a temp file next to `path`, fsync, rename into place."""
    from flatmount.atomic import AtomicFile
    from flatmount.errors import FlatmountError
    from flatmount.safepath import check_output

    check_output(path)  # a new or regular file only: never through a symlink, never a device
    try:
        with AtomicFile(os.path.dirname(os.path.abspath(path)), prefix=f".{os.path.basename(path)}.") as af:
            result = write(af.file)
            af.commit(path)
    except FlatmountError:
        raise
    except OSError as e:  # a missing or read-only directory, a full disk: say which file
        raise FlatmountError(f"cannot write {path}: {e.strerror or e}") from None
    return result
