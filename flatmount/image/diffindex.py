"""The diff index file format: every directory of an image as one record that a diff can compare
without reading the image (flatmount.diff.index maps these files and walks them).

Why not marshal/pickle: an additional image store belongs to another user and its indexes are read
by us; a decoder of untrusted bytes must only ever produce the tree model's values or refuse.  So
every offset and length is checked against the bytes present (records lie wholly inside the file, a
directory's record lies before its parent's, so no walk can loop), names must be sorted and unique,
and a bad magic, version, checksum or truncation raises FormatError (the caller rebuilds the index
from the image).

Layout (little endian): `HEAD` (magic, version, xxh3-128 and size of the image, the root record's
offset, length and fingerprint, xxh3-64 of the rest of the file), then one record per directory,
children before parents, the root's last.  A record: `REC_HEAD` (fingerprint, entry count n, length
of the directory's own attributes, length of the names), the attributes (`encode_dir_key`), the
sorted names joined by NUL, n entry hashes (xxh3-128 of each entry's item without its location),
n+1 item offsets (u32, relative to the first item) and the n items (`encode_leaf`, `encode_dir_item`).
Comparing two directories is then comparing hash arrays (same names) or set arithmetic on names, in C.

A directory's fingerprint (`dir_fingerprint`) is xxh3-128 of its attributes and its entries' keys
(for a subdirectory: its fingerprint and attributes), so equal fingerprints mean equal subtrees,
hardlink groups included.  (It hashes `marshal.dumps` output: marshal is only ever a hash input here,
never loaded.)
"""

from __future__ import annotations

import marshal
import struct
from collections.abc import Sequence
from itertools import accumulate, islice
from operator import lt

from flatmount.errors import FormatError
from flatmount.image.tree import Inode

MAGIC = b"FMDIFX\x00\x00"
VERSION = 4                  # FMDIFX03 and older were marshal records (refused: different magic)
HEAD = struct.Struct("<8sI16sQ"     # magic, version, xxh3-128 of the image, image size,
                     "QQ16s"        # root record: offset, length, fingerprint,
                     "Q")           # xxh3-64 of everything else in the file
REC_HEAD = struct.Struct("<16sIII")  # fingerprint, entries, len(attributes), len(names)
OFFSET = struct.Struct("<I")
# items
LEAF, DIR = 0, 1                              # the item's first byte
LEAF_HEAD = struct.Struct("<BBIIIqQQ")        # kind, flags, mode, uid, gid, mtime_ns, size, rdev
DIR_HEAD = struct.Struct("<B16s")             # kind, fingerprint; then the directory's attributes
DIR_KEY = struct.Struct("<BIIIqQ")            # flags, mode, uid, gid, mtime_ns, rdev
LOCATION = struct.Struct("<QQ")               # a directory item's record: offset, length
_LEAF_PACK = LEAF_HEAD.pack
U32 = struct.Struct("<I")
_ITEM_SPAN = struct.Struct("<II").unpack_from
# flags: which optional fields follow, in this order
F_TARGET, F_CONTENT, F_DIGEST, F_OBJPATH, F_XATTRS, F_LINKS = 1, 2, 4, 8, 16, 32
F_WIDE = 128   # the integers did not fit their fixed widths: each is a length byte and signed bytes
_OPTIONAL = (F_TARGET, F_CONTENT, F_DIGEST, F_OBJPATH)   # in the leaf key's order


# --- keys: what makes two entries differ -----------------------------------------------------------

def xattr_items(n: Inode) -> tuple | None:
    return tuple(sorted(n.xattrs.items())) if n.xattrs else None


def leaf_key(n: Inode, links: dict[int, tuple[bytes, ...]] | None) -> tuple:
    """Everything that makes a non-directory differ (`leaf_node` inverts it).  Content is normalised
    (b"" = None; the object path whether given or derived from the digest), so a tree read back from
    an image and the tree it was written from have equal keys."""
    content = n.content or None
    objpath = n.object_path if content is None else None
    return (n.mode, n.uid, n.gid, n.mtime_ns, n.size, n.rdev, n.target, content, n.digest,
            objpath.encode("utf-8", "surrogateescape") if objpath is not None else None,
            xattr_items(n), links.get(id(n)) if links else None)


def dir_key(n: Inode) -> tuple:
    return (n.mode, n.uid, n.gid, n.mtime_ns, n.rdev, xattr_items(n))


