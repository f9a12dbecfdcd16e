"""Tree -> composefs-layout EROFS metadata image, byte for byte as mkcomposefs (default options) lays it out.

The procedure is EROFS.md section 10, following containers/composefs `lcfs-writer-erofs.c` and
`lcfs-writer.c`, as passes (`_build_image`), each filling in its part of one `_Layout` record:

1. `_queue_inodes`: breadth-first inode order from the root, children by name (bytes order), `.`/`..`
   in every directory, the `00`..`ff` root whiteouts added; nlink counted;
2. `_inode_fields`: the composefs rewriting (virtual; the input tree is never modified): escape
   `trusted.overlay.*` to `trusted.overlay.overlay.*`, add `metacopy`/`redirect` to external files,
   turn whiteouts (char 0:0) into marked empty regular files and mark their parent directory, mark
   the root opaque; sizes, data layouts, inline tails; build_time = the minimum mtime;
3. `_share_xattrs`: (name, value) pairs used by more than one inode become shared xattrs;
4. `_place_inodes`: xattr body sizes, then slot alignment and tail-must-not-cross-a-block padding;
5. `_place_blocks`: the shared xattr area, then the data blocks;
6. `_emit_head`, `_emit_inodes`: everything written into one preallocated, zeroed buffer.

Speed matters (a 64k-inode tree must take well under a second), so the passes work on flat
per-inode lists (columns of the layout) and write with `struct.pack_into` into one bytearray;
per-inode helper calls are avoided in the hot loops on purpose.  Every layout size and struct comes
from `format`.

Compiled fast paths (flatmount/image/_cwrite.c, optional; `accel.CWRITE`, off with FLATMOUNT_PURE=1)
stand in for the per-inode work of passes 1, 2, 4 and 6: `collect` (the walk without `primary`,
hardlinks included), `inode_fields` (the inodes without xattrs, plus the mtime/uid/gid columns; it
returns the others to the Python loop), `place_inodes` and `emit_inodes`, plus `repeated` (pass 3's count of
the digests used more than once) and `emit_shared` (the shared xattr entries).  Those passes wait on memory
more than they compute (the inodes and their slot objects lie scattered over the heap), so their loops
prefetch a few inodes ahead.  They take the valid, common case only: on anything else they give
up (None/False, having changed nothing the Python code reads) and the Python code here, which is the
specification and the one place that words every error, runs the same input.  Tests run both and
compare the bytes (tests/test_cwrite.py).

Deviations from libcomposefs (each only reachable by trees libcomposefs rejects or mishandles):
- a regular file with a digest but no payload gets the redirect `/XX/<62 hex>` derived from the
  digest (libcomposefs writes no redirect then, which overlayfs refuses with data-only layers);
- a directory whose (escaped) `trusted.overlay.opaque` is already `y` keeps `y` when it contains
  whiteouts (libcomposefs overwrites it with the v1 marker `x`, silently dropping opaqueness);
- inline content larger than 8 KiB is written in full (libcomposefs stops after the first block;
  it caps inline content at 5000 bytes anyway).

nlink of a non-directory is the number of its names; mkcomposefs --from-file takes the dump's nlink
field instead, which is the same number for any consistent dump.  The inode of a hardlink group is
queued at its first name in depth-first name order (where a composefs dump puts the real entry).

Kept on purpose for byte compatibility (verified against digests pinned by composefs' test suite,
including the whole cs9-x86_64-minimal image):
- xattr names outside the user./system.posix_acl_*/trusted./security. prefixes are stored whole
  with name index 0 (the kernel does not show them);
- a file so large (> 1023 chunks of 8 TiB) that its 4 KiB NULL chunk map cannot follow the inode
  in the same block gets the map in a data block, although the kernel only looks right after the
  inode.
"""

from __future__ import annotations

import bisect
import gc
import os
import struct
from array import array
from binascii import hexlify as _hexlify
from collections import Counter
from collections.abc import Callable, Iterable
from itertools import accumulate, chain, repeat
from operator import attrgetter, itemgetter

import flatmount.image.accel as accel
import flatmount.image.format as fmt
from flatmount.errors import FormatError
from flatmount.image.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK, Inode
from objects.paths import object_path

TYPE_CHECKING = False  # (typing and collections.abc are slow to import: CLI start-up, see objects/lazy.py)

if TYPE_CHECKING:  # pragma: no cover
    from typing import BinaryIO

__all__ = ["write_image", "image_bytes", "image_buffer", "dir_size"]


# layout sizes (format.py), by short names for the arithmetic of the passes
BLKSZ = fmt.BLKSZ
BLKPAD = BLKSZ - 1                  # `(x + BLKPAD) & ~BLKPAD` rounds up to a block
SLOTBITS = fmt.ISLOTBITS            # nid = byte offset >> SLOTBITS
SLOTPAD = fmt.SLOTSIZE - 1          # inodes start on slots
COMPACT = fmt.INODE_COMPACT_SIZE
EXTENDED = fmt.INODE_EXTENDED_SIZE
XHDR = fmt.XATTR_HEADER_SIZE        # an xattr body: header,
XID = fmt.XATTR_ID_SIZE             # shared ids,
XENT = fmt.XATTR_ENTRY_SIZE         # entries (head, suffix, value),
XPAD = fmt.XATTR_ALIGN - 1          # each padded to XATTR_ALIGN
DIRENT = fmt.DIRENT_SIZE
CHUNK_ENTRY = fmt.CHUNK_ADDR_SIZE   # one entry of a chunk map (composefs writes block maps)
NULL_CHUNK = fmt.NULL_CHUNK
U32 = 0xFFFFFFFF
U16 = 0xFFFF
NS = 1_000_000_000

# dirent file types as plain ints (the hot loops store them by the thousand)
_FT_REG = int(fmt.FileType.REG_FILE)
_FT_DIR = int(fmt.FileType.DIR)
_FT_CHR = int(fmt.FileType.CHRDEV)
_FT_BLK = int(fmt.FileType.BLKDEV)
_FT_FIFO = int(fmt.FileType.FIFO)
_FT_SOCK = int(fmt.FileType.SOCK)
_FT_LNK = int(fmt.FileType.SYMLINK)

_DOT = b"."
_DOTDOT = b".."
# Byte values for membership tests: `0x2F in data` takes bytes' memchr path at once, while `b"/" in data`
# first tries the needle as an integer and raises (and clears) a TypeError every time, 7x the cost.
_SLASH = 0x2F
_HEX_NAMES = [b"%02x" % i for i in range(256)]
_RD_SIZE = 2 + 2 * fmt.DIGEST_SIZE  # len(b"/XX/<62 hex>"): b"/" + hexlify(digest, b"/", _HEX_SPLIT)
_MTIME = attrgetter("mtime_ns")
_UID = attrgetter("uid")
_GID = attrgetter("gid")

_MC = fmt.OVERLAY_METACOPY
_RD = fmt.OVERLAY_REDIRECT
_TOP = fmt.OVERLAY_PREFIX
_ESC = fmt.OVERLAY_ESCAPED_PREFIX
_NTOP = len(_TOP)

_MC0 = (_MC, b"")   # the metacopy item of every external file without a digest: one object
_HEX_SPLIT = fmt.DIGEST_SIZE - 1   # hexlify(digest, b"/", _HEX_SPLIT): "XX/<62 hex>", an object path
_MCH = len(fmt.METACOPY_HEADER)

# the xattr body of an external file whose xattrs are exactly a metacopy and a redirect (`_Layout.forms`)
_OTHER_BODY = 0       # any other body (or not an external file)
_BOTH_INLINE = 1      # metacopy and redirect inline
_MC_SHARED = 2        # metacopy shared, redirect inline
_BOTH_SHARED = 3      # both shared

# data layouts shifted into i_format (plain ints)
_LAYOUT_SHIFT = fmt.I_DATALAYOUT_BIT
_PLAIN = int(fmt.DataLayout.FLAT_PLAIN) << _LAYOUT_SHIFT
_INLINE = int(fmt.DataLayout.FLAT_INLINE) << _LAYOUT_SHIFT
_CHUNK = int(fmt.DataLayout.CHUNK_BASED) << _LAYOUT_SHIFT
_MAX_CHUNK_BITS = fmt.CHUNK_FORMAT_BLKBITS_MASK + fmt.BLKSZBITS   # the largest chunk: 2^this bytes

# (index, suffix, filter bit, suffix length) per full xattr name; names repeat across images
_KEYINFO: dict[bytes, tuple[int, bytes, int, int]] = {}


def _keyinfo(name: bytes) -> tuple[int, bytes, int, int]:
    info = _KEYINFO.get(name)
    if info is None:
        if not name:
            raise FormatError("empty xattr name")
        index, suffix = fmt.xattr_split(name)
        if len(suffix) > fmt.NAME_LEN:   # e_name_len is one byte
            raise FormatError(f"xattr name too long for EROFS: {name[:64]!r}...")
        info = (index, suffix, 1 << fmt.xattr_filter_bit(index, suffix), len(suffix))
        if len(_KEYINFO) < 65536:
            _KEYINFO[name] = info
    return info


