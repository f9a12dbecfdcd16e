"""composefs-layout EROFS image -> tree, strict and safe on hostile input.

`Image(data)` validates the composefs header and the superblock eagerly and reads inodes only when
asked: `root()` builds the whole tree, `lookup(path)` binary-searches directory blocks (EROFS.md
section 4) and builds only the subtree it finds.  The writer's own rewriting is undone exactly:
whiteout files go back to char 0:0, `trusted.overlay.overlay.X` back to `trusted.overlay.X`, the
metacopy/redirect pair becomes `digest`/`payload`, and the root's `opaque` marker, the `00`..`ff`
root whiteouts and the whiteout-parent markers disappear.

Every problem with the bytes raises `CorruptImageError` (message says which nid / offset).  Sizes
read from the image are checked against the image length before anything is sliced or allocated,
each directory is entered at most once (no loops), and the total number of directory entries is
capped by what the image could hold, so time and memory stay proportional to the image size.

Speed (a whole 64k-inode tree is read by every flatten from an image, first diff, gc and fsck): the
whole-tree walk (`_fill`) decodes each directory block with one struct call, and each inode of a common
form (no xattrs; an external file's metacopy/redirect pair, inline or shared) with `_block_decoder`,
with the same checks as the general per-inode path (`_rec`/`_make`), which takes every other form and
every inode that fails a check, so the two never disagree (tests/test_erofs_hostile.py damages images
to check that).  Every layout size and struct comes from `format`, as in the writer.

Where it was built, `root()` first tries the compiled whole-tree read (image/_cread.c, picked by
image/accel.py; `FLATMOUNT_PURE=1` turns it off).  It takes only valid images of the common forms and
gives up (returns None) on anything else: damage of any kind, whiteout files to convert, a bound that
fails, an xattr name `_xname` refuses.  This Python code then reads the same bytes, so it stays the
specification and the only place that words an error (tests/test_cread.py runs both on the same
images, damaged ones included, and compares trees, dumps and messages).
"""

from __future__ import annotations

import gc
import mmap
import os
import struct
from bisect import bisect_left
from collections.abc import Callable, Generator
from operator import lt as _lt
from operator import sub as _sub

import flatmount.image.accel as accel
import flatmount.image.format as fmt
from flatmount.errors import CorruptImageError
from flatmount.image.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, Inode, split_path

__all__ = ["Image", "read_tree", "collect_objects"]

NS = 1_000_000_000

_FTYPE = {k: int(v) for k, v in fmt.FTYPE_BY_IFMT.items()}
_PREFIX = {int(k): v for k, v in fmt.XATTR_READ_PREFIXES.items()}
_HEX_NAMES = frozenset(b"%02x" % i for i in range(256))
# byte values: `find` with an int searches at once (with a bytes needle it is slower, and `in` even more so)
_SLASH = 0x2F
_NUL = 0
_PLAIN = fmt.DataLayout.FLAT_PLAIN
_INLINE = fmt.DataLayout.FLAT_INLINE
_CHUNK = fmt.DataLayout.CHUNK_BASED
_LAYOUTS = frozenset((int(_PLAIN), int(_INLINE), int(_CHUNK)))
_SUPPORTED_INCOMPAT = (fmt.FeatureIncompat.ZERO_PADDING | fmt.FeatureIncompat.CHUNKED_FILE
                       | fmt.FeatureIncompat.DEVICE_TABLE)
_SB = fmt.SUPER_OFFSET        # message offsets of superblock fields: _SB + fmt.SUPERBLOCK_AT[field]

# layout sizes (format.py), by short names for the arithmetic of the hot loops
COMPACT = fmt.INODE_COMPACT_SIZE
EXTENDED = fmt.INODE_EXTENDED_SIZE
SLOTBITS = fmt.ISLOTBITS
XHDR = fmt.XATTR_HEADER_SIZE   # an xattr body: header, shared ids, entries padded to XATTR_ALIGN
XID = fmt.XATTR_ID_SIZE
XENT = fmt.XATTR_ENTRY_SIZE
XPAD = fmt.XATTR_ALIGN - 1
DIRENT = fmt.DIRENT_SIZE
DIRENT_FIELDS = len(fmt.Dirent._fields)   # a block's dirents unpack into this many values each
_NAMEOFF = fmt.DIRENT_AT["nameoff"]
_FT_MIN = int(fmt.FileType.REG_FILE)   # a dirent's file type: known, and not UNKNOWN
_FT_MAX = int(fmt.FileType.SYMLINK)
_MCH = len(fmt.METACOPY_HEADER)
_CHUNK_FORMATS_READ = fmt.CHUNK_FORMAT_BLKBITS_MASK | fmt.CHUNK_FORMAT_INDEXES   # 48-bit: not taken

# The usual xattr bodies of an external file (EROFS.md section 8): a metacopy and a redirect, each
# inline or shared.  Both inline: header, metacopy entry (head, suffix, header + digest), redirect entry
# (head, suffix, "/" + path, padding).  Metacopy shared: header, its id, redirect entry.  Both shared:
# header and two ids.
_MC_SUFFIX = b"overlay.metacopy"
_RD_SUFFIX = b"overlay.redirect"
_MC_ENTRY = fmt.XATTR_ENTRY.pack(len(_MC_SUFFIX), fmt.XattrIndex.TRUSTED, fmt.METACOPY_SIZE) + _MC_SUFFIX
_RD_HEAD = XENT + len(_RD_SUFFIX)                       # a redirect entry before its value
assert len(_MC_SUFFIX) == len(_RD_SUFFIX)               # (so a metacopy entry's head is as long)
_MIN_REDIRECT = 2                                       # "/" and one byte
_RD_AT_BOTH_INLINE = XHDR + len(_MC_ENTRY) + fmt.METACOPY_SIZE   # where the redirect entry starts
_RD_AT_MC_SHARED = XHDR + XID
_VSIZE_AT = fmt.XATTR_ENTRY_AT["e_value_size"]
_TWO_SHARED = XHDR + 2 * XID
_BOTH_INLINE: dict[int, tuple[struct.Struct, bytes]] = {}      # redirect length -> (struct, entry head)
_REDIRECT_INLINE: dict[int, tuple[struct.Struct, bytes]] = {}
_MC_BIT = 1 << fmt.xattr_filter_bit(fmt.XattrIndex.TRUSTED, _MC_SUFFIX)
_RD_BIT = 1 << fmt.xattr_filter_bit(fmt.XattrIndex.TRUSTED, _RD_SUFFIX)
_EXTERNAL_BITS = _MC_BIT | _RD_BIT
_ESC = fmt.OVERLAY_ESCAPED_PREFIX
_TOP = fmt.OVERLAY_PREFIX
_NESC = len(_ESC)
_NTOP = len(_TOP)
_WHITEOUT = fmt.OVERLAY_PREFIX + b"whiteout"
_WHITEOUTS = fmt.OVERLAY_PREFIX + b"whiteouts"
# the markers the writer puts on a directory holding whiteouts: (xattr, value, composefs version needed)
_WHITEOUT_PARENT_MARKS = ((_WHITEOUTS, b"", 0), (fmt.USER_OVERLAY_WHITEOUTS, b"", 0),
                          (fmt.OVERLAY_OPAQUE, b"x", 1), (fmt.USER_OVERLAY_OPAQUE, b"x", 1))


