"""Layer tarballs (tar, tar+gzip, tar+zstd) -> layer tree + objects, streaming (the byte pipeline
under it, decompression and hashing: flatmount.sources.pipeline).

Why streaming: layers can be many GB.  The compressed input is read in 1 MiB chunks, decompressed
with bounded output, hashed (the diff_id is the sha256 of the uncompressed tar, computed while reading,
including the padding after the end-of-archive blocks) and parsed by `tarfile` through a forward-only
reader, so memory does not grow with layer or file size, only with the number of entries (the tree).

Speed (the import is meant to run near hashing speed): plain members (a ustar/GNU header of a file
under 1 MiB, a directory, link, device or FIFO, no pax or GNU extension header) are decoded by us
without tarfile (`_fast_member`: the same fields, the same result; the header block by the compiled
`_tarscan.parse_plain` where it was built, which leaves anything unusual to `_parse_plain_py`, the
specification; FLATMOUNT_PURE=1 uses only the Python code); tarfile decodes the others (the
plain ustar header with a faster `frombuf`, see `_TarInfo`), but regular file content is read by us,
right after the header: content of 1 MiB and more streams into `ObjectStore.put`, whose reader thread fills its
aligned buffers straight from the file (uncompressed input: one copy, the kernel's; the diff_id is
hashed over those buffers in that thread) while the fs-verity hash runs in this one and a writer
thread writes; smaller content is read whole and handed to the store's bulk writer, whose helper
processes create the object files while we go on parsing (`objects.bulk`).

Compression is recognised by magic (gzip 1f8b, zstd 28b52ffd; anything else is read as tar), not by
media type.  zstandard is imported only for zstd input.

Rules (OCI image-spec layer.md, and what is rejected with LayerError):
- entry names: a leading `/` and `./` are stripped (tar convention), empty and `.` components
  dropped; a `..` component, a NUL byte or a component over 255 bytes is an error; `./` (or `/`) gives
  the layer root its attributes.
- an entry below a symlink or below a non-directory of this layer is an error; missing parent
  directories are created implicitly as 0755 root:root with the mtime of the entry that needed them
  (the root, when the tar has no `./` entry, is 0755 root:root with mtime 0: flatten takes such a root
  as "no attributes").
- the same path twice is an error (a directory entry may come after entries below it: it then gives
  the implicit directory its attributes).
- whiteouts: `.wh.<name>` -> a whiteout (char 0:0) `<name>`; `.wh..wh..opq` -> the opaque marker on
  its directory, wherever it appears among its siblings.  A whiteout and an entry of the same name in
  one layer: the entry stands (the whiteout only hides lower layers), and if it is a directory it
  becomes opaque, since the lower one is gone.  A bare `.wh.`, a whiteout of `.`/`..`/`/`, a directory
  named `.wh.*`, and other AUFS `.wh..wh.*` names are errors.  A character device 0:0 in the tar is a
  whiteout too (that is what it becomes under overlayfs).
- hardlinks share one Inode with their target, which must be an earlier non-directory entry of this
  layer; anything else is an error.
- xattrs from pax `SCHILY.xattr.*` and `LIBARCHIVE.xattr.*` (the latter wins); `trusted.overlay.*`
  and `user.overlay.*` are overlayfs' own vocabulary and are dropped (a tar expresses deletion and
  opacity with `.wh.` names only).  mtimes: pax `mtime` with nanoseconds, else the header's seconds.
- uid/gid are the numeric ids (names are ignored); GNU long names/links and sparse files are read.
- the archive must end with the end-of-archive block; a truncated, corrupt or unknown-compression
  stream is an error.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tarfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from flatmount.errors import FormatError, LayerError
from flatmount.image.tree import (
    INLINE_MAX,
    S_IFBLK,
    S_IFCHR,
    S_IFDIR,
    S_IFIFO,
    S_IFLNK,
    S_IFREG,
    Inode,
    lookup_parts,
)
from flatmount.record import record
from flatmount.sources import whiteouts as wh
from flatmount.sources.pipeline import (
    ForwardReader,
    HashingReader,
    _gzip_chunks,
    _plain_chunks,
    _zstd_chunks,
    detect_compression,
)
from objects.compiled import load

if TYPE_CHECKING:  # pragma: no cover
    from objects import ObjectStore

OBJECT_CHUNK = 1 << 20  # payloads below this are read whole and stored with put_bytes (objects' READ_CHUNK)
MANY_BYTES = 16 << 20  # a tarball this big: its small files, if it has a few, are likely many (`read_tar`)
NAME_MAX = 255
_U32 = 0xFFFFFFFF  # uid, gid and device major/minor numbers (base-256 tar fields can be larger)

Progress = Callable[[int, int], None]   # (uncompressed bytes read so far, entries read so far)


@record
class TarLayer:
    """Result of reading one layer tarball."""

    tree: Inode
    diff_id: str                 # sha256:<hex> of the uncompressed tar
    diff_size: int               # bytes of the uncompressed tar
    compressed_digest: str       # <alg>:<hex> of the input as read
    compressed_size: int
    compression: str             # "none", "gzip" or "zstd"
    entries: int


# --- tar -> tree ---------------------------------------------------------------------------------

def _octal(field: bytes) -> int:
    """tarfile's octal number field (NUL-terminated, blank-padded); ValueError where it raises."""
    p = field.find(b"\0")
    if p != -1:
        field = field[:p]
    return int(field.decode("ascii").strip() or "0", 8)