def _dir_blocks(names: list[bytes]) -> tuple[list[int], int, int]:
    """Greedy packing of sorted dirent names: (block start indexes, n full blocks, tail bytes).

    `starts` holds the index of the first entry of every block including the tail's.
    """
    starts = [0]
    used = DIRENT * len(names) + sum(map(len, names))
    if used > BLKSZ:  # more than one block: greedy, by binary search over the running sizes
        # bytes taken by the first k entries (each: its dirent and its name), at C speed
        run = list(accumulate(map(DIRENT.__add__, map(len, names)), initial=0))
        a = 0
        while True:
            e = bisect.bisect_right(run, run[a] + BLKSZ) - 1   # entries a..e-1 fit one block
            if e == len(names):
                break
            starts.append(e)
            a = e
        used = run[-1] - run[a]
    nblocks = len(starts) - 1
    if used > fmt.DIR_INLINE_MAX:  # composefs never inlines more than half a block
        nblocks += 1
        used = 0
    return starts, nblocks, used


def dir_size(names: Iterable[bytes]) -> int:
    """EROFS i_size of a directory holding `names` (`.` and `..` are added), as this writer lays it out."""
    allnames = sorted([*names, _DOT, _DOTDOT])
    _, nblocks, tail = _dir_blocks(allnames)
    return nblocks * BLKSZ + tail


def _collect(root: Inode, root_whiteouts: bool, primary: dict[int, tuple[int, bytes]] | None):
    """Breadth-first walk: distinct inodes in queue order plus every directory's sorted names/children.

    `primary` (given only when hardlinks need it) maps id(inode) -> (id(parent dir), name) of the name
    that places a multiply-linked inode in the queue; libcomposefs queues the "real" node of a
    hardlink group, which is its first name in a path-sorted composefs dump.

    Returns (nodes, dnames, dkids, nlink, whiteout_parents, raw_whiteouts, version, dups, nparent,
    dparent): `dups` lists (dir index, name, inode index) of every name of an inode after the one that
    queued it (hardlinks), `nparent` the dir index that queued each inode, `dparent` each dir's parent.
    """
    if root.mode & S_IFMT != S_IFDIR or root.entries is None:
        raise FormatError("the root of an image must be a directory")
    root_ents = root.entries
    raw: set[int] = set()
    if root_whiteouts:
        missing = [h for h in _HEX_NAMES if h not in root_ents]
        if missing:
            root_ents = dict(root_ents)
            sel = root.xattrs.get(fmt.SELINUX) if root.xattrs else None
            for h in missing:
                w = Inode(S_IFCHR | 0o644, uid=root.uid, gid=root.gid, mtime_ns=root.mtime_ns,
                          xattrs={fmt.SELINUX: sel} if sel is not None else None)
                raw.add(id(w))
                root_ents[h] = w
    # the compiled walk (flatmount/image/_cwrite.c) takes a valid tree, hardlinks listed in `dups` as
    # here, but not the second walk with `primary`; on anything invalid it returns None and this walk
    # runs (and words the error)
    cw = accel.CWRITE
    if cw is not None and primary is None:
        got = cw.collect(Inode, root, root_ents, raw)
        if got is not None:
            return got
    nodes: list[Inode] = [root]
    index: dict[int, int] = {id(root): 0}
    nlink: list[int] = [0]
    nparent: list[int] = [0]
    dparent: dict[int, int] = {0: 0}
    dnames: dict[int, list[bytes]] = {}
    dkids: dict[int, list[int]] = {}
    whiteout_parents: set[int] = set()
    version = 0
    dups: list[tuple[int, bytes, int]] = []
    pending: list[tuple[int, bytes, Inode]] = []
    dirq = [0]   # directories in queue order (only they need a visit of their own)
    for i in dirq:
        node = nodes[i]
        ents = root_ents if i == 0 else node.entries
        names = sorted(ents)
        if names:
            joined = b"\0".join(names)
            if (_SLASH in joined or not names[0]
                    or (len(joined) > fmt.NAME_LEN and max(map(len, names)) > fmt.NAME_LEN)
                    or joined.count(0) != len(names) - 1 or _DOT in ents or _DOTDOT in ents):
                bad = [n for n in names if not n or b"/" in n or b"\0" in n or len(n) > fmt.NAME_LEN
                       or n in (_DOT, _DOTDOT)]
                raise FormatError(f"invalid directory entry name {bad[0][:80]!r}")
        kids: list[int] = []
        nsub = 0
        me = id(node)
        for name in names:
            child = ents[name]
            cid = id(child)
            j = index.get(cid)
            cm = child.mode & S_IFMT
            if cm == S_IFDIR:
                if j is not None:
                    raise FormatError(f"directory {name!r} appears twice (hardlinked directory or cycle)")
                if child.entries is None:
                    raise FormatError("directory inode without entries")
                nsub += 1
            elif child.entries is not None:
                raise FormatError(f"non-directory inode {child!r} has entries")
            if j is None:
                if primary is not None:
                    p = primary.get(cid)
                    if p is not None and p != (me, name):
                        pending.append((i, name, child))
                        kids.append(-1)
                        continue
                j = len(nodes)
                index[cid] = j
                nodes.append(child)
                nlink.append(1)
                nparent.append(i)
                if cm == S_IFDIR:
                    dparent[j] = i
                    dirq.append(j)
                elif cm == S_IFCHR and child.rdev == 0 and cid not in raw:
                    whiteout_parents.add(i)
                    version = 1
            else:
                nlink[j] += 1
                dups.append((i, name, j))
                if cm == S_IFCHR and child.rdev == 0 and cid not in raw:  # a hardlinked whiteout:
                    whiteout_parents.add(i)                               # every parent is marked
            kids.append(j)
        nlink[i] = 2 + nsub
        p = bisect.bisect_left(names, _DOT)
        names.insert(p, _DOT)
        kids.insert(p, i)
        p = bisect.bisect_left(names, _DOTDOT)
        names.insert(p, _DOTDOT)
        kids.insert(p, dparent[i])
        dnames[i] = names
        dkids[i] = kids
    for i, name, child in pending:
        j = index.get(id(child))
        if j is None:
            raise FormatError("hardlink to an inode outside the tree")
        nlink[j] += 1
        if child.mode & S_IFMT == S_IFCHR and child.rdev == 0 and id(child) not in raw:
            whiteout_parents.add(i)
        dkids[i][bisect.bisect_left(dnames[i], name)] = j
    return nodes, dnames, dkids, nlink, whiteout_parents, raw, version, dups, nparent, dparent


def _primary_names(nodes: list[Inode], dnames: dict[int, list[bytes]], dkids: dict[int, list[int]],
                   dups: list[tuple[int, bytes, int]], nparent: list[int], dparent: dict[int, int]
                   ) -> dict[int, tuple[int, bytes]] | None:
    """For a breadth-first walk with hardlinks (`_collect` without `primary`): id(inode) -> (id(parent
    dir), name) of the first name of every multiply-linked inode in depth-first, name-sorted order
    (composefs dump order, i.e. the smallest path compared component by component), or None when
    that is already the name that queued each of them (the walk is then right as it is)."""
    paths: dict[int, tuple[bytes, ...]] = {0: ()}

    def path(i: int) -> tuple[bytes, ...]:
        chain = []
        while i not in paths:
            chain.append(i)
            i = dparent[i]
        p = paths[i]
        for c in reversed(chain):
            up = dparent[c]
            p = paths[c] = (*p, dnames[up][dkids[up].index(c)])
        return p

    names: dict[int, list[tuple[int, bytes]]] = {}
    for i, name, j in dups:
        names.setdefault(j, []).append((i, name))
    first: dict[int, tuple[int, bytes]] = {}
    moved = False
    for j, more in names.items():
        q = nparent[j]
        queued = (q, dnames[q][dkids[q].index(j)])
        best = min([queued, *more], key=lambda o: (*path(o[0]), o[1]))
        moved = moved or best != queued
        first[id(nodes[j])] = (id(nodes[best[0]]), best[1])
    return first if moved else None


# `layout_hook(n, layout, size) -> (buffer, lo, hi)`: called once the layout is known (n inodes,
# `layout` a fingerprint of it, an image of `size` bytes), returns the zeroed buffer of `size` bytes to
# write into and the slice [lo, hi) of inodes (queue order) to write there, the header, superblock and
# shared xattrs with the slice starting at 0.  Two processes building the same image can so each
# write part of one shared buffer (flatmount.flatten does).
LayoutHook = Callable[[int, bytes, int], tuple]