def leaf_node(k: tuple) -> Inode:
    mode, uid, gid, mtime, size, rdev, target, content, digest, payload, xattrs, _links = k
    return Inode(mode, uid=uid, gid=gid, mtime_ns=mtime, size=size, rdev=rdev,
                 xattrs=dict(xattrs) if xattrs else None, target=target, content=content, digest=digest,
                 payload=payload.decode("utf-8", "surrogateescape") if payload is not None else None)


def dir_node(k: tuple) -> Inode:
    """A directory inode whose `entries` stay empty: its children are listed by the index."""
    mode, uid, gid, mtime, rdev, xattrs = k
    return Inode(mode, uid=uid, gid=gid, mtime_ns=mtime, rdev=rdev, xattrs=dict(xattrs) if xattrs else None,
                 entries={})


def path_key(path: bytes) -> list[bytes]:
    """Depth-first order with parents first: compare component by component."""
    return path.split(b"/")


def walk_dirs(root: Inode, sort: bool) -> tuple[list[tuple[bytes, Inode]], dict[int, tuple[bytes, ...]]]:
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
        links = {k: tuple(sorted(v, key=path_key)) for k, v in groups.items()}
    return dirs, links


def dir_entries(d: Inode, names: list[bytes], fp: dict[int, bytes], dkeys: dict[int, tuple],
                links: dict[int, tuple[bytes, ...]]) -> tuple[list[tuple], list[tuple[int, int]]]:
    """The entry keys of directory `d` (names sorted) whose subdirectories are done, and the
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
            append(leaf_key(c, links))
    return keys, subdirs


def dir_fingerprint(dk: tuple, names: list[bytes], keys: list[tuple]) -> bytes:
    """xxh3-128 of a directory's attributes and entry keys (marshal version 2: no back-references,
    so the same values give the same bytes; only hashed, never loaded)."""
    import xxhash

    return xxhash.xxh3_128_digest(marshal.dumps((dk, list(zip(names, keys, strict=True))), 2))


# --- items -----------------------------------------------------------------------------------------

def _wide(values: Sequence[int]) -> bytes:
    out = []
    for v in values:
        b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        if len(b) > 255:
            raise ValueError("diff index: an integer too large to store")
        out += [bytes((len(b),)), b]
    return b"".join(out)


def _pairs_and_links(out: list[bytes], xattrs: tuple | None, links: tuple[bytes, ...] | None) -> None:
    pack = U32.pack
    if xattrs:
        out.append(pack(len(xattrs)))
        for k, v in xattrs:
            out += (pack(len(k)), k, pack(len(v)), v)
    if links:
        out.append(pack(len(links)))
        for p in links:
            out += (pack(len(p)), p)


def encode_leaf(k: tuple) -> bytes:
    """The item of a non-directory, from its `leaf_key` (straight-line code: flatten writes one item
    per inode of every image it makes)."""
    mode, uid, gid, mtime, size, rdev, target, content, digest, objpath, xattrs, links = k
    flags = ((target is not None) | (content is not None) << 1 | (digest is not None) << 2
             | (objpath is not None) << 3 | bool(xattrs) << 4 | bool(links) << 5)
    try:
        head = _LEAF_PACK(LEAF, flags, mode, uid, gid, mtime, size, rdev)
    except struct.error:
        flags |= F_WIDE
        head = bytes((LEAF, flags)) + _wide((mode, uid, gid, mtime, size, rdev))
    if not flags:
        return head
    pack = U32.pack
    out = [head]
    if target is not None:
        out += (pack(len(target)), target)
    if content is not None:
        out += (pack(len(content)), content)
    if digest is not None:
        out += (pack(len(digest)), digest)
    if objpath is not None:
        out += (pack(len(objpath)), objpath)
    if flags & (F_XATTRS | F_LINKS):
        _pairs_and_links(out, xattrs, links)
    return b"".join(out)


def encode_dir_key(dk: tuple) -> bytes:
    """A directory's own attributes, from its `dir_key`."""
    mode, uid, gid, mtime, rdev, xattrs = dk
    flags = F_XATTRS if xattrs else 0
    try:
        head = DIR_KEY.pack(flags, mode, uid, gid, mtime, rdev)
    except struct.error:
        flags |= F_WIDE
        head = bytes((flags,)) + _wide((mode, uid, gid, mtime, rdev))
    if not xattrs:
        return head
    out = [head]
    _pairs_and_links(out, xattrs, None)
    return b"".join(out)