def _nts(field: bytes, encoding: str, errors: str) -> str:
    p = field.find(b"\0")
    if p != -1:
        field = field[:p]
    return field.decode(encoding, errors)


class _TarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped (only an end-of-archive block is a proper end); decodes headers faster."""

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._flatmount_stop = e
            raise

    @classmethod
    def frombuf(cls, buf, encoding, errors):  # type: ignore[override]
        """tarfile's `TarInfo.frombuf`, about 3x faster for the common header.

        Layers of many small files spend a third of their parsing here, half of it in tarfile's
        checksum (two struct unpacks of 504 values).  Only the plain case is decoded here: a short
        or all-zero block, a checksum that is not the unsigned sum, a base-256 or malformed number,
        or a GNU sparse header go to tarfile's own code, so results and errors are exactly its own.
        """
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        try:  # (a base-256 number has a high first byte: not ASCII, so ValueError below)
            chksum = _octal(buf[148:156])
            if chksum != 256 + sum(buf) - sum(buf[148:156]):
                return super().frombuf(buf, encoding, errors)
            obj = cls()
            obj.name = _nts(buf[0:100], encoding, errors)
            obj.mode = _octal(buf[100:108])
            obj.uid = _octal(buf[108:116])
            obj.gid = _octal(buf[116:124])
            obj.size = _octal(buf[124:136])
            obj.mtime = _octal(buf[136:148])
            obj.chksum = chksum
            obj.type = buf[156:157]
            obj.linkname = _nts(buf[157:257], encoding, errors)
            obj.uname = _nts(buf[265:297], encoding, errors)
            obj.gname = _nts(buf[297:329], encoding, errors)
            obj.devmajor = _octal(buf[329:337])
            obj.devminor = _octal(buf[337:345])
            prefix = _nts(buf[345:500], encoding, errors)
        except ValueError:  # a malformed number: tarfile raises its own error for it
            return super().frombuf(buf, encoding, errors)
        if obj.type == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE  # old V7 directory: a regular file with a trailing slash
        if obj.isdir():
            obj.name = obj.name.rstrip("/")
        if prefix and obj.type not in tarfile.GNU_TYPES:
            obj.name = prefix + "/" + obj.name  # ustar long name
        return obj


def _parse_pax_time(value: str) -> int | None:
    """`1700000000.123456789` (or negative) -> ns; None if malformed."""
    v = value.strip()
    neg = v.startswith("-")
    if neg:
        v = v[1:]
    sec, _, frac = v.partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()) or len(sec) > 30:
        return None  # (more digits than any int64 second count: tarfile's float() says inf)
    ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9] or "0")
    return -ns if neg else ns


def _xattrs(ti: tarfile.TarInfo, where: str) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    libarchive: dict[bytes, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[key[13:].encode("utf-8", "surrogateescape")] = value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            from urllib.parse import unquote_to_bytes

            name = unquote_to_bytes(key[17:])
            try:
                raw = value.encode("ascii")
                libarchive[name] = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
            except (UnicodeEncodeError, ValueError):
                raise LayerError(f"{where}: bad LIBARCHIVE.xattr value for {name!r}") from None
    out.update(libarchive)
    for name in list(out):
        if not name or b"\0" in name:
            raise LayerError(f"{where}: invalid xattr name {name!r}")
        if name.startswith(wh.OVERLAY_XATTR_PREFIXES):
            del out[name]
    return out


def _split(name: bytes, where: Callable[[], str]) -> list[bytes]:
    """The components of an entry name (see the rules above); `where()` names the entry in errors."""
    if b"\0" in name:
        raise LayerError(f"{where()}: NUL byte in entry name")
    parts = []
    for p in name.split(b"/"):
        if not p or p == b".":
            continue
        if p == b"..":
            raise LayerError(f"{where()}: '..' in entry name (path traversal)")
        if len(p) > NAME_MAX:
            raise LayerError(f"{where()}: name component longer than {NAME_MAX} bytes")
        parts.append(p)
    return parts


def _plain_component(p: bytes) -> bool:
    """A name component `_split` keeps as it is and `add` enters as an entry (not a whiteout)."""
    return bool(p) and p != b"." and p != b".." and len(p) <= NAME_MAX and b"\0" not in p \
        and not p.startswith(wh.WHITEOUT_PREFIX)


def _show(name: bytes) -> str:
    return name.decode("utf-8", "backslashreplace")


class LayerTreeBuilder:
    """Builds a layer tree from entries arriving in tar order; `finish()` applies whiteouts/opacity."""

    def __init__(self, label: str = "layer"):
        self.label = label
        self.root = Inode(S_IFDIR | 0o755)
        self._implicit: set[int] = set()          # ids of directories created for a missing parent
        self._root_explicit = False
        self._opaque: dict[int, Inode] = {}        # dirs with a .wh..wh..opq entry
        self._whiteouts: dict[int, tuple[Inode, set[bytes]]] = {}
        self.entries = 0
        # the directory of the last entry: (its raw name, its inode).  Tar entries come directory by
        # directory, so most names start with the last one's directory, already split, checked and
        # walked (a directory, once in the tree, stays at its path while the layer is built)
        self._last_dir: tuple[bytes, Inode] | None = None

    def where(self, name: bytes) -> str:
        return f"{self.label}: {_show(name)!r}"

    def _parent(self, parts: list[bytes], mtime_ns: int, name: bytes) -> Inode:
        node = self.root
        for p in parts:
            assert node.entries is not None
            child = node.entries.get(p)
            if child is None:
                child = Inode(S_IFDIR | 0o755, mtime_ns=mtime_ns)
                node.entries[p] = child
                self._implicit.add(id(child))
            elif child.is_symlink:
                raise LayerError(f"{self.where(name)}: below a symlink of this layer")
            elif not child.is_dir:
                raise LayerError(f"{self.where(name)}: parent is not a directory")
            node = child
        return node

    def _lookup(self, parts: list[bytes]) -> Inode | None:
        return lookup_parts(self.root, parts)

    def add(self, name: bytes, node: Inode | None, *, link: bytes | None = None, mtime_ns: int = 0) -> None:
        """Add an entry; `node` None with `link` set is a hardlink to the earlier entry `link`.

        `mtime_ns` (default: the node's) dates implicit parent directories.
        """
        self.entries += 1

        def where() -> str:  # (only an error needs the text: not built for every entry)
            return self.where(name)

        head, sep, base = name.rpartition(b"/")
        plain = bool(sep) and _plain_component(base)
        last = self._last_dir
        if plain and last is not None and last[0] == head:
            self._put(last[1], base, node, link, where)
            return
        parts = _split(name, where)
        if not parts:
            if node is None or not node.is_dir:
                raise LayerError(f"{where()}: the root must be a directory")
            if self._root_explicit:
                raise LayerError(f"{where()}: duplicate entry for the root directory")
            self._root_explicit = True
            self.root.mode, self.root.uid, self.root.gid = node.mode, node.uid, node.gid
            self.root.mtime_ns, self.root.xattrs = node.mtime_ns, node.xattrs
            return
        base = parts[-1]
        mtime = node.mtime_ns if node is not None else mtime_ns
        kind, target = wh.classify_name(base)
        if kind != wh.ENTRY:
            parent = self._parent(parts[:-1], mtime, name)
            if node is not None and node.is_dir:
                raise LayerError(f"{where()}: a directory cannot be a whiteout (.wh.*)")
            if kind == wh.OPAQUE:
                if id(parent) in self._opaque:
                    raise LayerError(f"{where()}: duplicate opaque marker")
                self._opaque[id(parent)] = parent
                return
            if kind == wh.INVALID and not target:
                raise LayerError(f"{where()}: bare '.wh.' whiteout")
            if kind == wh.INVALID:
                raise LayerError(f"{where()}: whiteout of {'/' if target == b'.' else '..'} is not allowed")
            if kind == wh.AUFS_META:
                raise LayerError(f"{where()}: AUFS metadata entries (.wh..wh.*) are not supported")
            assert target is not None
            _, names = self._whiteouts.setdefault(id(parent), (parent, set()))
            if target in names:
                raise LayerError(f"{where()}: duplicate whiteout")
            names.add(target)
            return
        parent = self._parent(parts[:-1], mtime, name)
        if plain:  # (then `base` is the last of `parts`, and `head` names `parent`)
            self._last_dir = (head, parent)
        self._put(parent, base, node, link, where)

    def add_files(self, files: list[tuple[bytes, Inode]]) -> None:
        """`add(name, node)` of each pair in order (no hardlinks).  Most names of a run of files lie
        in the last entry's directory under a new plain name: those are entered here directly,
        without `add`'s calls per entry (its shortcut, inlined: 0.02 s of 50,000 small files);
        any other goes through `add`."""
        last = self._last_dir
        for name, node in files:
            head, sep, base = name.rpartition(b"/")
            if last is not None and last[0] == head and sep and _plain_component(base):
                entries = last[1].entries
                assert entries is not None
                if base not in entries:
                    self.entries += 1
                    entries[base] = node
                    continue
            self.add(name, node)  # (an error, or another directory: `add` says which, or walks to it)
            last = self._last_dir

    def _put(self, parent: Inode, base: bytes, node: Inode | None, link: bytes | None,
             where: Callable[[], str]) -> None:
        """Enter `node` (or the hardlink target `link`) as `base` in `parent` (`add`'s last step)."""
        assert parent.entries is not None
        if link is not None:
            lparts = _split(link, where)
            target = self._lookup(lparts) if lparts else None
            if target is None or target.is_dir or target.is_whiteout:
                what = "a directory" if target is not None and target.is_dir else (
                    "a whiteout" if target is not None else "missing or outside this layer")
                raise LayerError(f"{where()}: hardlink target {_show(link)!r} is {what}")
            node = target
        assert node is not None
        existing = parent.entries.get(base)
        if existing is not None:
            if node.is_dir and existing.is_dir and id(existing) in self._implicit:
                self._implicit.discard(id(existing))
                existing.mode, existing.uid, existing.gid = node.mode, node.uid, node.gid
                existing.mtime_ns, existing.xattrs = node.mtime_ns, node.xattrs
                return
            if id(existing) in self._implicit:
                raise LayerError(f"{where()}: not a directory, but earlier entries are below it")
            raise LayerError(f"{where()}: duplicate entry")
        parent.entries[base] = node

    def finish(self) -> Inode:
        """Apply whiteouts and opaque markers (order-independent) and return the root."""
        for parent, names in self._whiteouts.values():
            assert parent.entries is not None
            for d in wh.merge_whiteouts(parent.entries, {n: Inode.whiteout() for n in names}, opaque_dirs=True):
                self._opaque[id(d)] = d
        for d in self._opaque.values():
            wh.make_opaque(d)
        return self.root


def read_tar(stream: BinaryIO, objects: ObjectStore, *, label: str = "layer",
             progress: Progress | None = None, algorithm: str = "sha256", size: int | None = None) -> TarLayer:
    """Read one layer tarball (any supported compression) into a tree, content into `objects`.

    Digests are not checked here (see `verify`); `objects` is not synced.  `size`: the tarball's
    bytes as stored or sent (compressed), where the caller knows them: a big one's small files are
    handed to the bulk writer's helpers from the first few (`MANY_BYTES`).
    """
    raw = stream if isinstance(stream, HashingReader) else HashingReader(stream, algorithm)
    compression = detect_compression(raw, label)
    if compression == "gzip":
        chunks = _gzip_chunks(raw, label)
    elif compression == "zstd":
        chunks = _zstd_chunks(raw, label)
    else:
        chunks = _plain_chunks(raw)
    src = ForwardReader(chunks, label,
                        same_as=raw if compression == "none" and raw.algorithm == "sha256" else None,
                        direct=raw if compression == "none" else None)
    builder = LayerTreeBuilder(label)
    try:
        tf = tarfile.open(fileobj=src, mode="r:", tarinfo=_TarInfo, encoding="utf-8",  # type: ignore[arg-type]
                          errors="surrogateescape")
    except tarfile.ReadError as e:
        if compression != "none" and src.tell() == 0:
            raise LayerError(f"{label}: {compression} stream yields no data (truncated or corrupt)") from None
        raise LayerError(f"{label}: not a tar archive ({e})") from None
    except tarfile.TarError as e:
        raise LayerError(f"{label}: bad tar archive ({e})") from None
    except (ValueError, OverflowError) as e:  # tarfile's pax/GNU sparse parsing: int() of any text
        if isinstance(e, LayerError | FormatError):
            raise
        raise LayerError(f"{label}: bad tar archive (malformed pax or GNU sparse header: {e})") from None
    # many small files: their object files are written by a helper process while we parse on
    bulk = objects.bulk(many=size is not None and size >= MANY_BYTES) \
        if callable(getattr(objects, "bulk", None)) else None
    put_small = bulk.put_bytes if bulk is not None else objects.put_bytes
    put_many = getattr(bulk, "put_many", None)  # (many small contents hashed together)
    # big files: hashed and written while the next members are read (their digests are set below)
    later: list[tuple[Inode, Any]] | None = [] if callable(getattr(objects, "put_async", None)) else None
    try:
        try:
            while True:
                if tf.firstmember is None and not tf.pax_headers:
                    if _fast_batch(tf, src, builder, put_small, progress, put_many):
                        continue  # (progress reported per member)
                    if _fast_member(tf, src, builder, put_small):
                        if progress is not None:
                            progress(src.tell(), builder.entries)
                        continue
                try:
                    ti = tf.next()
                except tarfile.TarError as e:
                    raise LayerError(f"{label}: corrupt tar archive at byte {tf.offset} ({e})") from None
                except (ValueError, OverflowError) as e:  # (as above)
                    if isinstance(e, LayerError | FormatError):
                        raise
                    raise LayerError(f"{label}: corrupt tar archive at byte {tf.offset} (malformed pax or "
                                     f"GNU sparse header: {e})") from None
                if ti is None:
                    break
                tf.members.clear()  # stream reading: keep no per-entry state in tarfile
                _add_member(tf, ti, builder, objects, src, put_small, later)
                if progress is not None:
                    progress(src.tell(), builder.entries)
        finally:
            tf.fileobj = None  # type: ignore[assignment]  # do not let tarfile touch our reader again
        stop = getattr(tf, "_flatmount_stop", None)
        if not isinstance(stop, tarfile.EOFHeaderError):
            why = "truncated" if isinstance(stop, tarfile.EmptyHeaderError | tarfile.TruncatedHeaderError | None) \
                else f"corrupt ({stop})"
            raise LayerError(f"{label}: tar archive is {why}: no end-of-archive block at byte {tf.offset}")
        src.drain()
        raw.drain()
        for node, pending in later or ():
            node.digest = pending.result()
    except BaseException:
        for _node, pending in later or ():  # none may still write when we return
            with contextlib.suppress(BaseException):
                pending.result()
        if bulk is not None:
            bulk.abort()
        raise
    if bulk is not None:
        bulk.close()
    tree = builder.finish()
    return TarLayer(tree, src.digest, src.tell(), raw.digest, raw.size, compression, builder.entries)


class _MemberReader:
    """One member's payload as a file object for `ObjectStore.put`, read straight from the stream.

    Ends after exactly `size` bytes; EOF before that is a truncated archive.  (tarfile's own member
    file objects stack a BufferedReader and several copies on top of the same reads.)
    """

    def __init__(self, src: ForwardReader, size: int, where: str):
        self._src = src
        self._left = size
        self._where = where

    def readinto(self, b: bytearray | memoryview) -> int:
        if not self._left:
            return 0
        mv = memoryview(b).cast("B")
        if len(mv) > self._left:
            mv = mv[:self._left]
        n = self._src.readinto(mv)
        if not n:
            raise LayerError(f"{self._where}: archive ends inside this file (truncated)")
        self._left -= n
        return n

    @property
    def remaining(self) -> int:
        """Bytes of the payload not read yet (lets `ObjectStore.put_async` return right after the last)."""
        return self._left

    def defer_work(self) -> HashingReader | None:
        return self._src.defer_work()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        buf = bytearray(n)
        got = 0
        while got < n:
            got += self.readinto(memoryview(buf)[got:])
        return bytes(buf)

    def readable(self) -> bool:
        return True


def _payload(src: ForwardReader, size: int, where: str) -> bytes:
    """The next `size` bytes of the stream (a member's whole payload); LayerError if it ends first."""
    data = src.read(size)
    if len(data) != size:
        raise LayerError(f"{where}: archive ends inside this file (truncated)")
    return data


_FAST_TYPES = frozenset(b"0\x0012345" b"6")  # regular (and old regular), hardlink, symlink, char, block, dir, fifo

PlainHeader = tuple[bytes, bytes, bytes, int, int, int, int, int, int, int]


def _parse_plain_py(buf: bytes) -> PlainHeader | None:
    """Decode a plain header block: (type, name, link, mode, uid, gid, size, mtime, devmajor, devminor).

    The specification of the compiled `_tarscan.parse_plain` (which hands back None, to this code,
    for anything but the common form).  None where `_fast_member` must leave the block to tarfile:
    another type, a checksum that is not the unsigned sum, a number `_octal` refuses.  The type is
    the header's, but `5` for an old V7 directory (a regular file whose name ends in `/`); the name
    is prefix `/` name (a directory's without trailing slashes); `link` is the link field of a hard
    or symbolic link, else empty.
    """
    if len(buf) != tarfile.BLOCKSIZE:
        raise ValueError(f"a tar header block is {tarfile.BLOCKSIZE} bytes, not {len(buf)}")
    if buf[156] not in _FAST_TYPES:
        return None
    try:
        chksum = _octal(buf[148:156])
        if chksum != 256 + sum(buf) - sum(buf[148:156]):
            return None
        mode = _octal(buf[100:108])
        uid = _octal(buf[108:116])
        gid = _octal(buf[116:124])
        size = _octal(buf[124:136])
        mtime = _octal(buf[136:148])
        # (tarfile decodes the device numbers whatever the type: a malformed one is its error)
        devmajor = _octal(buf[329:337])
        devminor = _octal(buf[337:345])
    except ValueError:
        return None
    kind = buf[156:157]
    name = buf[0:100]
    if (p := name.find(b"\0")) != -1:
        name = name[:p]
    prefix = buf[345:500]
    if (p := prefix.find(b"\0")) != -1:
        prefix = prefix[:p]
    if kind == b"\x00" and name.endswith(b"/"):
        kind = b"5"  # old V7 directory: a regular file with a trailing slash
    if kind == b"5":
        name = name.rstrip(b"/")
    if prefix:
        name = prefix + b"/" + name
        if kind == b"5":
            name = name.rstrip(b"/")
    link = b""
    if kind in (b"1", b"2"):
        link = buf[157:257]
        if (p := link.find(b"\0")) != -1:
            link = link[:p]
    return kind, name, link, mode, uid, gid, size, mtime, devmajor, devminor


PlainMember = tuple[bytes, bytes, bytes, int, int, int, int, int, int, int, int]  # PlainHeader + payload offset


def _scan_plain_py(buf: bytes, off: int, limit: int, max_size: int) -> tuple[list[PlainMember], int]:
    """The plain members lying whole in `buf[off:]`, one after the other, at most `limit`: each
    `_parse_plain_py`'s tuple plus the offset of its payload in `buf`; and the offset after the last
    one's padding.  Stops before a block `_parse_plain_py` does not decode, a regular file (header
    type 0 or NUL, as `_fast_member` tests it) of `max_size` bytes or more, and a member whose
    payload and padding are not all in `buf`.  The specification of the compiled
    `_tarscan.scan_plain` (which stops earlier where its `parse_plain` leaves a block to Python)."""
    out: list[PlainMember] = []
    if off < 0:
        off = len(buf)
    while len(out) < limit and off + tarfile.BLOCKSIZE <= len(buf):
        fields = _parse_plain_py(buf[off:off + tarfile.BLOCKSIZE])
        if fields is None:
            break
        size = fields[6]
        if buf[off + 156] in b"0\x00" and size >= max_size:
            break
        padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if fields[0] in (b"0", b"\x00") else 0
        if off + tarfile.BLOCKSIZE + padded > len(buf):
            break
        out.append((*fields, off + tarfile.BLOCKSIZE))
        off += tarfile.BLOCKSIZE + padded
    return out, off


# the compiled decoder where it was built, unless FLATMOUNT_PURE=1 (objects/compiled.py): then the
# Python code above decodes every header
_tarscan = load("flatmount.sources._tarscan")
parse_plain: Callable[[bytes], PlainHeader | None] = _parse_plain_py if _tarscan is None else _tarscan.parse_plain
NATIVE = parse_plain is not _parse_plain_py  # whether the compiled header decoder is in use
scan_plain: Callable[[bytes, int, int, int], tuple[list[PlainMember], int]] = \
    _scan_plain_py if _tarscan is None else _tarscan.scan_plain
BATCH = 512  # members decoded per scan_plain call at most (a 1 MiB chunk of small files holds ~200)


def _fast_batch(tf: tarfile.TarFile, src: ForwardReader, builder: LayerTreeBuilder,
                put_small: Callable[[bytes | memoryview], bytes], progress: Progress | None = None,
                put_many: Callable[[list[memoryview]], list[bytes]] | None = None) -> int:
    """Add the plain members lying whole in what `src` holds buffered (`scan_plain`); how many (0:
    nothing consumed).  The same entries as `_fast_member` one by one, without its per-member
    reads, copies and calls: the payloads are handed on as views of the buffered chunk, with
    `put_many` (a bulk writer's) all contents to store at once (hashed together), else one by one
    with `put_small`.  `progress` is called as `read_tar` does after `_fast_member`: after each
    member whose content is not stored, and at the end if the batch ends with members whose content
    is (those are entered in runs, `LayerTreeBuilder.add_files`, and counted by the next call)."""
    offset = tf.offset
    if src.tell() != offset:
        return 0
    buf, off = src.buffered()
    members, end = scan_plain(buf, off, BATCH, OBJECT_CHUNK)
    if not members:
        return 0
    view = memoryview(buf)
    base = offset - off
    digests: list[bytes | None] = [None] * len(members)
    if put_many is not None:
        stored = [i for i, m in enumerate(members) if _stores_content(m[0], m[1], m[6])]
        if stored:
            for i, d in zip(stored, put_many([view[members[i][10]:members[i][10] + members[i][6]] for i in stored]),
                            strict=True):
                digests[i] = d
    files: list[tuple[bytes, Inode]] = []  # a run of stored members, entered at once (`add_files`)
    for (kind, name, link, mode, uid, gid, size, mtime, devmajor, devminor, at), digest in zip(members, digests,
                                                                                             strict=True):
        if digest is not None:  # (_add_plain's node for stored content, without its tests and call)
            files.append((name, Inode(S_IFREG | mode & 0o7777, size=size, digest=digest, uid=uid, gid=gid,
                                      mtime_ns=mtime * 1_000_000_000, xattrs={})))
            continue
        if files:
            builder.add_files(files)
            files = []
        regular = kind in (b"0", b"\x00")
        _add_plain(builder, put_small, kind, name, link, mode, uid, gid, size, mtime,
                   os.makedev(devmajor, devminor) if kind in (b"3", b"4") else 0,
                   (view[at:at + size] if size > INLINE_MAX else buf[at:at + size]) if regular else b"")
        if progress is not None:
            progress(base + at + (-(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if regular else 0),
                     builder.entries)
    if files:
        builder.add_files(files)
        if progress is not None:
            progress(base + end - off, builder.entries)
    src.skip_buffered(end - off)
    tf.offset = offset + (end - off)
    return len(members)


def _fast_member(tf: tarfile.TarFile, src: ForwardReader, builder: LayerTreeBuilder,
                 put_small: Callable[[bytes | memoryview], bytes]) -> bool:
    """Add the next entry without tarfile, if it is a plain one; False (nothing consumed) otherwise.

    Why: with many small files, tarfile's per-member work (TarInfo objects, pax and GNU dispatch,
    the member list, offsets) cost about as much as everything else in the import.  Plain means a
    ustar/GNU header of a regular file under 1 MiB, a directory, symlink, hardlink, device or FIFO,
    whose checksum is the unsigned sum and whose numbers are octal, with no global pax header in
    force; everything else (pax and GNU long-name headers, sparse files, the end-of-archive blocks,
    a bad checksum, big files) goes to tarfile and `_add_member` as before.  The result, tree and
    objects, is exactly what they give: the same fields are decoded the same way
    (`_TarInfo.frombuf`, tarfile's `_proc_builtin`), the payload and its padding are consumed the
    same way, and `tf.offset` is left where tarfile would have left it.
    """
    offset = tf.offset
    if src.tell() > offset:
        return False
    if src.tell() != offset:  # the padding after a payload tarfile's member read from `src`
        src.seek(offset)
        if src.tell() != offset:
            return False  # truncated: tarfile says so
    buf = src.peek(tarfile.BLOCKSIZE)
    if len(buf) != tarfile.BLOCKSIZE:
        return False
    fields = parse_plain(buf)
    if fields is None and NATIVE:  # the compiled decoder leaves anything unusual to the Python one
        fields = _parse_plain_py(buf)
    if fields is None:
        return False
    kind, name, link, mode, uid, gid, size, mtime, devmajor, devminor = fields
    rdev = os.makedev(devmajor, devminor) if kind in (b"3", b"4") else 0
    if buf[156] in b"0\x00" and size >= OBJECT_CHUNK:  # (the type byte itself: an old V7 directory too)
        return False  # streamed through a put of its own (`_add_member`)
    regular = kind in b"0\x00"
    padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if regular else 0
    tf.offset = offset + tarfile.BLOCKSIZE + padded
    # header, payload and padding in one read (a stream cut inside the padding leaves `src` short of
    # `tf.offset`: the next call hands that to tarfile, which reports the truncation as before)
    member = src.read(tarfile.BLOCKSIZE + padded)
    if regular and len(member) < tarfile.BLOCKSIZE + size:
        raise LayerError(f"{builder.where(name)}: archive ends inside this file (truncated)")
    data = b""
    if regular:
        data = memoryview(member)[tarfile.BLOCKSIZE:tarfile.BLOCKSIZE + size] if size > INLINE_MAX else \
            member[tarfile.BLOCKSIZE:tarfile.BLOCKSIZE + size]
    _add_plain(builder, put_small, kind, name, link, mode, uid, gid, size, mtime, rdev, data)
    return True


def _stores_content(kind: bytes, name: bytes, size: int) -> bool:
    """Whether `_add_plain` stores this member's content as an object (a regular file, not inlined,
    not a whiteout)."""
    return kind in (b"0", b"\x00") and size > INLINE_MAX and \
        not wh.is_whiteout_name(name.rstrip(b"/").rpartition(b"/")[2])


def _add_plain(builder: LayerTreeBuilder, put_small: Callable[[bytes | memoryview], bytes], kind: bytes,
               name: bytes, link: bytes, mode: int, uid: int, gid: int, size: int, mtime: int, rdev: int,
               data: bytes | memoryview, digest: bytes | None = None) -> None:
    """Enter one plain member (`_parse_plain_py`'s fields; `data` its payload, a regular file's,
    bytes when it is inlined; `rdev` a device's number) into the tree, its content into the store
    (unless the caller stored it already: `digest`, for a member `_stores_content` names)."""
    mtime_ns = mtime * 1_000_000_000
    perm = mode & 0o7777
    if kind == b"1":
        builder.add(name, None, link=link, mtime_ns=mtime_ns)
        return
    if kind in b"0\x00":
        if wh.is_whiteout_name(name.rstrip(b"/").rpartition(b"/")[2]):
            # a whiteout or opaque marker: its name is all it says; its content is read past, not stored
            node = Inode(S_IFREG | perm, uid=uid, gid=gid, mtime_ns=mtime_ns, xattrs={})
        elif size > INLINE_MAX:
            if digest is None:
                digest = put_small(data)
            node = Inode(S_IFREG | perm, size=size, digest=digest, uid=uid, gid=gid, mtime_ns=mtime_ns, xattrs={})
        else:
            node = Inode(S_IFREG | perm, size=size, content=data or None, uid=uid, gid=gid, mtime_ns=mtime_ns,
                         xattrs={})
    elif kind == b"5":
        node = Inode(S_IFDIR | perm, uid=uid, gid=gid, mtime_ns=mtime_ns, xattrs={})
    elif kind == b"2":
        target = link
        if not target:
            raise LayerError(f"{builder.where(name)}: symlink with an empty or NUL-containing target")
        node = Inode(S_IFLNK | 0o777, size=len(target), target=target, uid=uid, gid=gid, mtime_ns=mtime_ns,
                     xattrs={})
    elif kind == b"6":
        node = Inode(S_IFIFO | perm, uid=uid, gid=gid, mtime_ns=mtime_ns, xattrs={})
    else:
        node = Inode((S_IFCHR if kind == b"3" else S_IFBLK) | perm, rdev=rdev, uid=uid, gid=gid,
                     mtime_ns=mtime_ns, xattrs={})
        if node.is_whiteout:
            node = Inode.whiteout()
    builder.add(name, node)


def _add_member(tf: tarfile.TarFile, ti: tarfile.TarInfo, builder: LayerTreeBuilder,
                objects: ObjectStore, src: ForwardReader | None = None,
                put_small: Callable[[bytes], bytes] | None = None,
                later: list[tuple[Inode, Any]] | None = None) -> None:
    """Add one tar entry to the tree.

    Regular file content is read from `src` when given (else through tarfile); content under 1 MiB
    is stored with `put_small` (default `objects.put_bytes`), bigger content streams into `objects.put`
    (with `later`, into `objects.put_async`: the node's digest is then set when the caller resolves the
    (node, pending put) pairs appended to `later`).
    """
    name = ti.name.encode("utf-8", "surrogateescape")
    where = builder.where(name)
    pax_mtime = ti.pax_headers.get("mtime")
    mtime_ns = _parse_pax_time(pax_mtime) if pax_mtime is not None else None
    if mtime_ns is None:
        try:  # (tarfile parses a pax mtime with float(): "nan" and "1e400" arrive here)
            mtime_ns = int(ti.mtime) * 1_000_000_000
        except (ValueError, OverflowError, TypeError):
            raise LayerError(f"{where}: mtime {pax_mtime if pax_mtime is not None else ti.mtime!r} is not "
                             "a number of seconds") from None
    for field, value in (("mtime", mtime_ns // 1_000_000_000), ("uid", ti.uid), ("gid", ti.gid)):
        lo, hi = (-(1 << 63), (1 << 63) - 1) if field == "mtime" else (0, _U32)
        if not lo <= value <= hi:  # (base-256 numbers and pax values can be of any size)
            raise LayerError(f"{where}: {field} {value} is out of range ({lo}..{hi})")
    perm = ti.mode & 0o7777
    if ti.islnk():
        builder.add(name, None, link=ti.linkname.encode("utf-8", "surrogateescape"), mtime_ns=mtime_ns)
        return
    xattrs = _xattrs(ti, where)
    kw = {"uid": ti.uid, "gid": ti.gid, "mtime_ns": mtime_ns, "xattrs": xattrs}
    if ti.isreg() and wh.is_whiteout_name(name.rstrip(b"/").rpartition(b"/")[2]):
        # a whiteout or opaque marker: its name is all it says; content it carries is not stored
        # (it would be an object nothing references), tarfile skips over it
        builder.add(name, Inode(S_IFREG | perm, **kw))
        return
    if ti.isreg():
        size = ti.size
        # the payload starts where tarfile stopped (offset_data); tarfile's next() skips the padding
        direct = src is not None and ti.sparse is None and src.tell() == ti.offset_data
        if size > INLINE_MAX:
            if direct and size < OBJECT_CHUNK:
                digest = (put_small or objects.put_bytes)(_payload(src, size, where))  # type: ignore[arg-type]
            else:
                f = _MemberReader(src, size, where) if direct else tf.extractfile(ti)  # type: ignore[arg-type]
                assert f is not None
                try:
                    if later is not None and direct:
                        node = Inode(S_IFREG | perm, size=size, **kw)
                        later.append((node, objects.put_async(f, size=size)))  # type: ignore[arg-type]
                        builder.add(name, node)
                        return
                    digest = objects.put(f, size=size)  # type: ignore[arg-type]
                except tarfile.TarError as e:
                    raise LayerError(f"{where}: archive ends inside this file ({e})") from None
            node = Inode(S_IFREG | perm, size=size, digest=digest, **kw)
        else:
            data = b""
            if size and direct:
                data = _payload(src, size, where)  # type: ignore[arg-type]
            elif size:
                f = tf.extractfile(ti)
                assert f is not None
                try:
                    data = f.read()
                except tarfile.TarError as e:
                    raise LayerError(f"{where}: archive ends inside this file ({e})") from None
            node = Inode(S_IFREG | perm, size=len(data), content=data or None, **kw)
    elif ti.isdir():
        node = Inode(S_IFDIR | perm, **kw)
    elif ti.issym():
        target = ti.linkname.encode("utf-8", "surrogateescape")
        if not target or b"\0" in target:
            raise LayerError(f"{where}: symlink with an empty or NUL-containing target")
        node = Inode(S_IFLNK | 0o777, size=len(target), target=target, **kw)
    elif ti.ischr() or ti.isblk():
        kind = S_IFCHR if ti.ischr() else S_IFBLK
        if not (0 <= ti.devmajor < 1 << 12 and 0 <= ti.devminor < 1 << 20):  # an image holds 32 bits
            raise LayerError(f"{where}: device number {ti.devmajor}:{ti.devminor} is out of range "
                             "(major < 4096, minor < 1048576)")
        node = Inode(kind | perm, rdev=os.makedev(ti.devmajor, ti.devminor), **kw)
        if node.is_whiteout:
            node = Inode.whiteout()
    elif ti.isfifo():
        node = Inode(S_IFIFO | perm, **kw)
    else:
        raise LayerError(f"{where}: unsupported tar entry type {ti.type!r}")
    builder.add(name, node)