def _build(root: Inode, root_whiteouts: bool = True, layout_hook: LayoutHook | None = None,
           keep: list | None = None, alloc: Callable[[int], object] | None = None,
           final: Callable[[object, int], None] | None = None):
    """The whole image in one buffer; the cyclic GC is paused meanwhile (it would rescan the tree
    for every few hundred tuples allocated here, for nothing: nothing built here is cyclic).
    `keep`: a list the layout is appended to, for a caller that frees it later (see image_buffer)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        buf = _build_image(root, root_whiteouts, layout_hook, keep, alloc, final)
        if keep:
            # the kept layout's containers join the old generation at once (freeze, then unfreeze:
            # two list splices), or the first young collection after this would walk them all
            # (10-20 ms for a 64k-inode tree) only to find them alive
            gc.freeze()
            gc.unfreeze()
        return buf
    except _InodeError as e:  # name the entry: found again by the same (deterministic) walk
        raise FormatError(f"{_path_of(root, root_whiteouts, e.index)}: {e.args[0]}") from None
    finally:
        if enabled:
            gc.enable()


class _InodeError(FormatError):
    """Inode `index` (queue order) cannot be written; `_build` turns it into an error naming its path."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def _path_of(root: Inode, root_whiteouts: bool, index: int) -> str:
    """The path (git-style quoted where needed) of inode `index` of `_build_image`'s queue order."""
    nodes, dnames, dkids, _, _, _, _, dups, nparent, dparent = _collect(root, root_whiteouts, None)
    if dups:
        primary = _primary_names(nodes, dnames, dkids, dups, nparent, dparent)
        if primary is not None:
            nodes, dnames, dkids, _, _, _, _, _, nparent, _ = _collect(root, root_whiteouts, primary)
    parts: list[bytes] = []
    while index:
        up = nparent[index]
        parts.append(dnames[up][dkids[up].index(index)])
        index = up
    from flatmount.quoting import quote_path

    return quote_path(b"/" + b"/".join(reversed(parts))).decode("utf-8", "backslashreplace")


def _bad_field(node: Inode, isize: int, mode: int, nlink: int, size: int, iu: int, uid: int, gid: int,
               e: Exception) -> str:
    """Which inode field does not fit its on-disk width (for an error message a person can act on)."""
    big = isize == EXTENDED
    sec = node.mtime_ns // NS if isinstance(node.mtime_ns, int) else node.mtime_ns
    checks = (("mode", mode, 0, U16), ("size", size, 0, (1 << 64) - 1 if big else U32),
              ("uid", uid, 0, U32 if big else U16), ("gid", gid, 0, U32 if big else U16),
              ("nlink", nlink, 0, U32 if big else U16), ("rdev/block address", iu, 0, U32),
              ("mtime (seconds)", sec, -(1 << 63) if big else 0, (1 << 63) - 1 if big else U32))
    for name, value, lo, hi in checks:
        if not isinstance(value, int) or not lo <= value <= hi:
            return f"inode field {name} = {value} is out of range ({lo}..{hi})"
    return f"inode field out of range ({e})"


class _Layout:
    """What the writer's passes know about the image, filled in pass by pass: a slotted record (not a
    `dataclasses` one, whose import alone costs 5 ms of every `mkimage`).  Per-inode fields are
    columns (lists indexed by queue position, the order of the inodes in the image) so that the hot
    loops run over them with `zip` and no attribute lookups."""

    __slots__ = (
        # _queue_inodes: the tree in queue order
        "nodes", "dnames", "dkids", "nlink", "whiteout_parents", "raw_whiteouts", "version",
        # _inode_fields: what each inode becomes on disk
        "build_sec", "build_nsec", "modes", "sizes", "layouts", "iu", "tails", "nblk", "xitems", "fast",
        "digests", "isz", "ftypes", "dstarts", "uids", "gids", "allitems", "rditems",
        # _share_xattrs
        "shared", "shared_off", "shared_size", "keyinfo", "has_acl", "mc_sh", "rd_sh", "dg_items",
        # _place_inodes
        "xsizes", "forms", "nids", "inodes_end",
        # _place_blocks
        "xattr_blkaddr", "shared_ids", "data_start", "total_blocks",
    )

    nodes: list[Inode]                   # distinct inodes, breadth-first (hardlinks at their first name)
    dnames: dict[int, list[bytes]]       # directory index -> its sorted names, `.` and `..` included
    dkids: dict[int, list[int]]          # directory index -> the inode index of each name
    nlink: list[int]
    whiteout_parents: set[int]           # directories holding a whiteout (marked with xattrs)
    raw_whiteouts: set[int]              # ids of the writer's own 00..ff root whiteouts (kept char 0:0)
    version: int                         # composefs format version: 1 when whiteouts are marked
    build_sec: int                       # the superblock epoch: the smallest mtime
    build_nsec: int
    modes: list[int]                     # st_mode as written (a whiteout becomes a regular file)
    sizes: list[int]
    layouts: list[int]                   # data layout, already shifted into i_format
    iu: list[int]                        # i_u: block address, rdev or chunk format
    tails: list[int]                     # bytes stored inline after the xattrs
    nblk: list[int]                      # data blocks
    xitems: list                         # sorted (name, value) xattrs as written; () for none
    fast: list                           # external file whose xattrs are exactly (metacopy, redirect):
                                         # True, or its digest when both come from the digest
    digests: list[bytes]                 # those digests
    isz: list[int]                       # inode size: compact or extended
    ftypes: list[int]                    # dirent file type
    dstarts: dict[int, list[int]]        # directory index -> first entry of each of its blocks
    uids: list[int]
    gids: list[int]
    allitems: list                       # every xattr item of every inode (counted for sharing)
    rditems: list                        # redirects of files whose metacopy is the empty one (_MC0)
    shared: list                         # the shared xattr items in on-disk order
    shared_off: dict                     # shared item -> byte offset in the shared area
    mc_sh: set[bytes]                    # digests whose derived metacopy item is shared
    rd_sh: set[bytes]                    # digests whose derived redirect item is shared
    dg_items: _DigestItems               # digest -> its `_digest_items` (made once per digest)
    shared_size: int
    keyinfo: dict[bytes, tuple[int, bytes, int, int]]   # xattr name -> _keyinfo
    has_acl: bool
    xsizes: list[int]                    # xattr body size
    forms: list[int]                     # the xattr body's form: _BOTH_INLINE, _MC_SHARED, _BOTH_SHARED
                                         # or _OTHER_BODY
    nids: list[int]
    inodes_end: int                      # byte offset after the last inode: the shared xattrs start
    xattr_blkaddr: int
    shared_ids: dict                     # shared item -> its xattr id
    data_start: int                      # byte offset of the first data block
    total_blocks: int