def encode_dir_item(fp: bytes, dk: tuple) -> bytes:
    """The item of a subdirectory without its location (`LOCATION` follows it in the file)."""
    return DIR_HEAD.pack(DIR, fp) + encode_dir_key(dk)


class _Reader:
    """Bounds-checked reads from one item (FormatError past its end)."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, s: struct.Struct) -> tuple:
        if self.pos + s.size > len(self.buf):
            raise FormatError("diff index: an item is cut short")
        v = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def bytes(self) -> bytes:
        (n,) = self.unpack(U32)
        if self.pos + n > len(self.buf):
            raise FormatError("diff index: an item is cut short")
        v = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return v

    def wide(self, count: int) -> tuple:
        out = []
        for _ in range(count):
            if self.pos >= len(self.buf):
                raise FormatError("diff index: an item is cut short")
            n = self.buf[self.pos]
            if self.pos + 1 + n > len(self.buf):
                raise FormatError("diff index: an item is cut short")
            out.append(int.from_bytes(self.buf[self.pos + 1:self.pos + 1 + n], "little", signed=True))
            self.pos += 1 + n
        return tuple(out)

    def extras(self, flags: int) -> tuple[list, tuple | None, tuple | None]:
        fields = [self.bytes() if flags & flag else None for flag in _OPTIONAL] if flags & 15 else [None] * 4
        xattrs = links = None
        if flags & F_XATTRS:
            (n,) = self.unpack(U32)
            if n == 0 or n > len(self.buf):
                raise FormatError("diff index: bad xattr count")
            xattrs = tuple((self.bytes(), self.bytes()) for _ in range(n))
        if flags & F_LINKS:
            (n,) = self.unpack(U32)
            if n == 0 or n > len(self.buf):
                raise FormatError("diff index: bad hardlink count")
            links = tuple(self.bytes() for _ in range(n))
        return fields, xattrs, links

    def dir_key(self) -> tuple:
        if self.pos >= len(self.buf):
            raise FormatError("diff index: an item is cut short")
        flags = self.buf[self.pos]
        if flags & ~(F_XATTRS | F_WIDE):
            raise FormatError("diff index: bad directory flags")
        if flags & F_WIDE:
            self.pos += 1
            mode, uid, gid, mtime, rdev = self.wide(5)
            _check_wide(mode, uid, gid, 0, rdev)
        else:
            _f, mode, uid, gid, mtime, rdev = self.unpack(DIR_KEY)
        xattrs = self.extras(F_XATTRS)[1] if flags & F_XATTRS else None
        return (mode, uid, gid, mtime, rdev, xattrs)


_DIR_PLAIN = struct.Struct("<B16sBIIIqQQQ")   # DIR_HEAD + DIR_KEY (no flags) + LOCATION, in one
_PLAIN_LEAF_FLAGS = F_TARGET | F_CONTENT | F_DIGEST | F_OBJPATH


def _check_wide(mode: int, uid: int, gid: int, size: int, rdev: int) -> None:
    """What no tree can hold is refused even in the wide form (only an mtime may exceed 64 bits:
    the others are never negative, and a device number is 64 bits at most)."""
    if min(mode, uid, gid, size, rdev) < 0 or rdev >= 1 << 64 or mode >= 1 << 32:
        raise FormatError("diff index: a value out of range")


def decode_item(buf) -> tuple:
    """(LEAF, leaf key) or (DIR, fingerprint, dir key, record offset, record length) of one item
    (all of `buf`); FormatError if it is not one."""
    n = len(buf)
    if not n:
        raise FormatError("diff index: an empty item")
    # the common cases without the general reader: a leaf without xattrs or hardlinks, a directory
    # without xattrs (each length still checked against the item)
    if buf[0] == LEAF and n >= LEAF_HEAD.size and not buf[1] & ~_PLAIN_LEAF_FLAGS:
        _k, flags, mode, uid, gid, mtime, size, rdev = LEAF_HEAD.unpack_from(buf)
        pos = LEAF_HEAD.size
        vals: list[bytes | None] = [None, None, None, None]
        if flags:
            for j, flag in enumerate(_OPTIONAL):
                if flags & flag:
                    if pos + 4 > n:
                        raise FormatError("diff index: an item is cut short")
                    (ln,) = U32.unpack_from(buf, pos)
                    pos += 4
                    if pos + ln > n:
                        raise FormatError("diff index: an item is cut short")
                    vals[j] = bytes(buf[pos:pos + ln])
                    pos += ln
        if pos != n:
            raise FormatError("diff index: trailing bytes in an item")
        return LEAF, (mode, uid, gid, mtime, size, rdev, *vals, None, None)
    if buf[0] == DIR and n == _DIR_PLAIN.size and buf[DIR_HEAD.size] == 0:
        _k, fp, _f, mode, uid, gid, mtime, rdev, off, ln = _DIR_PLAIN.unpack(buf)
        return DIR, fp, (mode, uid, gid, mtime, rdev, None), off, ln
    r = _Reader(buf)
    kind = buf[0]
    if kind == DIR:
        _k, fp = r.unpack(DIR_HEAD)
        dk = r.dir_key()
        off, ln = r.unpack(LOCATION)
        out: tuple = (DIR, fp, dk, off, ln)
    elif kind == LEAF:
        if len(buf) < 2:
            raise FormatError("diff index: an item is cut short")
        flags = buf[1]
        if flags & 64:
            raise FormatError("diff index: bad item flags")
        if flags & F_WIDE:
            r.pos = 2
            mode, uid, gid, mtime, size, rdev = r.wide(6)
            _check_wide(mode, uid, gid, size, rdev)
        else:
            _k, _f, mode, uid, gid, mtime, size, rdev = r.unpack(LEAF_HEAD)
        (target, content, digest, objpath), xattrs, links = r.extras(flags)
        out = (LEAF, (mode, uid, gid, mtime, size, rdev, target, content, digest, objpath, xattrs, links))
    else:
        raise FormatError(f"diff index: unknown item kind {kind}")
    if r.pos != len(buf):
        raise FormatError("diff index: trailing bytes in an item")
    return out


def decode_dir_key(buf) -> tuple:
    if len(buf) == DIR_KEY.size and buf[0] == 0:
        return (*DIR_KEY.unpack(buf)[1:], None)
    r = _Reader(buf)
    dk = r.dir_key()
    if r.pos != len(buf):
        raise FormatError("diff index: trailing bytes in directory attributes")
    return dk


# --- the file --------------------------------------------------------------------------------------

def checksum(data) -> int:
    """xxh3-64 of an index file without its checksum field (the header's last 8 bytes)."""
    import xxhash

    view = memoryview(data)
    h = xxhash.xxh3_64(view[:HEAD.size - 8])
    h.update(view[HEAD.size:])
    return h.intdigest()


def encode(root: Inode, image_id: bytes, image_size: int) -> bytes:
    """The index file of tree `root`, written from or read back from the image whose xxh3-128 is
    `image_id` (`image_size` bytes), in one bottom-up pass (the fingerprints are `TreeIndex`'s)."""
    import xxhash

    if not root.is_dir:
        raise ValueError("a tree root must be a directory")
    dirs, links = walk_dirs(root, True)
    h = xxhash.xxh3_128_digest
    fps: dict[int, bytes] = {}
    dkeys: dict[int, tuple] = {}
    parts = [b""]
    pos = HEAD.size
    where: dict[int, tuple[int, int]] = {}            # id(dir) -> (offset, length) of its record
    for _path, d in reversed(dirs):                # children first: a parent records where they are
        names = sorted(d.entries)
        keys, subdirs = dir_entries(d, names, fps, dkeys, links)
        sub = dict(subdirs)
        items = [encode_dir_item(*keys[i]) if i in sub else encode_leaf(keys[i]) for i in range(len(keys))]
        hashes = list(map(h, items))
        for i, cid in subdirs:                     # a directory's item also says where its record is
            items[i] += LOCATION.pack(*where[cid])
        dk = dkeys[id(d)] = dir_key(d)
        fp = fps[id(d)] = dir_fingerprint(dk, names, keys)
        dkb = encode_dir_key(dk)
        nb = b"\0".join(names)
        rec = b"".join([REC_HEAD.pack(fp, len(names), len(dkb), len(nb)), dkb, nb, *hashes,
                        struct.pack(f"<{len(items) + 1}I", *accumulate(map(len, items), initial=0)),
                        *items])
        where[id(d)] = (pos, len(rec))
        parts.append(rec)
        pos += len(rec)
    parts[0] = HEAD.pack(MAGIC, VERSION, image_id, image_size, *where[id(root)], fps[id(root)], 0)
    data = bytearray(b"".join(parts))
    data[HEAD.size - 8:HEAD.size] = struct.pack("<Q", checksum(data))
    return bytes(data)


def check_sorted(names: list[bytes]) -> None:
    """FormatError unless `names` are strictly increasing (sorted, unique): what comparing two
    records by position needs (`flatmount.diff.changes`)."""
    if not all(map(lt, names, islice(names, 1, None))):
        raise FormatError("diff index: names of a record not sorted")


class IndexFile:
    """A checked view of an index file: the header at once, each record when asked (`record`), each
    item when asked (`item`); every offset and length is checked against the file and the record.

    A record handle is (offset, length, fingerprint)."""

    def __init__(self, data, image_id: bytes | None = None, image_size: int = 0) -> None:
        """FormatError unless `data` is a whole index of this version (for that image, if given)."""
        if len(data) < HEAD.size:
            raise FormatError("diff index truncated")
        magic, version, self.image_id, self.image_size, off, ln, fp, check = HEAD.unpack_from(data)
        if magic != MAGIC:
            raise FormatError("not a flatmount diff index (or one of an older format)")
        if version != VERSION:
            raise FormatError(f"diff index version {version} (this flatmount reads {VERSION})")
        if checksum(data) != check:
            raise FormatError("diff index does not match its checksum")
        if off + ln != len(data) or off < HEAD.size:       # the root record comes last
            raise FormatError("diff index truncated")
        if image_id is not None and (image_id, image_size) != (self.image_id, self.image_size):
            raise FormatError("diff index of another image")
        self.data = data
        self.view = memoryview(data)
        self.root = (off, ln, fp)
        self.root_key = self.record(self.root)[4]

    def record(self, handle: tuple) -> tuple:
        """(names, hashes, offsets position, items position, directory key, end) of the record at
        `handle`; FormatError if it does not fit its place."""
        off, ln, _fp = handle
        end = off + ln
        if off < HEAD.size or end > len(self.data) or ln < REC_HEAD.size:
            raise FormatError("diff index: a record outside the file")
        _rfp, n, dkl, nl = REC_HEAD.unpack_from(self.data, off)
        p = off + REC_HEAD.size
        q = p + dkl + nl + 20 * n + 4
        if q > end:
            raise FormatError("diff index: a record cut short")
        dk = decode_dir_key(self.view[p:p + dkl])
        p += dkl
        blob = bytes(self.view[p:p + nl])
        names = blob.split(b"\0") if n else []
        if len(names) != n or (n == 0 and nl) or not all(names):
            raise FormatError("diff index: bad names in a record")
        p += nl
        hashes = bytes(self.view[p:p + 16 * n])
        offs = p + 16 * n
        # (whether the names are sorted and unique is checked where that matters: `check_sorted`;
        # the item offsets where an item is read: `item`)
        return names, hashes, offs, offs + 4 * (n + 1), dk, end

    def item(self, rec: tuple, handle: tuple, i: int) -> tuple:
        """Item `i` of the record `rec` (what `record(handle)` returned), decoded: see `decode_item`.
        A subdirectory's record must lie before this one's (so no walk loops)."""
        names, _hashes, offs, items, _dk, end = rec
        if not 0 <= i < len(names):
            raise IndexError(i)
        a, b = _ITEM_SPAN(self.data, offs + 4 * i)
        if not a < b <= end - items:
            raise FormatError("diff index: bad item offsets in a record")
        it = decode_item(self.view[items + a:items + b])
        if it[0] == DIR and it[3] + it[4] > handle[0]:
            raise FormatError("diff index: a directory record after its parent's")
        return it


__all__ = ["DIR", "DIR_HEAD", "DIR_KEY", "HEAD", "LEAF", "LEAF_HEAD", "LOCATION", "MAGIC", "REC_HEAD",
           "VERSION", "IndexFile", "check_sorted", "checksum", "decode_dir_key", "decode_item", "dir_entries",
           "dir_fingerprint", "dir_key", "dir_node", "encode", "encode_dir_item", "encode_dir_key",
           "encode_leaf", "leaf_key", "leaf_node", "path_key", "walk_dirs", "xattr_items"]