def _remember(cache: dict, key, value):
    """`value`, kept in the module-level `cache` unless it is full (hostile images could vary the key)."""
    if len(cache) < 256:
        cache[key] = value
    return value


def _redirect_entry(vlen: int) -> bytes:
    return fmt.XATTR_ENTRY.pack(len(_RD_SUFFIX), fmt.XattrIndex.TRUSTED, vlen) + _RD_SUFFIX


def _rd_entry_size(vlen: int) -> int:
    return (_RD_HEAD + vlen + XPAD) & ~XPAD


def _both_inline_struct(vlen: int) -> tuple[struct.Struct, bytes]:
    """An external file's xattr body after its header, metacopy and redirect (`vlen` bytes) inline, and
    the redirect entry head it must have."""
    return fmt.both_inline_struct(vlen), _redirect_entry(vlen)


def _redirect_inline_struct(vlen: int) -> tuple[struct.Struct, bytes]:
    """The same with the metacopy shared: its shared id, then the inline redirect."""
    return fmt.redirect_inline_struct(vlen), _redirect_entry(vlen)


def _corrupt(msg: str, offset: int | None = None) -> CorruptImageError:
    return CorruptImageError(msg if offset is None else f"{msg} @{offset:#x}", offset)


def _drop_dots(names: list[bytes], nids, ftypes, nid: int, parent: int, doff: int) -> tuple[list, object, object, int]:
    """A directory block's entries without `.` and `..` (checked: `.` is the directory `nid` itself,
    `..` its `parent`), and how many of the two it held (not always adjacent: `-` sorts between)."""
    k1 = bisect_left(names, b".")
    if k1 == len(names) or names[k1][:1] != b".":
        return names, nids, ftypes, 0
    drop = []
    for dot, want in ((b".", nid), (b"..", parent)):
        k = bisect_left(names, dot, k1)
        if k < len(names) and names[k] == dot:
            if nids[k] != want or ftypes[k] != fmt.FileType.DIR:
                raise _corrupt(f"dir {nid}: {dot.decode()!r} points to {nids[k]}"
                               + (f", parent is {parent}" if dot == b".." else ""), doff)
            drop.append(k)
    if drop:
        nids, ftypes = list(nids), list(ftypes)
        for k in reversed(drop):
            del names[k], nids[k], ftypes[k]
    return names, nids, ftypes, len(drop)