def _build_image(root: Inode, root_whiteouts: bool, layout_hook: LayoutHook | None, keep: list | None = None,
                 alloc: Callable[[int], object] | None = None, final: Callable[[object, int], None] | None = None):
    """The passes, in order; each fills in its part of the layout (EROFS.md section 10)."""
    lay = _queue_inodes(root, root_whiteouts)
    if keep is not None:
        keep.append(lay)
    _inode_fields(lay)
    _share_xattrs(lay)
    _place_inodes(lay)
    _place_blocks(lay)
    n = len(lay.nodes)
    size = lay.total_blocks * BLKSZ
    if layout_hook is None:
        buf, lo, hi = bytearray(size) if alloc is None else alloc(size), 0, n
    else:
        import xxhash

        fingerprint = (fmt.LAYOUT_FINGERPRINT.pack(n, lay.total_blocks, lay.inodes_end, lay.shared_size)
                       + xxhash.xxh3_128_digest(array("q", lay.nids)))
        buf, lo, hi = layout_hook(n, fingerprint, size)
    if not lo:   # the header, superblock and shared xattrs go with the first inodes
        _emit_head(buf, lay)
    if final is None or layout_hook is not None:
        _emit_inodes(buf, lay, lo, hi)
        return buf
    # in slices, telling `final` after each how far the image is final: an inode's bytes lie below
    # the next inode's; directory and data blocks and the shared xattrs lie after all the inodes
    step = max(FINAL_SLICE, -(-n // FINAL_SLICES))
    blk = lay.data_start // BLKSZ   # the first data block of the slice at hand
    for a in range(0, n, step):
        b = min(a + step, n)
        _emit_inodes(buf, lay, a, b, blk)
        blk += sum(lay.nblk[a:b])
        if b < n:
            final(buf, (lay.nids[b] << SLOTBITS) & ~BLKPAD)
    final(buf, size)
    return buf


# `final`'s slices (image_buffer): at most this many, of at least FINAL_SLICE inodes
FINAL_SLICES = 6
FINAL_SLICE = 4096


def _queue_inodes(root: Inode, root_whiteouts: bool) -> _Layout:
    """Pass 1: the inodes in image order (breadth first, names sorted), hardlinks queued at their first
    name in dump order (which may be a later one than the walk meets first: then walk again)."""
    (nodes, dnames, dkids, nlink, wparents, raw, version, dups, nparent,
     dparent) = _collect(root, root_whiteouts, None)
    if dups:
        primary = _primary_names(nodes, dnames, dkids, dups, nparent, dparent)
        if primary is not None:
            (nodes, dnames, dkids, nlink, wparents, raw, version,
             *_) = _collect(root, root_whiteouts, primary)
    lay = _Layout()
    lay.nodes, lay.dnames, lay.dkids, lay.nlink = nodes, dnames, dkids, nlink
    lay.whiteout_parents, lay.raw_whiteouts, lay.version = wparents, raw, version
    return lay


def _inode_fields(lay: _Layout) -> None:
    """Pass 2: the final mode, size, data layout and xattrs of every inode (the composefs rewriting:
    escaped overlay xattrs, metacopy/redirect, whiteouts as marked files, whiteout parents, root),
    its inline tail and data blocks, and whether it needs an extended inode."""
    nodes = lay.nodes
    dnames = lay.dnames
    wparents = lay.whiteout_parents
    raw = lay.raw_whiteouts
    version = lay.version
    n = len(nodes)
    modes = [0] * n
    sizes = [0] * n
    layouts = [0] * n
    iu = [0] * n
    tails = [0] * n
    nblk = [0] * n
    xitems: list = [()] * n
    fast: list = [False] * n
    dgs: list[bytes] = []
    ftypes = [0] * n
    dstarts: dict[int, list[int]] = {}
    allitems: list = []
    extend = allitems.extend
    rditems: list = []   # the redirect items of external files whose metacopy item is _MC0
    rdappend = rditems.append
    MC, RD = _MC, _RD
    TOP, ESC, NTOP = _TOP, _ESC, _NTOP
    mc_header = fmt.METACOPY_HEADER
    max_bits = _MAX_CHUNK_BITS
    blkbits = fmt.BLKSZBITS
    chunk = _CHUNK
    mc0 = _MC0
    DIGEST_SIZE = fmt.DIGEST_SIZE
    one_chunk = 1 << max_bits   # the largest file with a single chunk
    one_entry = CHUNK_ENTRY     # its chunk map: one block map entry
    REG, DIR, LNK, CHR, BLK, FIFO, SOCK = _FT_REG, _FT_DIR, _FT_LNK, _FT_CHR, _FT_BLK, _FT_FIFO, _FT_SOCK
    inline, plain, blksz = _INLINE, _PLAIN, BLKSZ
    nlink = lay.nlink
    # the compiled pass (flatmount/image/_cwrite.c) fills in the common inodes (no xattrs, one-block
    # directories, files, symlinks, devices) and returns the others, which this loop does; it also
    # takes the smallest mtime, the inode sizes and the uid/gid columns, and says whether the rare
    # check below is needed (None: it changed nothing, and all of it is done here)
    got = None
    cw = accel.CWRITE
    if cw is not None:
        got = cw.inode_fields(Inode, nodes, (modes, sizes, layouts, iu, tails, nblk, xitems, fast, ftypes),
                              dgs, allitems, rditems, dnames, dstarts, wparents, MC, RD, mc0, nlink)
    if got is None:
        todo = None
        mtimes = list(map(_MTIME, nodes))
        try:
            min_mtime = min(mtimes)
        except TypeError:
            raise FormatError("mtime_ns must be an integer") from None
        # an inode is compact when its mtime is the epoch (and its fields fit: checked below)
        isz = [COMPACT if m == min_mtime else EXTENDED for m in mtimes]
    else:
        todo, min_mtime, rare, isz, uids, gids = got
    lay.build_sec, lay.build_nsec = divmod(min_mtime, NS)
    for i, node in enumerate(nodes) if todo is None else zip(todo, map(nodes.__getitem__, todo), strict=True):
        mode = node.mode
        t = mode & S_IFMT
        xs = node.xattrs
        if t == S_IFREG and not xs and node.content is None and node.payload is None:
            # the most common inode of all first, in as few steps as can be: a file known by its
            # digest alone, one chunk (metacopy and redirect are made from the digest later)
            dg = node.digest
            size = node.size
            if dg is not None and 0 < size <= one_chunk and len(dg) == DIGEST_SIZE:
                fast[i] = dg
                dgs.append(dg)
                cb = (size - 1).bit_length()
                iu[i] = cb - blkbits if cb > blkbits else 0
                tails[i] = one_entry
                layouts[i] = chunk
                ftypes[i] = REG
                modes[i] = mode
                sizes[i] = size
                continue
        d = None
        if xs:
            d = {}
            for k, v in xs.items():
                if k[:NTOP] == TOP:
                    k = ESC + k[NTOP:]
                d[k] = v
        items = ()
        if t == S_IFREG:
            content = node.content
            if content is not None:
                size = len(content)
                if size:
                    nb, tail = divmod(size, blksz)
                    if tail > fmt.DIR_INLINE_MAX:
                        nb += 1
                        tail = 0
                    nblk[i] = nb
                    tails[i] = tail
                    layouts[i] = inline if tail else plain
            else:
                size = node.size
                if size > 0:
                    dg = node.digest
                    if dg is not None and len(dg) != DIGEST_SIZE:
                        raise _InodeError(i, f"digest must be {fmt.DIGEST_SIZE} bytes, got {len(dg)}")
                    path = node.payload
                    if path is None and dg is not None and d is None:
                        fast[i] = dg
                        dgs.append(dg)
                    else:
                        mv = b"" if dg is None else mc_header + dg
                        if path is None and dg is not None:
                            path = object_path(dg)
                        if d is None:
                            if path:
                                items = (mc0 if dg is None else (MC, mv),
                                         (RD, ("/" + path).encode("utf-8", "surrogateescape")))
                                fast[i] = True
                            else:
                                items = ((MC, mv),)
                        else:
                            d[MC] = mv
                            if path:
                                d[RD] = b"/" + path.encode("utf-8", "surrogateescape")
                    cb = (size - 1).bit_length()   # fmt.chunk_bits: one chunk when possible
                    if cb <= max_bits:
                        tails[i] = one_entry
                        iu[i] = cb - blkbits if cb > blkbits else 0
                    else:
                        nch = (size + (1 << max_bits) - 1) >> max_bits
                        if nch > fmt.MAX_NONINLINE_CHUNKS:
                            raise _InodeError(i, f"file too large for a composefs image: {size} bytes")
                        tails[i] = one_entry * nch
                        iu[i] = max_bits - blkbits
                    layouts[i] = chunk
                elif size < 0:
                    raise _InodeError(i, f"negative file size {size}")
            ftypes[i] = REG
        elif t == S_IFDIR:
            starts, nb, tail = _dir_blocks(dnames[i])
            dstarts[i] = starts
            nblk[i] = nb
            tails[i] = tail
            layouts[i] = inline if tail else plain
            size = nb * blksz + tail
            if i in wparents:
                if d is None:
                    d = {}
                d[fmt.OVERLAY_ESCAPED_WHITEOUTS] = b""
                d[fmt.USER_OVERLAY_WHITEOUTS] = b""
                if version >= 1:
                    if d.get(fmt.OVERLAY_ESCAPED_OPAQUE) != b"y":
                        d[fmt.OVERLAY_ESCAPED_OPAQUE] = b"x"
                    d[fmt.USER_OVERLAY_OPAQUE] = b"x"
            if i == 0:
                if d is None:
                    d = {}
                d[fmt.OVERLAY_OPAQUE] = b"y"
            ftypes[i] = DIR
        elif t == S_IFLNK:
            target = node.target
            if not target:
                raise _InodeError(i, "symlink without a target")
            size = len(target)
            if size >= fmt.PATH_MAX:
                raise _InodeError(i, f"symlink target too long ({size} bytes)")
            tails[i] = size
            layouts[i] = inline
            ftypes[i] = LNK
        elif t == S_IFCHR or t == S_IFBLK:
            size = 0
            rdev = node.rdev
            if t == S_IFCHR and rdev == 0 and id(node) not in raw:
                mode = S_IFREG | (mode & ~S_IFMT)
                if d is None:
                    d = {}
                d[fmt.OVERLAY_ESCAPED_WHITEOUT] = b""
                d[fmt.USER_OVERLAY_WHITEOUT] = b""
                ftypes[i] = REG
            else:
                if not 0 <= rdev <= U32:
                    raise _InodeError(i, f"device number {rdev:#x} does not fit 32 bits")
                iu[i] = rdev
                ftypes[i] = CHR if t == S_IFCHR else BLK
        elif t == S_IFIFO:
            size = 0
            ftypes[i] = FIFO
        elif t == S_IFSOCK:
            size = 0
            ftypes[i] = SOCK
        else:
            raise _InodeError(i, f"invalid file mode {mode:#o}")
        if d:
            items = sorted(d.items())
        if items:
            xitems[i] = items
            if items[0] is mc0:   # (mc0, redirect): mc0 is counted at the end
                rdappend(items[1])
            else:
                extend(items)
        modes[i] = mode
        sizes[i] = size
    # the other reasons for an extended inode, rare: looked for inode by inode only when present
    if got is None:
        uids = list(map(_UID, nodes))
        gids = list(map(_GID, nodes))
        rare = n and (max(uids) > U16 or max(gids) > U16 or max(nlink) > U16 or max(sizes) > U32
                      or min(uids) < 0 or min(gids) < 0)
    elif not rare and todo:   # the compiled pass checked all but the sizes of the inodes left here
        rare = max(map(sizes.__getitem__, todo)) > U32
    if rare:
        for i, uid, gid in zip(range(n), uids, gids, strict=True):
            if uid > U16 or gid > U16 or nlink[i] > U16 or sizes[i] > U32:
                isz[i] = EXTENDED
            top = U32 if isz[i] == EXTENDED else U16
            if not (0 <= uid <= top and 0 <= gid <= top):
                raise _InodeError(i, f"uid/gid {uid}/{gid} does not fit 32 bits" if uid >= 0 and gid >= 0
                                  else f"negative uid/gid {uid}/{gid}")
    lay.modes, lay.sizes, lay.layouts, lay.iu, lay.tails, lay.nblk = modes, sizes, layouts, iu, tails, nblk
    lay.xitems, lay.fast, lay.digests, lay.isz, lay.ftypes, lay.dstarts = xitems, fast, dgs, isz, ftypes, dstarts
    lay.uids, lay.gids, lay.allitems, lay.rditems = uids, gids, allitems, rditems


def _share_xattrs(lay: _Layout) -> None:
    """Pass 3: every (name, value) used by more than one inode becomes a shared xattr, in libcomposefs'
    order; their offsets in the shared area, and the name facts every later pass needs."""
    allitems = lay.allitems
    rditems = lay.rditems
    dgs = lay.digests
    counts = Counter(allitems)
    if rditems:
        counts.update(rditems)
        counts[_MC0] += len(rditems)
    general = list(counts)   # the items of the inodes' own xattrs (and their metacopy/redirect)
    dg_items = _DigestItems()
    many: set[bytes] = set()
    if dgs:   # the digest-only files' items, where they may be shared (more than one use)
        # digests that a general item names too (rare: files with xattrs of their own) count once used
        named = [dg for dg in map(_digest_of_item, general) if dg is not None]
        cw = accel.CWRITE
        # the compiled count keeps only the digests used more than once (most are not), and the
        # named ones used at all
        per_digest = cw.repeated(dgs, named) if cw is not None else None
        if per_digest is not None and _share_repeated(lay, counts, general, per_digest, dg_items, named):
            return
        if per_digest is None:
            per_digest = Counter(dgs)
            many = {dg for dg, c in per_digest.items() if c > 1}
            many.update(filter(per_digest.__contains__, named))
        else:
            many = set(per_digest)
        for dg in many:
            it_m, it_r = dg_items[dg] = _digest_items(dg)
            counts[it_m] += per_digest[dg]
            counts[it_r] += per_digest[dg]
    _share_counted(lay, counts, general, dg_items)


def _share_counted(lay: _Layout, counts: Counter, general: list, dg_items: _DigestItems) -> None:
    """`_share_xattrs` once every item is counted (`counts`; `general`: the items of the inodes' own
    xattrs): the shared items in order, their offsets, and the facts of the names."""
    allitems = lay.allitems
    rditems = lay.rditems
    dgs = lay.digests
    shared = _shared_order([it for it, c in counts.items() if c > 1])
    # the digests whose derived metacopy / redirect is shared (every shared item of key _MC / _RD that
    # names a digest): those of `many` whose item counts twice at least, and those general shared items
    # name
    gshared = [it for it in general if counts[it] > 1]
    lay.mc_sh = {dg for dg, its in dg_items.items() if counts[its[0]] > 1}
    lay.mc_sh.update(filter(None, [_digest_of_item(it) for it in gshared if it[0] == _MC]))
    lay.rd_sh = {dg for dg, its in dg_items.items() if counts[its[1]] > 1}
    lay.rd_sh.update(filter(None, [_digest_of_item(it) for it in gshared if it[0] == _RD]))
    lay.dg_items = dg_items
    shared_off: dict[tuple[bytes, bytes], int] = {}
    off = 0
    for it in shared:
        shared_off[it] = off
        off += (XENT + _keyinfo(it[0])[3] + len(it[1]) + XPAD) & ~XPAD
    keyinfo: dict[bytes, tuple[int, bytes, int, int]] = {}
    for k in set(map(itemgetter(0), allitems)) | ({_MC, _RD} if rditems or dgs else set()):
        keyinfo[k] = _keyinfo(k)
    if counts and max(map(len, map(itemgetter(1), counts))) > U16:
        k, v = next(kv for kv in counts if len(kv[1]) > U16)
        raise FormatError(f"xattr {k[:64]!r} value too long ({len(v)} bytes)")
    lay.shared, lay.shared_off, lay.shared_size, lay.keyinfo = shared, shared_off, off, keyinfo
    lay.has_acl = fmt.POSIX_ACL_ACCESS in keyinfo or fmt.POSIX_ACL_DEFAULT in keyinfo


def _share_repeated(lay: _Layout, counts: Counter, general: list, per_digest: dict[bytes, int],
                    dg_items: _DigestItems, named: list[bytes]) -> bool:
    """`_share_counted` in bulk, for the usual case: the digests used more than once by digest-only
    files and those of them an item of the inodes' own xattrs names (`named`: a file with xattrs of
    its own and a digest; few), all in `per_digest` with their counts, get their metacopy and redirect
    items made and counted all at once (with the equal items of the inodes' own xattrs, if any), not
    one by one.  A metacopy or redirect block of the shared area holds items of one length: the
    digests' order (descending) is libcomposefs' order (by name, then length, then value, all
    descending); where the inodes' own shared metacopies or redirects join a block, it is sorted
    whole.  False (nothing changed) for what it does not take (an invalid name or value): the general
    code then counts item by item (the specification; tests compare both)."""
    keyinfo: dict[bytes, tuple[int, bytes, int, int]] = {}
    try:   # (an invalid name or value: the general code words the error)
        for k in {*map(itemgetter(0), lay.allitems), _MC, _RD}:
            keyinfo[k] = _keyinfo(k)
    except FormatError:
        return False
    if general and max(map(len, map(itemgetter(1), general))) > U16:
        return False
    many = sorted(per_digest, reverse=True)   # (with the named digests digest-only files use too)
    hdr = fmt.METACOPY_HEADER
    mcs = list(zip(repeat(_MC), [hdr + dg for dg in many]))
    rds = list(zip(repeat(_RD), [b"/" + _hexlify(dg, b"/", _HEX_SPLIT) for dg in many]))
    dg_items.update(zip(many, zip(mcs, rds, strict=True), strict=True))
    if named or any(k == _MC or k == _RD for k, _v in general):
        # the inodes' own items may equal digest items: counted together, and listed once
        uses = [per_digest[dg] for dg in many]
        comb = dict(zip(mcs, uses, strict=True))
        comb.update(zip(rds, uses, strict=True))
        own = []
        for it in general:
            c = comb.get(it)
            if c is None:
                own.append(it)
            else:
                comb[it] = c + counts[it]
        gshared = [it for it in own if counts[it] > 1]
        mc_keep = [comb[it] > 1 for it in mcs]
        rd_keep = [comb[it] > 1 for it in rds]
        lay.mc_sh = {dg for dg, keep in zip(many, mc_keep, strict=True) if keep}
        lay.rd_sh = {dg for dg, keep in zip(many, rd_keep, strict=True) if keep}
        lay.mc_sh.update(filter(None, [_digest_of_item(it) for it in gshared if it[0] == _MC]))
        lay.rd_sh.update(filter(None, [_digest_of_item(it) for it in gshared if it[0] == _RD]))
        mcs = [it for it, keep in zip(mcs, mc_keep, strict=True) if keep]
        rds = [it for it, keep in zip(rds, rd_keep, strict=True) if keep]
    else:   # every digest item counts twice at least, and no other item is one
        gshared = [it for it in general if counts[it] > 1]
        lay.mc_sh = set(many)
        lay.rd_sh = set(many)
    blocks: dict[bytes, list] = {}
    if mcs:
        blocks[_MC] = mcs
    if rds:
        blocks[_RD] = rds
    mixed = set()
    for it in _shared_order(gshared):
        if it[0] in blocks and (it[0] == _MC or it[0] == _RD):
            mixed.add(it[0])
        blocks.setdefault(it[0], []).append(it)
    shared: list = []
    shared_off: dict[tuple[bytes, bytes], int] = {}
    off = 0
    for name in sorted(blocks, reverse=True):
        items = blocks[name]
        if name in mixed:
            items.sort(key=_len_value, reverse=True)
        if (name == _MC or name == _RD) and name not in mixed and len(items[0][1]) == len(items[-1][1]):
            step = (XENT + keyinfo[name][3] + len(items[0][1]) + XPAD) & ~XPAD   # one size for all
            shared_off.update(zip(items, range(off, off + step * len(items), step), strict=True))
            off += step * len(items)
        else:
            for it in items:
                shared_off[it] = off
                off += (XENT + keyinfo[name][3] + len(it[1]) + XPAD) & ~XPAD
        shared += items
    lay.dg_items = dg_items
    lay.shared, lay.shared_off, lay.shared_size, lay.keyinfo = shared, shared_off, off, keyinfo
    lay.has_acl = fmt.POSIX_ACL_ACCESS in keyinfo or fmt.POSIX_ACL_DEFAULT in keyinfo
    return True


def _len_value(item: tuple[bytes, bytes]) -> tuple[int, bytes]:
    return len(item[1]), item[1]


def _place_inodes(lay: _Layout) -> None:
    """Pass 4: each inode's xattr body size and form, then its nid: inodes on slot boundaries, an inline
    tail never crossing a block (the inode moves down, or the tail becomes a full data block)."""
    modes, tails, nblk, layouts, sizes = lay.modes, lay.tails, lay.nblk, lay.layouts, lay.sizes
    xitems, fast, keyinfo, shared_off = lay.xitems, lay.fast, lay.keyinfo, lay.shared_off
    n = len(lay.nodes)
    # the layout constants as locals (the loop runs once per inode)
    blksz, blkpad, slotpad, slotbits, xhdr, xid, xpad = BLKSZ, BLKPAD, SLOTPAD, SLOTBITS, XHDR, XID, XPAD
    xsizes = [0] * n
    nids = [0] * n
    forms = [0] * n
    pos = fmt.SUPER_OFFSET + fmt.SUPERBLOCK.size
    MAXSH = fmt.MAX_SHARED_PER_INODE
    RD = _RD
    mc0 = _MC0
    one_id = XHDR + XID            # a body of one shared id
    two_ids = XHDR + 2 * XID       # a body of two shared ids
    max_xsize = XHDR + XID * (fmt.XATTR_ICOUNT_MAX - 1)
    entry_pad = XENT + XPAD        # an entry's head and the most padding it may need
    mc_suffix = entry_pad + keyinfo[_MC][3] if _MC in keyinfo else 0
    rd_suffix = entry_pad + keyinfo[RD][3] if RD in keyinfo else 0
    mc0_shared = mc0 in shared_off
    shared_rd = {v for k, v in shared_off if k == RD}   # the values of the shared redirects
    # the digests whose derived metacopy / redirect is shared (`_share_xattrs`), and the sizes of the
    # inline ones
    mc_sh, rd_sh = lay.mc_sh, lay.rd_sh
    dg_mc_size = XHDR + ((mc_suffix + fmt.METACOPY_SIZE) & ~XPAD)
    dg_rd_size = (rd_suffix + _RD_SIZE) & ~XPAD
    dg_shared = bool(mc_sh or rd_sh)
    # the compiled loop (flatmount/image/_cwrite.c) does the same; on anything out of its common case it
    # returns None having changed nothing, and the loop here runs (and words any error)
    cw = accel.CWRITE
    got = None if cw is None else cw.place_inodes(
        (xitems, lay.isz, tails, fast, modes, nblk, layouts, sizes), keyinfo, shared_off, mc0, mc0_shared,
        shared_rd, mc_sh, rd_sh, RD, mc_suffix, rd_suffix, dg_mc_size, dg_rd_size, pos, max_xsize,
        lay.dg_items.__getitem__)
    if got is not None:
        pos, xsizes, forms, nids = got
    else:
        for i, items, base, tail, fst in zip(range(n), xitems, lay.isz, tails, fast, strict=True):
            if items:
                if fst:
                    it_m, it_r = items
                    m_sh = mc0_shared if it_m is mc0 else it_m in shared_off
                    xsize = one_id if m_sh else xhdr + ((mc_suffix + len(it_m[1])) & ~xpad)
                    if it_r[1] in shared_rd and it_r[0] == RD:   # it_r in shared_off, hashing bytes only
                        xsize += xid
                        forms[i] = _BOTH_SHARED if xsize == two_ids else _OTHER_BODY
                    else:
                        xsize += (rd_suffix + len(it_r[1])) & ~xpad
                        forms[i] = _MC_SHARED if m_sh else _BOTH_INLINE
                else:
                    nsh = 0
                    xsize = xhdr
                    for it in items:
                        if nsh < MAXSH and it in shared_off:
                            nsh += 1
                            xsize += xid
                        else:
                            xsize += (entry_pad + keyinfo[it[0]][3] + len(it[1])) & ~xpad
                    if xsize > max_xsize:
                        raise _InodeError(i, "too many xattrs on one inode")
                xsizes[i] = xsize
                base += xsize
            elif fst:   # metacopy and redirect from the digest `fst`
                if dg_shared and (fst in mc_sh or fst in rd_sh):
                    m_sh = fst in mc_sh
                    xsize = one_id if m_sh else dg_mc_size
                    if fst in rd_sh:
                        xsize += xid
                        forms[i] = _BOTH_SHARED if xsize == two_ids else _OTHER_BODY
                    else:
                        xsize += dg_rd_size
                        forms[i] = _MC_SHARED
                    xitems[i] = _digest_items(fst)   # the rare forms take the general paths of the emit
                else:
                    xsize = dg_mc_size + dg_rd_size
                    forms[i] = _BOTH_INLINE
                xsizes[i] = xsize
                base += xsize
            pos = (pos + slotpad) & ~slotpad
            if tail:
                if not fst and modes[i] & S_IFMT == S_IFLNK:   # (fst: an external regular file)
                    total = base + tail
                    if total >= blksz:  # inode + xattrs + target do not fit one block: target in a block
                        nblk[i] = 1
                        tails[i] = tail = 0
                        layouts[i] = _PLAIN
                    if pos // blksz != (pos + total - 1) // blksz:
                        pos = (pos + blkpad) & ~blkpad
                else:
                    rem = blksz - (pos + base) % blksz
                    if rem < tail:
                        extra = (rem + slotpad) & ~slotpad
                        if tail <= blksz - (pos + base + extra) % blksz:
                            pos += extra
                        else:  # no inline tail after all: a full block, and the inode starts a block
                            nblk[i] += 1
                            if fst and not xitems[i]:   # (the general path writes this one)
                                xitems[i] = _digest_items(fst)
                            tails[i] = tail = 0
                            if layouts[i] != _CHUNK:
                                layouts[i] = _PLAIN
                            if modes[i] & S_IFMT == S_IFDIR:
                                sizes[i] = nblk[i] * blksz
                            pos = (pos + blkpad) & ~blkpad
            nids[i] = pos >> slotbits
            pos += base + tail
    lay.inodes_end = (pos + slotpad) & ~slotpad
    if nids[0] > U16:
        raise FormatError("root inode beyond the 16-bit root_nid range")
    lay.xsizes, lay.forms, lay.nids = xsizes, forms, nids


def _place_blocks(lay: _Layout) -> None:
    """Pass 5: the shared xattrs right after the inodes (ids count 4-byte units from the block they
    start in), then the data blocks in queue order."""
    inodes_end = lay.inodes_end
    lay.xattr_blkaddr = inodes_end // BLKSZ
    id_base = inodes_end % BLKSZ
    lay.shared_ids = {it: (id_base + o) // XID for it, o in lay.shared_off.items()}
    lay.data_start = (inodes_end + lay.shared_size + BLKPAD) & ~BLKPAD
    lay.total_blocks = lay.data_start // BLKSZ + sum(lay.nblk)
    if lay.total_blocks > U32:
        raise FormatError("image too large")


def _emit_head(buf, lay: _Layout) -> None:
    """The composefs header, the superblock and the shared xattr entries (after the inodes)."""
    fmt.COMPOSEFS_HEADER.pack_into(buf, 0, fmt.COMPOSEFS_MAGIC, fmt.COMPOSEFS_HEADER_VERSION,
                                   fmt.ComposefsFlags.HAS_ACL if lay.has_acl else 0, lay.version, b"")
    sb = fmt.Superblock(
        feature_compat=fmt.FeatureCompat.MTIME | fmt.FeatureCompat.XATTR_FILTER,
        root_nid=lay.nids[0], inos=len(lay.nodes), build_time=lay.build_sec, build_time_nsec=lay.build_nsec,
        blocks=lay.total_blocks, meta_blkaddr=0, xattr_blkaddr=lay.xattr_blkaddr)
    try:
        fmt.SUPERBLOCK.pack_into(buf, fmt.SUPER_OFFSET, *sb)
    except Exception as e:
        raise FormatError(f"superblock field out of range: {e}") from None

    p = lay.inodes_end
    cw = accel.CWRITE   # the compiled loop writes the same bytes; False: out of its common case
    if cw is not None and cw.emit_shared(buf, p, lay.shared, lay.keyinfo):
        return
    entry_pack = fmt.XATTR_ENTRY.pack_into
    keyinfo = lay.keyinfo
    for k, v in lay.shared:
        index, suffix, _bit, nlen = keyinfo[k]
        entry_pack(buf, p, nlen, index, len(v))
        q = p + XENT
        buf[q:q + nlen] = suffix
        q += nlen
        buf[q:q + len(v)] = v
        p += (XENT + nlen + len(v) + XPAD) & ~XPAD


def _emit_inodes(buf, lay: _Layout, lo: int, hi: int, first_blk: int | None = None) -> None:
    """Pass 6: inodes [lo, hi) (queue order), their xattr bodies, inline tails and data blocks, into
    the zeroed `buf`: the compiled pass (flatmount/image/_cwrite.c) where it takes the slice, else (on
    anything out of its common case; it returns False) `_emit_inodes_py` writes it (again: the same
    bytes) and words any error.  `first_blk`: the first data block of inode `lo`'s, if known."""
    cw = accel.CWRITE
    if cw is None or not cw.emit_inodes(
            buf, lo, hi, lay.data_start // BLKSZ + sum(lay.nblk[:lo]) if first_blk is None else first_blk,
            (lay.nodes, lay.modes, lay.nids, lay.nblk, lay.iu, lay.layouts, lay.xsizes, lay.sizes, lay.nlink,
             lay.isz, lay.forms, lay.xitems, lay.uids, lay.gids, lay.fast, lay.tails, lay.ftypes),
            lay.dnames, lay.dkids, lay.dstarts, lay.shared_ids, lay.keyinfo, _MC, _RD):
        _emit_inodes_py(buf, lay, lo, hi)


def _emit_inodes_py(buf, lay: _Layout, lo: int, hi: int) -> None:
    """Pass 6 in Python (the specification of the compiled pass): inodes [lo, hi) (queue order), their
    xattr bodies, inline tails and data blocks, into the zeroed `buf` (nothing that is zero is written).

    The hot loop of the writer.  An external file, the most common inode, is written with one
    `pack_into` of a struct made for its shape (inode, xattr body, chunk map: `fmt.external_inode_struct`),
    cached per shape; its xattr body comes in one of three forms (see `_Layout.forms`)."""
    nodes, dnames, dkids, dstarts = lay.nodes, lay.dnames, lay.dkids, lay.dstarts
    nids, ftypes, tails = lay.nids, lay.ftypes, lay.tails
    shared_ids, keyinfo = lay.shared_ids, lay.keyinfo
    mc0 = _MC0
    cur_blk = lay.data_start // BLKSZ + sum(lay.nblk[:lo])
    mc_header = fmt.METACOPY_HEADER
    cpack = fmt.INODE_COMPACT.pack_into
    epack = fmt.INODE_EXTENDED.pack_into
    extended = fmt.I_FORMAT_EXTENDED
    null_map = NULL_CHUNK
    body_cache: dict = {}
    heads: dict = {}
    nulls = {CHUNK_ENTRY: null_map}     # chunk map bytes -> the NULL map of that size
    dirent_structs: dict[int, struct.Struct] = {}

    def pack_block(off: int, bnames: list[bytes], bkids: list[int]) -> None:
        """One directory block at `off`: every (nid, name offset, file type) in one pack, then names."""
        cnt = len(bnames)
        st = dirent_structs.get(cnt)
        if st is None:
            st = dirent_structs[cnt] = fmt.dirents_pack_struct(cnt)
        st.pack_into(buf, off, *chain.from_iterable(zip(
            map(nids.__getitem__, bkids), accumulate(map(len, bnames[:-1]), initial=DIRENT * cnt),
            map(ftypes.__getitem__, bkids), strict=True)))
        off += DIRENT * cnt
        blob = b"".join(bnames)
        buf[off:off + len(blob)] = blob

    packs: dict[tuple, struct.Struct] = {}
    fcache: dict[tuple, tuple] = {}
    f1cache: dict[object, tuple] = {}
    hexlify = _hexlify
    mc_len = keyinfo[_MC][3] if _MC in keyinfo else 0
    rd_len = keyinfo[_RD][3] if _RD in keyinfo else 0
    # the layout constants as locals (the loop runs once per inode)
    slotbits, xhdr, xid, xpad, compact, blksz, chunk_entry = SLOTBITS, XHDR, XID, XPAD, COMPACT, BLKSZ, CHUNK_ENTRY
    both_inline, mc_shared, both_shared = _BOTH_INLINE, _MC_SHARED, _BOTH_SHARED
    columns = [nodes, lay.modes, nids, lay.nblk, lay.iu, lay.layouts, lay.xsizes, lay.sizes, lay.nlink,
               lay.isz, lay.forms, lay.xitems, lay.uids, lay.gids, lay.fast]
    if (lo, hi) != (0, len(nodes)):
        columns = [c[lo:hi] for c in columns]
    for i, node, mode, nid, nb, u, layout, xsize, size, nl, isize, form, items, uid, gid, fst in zip(
            range(lo, hi), *columns, strict=True):
        t = mode & S_IFMT
        pos = nid << slotbits
        if nb:
            # a chunk map moved to a block keeps its format in the low half of i_u (libcomposefs
            # writes blkaddr, then the chunk format over it in the same union)
            u = (cur_blk & ~fmt.CHUNK_FORMAT_MASK) | u if layout == _CHUNK else cur_blk
        icount = (xsize - xhdr) // xid + 1 if xsize else 0
        if form == both_inline and not nb:
            # content no other file shares (metacopy and redirect both inline): one cached pack and
            # entry heads per (value lengths, inode size, chunk map size)
            tail = tails[i]
            if items:
                mv = items[0][1]
                rv = items[1][1]
                fk: object = (len(mv), len(rv), isize, tail)
                fc = f1cache.get(fk)
                if fc is None:
                    h0, _, h1 = _inline_heads(items, shared_ids, xsize, keyinfo, mc_len, rd_len)
                    fc = f1cache[fk] = (fmt.external_inode_struct(isize, [len(h0), len(mv), len(h1), len(rv)],
                                                                  xsize, tail).pack_into,
                                        h0, h1, null_map * (tail // chunk_entry))
            else:
                # the most common inode of all: both made from the digest (pass 2), so the value
                # lengths and xsize are the same for all; the metacopy header goes with the head
                # before the digest, the redirect's leading "/" with the one before "XX/<62 hex>"
                mv = fst
                rv = hexlify(mv, b"/", _HEX_SPLIT)
                fk = isize << 16 | tail
                fc = f1cache.get(fk)
                if fc is None:
                    h0, _, h1 = _inline_heads(_digest_items(mv), shared_ids, xsize, keyinfo, mc_len, rd_len)
                    fc = f1cache[fk] = (fmt.external_inode_struct(
                                            isize, [len(h0) + len(mc_header), fmt.DIGEST_SIZE, len(h1) + 1,
                                                    _RD_SIZE - 1], xsize, tail).pack_into,
                                        h0 + mc_header, h1 + b"/", null_map * (tail // chunk_entry))
            pk, h0, h1, nm = fc
            try:
                if isize == compact:
                    pk(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0, h0, mv, h1, rv, nm)
                else:
                    sec, nsec = divmod(node.mtime_ns, NS)
                    pk(buf, pos, layout | extended, icount, mode, 0, size, u, i, uid, gid, sec, nsec, nl,
                       h0, mv, h1, rv, nm)
            except struct.error as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
            continue
        if form == mc_shared and not nb:
            # shared metacopy, redirect inline (files without a digest, or with a payload of their
            # own: read back from an image, for one): one cached pack per
            # (metacopy, redirect length, inode size, chunk map size), the redirect the only part of
            # the body that varies
            tail = tails[i]
            rv = items[1][1]
            it_m = items[0]
            fk = (len(rv), isize, tail) if it_m is mc0 else (it_m, len(rv), isize, tail)
            fc = fcache.get(fk)
            if fc is None:
                head = _xattr_body(items, shared_ids, xsize, keyinfo)[:xsize - ((len(rv) + xpad) & ~xpad)]
                fc = fcache[fk] = (fmt.external_inode_struct(isize, [len(head), len(rv)], xsize, tail).pack_into,
                                   head, null_map * (tail // chunk_entry))
            pk, head, nm = fc
            try:
                if isize == compact:
                    pk(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0, head, rv, nm)
                else:
                    sec, nsec = divmod(node.mtime_ns, NS)
                    pk(buf, pos, layout | extended, icount, mode, 0, size, u, i, uid, gid, sec, nsec, nl,
                       head, rv, nm)
            except struct.error as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
            continue
        if form and not nb:
            # an external file in its other forms: inode, xattrs and chunk map in one pack
            tail = tails[i]
            if form == mc_shared:  # shared metacopy: cached head (header, its id, redirect entry head) + value
                rv = items[1][1]
                hk = (items[0], len(rv))
                head = heads.get(hk)
                if head is None:
                    head = heads[hk] = _xattr_body(items, shared_ids, xsize, keyinfo)[:xsize - ((len(rv) + xpad) & ~xpad)]
                parts: tuple = (head, rv)
                sk: tuple = (isize, len(head), len(rv), tail)
            else:  # both_shared: the body is the header and two ids
                body = body_cache.get(items)
                if body is None:
                    body = body_cache[items] = _xattr_body(items, shared_ids, xsize, keyinfo)
                parts = (body,)
                sk = (isize, tail)
            st = packs.get(sk)
            if st is None:
                st = packs[sk] = fmt.external_inode_struct(isize, [len(x) for x in parts], xsize, tail)
            nm = nulls.get(tail)
            if nm is None:
                nm = nulls[tail] = null_map * (tail // chunk_entry)
            try:
                if isize == compact:
                    st.pack_into(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0,
                                 *parts, nm)
                else:
                    sec, nsec = divmod(node.mtime_ns, NS)
                    st.pack_into(buf, pos, layout | extended, icount, mode, 0, size, u, i, uid, gid,
                                 sec, nsec, nl, *parts, nm)
            except struct.error as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
            continue
        # every other inode: the inode, then its xattr body, its inline tail and data blocks apart
        if isize == compact:
            cpack(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0)
        else:
            sec, nsec = divmod(node.mtime_ns, NS)
            try:
                epack(buf, pos, layout | extended, icount, mode, 0, size, u, i, uid, gid,
                      sec, nsec, nl, b"")
            except Exception as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
        p = pos + isize
        if xsize:
            # the common forms of an external file first (the buffer is zeroed: no padding to write)
            if form == mc_shared:  # shared metacopy: cached head (header, its id, redirect entry head) + value
                rv = items[1][1]
                hk = (items[0], len(rv))
                head = heads.get(hk)
                if head is None:
                    head = heads[hk] = _xattr_body(items, shared_ids, xsize, keyinfo)[:xsize - ((len(rv) + xpad) & ~xpad)]
                q = p + len(head)
                buf[p:q] = head
                buf[q:q + len(rv)] = rv
            elif form == both_inline:  # both inline: cached entry heads (by value lengths) around the two values
                mv = items[0][1]
                rv = items[1][1]
                hk = (1, len(mv), len(rv))   # not the key of the 2-part heads of the path above
                head = heads.get(hk)
                if head is None:
                    head = heads[hk] = _inline_heads(items, shared_ids, xsize, keyinfo, mc_len, rd_len)
                h0, r0, h1 = head
                q = p + len(h0)
                buf[p:q] = h0
                buf[q:q + len(mv)] = mv
                q = p + r0
                buf[q:q + len(h1)] = h1
                q += len(h1)
                buf[q:q + len(rv)] = rv
            else:
                key = items if type(items) is tuple else tuple(items)
                body = body_cache.get(key)
                if body is None:
                    body = _xattr_body(items, shared_ids, xsize, keyinfo)
                    if layout != _CHUNK or form == both_shared:  # an external file's body is unique unless all shared
                        body_cache[key] = body
                buf[p:p + xsize] = body
            p += xsize
        tail = tails[i]
        if t == S_IFDIR:
            names = dnames[i]
            kids = dkids[i]
            starts = dstarts[i]
            if len(starts) == 1:   # one block (most directories): no slicing
                pack_block(cur_blk * blksz if nb else p, names, kids)
                cur_blk += nb
                continue
            starts = [*starts, len(names)]
            q = cur_blk * blksz
            for b in range(len(starts) - 1):
                a, e = starts[b], starts[b + 1]
                pack_block(q if b < nb else p, names[a:e], kids[a:e])
                q += blksz
        else:
            if tail:
                if layout == _CHUNK:
                    nm = nulls.get(tail)
                    if nm is None:
                        nm = nulls[tail] = null_map * (tail // chunk_entry)
                    buf[p:p + tail] = nm
                elif t == S_IFLNK:
                    buf[p:p + tail] = node.target
                else:
                    content = node.content
                    buf[p:p + tail] = content[len(content) - tail:]
            if nb:
                if layout == _CHUNK:
                    data = null_map * (blksz // chunk_entry)
                else:
                    data = node.target if t == S_IFLNK else node.content
                q = cur_blk * blksz
                ln = min(len(data), nb * blksz)
                buf[q:q + ln] = data[:ln]
        cur_blk += nb


def _digest_items(dg: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """The (metacopy, redirect) items of an external file known only by its digest."""
    return (_MC, fmt.METACOPY_HEADER + dg), (_RD, b"/" + _hexlify(dg, b"/", _HEX_SPLIT))


class _DigestItems(dict):
    """digest -> `_digest_items(digest)`, made on first use: the files sharing a digest (the ones
    whose items are shared) share those tuples too."""

    def __missing__(self, dg: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
        items = self[dg] = _digest_items(dg)
        return items


def _digest_of_item(item: tuple[bytes, bytes]) -> bytes | None:
    """The digest whose `_digest_items` include `item`, or None."""
    k, v = item
    if k == _MC:
        if len(v) == fmt.METACOPY_SIZE and v[:_MCH] == fmt.METACOPY_HEADER:
            return v[_MCH:]
    elif k == _RD and len(v) == _RD_SIZE and v[0] == 0x2F and v[3] == 0x2F:
        try:
            dg = bytes.fromhex((v[1:3] + v[4:]).decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        if b"/" + _hexlify(dg, b"/", _HEX_SPLIT) == v:
            return dg
    return None


def _shared_order(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`sorted(items, key=lambda kv: (kv[0], len(kv[1]), kv[1]), reverse=True)` (the shared xattr
    order of libcomposefs), per name with C-level keys: stable sorts, least significant key first."""
    out = []
    for name in sorted(set(map(itemgetter(0), items)), reverse=True):
        values = [v for k, v in items if k == name]
        values.sort(reverse=True)
        values.sort(key=len, reverse=True)
        out += [(name, v) for v in values]
    return out


def _inline_heads(items, shared_ids: dict, xsize: int, keyinfo: dict, mc_len: int, rd_len: int
                  ) -> tuple[bytes, int, bytes]:
    """For an external file whose metacopy and redirect are both inline: (the bytes before the
    metacopy value, where the redirect entry starts, the redirect entry's head), the same for every
    file with those value lengths."""
    body = _xattr_body(items, shared_ids, xsize, keyinfo)
    r0 = XHDR + ((XENT + XPAD + mc_len + len(items[0][1])) & ~XPAD)
    return body[:XHDR + XENT + mc_len], r0, body[r0:r0 + XENT + rd_len]


def _xattr_body(items, shared_ids: dict, xsize: int, keyinfo: dict) -> bytes:
    """Header (filter, shared count), shared ids, then inline entries, as libcomposefs orders them."""
    used = 0
    ids = []
    inline = []
    for it in items:
        k, v = it
        index, suffix, bit, nlen = keyinfo[k]
        used |= bit
        sid = shared_ids.get(it)
        if sid is not None and len(ids) < fmt.MAX_SHARED_PER_INODE:
            ids.append(sid)
        else:
            e = fmt.XATTR_ENTRY.pack(nlen, index, len(v)) + suffix + v
            inline.append(e + b"\0" * (-len(e) % fmt.XATTR_ALIGN))
    body = b"".join([fmt.XATTR_IBODY_HEADER.pack(fmt.XATTR_FILTER_DEFAULT & ~used, len(ids), b""),
                     *[fmt.XATTR_SHARED_ID.pack(x) for x in ids], *inline])
    assert len(body) == xsize
    return body


def image_buffer(root: Inode, *, root_whiteouts: bool = True, layout_hook: LayoutHook | None = None,
                 keep: list | None = None, alloc: Callable[[int], object] | None = None,
                 final: Callable[[object, int], None] | None = None):
    """`image_bytes` without the copy into a bytes object (for a caller that only writes and hashes
    it): a bytearray, or with `layout_hook` (see LayoutHook) the buffer it gave, written in part.

    `keep`: a list the writer's layout (its columns: a few hundred thousand objects for a big tree)
    is appended to instead of being freed on return, for a caller that has better things to do
    first (freeing the layout of a 64k-inode tree takes ~6 ms; flatten leaves it to its
    background thread).  `alloc(size)`: the zeroed writable buffer to write the image into, instead
    of a bytearray (flatten takes page-aligned memory, to write it with O_DIRECT); not with
    `layout_hook`, which gives its own.

    `final(buf, end)`: called as the inodes are written, `buf[:end]` then holding its final bytes
    (whole blocks; `end` grows, the last call has the whole size), so the caller can write and hash
    the image on other threads meanwhile (they must only read below `end`).  Not with `layout_hook`."""
    return _build(root, root_whiteouts, layout_hook, keep, alloc, final)


def image_bytes(root: Inode, *, root_whiteouts: bool = True) -> bytes:
    """The image of the tree at `root` (deterministic: same tree, same bytes).

    `root_whiteouts=False` leaves out the `00`..`ff` root whiteouts; it exists only to reproduce the
    worked example of EROFS.md section 11 in tests.
    """
    return bytes(_build(root, root_whiteouts))


def write_image(root: Inode, out: BinaryIO | str | os.PathLike, *, root_whiteouts: bool = True) -> None:
    """Write the image of `root` to a binary file object, or atomically (temp, fsync, rename) to a path."""
    buf = _build(root, root_whiteouts)
    if hasattr(out, "write"):
        out.write(buf)
        return
    from flatmount.atomic import AtomicFile
    from flatmount.safepath import check_output

    path = os.fspath(out)
    check_output(path)  # a new or regular file only: never through a symlink, never a device
    with AtomicFile(os.path.dirname(os.path.abspath(path)), prefix=".tmp-erofs-") as af:
        af.file.write(buf)
        af.commit(path)