def _block_decoder(img: Image, built: dict[int, tuple[Inode, int, bool]], dirs_seen: set[int],
                   push: Callable[[tuple], None]) -> Generator[list, tuple, None]:
    """A generator for one whole-tree read: sent the entries of one directory block as (ents, names,
    nids, ftypes, parent, root_dir), it enters them into the dict `ents` and yields the ones left for
    `_fill`, as (name, nid, file type), each holding its place in `ents` with None (entries stay in
    name order): inodes already read, and every inode not of a common form (no xattrs, or exactly an
    external file's metacopy and redirect, inline or shared) or failing one of the checks of
    `_rec`/`_make`/`_check_chunks`, for the general path to decide (and raise on damage).  A new file
    is remembered in `built` (for its other names), a new directory marked seen and pushed.

    The hot loop of every whole-tree read (flatten, diff, gc, fsck): one step per block, not a call
    per inode (5% of a read); a generator, so that the image's fields below are fast locals (a
    closure's cells cost another 2%); each inode built as `Inode(mode)` with its other fields set by
    name (a keyword call of a class first builds a dict of its arguments, 60% more here)."""
    d = img._d
    n = img._n
    get = img._get
    meta = img._meta
    bs = img._bs
    bits = img._bits
    base_ns = img._epoch * NS + img.superblock.build_time_nsec
    check_filter = img._filter
    compact = fmt.INODE_COMPACT_HEAD.unpack_from
    extended = fmt.INODE_EXTENDED_HEAD.unpack_from
    value_size = fmt.LE16.unpack_from
    ftype_of = _FTYPE.get
    counts = fmt.XATTR_IBODY_COUNTS.unpack_from
    both_inline = _BOTH_INLINE
    redirect_inline = _REDIRECT_INLINE
    mc_header = fmt.METACOPY_HEADER
    shared_mc: dict[int, tuple[int, bytes | None]] = {}
    pairs: dict[tuple[int, ...], tuple | None] = {}      # two shared ids -> (filter bits, digest, payload)
    shared_ids: dict[tuple[int, ...], tuple | None] = {}  # shared ids -> `_external`'s cache
    ext_bit = fmt.I_FORMAT_EXTENDED
    known = fmt.I_FORMAT_KNOWN
    layout_shift = fmt.I_DATALAYOUT_BIT
    path_max = fmt.PATH_MAX
    both_min = _RD_AT_BOTH_INLINE + _rd_entry_size(_MIN_REDIRECT)
    mc_shared_min = _RD_AT_MC_SHARED + _rd_entry_size(_MIN_REDIRECT)
    rd_entry = _RD_HEAD + XPAD       # `(rd_entry + vlen) & ~XPAD`: a redirect entry's size
    # the layout constants as locals too
    slotbits, compact_size, extended_size, xhdr, xid, xpad = SLOTBITS, COMPACT, EXTENDED, XHDR, XID, XPAD
    rd_at_both, rd_at_mc_shared = _RD_AT_BOTH_INLINE, _RD_AT_MC_SHARED
    vsize_at, min_redirect = _VSIZE_AT, _MIN_REDIRECT
    chunk_format = fmt.CHUNK_FORMAT_MASK
    indexes = fmt.CHUNK_FORMAT_INDEXES
    blkbits_mask = fmt.CHUNK_FORMAT_BLKBITS_MASK
    index_size = fmt.CHUNK_INDEX_SIZE
    addr_size = fmt.CHUNK_ADDR_SIZE

    later: list[tuple[bytes, int, int]] = []
    while True:
        ents, names, nids, ftypes, parent, root_dir = yield later
        later = []
        left = later.append
        # each entry ends in `ents[name] = child` (decoded here) or in `ents[name] = None` and
        # `left(...)` (for _fill: it keeps its place in `ents`)
        for name, nid, ftype in zip(names, nids, ftypes, strict=True):
            if nid in built or nid in dirs_seen:   # a hardlink, or a directory named twice
                ents[name] = None
                left((name, nid, ftype))
                continue
            off = meta + (nid << slotbits)
            if off + compact_size > n:
                ents[name] = None
                left((name, nid, ftype))
                continue
            f, icount, mode, _nl, size, mtime, iu, _ino, uid, gid = compact(d, off)
            if not f & ext_bit:
                mt = base_ns + mtime * NS
                xoff = off + compact_size
            else:
                if off + extended_size > n:
                    ents[name] = None
                    left((name, nid, ftype))
                    continue
                _f, icount, mode, _r, size, iu, _ino, uid, gid, mtime, nsec, _nl = extended(d, off)
                if nsec >= NS:
                    ents[name] = None
                    left((name, nid, ftype))
                    continue
                mt = mtime * NS + nsec
                xoff = off + extended_size
            t = mode & S_IFMT
            layout = f >> layout_shift
            xsize = xhdr + xid * (icount - 1) if icount else 0
            data_off = xoff + xsize
            if data_off > n or f & ~known or ftype_of(t) != ftype or layout not in _LAYOUTS:
                ents[name] = None
                left((name, nid, ftype))
                continue
            if t != S_IFREG and (icount or layout == _CHUNK):
                ents[name] = None
                left((name, nid, ftype))
                continue
            child = Inode(mode)
            child.uid = uid
            child.gid = gid
            child.mtime_ns = mt
            if t == S_IFREG:
                if layout == _CHUNK:   # an external file: its chunk map must lie inside the image
                    cfmt = iu & chunk_format
                    unit = index_size if cfmt & indexes else addr_size
                    cb = bits + (cfmt & blkbits_mask)
                    if (cfmt & ~_CHUNK_FORMATS_READ
                            or (data_off + unit - 1) // unit * unit + ((size + (1 << cb) - 1) >> cb) * unit > n):
                        ents[name] = None
                        left((name, nid, ftype))
                        continue
                    child.size = size
                    if not icount:
                        built[nid] = (child, ftype, False)
                        ents[name] = child
                        continue
                    filt, sh = counts(d, xoff)
                    if sh == 0 and xsize >= both_min:   # both inline: one unpack for the whole body
                        vlen = value_size(d, xoff + rd_at_both + vsize_at)[0]
                        if vlen >= min_redirect and rd_at_both + ((rd_entry + vlen) & ~xpad) == xsize:
                            st = both_inline.get(vlen)
                            if st is None:
                                st = _remember(both_inline, vlen, _both_inline_struct(vlen))
                            e1, mch, dg, e2, slash, rest = st[0].unpack_from(d, xoff + xhdr)
                            if (e1 == _MC_ENTRY and mch == mc_header and e2 == st[1] and slash == b"/"
                                    and not (filt & _EXTERNAL_BITS and check_filter)):
                                child.digest = dg
                                child.payload = rest.decode("utf-8", "surrogateescape")
                                built[nid] = (child, ftype, False)
                                ents[name] = child
                                continue
                    elif sh == 1 and xsize >= mc_shared_min:   # metacopy shared, redirect inline
                        vlen = value_size(d, xoff + rd_at_mc_shared + vsize_at)[0]
                        if vlen >= min_redirect and rd_at_mc_shared + ((rd_entry + vlen) & ~xpad) == xsize:
                            st = redirect_inline.get(vlen)
                            if st is None:
                                st = _remember(redirect_inline, vlen, _redirect_inline_struct(vlen))
                            sid, e2, slash, rest = st[0].unpack_from(d, xoff + xhdr)
                            mc = shared_mc.get(sid)
                            if mc is None:
                                mc = img._shared_metacopy(sid, nid, shared_mc)
                            if (mc is not None and e2 == st[1] and slash == b"/"
                                    and not (filt & (mc[0] | _RD_BIT) and check_filter)):
                                child.digest = mc[1]
                                child.payload = rest.decode("utf-8", "surrogateescape")
                                built[nid] = (child, ftype, False)
                                ents[name] = child
                                continue
                    if not img._external_into(child, filt, sh, xoff, xsize, data_off, nid, pairs, shared_ids):
                        ents[name] = None
                        left((name, nid, ftype))
                        continue
                    built[nid] = (child, ftype, False)
                    ents[name] = child
                    continue
                if icount:
                    ents[name] = None
                    left((name, nid, ftype))
                    continue
                if size:   # inline content
                    if not (layout == _INLINE and size <= bs and data_off + size <= n and data_off % bs + size <= bs):
                        ents[name] = None
                        left((name, nid, ftype))
                        continue
                    child.size = size
                    child.content = get(data_off, data_off + size)
                built[nid] = (child, ftype, False)
                ents[name] = child
                continue
            if t == S_IFDIR:
                child.size = size
                dirs_seen.add(nid)
                push((nid, off, size, layout, iu, data_off, child, parent, False))
                ents[name] = child
                continue
            if t == S_IFLNK:
                if not (0 < size < path_max and layout == _INLINE and size <= bs and data_off + size <= n
                        and data_off % bs + size <= bs):
                    ents[name] = None
                    left((name, nid, ftype))
                    continue
                child.size = size
                child.target = get(data_off, data_off + size)
            elif t == S_IFCHR or t == S_IFBLK:
                child.rdev = iu
                if not iu and root_dir and t == S_IFCHR and name in _HEX_NAMES:
                    built[nid] = (child, ftype, False)
                    continue   # the writer's own 00..ff root whiteouts
            built[nid] = (child, ftype, False)
            ents[name] = child
            continue



class _Rec:
    """One parsed on-disk inode (before the composefs rewriting is undone)."""

    __slots__ = ("nid", "off", "mode", "nlink", "size", "uid", "gid", "mtime_ns", "iu", "layout",
                 "isize", "xoff", "xsize", "data_off")


class Image:
    """A composefs/EROFS image held in memory (bytes, memoryview or mmap); see the module docstring."""

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap):
        self._mmap: mmap.mmap | None = None
        try:
            self._setup(data)
        except CorruptImageError:
            raise
        except Exception as e:  # struct.error, IndexError, ValueError, OverflowError, ...
            raise CorruptImageError(f"invalid image: {type(e).__name__}: {e}") from None

    @classmethod
    def open(cls, path: str | os.PathLike) -> Image:
        """Map the image file read-only; call `close()` (or use `with`) when done."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CorruptImageError(f"{os.fspath(path)}: empty image file", 0)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            img = cls(mm)
        except BaseException:
            mm.close()
            raise
        img._mmap = mm
        return img

    def close(self) -> None:
        if self._mmap is not None:
            self._d = b""
            self._mmap.close()
            self._mmap = None

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- setup ------------------------------------------------------------------------------------
    def _setup(self, data) -> None:
        if isinstance(data, (bytes, mmap.mmap)):
            d = data
            self._get: Callable[[int, int], bytes] = lambda a, b: d[a:b]
        else:
            d = memoryview(data).cast("B")
            self._get = lambda a, b: d[a:b].tobytes()
        self._d = d
        n = self._n = len(d)
        if n < fmt.SUPER_OFFSET + fmt.SUPERBLOCK.size:
            raise _corrupt(f"image truncated: {n} bytes, no room for a superblock")
        hdr = fmt.ComposefsHeader._make(fmt.COMPOSEFS_HEADER.unpack_from(d, 0))
        self.header: fmt.ComposefsHeader | None = None
        self.composefs_version: int | None = None
        if hdr.magic == fmt.COMPOSEFS_MAGIC:
            if hdr.version != fmt.COMPOSEFS_HEADER_VERSION:
                raise _corrupt(f"unsupported composefs header version {hdr.version}",
                               fmt.COMPOSEFS_HEADER_AT["version"])
            self.header = hdr
            self.composefs_version = hdr.composefs_version
        sb = self.superblock = fmt.Superblock._make(fmt.SUPERBLOCK.unpack_from(d, fmt.SUPER_OFFSET))
        if sb.magic != fmt.SUPER_MAGIC:
            raise _corrupt(f"bad EROFS magic {sb.magic:#x}", fmt.SUPER_OFFSET)
        if not fmt.MIN_BLKSZBITS <= sb.blkszbits <= fmt.BLKSZBITS:
            raise _corrupt(f"unsupported block size 2^{sb.blkszbits}", _SB + fmt.SUPERBLOCK_AT["blkszbits"])
        bs = self._bs = 1 << sb.blkszbits
        self._bits = sb.blkszbits
        if sb.feature_compat & fmt.FeatureCompat.SB_CHKSUM:
            ln = bs - fmt.SUPER_OFFSET if bs > fmt.SUPER_OFFSET else bs
            if n < fmt.SUPER_OFFSET + ln:
                raise _corrupt("image truncated inside the superblock block")
            raw = bytearray(self._get(fmt.SUPER_OFFSET, fmt.SUPER_OFFSET + ln))
            raw[fmt.SB_CHECKSUM] = bytes(fmt.SB_CHECKSUM.stop - fmt.SB_CHECKSUM.start)
            if fmt.crc32c_linux(bytes(raw)) != sb.checksum:
                raise _corrupt("superblock checksum mismatch", _SB + fmt.SB_CHECKSUM.start)
        if sb.dirblkbits != 0:
            raise _corrupt(f"dirblkbits {sb.dirblkbits} != 0", _SB + fmt.SUPERBLOCK_AT["dirblkbits"])
        bad = sb.feature_incompat & ~_SUPPORTED_INCOMPAT
        if bad:
            raise _corrupt(f"unsupported incompatible features {bad:#x}", _SB + fmt.SUPERBLOCK_AT["feature_incompat"])
        if sb.blocks * bs > n:
            raise _corrupt(f"image truncated: superblock says {sb.blocks} blocks, file has {n} bytes")
        if not 0 <= sb.build_time_nsec < NS:
            raise _corrupt(f"bad build_time_nsec {sb.build_time_nsec}", _SB + fmt.SUPERBLOCK_AT["build_time_nsec"])
        self._meta = sb.meta_blkaddr * bs
        self._xbase = sb.xattr_blkaddr * bs
        self._epoch = sb.build_time
        self._root_nid = sb.root_nid
        self._filter = bool(sb.feature_compat & fmt.FeatureCompat.XATTR_FILTER) and not sb.xattr_filter_reserved
        self._bitcache: dict[tuple[int, bytes], tuple[bytes, int]] = {}
        self._shared: dict[int, tuple[bytes, bytes, int]] = {}
        # every dirent takes DIRENT bytes of image, so a sane image never holds more entries than this
        self._max_dirents = n // DIRENT + 16
        self._dirents_seen = 0
        root = self._rec(self._root_nid)
        if root.mode & S_IFMT != S_IFDIR:
            raise _corrupt(f"root inode {self._root_nid} is not a directory", root.off)

    # --- raw records ------------------------------------------------------------------------------
    def _rec(self, nid: int) -> _Rec:
        off = self._meta + (nid << SLOTBITS)
        n = self._n
        if off + COMPACT > n:
            raise _corrupt(f"inode {nid} beyond the end of the image", off)
        d = self._d
        r = _Rec()
        r.nid = nid
        r.off = off
        ifmt = fmt.LE16.unpack_from(d, off)[0]
        if ifmt & ~fmt.I_FORMAT_KNOWN:
            raise _corrupt(f"inode {nid}: unsupported i_format {ifmt:#x}", off)
        layout = ifmt >> fmt.I_DATALAYOUT_BIT
        if ifmt & fmt.I_FORMAT_EXTENDED:
            if off + EXTENDED > n:
                raise _corrupt(f"inode {nid}: extended inode truncated", off)
            (_f, icount, mode, _r, size, iu, _ino, uid, gid, mtime, nsec,
             nlink) = fmt.INODE_EXTENDED_HEAD.unpack_from(d, off)
            if nsec >= NS:
                raise _corrupt(f"inode {nid}: bad mtime nsec {nsec}", off + fmt.INODE_EXTENDED_AT["i_mtime_nsec"])
            r.mtime_ns = mtime * NS + nsec
            r.isize = EXTENDED
        else:
            (_f, icount, mode, nlink, size, mtime, iu, _ino, uid,
             gid) = fmt.INODE_COMPACT_HEAD.unpack_from(d, off)
            r.mtime_ns = (self._epoch + mtime) * NS + self.superblock.build_time_nsec
            r.isize = COMPACT
        t = mode & S_IFMT
        if t not in _FTYPE:
            raise _corrupt(f"inode {nid}: bad file type in mode {mode:#o}", off + fmt.INODE_COMPACT_AT["i_mode"])
        if layout not in (_PLAIN, _INLINE, _CHUNK):
            raise _corrupt(f"inode {nid}: unsupported data layout {layout}", off)
        if layout == _CHUNK and t != S_IFREG:
            raise _corrupt(f"inode {nid}: chunk-based layout on a non-regular file", off)
        xsize = XHDR + XID * (icount - 1) if icount else 0
        r.mode = mode
        r.nlink = nlink
        r.size = size
        r.uid = uid
        r.gid = gid
        r.iu = iu
        r.layout = layout
        r.xoff = off + r.isize
        r.xsize = xsize
        r.data_off = off + r.isize + xsize
        if r.data_off > n:
            raise _corrupt(f"inode {nid}: xattrs beyond the end of the image", off)
        return r

    def _data(self, r: _Rec) -> bytes:
        """The data of a flat (plain or inline) inode, bounded by the image."""
        size = r.size
        if size == 0:
            return b""
        bs = self._bs
        n = self._n
        if size > n:
            raise _corrupt(f"inode {r.nid}: size {size} larger than the image", r.off)
        if r.layout == _PLAIN:
            start = r.iu * bs
            if start + size > n:
                raise _corrupt(f"inode {r.nid}: data blocks beyond the end of the image", r.off)
            return self._get(start, start + size)
        if r.layout != _INLINE:
            raise _corrupt(f"inode {r.nid}: unexpected data layout {r.layout}", r.off)
        nb = (size + bs - 1) >> self._bits
        head = (nb - 1) * bs
        tail = size - head
        t0 = r.data_off
        if t0 + tail > n or (t0 % bs) + tail > bs:
            raise _corrupt(f"inode {r.nid}: inline data crosses a block or the image end", t0)
        if head:
            start = r.iu * bs
            if start + head > n:
                raise _corrupt(f"inode {r.nid}: data blocks beyond the end of the image", r.off)
            return self._get(start, start + head) + self._get(t0, t0 + tail)
        return self._get(t0, t0 + tail)

    def _xattrs(self, r: _Rec) -> list[tuple[bytes, bytes]]:
        """The raw xattrs of an inode: inline entries, then shared ones; filter bits checked."""
        if not r.xsize:
            return []
        d = self._d
        start = r.xoff
        end = start + r.xsize
        filt, shared = fmt.XATTR_IBODY_COUNTS.unpack_from(d, start)
        p = start + XHDR
        if p + XID * shared > end:
            raise _corrupt(f"inode {r.nid}: {shared} shared xattr ids do not fit the xattr body", start)
        p += XID * shared
        out: list[tuple[bytes, bytes]] = []
        bits = 0
        get = self._get
        cache = self._bitcache
        entry = fmt.XATTR_ENTRY.unpack_from
        while p < end:
            if p + XENT > end:
                raise _corrupt(f"inode {r.nid}: truncated xattr entry", p)
            nlen, idx, vlen = entry(d, p)
            q = p + XENT + nlen
            if q + vlen > end:
                raise _corrupt(f"inode {r.nid}: xattr entry overruns the xattr body", p)
            suffix = get(p + XENT, q)
            key = (idx, suffix)
            info = cache.get(key)
            if info is None:
                info = cache[key] = (self._xname(idx, suffix, r.nid, p), 1 << fmt.xattr_filter_bit(idx, suffix))
            bits |= info[1]
            out.append((info[0], get(q, q + vlen)))
            p += (XENT + nlen + vlen + XPAD) & ~XPAD
        if shared:
            scache = self._shared
            for sid in fmt.xattr_ids_struct(shared).unpack_from(d, start + XHDR):
                ent = scache.get(sid)
                if ent is None:
                    ent = scache[sid] = self._shared_entry(sid, r.nid)
                bits |= ent[2]
                out.append(ent[:2])
        if len(out) > 1 and len(dict(out)) != len(out):
            raise _corrupt(f"inode {r.nid}: duplicate xattr names", start)
        if filt & bits and self._filter:
            raise _corrupt(f"inode {r.nid}: xattr name filter hides a present xattr", start)
        return out

    def _shared_entry(self, sid: int, nid: int) -> tuple[bytes, bytes, int]:
        """(name, value, filter bit) of shared xattr `sid` (first needed by inode `nid`)."""
        p = self._xbase + fmt.XATTR_ALIGN * sid   # an id counts XATTR_ALIGN units
        n = self._n
        if p + XENT > n:
            raise _corrupt(f"inode {nid}: shared xattr id {sid} beyond the end of the image", p)
        nlen, idx, vlen = fmt.XATTR_ENTRY.unpack_from(self._d, p)
        q = p + XENT + nlen
        if q + vlen > n:
            raise _corrupt(f"inode {nid}: shared xattr {sid} overruns the image", p)
        suffix = self._get(p + XENT, q)
        key = (idx, suffix)
        info = self._bitcache.get(key)
        if info is None:
            info = self._bitcache[key] = (self._xname(idx, suffix, nid, p), 1 << fmt.xattr_filter_bit(idx, suffix))
        return info[0], self._get(q, q + vlen), info[1]

    @staticmethod
    def _xname(idx: int, suffix: bytes, nid: int, p: int) -> bytes:
        prefix = _PREFIX.get(idx)
        if prefix is None:
            raise _corrupt(f"inode {nid}: unsupported xattr name index {idx:#x}", p)
        name = prefix + suffix
        if not name or b"\0" in suffix:
            raise _corrupt(f"inode {nid}: invalid xattr name {name!r}", p)
        return name

    def _nblocks(self, r: _Rec) -> int:
        return (r.size + self._bs - 1) >> self._bits

    def _block(self, r: _Rec, b: int, nb: int) -> list[tuple[bytes, int, int]]:
        """Entries (name, nid, file type) of directory block `b` of `nb`, validated and sorted."""
        names, nids, ftypes = self._dirblock(r.nid, r.off, r.size, r.layout, r.iu, r.data_off, b, nb)
        return list(zip(names, nids, ftypes, strict=True))

    def _dirblock(self, nid: int, off: int, size: int, layout: int, iu: int, data_off: int, b: int,
                  nb: int) -> tuple[list[bytes], tuple[int, ...], tuple[int, ...]]:
        """Names, nids and file types of directory block `b` of `nb` (directory inode `nid` at `off`),
        validated and sorted; the dirents are unpacked in one call and checked with C-level loops."""
        bs = self._bs
        if layout == _INLINE and b == nb - 1:
            a = data_off
            blen = size - b * bs
            if a + blen > self._n or (a % bs) + blen > bs:
                raise _corrupt(f"dir {nid}: inline block crosses a block or the image end", a)
        elif layout == _PLAIN or layout == _INLINE:
            a = (iu + b) * bs
            blen = min(bs, size - b * bs)
            if a + blen > self._n:
                raise _corrupt(f"dir {nid}: block {b} beyond the end of the image", off)
        else:
            raise _corrupt(f"dir {nid}: unsupported data layout {layout}", off)
        blk = self._get(a, a + blen)
        if blen < DIRENT:
            raise _corrupt(f"dir {nid}: directory block {b} too short", a)
        first = fmt.LE16.unpack_from(blk, _NAMEOFF)[0]   # the names start after the dirents
        if first < DIRENT or first % DIRENT or first >= blen:
            raise _corrupt(f"dir {nid}: bad first name offset {first} in block {b}", a)
        cnt = first // DIRENT
        self._dirents_seen += cnt
        if self._dirents_seen > self._max_dirents:
            raise _corrupt("more directory entries than the image can hold (shared directory blocks?)", a)
        flat = fmt.dirents_struct(cnt).unpack_from(blk)   # (nid, nameoff, file_type, reserved) * cnt
        offs = list(flat[1::DIRENT_FIELDS])
        last = offs[-1]
        end = blk.find(b"\0", last)
        if end < 0:
            end = blen
        if last >= end or last > blen:
            raise _corrupt(f"dir {nid}: bad last name offset in block {b}", a)
        if blk.find(_SLASH, first, end) >= 0:
            raise _corrupt(f"dir {nid}: entry name with '/' in block {b}", a)
        if offs[0] != first:
            raise _corrupt(f"dir {nid}: bad first name offset in block {b}", a)
        offs.append(end)
        gaps = list(map(_sub, offs[1:], offs))
        if min(gaps) <= 0 or max(gaps) > fmt.NAME_LEN:
            k = next(k for k, g in enumerate(gaps) if not 0 < g <= fmt.NAME_LEN)
            raise _corrupt(f"dir {nid}: bad name offsets in block {b}, entry {k}", a + DIRENT * k)
        names = [blk[x:y] for x, y in zip(offs, offs[1:], strict=False)]
        ftypes = flat[2::DIRENT_FIELDS]
        if min(ftypes) < _FT_MIN or max(ftypes) > _FT_MAX or not all(map(_lt, names, names[1:])):
            k = next(k for k in range(cnt)
                     if not _FT_MIN <= ftypes[k] <= _FT_MAX or (k and names[k] <= names[k - 1]))
            raise _corrupt(f"dir {nid}: unsorted entry or bad file type at {names[k]!r}", a + offs[k])
        if blk.find(_NUL, first, end) >= 0:
            raise _corrupt(f"dir {nid}: NUL inside an entry name in block {b}", a)
        return names, flat[0::DIRENT_FIELDS], ftypes

    # --- rewriting undone ---------------------------------------------------------------------------
    def _make(self, r: _Rec) -> tuple[Inode, bool]:
        """Inode from a record; second value: True if it is a composefs-escaped whiteout file."""
        mode = r.mode
        t = mode & S_IFMT
        xattrs: dict[bytes, bytes] = {}
        metacopy = redirect = None
        for name, value in self._xattrs(r):
            if name[:_NTOP] == _TOP:
                if name[:_NESC] == _ESC:
                    name = _TOP + name[_NESC:]
                elif name == fmt.OVERLAY_METACOPY:
                    if t == S_IFREG:
                        metacopy = value
                    continue
                elif name == fmt.OVERLAY_REDIRECT:
                    if t == S_IFREG:
                        redirect = value
                    continue
                else:  # the root's own opaque marker and other unescaped overlay xattrs
                    continue
            xattrs[name] = value
        node = Inode(mode, uid=r.uid, gid=r.gid, mtime_ns=r.mtime_ns, xattrs=xattrs)
        converted = False
        if t == S_IFREG:
            if r.layout == _CHUNK:
                self._check_chunks(r)
                node.size = r.size
                if metacopy:
                    if len(metacopy) != fmt.METACOPY_SIZE or metacopy[:_MCH] != fmt.METACOPY_HEADER:
                        raise _corrupt(f"inode {r.nid}: unsupported metacopy value", r.xoff)
                    node.digest = metacopy[_MCH:]
                if redirect is not None:
                    if len(redirect) < _MIN_REDIRECT or redirect[:1] != b"/":
                        raise _corrupt(f"inode {r.nid}: redirect {redirect[:80]!r} is not absolute", r.xoff)
                    node.payload = redirect[1:].decode("utf-8", "surrogateescape")
            else:
                data = self._data(r)
                node.size = len(data)
                if data:
                    node.content = data
                if xattrs.get(_WHITEOUT) == b"" and r.size == 0:
                    del xattrs[_WHITEOUT]
                    if xattrs.get(fmt.USER_OVERLAY_WHITEOUT) == b"":
                        del xattrs[fmt.USER_OVERLAY_WHITEOUT]
                    node.mode = S_IFCHR | (mode & ~S_IFMT)
                    converted = True
        elif t == S_IFDIR:
            node.size = r.size
            node.entries = {}
        elif t == S_IFLNK:
            if not 0 < r.size < fmt.PATH_MAX:
                raise _corrupt(f"inode {r.nid}: bad symlink size {r.size}", r.off)
            node.target = self._data(r)
            node.size = r.size
        elif t == S_IFCHR or t == S_IFBLK:
            node.rdev = r.iu
        return node, converted

    def _check_chunks(self, r: _Rec) -> None:
        cfmt = r.iu & fmt.CHUNK_FORMAT_MASK
        if cfmt & fmt.CHUNK_FORMAT_48BIT or cfmt & ~fmt.CHUNK_FORMAT_KNOWN:
            raise _corrupt(f"inode {r.nid}: unsupported chunk format {cfmt:#x}", r.off + fmt.INODE_COMPACT_AT["i_u"])
        bits = self._bits + (cfmt & fmt.CHUNK_FORMAT_BLKBITS_MASK)
        unit = fmt.CHUNK_INDEX_SIZE if cfmt & fmt.CHUNK_FORMAT_INDEXES else fmt.CHUNK_ADDR_SIZE
        nchunks = (r.size + (1 << bits) - 1) >> bits
        start = (r.data_off + unit - 1) // unit * unit
        if start + nchunks * unit > self._n:
            raise _corrupt(f"inode {r.nid}: chunk map beyond the end of the image", start)

    def _fill(self, rec: _Rec, node: Inode, parent_nid: int, is_root: bool) -> None:
        """Read the directory `rec` into `node` and everything below it (iteratively, each dir once).

        This is the hot loop of every whole-tree read (flatten, diff, gc, fsck): each inode is decoded
        once, by `_block_decoder` when it has a common form, else by the general path (`_entry`), which
        raises on damage; a hardlinked inode is found again in `built`."""
        stack = [(rec.nid, rec.off, rec.size, rec.layout, rec.iu, rec.data_off, node, parent_nid, is_root)]
        push = stack.append
        dirs_seen = {rec.nid}
        built: dict[int, tuple[Inode, int, bool]] = {}   # non-directories: (inode, file type, converted)
        built_get = built.get
        decoder = _block_decoder(self, built, dirs_seen, push)
        next(decoder)
        bs = self._bs
        bits = self._bits
        while stack:
            nid, doff, dsize, dlayout, diu, ddata, dnode, parent, root_dir = stack.pop()
            nb = (dsize + bs - 1) >> bits
            ents = dnode.entries
            has_whiteouts = False
            dots = 0
            prev = b""
            for b in range(nb):
                names, nids, ftypes = self._dirblock(nid, doff, dsize, dlayout, diu, ddata, b, nb)
                if names[0] <= prev:
                    raise _corrupt(f"dir {nid}: entries not sorted across blocks at {names[0]!r}", doff)
                prev = names[-1]
                names, nids, ftypes, found = _drop_dots(names, nids, ftypes, nid, parent, doff)
                dots += found
                for name, cnid, ftype in decoder.send((ents, names, nids, ftypes, nid, root_dir)):
                    hit = built_get(cnid)
                    if hit is not None:
                        child, ctype, converted = hit
                        if ctype != ftype:
                            raise _corrupt(f"dir {nid}: entry {name!r} type {ftype} != inode {cnid} type", doff)
                    elif cnid in dirs_seen:
                        raise _corrupt(f"dir {nid}: entry {name!r} links directory {cnid} again", doff)
                    else:   # every other form, and damage
                        child, converted = self._entry(cnid, ftype, nid, name, doff, push, dirs_seen)
                        if child.entries is None:
                            built[cnid] = (child, ftype, converted)
                    if converted:
                        has_whiteouts = True
                    elif root_dir and name in _HEX_NAMES and child.is_whiteout:
                        del ents[name]   # the writer's own 00..ff root whiteouts
                        continue
                    ents[name] = child   # (in the place the decoder kept for it: entries stay in order)
            if dots != 2:
                raise _corrupt(f"dir {nid}: missing '.' or '..'", doff)
            if has_whiteouts:
                self._unmark_whiteout_parent(dnode)

    def _entry(self, nid: int, ftype: int, parent: int, name: bytes, doff: int, push: Callable[[tuple], None],
               dirs_seen: set[int]) -> tuple[Inode, bool]:
        """The general path of `_fill` for inode `nid` (entry `name` of type `ftype` in directory
        `parent`): `_rec`/`_make`, which raise on damage; a directory is `push`ed."""
        rec = self._rec(nid)
        t = rec.mode & S_IFMT
        if _FTYPE[t] != ftype:
            raise _corrupt(f"dir {parent}: entry {name!r} type {ftype} != inode {nid} type", doff)
        child, converted = self._make(rec)
        if t == S_IFDIR:
            dirs_seen.add(nid)
            push((nid, rec.off, rec.size, rec.layout, rec.iu, rec.data_off, child, parent, False))
        return child, converted

    def _unmark_whiteout_parent(self, dnode: Inode) -> None:
        """Drop the markers the writer put on a directory because it holds whiteouts."""
        x = dnode.xattrs
        version = self.composefs_version or 0
        for key, val, since in _WHITEOUT_PARENT_MARKS:
            if x.get(key) == val and version >= since:
                del x[key]

    def _external_into(self, child: Inode, filt: int, sh: int, xoff: int, xsize: int, data_off: int, nid: int,
                       pairs: dict, shared_ids: dict) -> bool:
        """Set the digest and payload of a chunk-based file from its xattr body; False if the body is
        not just a valid metacopy and redirect.  `filt`, `sh`: the body's name filter and shared count.
        (`_block_decoder` takes the two commonest bodies itself: both inline, and metacopy shared.)
        `pairs`, `shared_ids`: per-read caches by shared ids."""
        if sh == 2 and xsize == _TWO_SHARED:
            key = fmt.TWO_XATTR_IDS.unpack_from(self._d, xoff + XHDR)
            pair = pairs.get(key, 0)
            if pair == 0:
                pair = self._shared_external(key, nid)
                ext = pair and self._checked_external(pair[1], pair[2])
                pair = pairs[key] = ext and (pair[0], *ext)
            if pair is not None and not (filt & pair[0] and self._filter):
                child.digest = pair[1]
                child.payload = pair[2]
                return True
        ext = self._external(xoff, data_off, nid, shared_ids)   # any other combination of the two
        if ext is None:
            return False
        child.digest, child.payload = ext
        return True

    def _shared_metacopy(self, sid: int, nid: int, cache: dict[int, tuple[int, bytes | None]]
                         ) -> tuple[int, bytes | None] | None:
        """(filter bit, digest or None) if shared xattr `sid` is a metacopy `_make` accepts (empty or
        header + digest); else None (the general path decides).  `nid`: the inode naming it."""
        ent = self._shared.get(sid)
        if ent is None:
            if not 0 <= self._xbase + fmt.XATTR_ALIGN * sid < self._n:
                return None
            ent = self._shared[sid] = self._shared_entry(sid, nid)
        if ent[0] != fmt.OVERLAY_METACOPY:
            return None
        value = ent[1]
        if not value:
            out = (ent[2], None)
        elif len(value) == fmt.METACOPY_SIZE and value[:_MCH] == fmt.METACOPY_HEADER:
            out = (ent[2], value[_MCH:])
        else:
            return None
        cache[sid] = out
        return out

    def _external(self, start: int, end: int, nid: int, shared: dict
                  ) -> tuple[bytes | None, str | None] | None:
        """(digest, payload) of a chunk-based file whose xattr body (`start`..`end`) holds exactly a
        metacopy and/or a redirect, inline or shared, valid as `_xattrs`/`_make` require; None for
        anything else (the general path then decides).  `shared`: per-read cache by shared ids."""
        d = self._d
        get = self._get
        filt, sh = fmt.XATTR_IBODY_COUNTS.unpack_from(d, start)
        p = start + XHDR + XID * sh
        if p > end:
            return None
        mc = rd = None
        bits = 0
        if sh:
            ids = fmt.xattr_ids_struct(sh).unpack_from(d, start + XHDR)
            ent = shared.get(ids, 0)
            if ent == 0:
                ent = shared[ids] = self._shared_external(ids, nid)
            if ent is None:
                return None
            bits, mc, rd = ent
        entry = fmt.XATTR_ENTRY.unpack_from
        while p < end:   # inline entries: each a metacopy or a redirect (suffixes of one length)
            if p + _RD_HEAD > end:
                return None
            nlen, idx, vlen = entry(d, p)
            q = p + _RD_HEAD
            if nlen != len(_RD_SUFFIX) or idx != fmt.XattrIndex.TRUSTED or q + vlen > end:
                return None
            suffix = get(p + XENT, q)
            if suffix == _MC_SUFFIX and mc is None:
                mc = get(q, q + vlen)
                bits |= _MC_BIT
            elif suffix == _RD_SUFFIX and rd is None:
                rd = get(q, q + vlen)
                bits |= _RD_BIT
            else:
                return None
            p += _rd_entry_size(vlen)
        if filt & bits and self._filter:
            return None
        return self._checked_external(mc, rd)

    @staticmethod
    def _checked_external(mc: bytes | None, rd: bytes | None) -> tuple[bytes | None, str | None] | None:
        """(digest, payload) from a metacopy and a redirect value as `_make` accepts them, else None."""
        digest = payload = None
        if mc:
            if len(mc) != fmt.METACOPY_SIZE or mc[:_MCH] != fmt.METACOPY_HEADER:
                return None
            digest = mc[_MCH:]
        if rd is not None:
            if len(rd) < _MIN_REDIRECT or rd[:1] != b"/":
                return None
            payload = rd[1:].decode("utf-8", "surrogateescape")
        return digest, payload

    def _shared_external(self, ids: tuple[int, ...], nid: int) -> tuple[int, bytes | None, bytes | None] | None:
        """(filter bits, metacopy, redirect) of shared xattrs that are only those two (each at most
        once); None otherwise.  `nid`: the inode naming them (for messages)."""
        bits = 0
        mc = rd = None
        scache = self._shared
        for sid in ids:
            ent = scache.get(sid)
            if ent is None:
                ent = scache[sid] = self._shared_entry(sid, nid)
            name, value, bit = ent
            if name == fmt.OVERLAY_METACOPY and mc is None:
                mc = value
            elif name == fmt.OVERLAY_REDIRECT and rd is None:
                rd = value
            else:
                return None
            bits |= bit
        return bits, mc, rd

    # --- public -------------------------------------------------------------------------------------
    def _guard(self, fn, *args):
        """Run a read with every non-CorruptImageError failure wrapped; the cyclic GC is paused
        meanwhile (it would rescan the growing tree every few hundred objects; nothing here is cyclic)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args)
        except CorruptImageError:
            raise
        except Exception as e:
            raise CorruptImageError(f"invalid image: {type(e).__name__}: {e}") from None
        finally:
            if enabled:
                gc.enable()

    def root(self) -> Inode:
        """The whole tree (hardlinks as shared Inode objects)."""
        return self._guard(self._root)

    def _root(self) -> Inode:
        self._dirents_seen = 0
        node = None
        if accel.CREAD is not None:   # the compiled read: None unless it took the whole image
            node = accel.CREAD.read_tree(self._d, self._meta, self._xbase, self._bits, self._epoch,
                                         self.superblock.build_time_nsec, self._root_nid, self._filter,
                                         _name_info)
        if node is None:
            rec = self._rec(self._root_nid)
            node, _ = self._make(rec)
            self._fill(rec, node, rec.nid, True)
        # the whole tree is read (and the GC paused, see _guard): file its objects with the old ones
        # at once (freeze then unfreeze), or the next young collections would walk them all
        gc.freeze()
        gc.unfreeze()
        return node

    def lookup(self, path: bytes | str) -> Inode | None:
        """The inode at `path` (a directory comes with its subtree), or None; reads only what it needs."""
        parts = split_path(path)
        return self._guard(self._lookup, parts)

    def _lookup(self, parts: list[bytes]) -> Inode | None:
        self._dirents_seen = 0
        nid = parent = self._root_nid
        rec = self._rec(nid)
        for depth, name in enumerate(parts):
            if rec.mode & S_IFMT != S_IFDIR:
                return None
            hit = self._find(rec, name)
            if hit is None:
                return None
            cnid, ftype = hit
            crec = self._rec(cnid)
            if _FTYPE[crec.mode & S_IFMT] != ftype:
                raise _corrupt(f"dir {rec.nid}: entry {name!r} type {ftype} != inode {cnid} type", rec.off)
            if depth == 0 and name in _HEX_NAMES and ftype == fmt.FileType.CHRDEV and crec.iu == 0:
                return None
            parent, nid, rec = nid, cnid, crec
        node, _ = self._make(rec)
        if node.entries is not None:
            self._fill(rec, node, parent, nid == self._root_nid)
        return node

    def _find(self, r: _Rec, name: bytes) -> tuple[int, int] | None:
        """Binary search over the directory's blocks (by first and last name), then inside one."""
        nb = self._nblocks(r)
        lo, hi = 0, nb - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            names, nids, ftypes = self._dirblock(r.nid, r.off, r.size, r.layout, r.iu, r.data_off, mid, nb)
            if name < names[0]:
                hi = mid - 1
            elif name > names[-1]:
                lo = mid + 1
            else:
                a = bisect_left(names, name)
                if a < len(names) and names[a] == name:
                    return nids[a], ftypes[a]
                return None
        return None

def _name_info(index: int, suffix: bytes) -> tuple[bytes, int]:
    """(full name, name-filter bit) of an xattr name, for the compiled read (it raises on a name
    `_xname` refuses, and the compiled read then leaves the image to the Python path)."""
    return Image._xname(index, suffix, 0, 0), 1 << fmt.xattr_filter_bit(index, suffix)


def read_tree(path: str | os.PathLike) -> Inode:
    """The tree of the image file at `path`."""
    with Image.open(path) as img:
        return img.root()


def collect_objects(image: Image | bytes | str | os.PathLike) -> set[str]:
    """Object paths (`XX/<62 hex>` or whatever the redirects name) referenced by the image."""
    if isinstance(image, Image):
        root = image.root()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        root = Image(image).root()
    else:
        root = read_tree(image)
    out: set[str] = set()
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        for child in node.entries.values():
            if child.entries is not None:
                stack.append(child)
            elif id(child) not in seen:
                seen.add(id(child))
                p = child.object_path if child.is_external else None
                if p:
                    out.add(p)
    return out
