"""Tree -> composefs-layout EROFS metadata image, byte for byte as mkcomposefs (default options) lays it out.

The procedure is EROFS.md section 10, following containers/composefs `lcfs-writer-erofs.c` and
`lcfs-writer.c`:

1. rewrite (virtually; the input tree is never modified): escape `trusted.overlay.*` to
   `trusted.overlay.overlay.*`, add `metacopy`/`redirect` to external files, turn whiteouts (char 0:0)
   into marked empty regular files and mark their parent directory, mark the root opaque and add the
   `00`..`ff` root whiteouts;
2. breadth-first inode order from the root, children by name (bytes order), `.`/`..` in every
   directory; nlink counted; build_time = the minimum mtime; (name, value) pairs used by more than
   one inode become shared xattrs;
3. sizes, 4. placement (slot alignment, tail-must-not-cross-a-block padding), 5. shared xattr area
   and data blocks, 6. emit into one preallocated buffer.

Speed matters (a 64k-inode tree must take well under a second), so the passes work on flat
per-inode lists and write with `struct.pack_into` into one bytearray; per-inode helper calls are
avoided in the hot loops on purpose.

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
from itertools import accumulate, chain
from operator import attrgetter, itemgetter
from typing import BinaryIO

import flatmount.image.format as fmt
from flatmount.errors import FormatError
from flatmount.image.tree import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK, Inode
from objects.paths import object_path

__all__ = ["write_image", "image_bytes", "image_buffer", "dir_size"]


BLKSZ = fmt.BLKSZ
U32 = 0xFFFFFFFF
U16 = 0xFFFF
NS = 1_000_000_000

_DOT = b"."
_DOTDOT = b".."
# Byte values for membership tests: `0x2F in data` takes bytes' memchr path at once, while `b"/" in data`
# first tries the needle as an integer and raises (and clears) a TypeError every time, 7x the cost.
_SLASH = 0x2F
_HEX_NAMES = [b"%02x" % i for i in range(256)]
_RD_SIZE = 66   # len(b"/XX/<62 hex>"): b"/" + hexlify(digest, b"/", 31) (one separator, after 1 byte)
_MTIME = attrgetter("mtime_ns")
_UID = attrgetter("uid")
_GID = attrgetter("gid")

_MC = fmt.OVERLAY_METACOPY
_RD = fmt.OVERLAY_REDIRECT
_TOP = fmt.OVERLAY_PREFIX
_ESC = fmt.OVERLAY_ESCAPED_PREFIX
_NTOP = len(_TOP)

_FTYPE = fmt.FTYPE_BY_IFMT
_LAYOUT_SHIFT = fmt.I_DATALAYOUT_BIT
_PLAIN = fmt.DataLayout.FLAT_PLAIN << _LAYOUT_SHIFT
_INLINE = fmt.DataLayout.FLAT_INLINE << _LAYOUT_SHIFT
_CHUNK = fmt.DataLayout.CHUNK_BASED << _LAYOUT_SHIFT

# (index, suffix, filter bit, suffix length) per full xattr name; names repeat across images
_KEYINFO: dict[bytes, tuple[int, bytes, int, int]] = {}


def _keyinfo(name: bytes) -> tuple[int, bytes, int, int]:
    info = _KEYINFO.get(name)
    if info is None:
        if not name:
            raise FormatError("empty xattr name")
        index, suffix = fmt.xattr_split(name)
        if len(suffix) > 255:
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
    used = 12 * len(names) + sum(map(len, names))
    if used > BLKSZ:  # more than one block: greedy, by binary search over the running sizes
        cum = list(accumulate(map(len, names), initial=0))
        run = [c + 12 * k for k, c in enumerate(cum)]   # bytes taken by the first k entries
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
    nodes: list[Inode] = [root]
    index: dict[int, int] = {id(root): 0}
    nlink: list[int] = [0]
    nparent: list[int] = [0]
    dparent: dict[int, int] = {0: 0}
    dnames: dict[int, list[bytes]] = {}
    dkids: dict[int, list[int]] = {}
    whiteout_parents: set[int] = set()
    raw: set[int] = set()
    version = 0
    dups: list[tuple[int, bytes, int]] = []
    pending: list[tuple[int, bytes, Inode]] = []
    dirq = [0]   # directories in queue order (only they need a visit of their own)
    for i in dirq:
        node = nodes[i]
        ents = node.entries
        if i == 0 and root_whiteouts:
            missing = [h for h in _HEX_NAMES if h not in ents]
            if missing:
                ents = dict(ents)
                sel = node.xattrs.get(fmt.SELINUX) if node.xattrs else None
                for h in missing:
                    w = Inode(S_IFCHR | 0o644, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns,
                              xattrs={fmt.SELINUX: sel} if sel is not None else None)
                    raw.add(id(w))
                    ents[h] = w
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


def _build(root: Inode, root_whiteouts: bool = True, layout_hook: LayoutHook | None = None):
    """The whole image in one buffer; the cyclic GC is paused meanwhile (it would rescan the tree
    for every few hundred tuples allocated here, for nothing: nothing built here is cyclic)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _build_image(root, root_whiteouts, layout_hook)
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
    big = isize == 64
    sec = node.mtime_ns // NS if isinstance(node.mtime_ns, int) else node.mtime_ns
    checks = (("mode", mode, 0, U16), ("size", size, 0, (1 << 64) - 1 if big else U32),
              ("uid", uid, 0, U32 if big else U16), ("gid", gid, 0, U32 if big else U16),
              ("nlink", nlink, 0, U32 if big else U16), ("rdev/block address", iu, 0, U32),
              ("mtime (seconds)", sec, -(1 << 63) if big else 0, (1 << 63) - 1 if big else U32))
    for name, value, lo, hi in checks:
        if not isinstance(value, int) or not lo <= value <= hi:
            return f"inode field {name} = {value} is out of range ({lo}..{hi})"
    return f"inode field out of range ({e})"


def _build_image(root: Inode, root_whiteouts: bool, layout_hook: LayoutHook | None):
    (nodes, dnames, dkids, nlink, wparents, raw, version, dups, nparent,
     dparent) = _collect(root, root_whiteouts, None)
    if dups:  # hardlinks: queued at their first name in dump order, which may be a later one
        primary = _primary_names(nodes, dnames, dkids, dups, nparent, dparent)
        if primary is not None:
            (nodes, dnames, dkids, nlink, wparents, raw, version,
             *_) = _collect(root, root_whiteouts, primary)
    n = len(nodes)

    mtimes = list(map(_MTIME, nodes))
    try:
        min_mtime = min(mtimes)
    except TypeError:
        raise FormatError("mtime_ns must be an integer") from None
    build_sec, build_nsec = divmod(min_mtime, NS)

    # ---- pass 1: final mode/size/layout/xattrs of every inode ------------------------------------
    modes = [0] * n
    sizes = [0] * n
    layouts = [0] * n
    iu = [0] * n
    tails = [0] * n        # bytes stored inline after the xattrs
    nblk = [0] * n         # data blocks
    xitems: list = [()] * n
    # external file whose xattrs are exactly (metacopy, redirect): True, or its digest when both
    # come from the digest (the most common inode of all: no item tuples are made for it at all)
    fast: list = [False] * n
    dgs: list[bytes] = []   # those digests
    isz = [32 if m == min_mtime else 64 for m in mtimes]   # 32 compact, 64 extended inode (more below)
    ftypes = [0] * n
    dstarts: dict[int, list[int]] = {}
    allitems: list = []
    extend = allitems.extend
    rditems: list = []   # the redirect items of external files whose metacopy item is mc0 (below)
    rdappend = rditems.append
    MC, RD = _MC, _RD
    TOP, ESC, NTOP = _TOP, _ESC, _NTOP
    mc_header = fmt.METACOPY_HEADER
    max_bits = fmt.CHUNK_FORMAT_BLKBITS_MASK + fmt.BLKSZBITS
    blkbits = fmt.BLKSZBITS
    chunk = _CHUNK
    mc0 = (MC, b"")   # the metacopy item of every external file without a digest: one object
    DIGEST_SIZE = fmt.DIGEST_SIZE
    one_chunk = 1 << max_bits   # the largest file with a single chunk
    for i, node in enumerate(nodes):
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
                tails[i] = 4
                layouts[i] = chunk
                ftypes[i] = 1
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
                    nb, tail = divmod(size, BLKSZ)
                    if tail > fmt.DIR_INLINE_MAX:
                        nb += 1
                        tail = 0
                    nblk[i] = nb
                    tails[i] = tail
                    layouts[i] = _INLINE if tail else _PLAIN
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
                        tails[i] = 4
                        iu[i] = cb - blkbits if cb > blkbits else 0
                    else:
                        nch = (size + (1 << max_bits) - 1) >> max_bits
                        if nch > fmt.MAX_NONINLINE_CHUNKS:
                            raise _InodeError(i, f"file too large for a composefs image: {size} bytes")
                        tails[i] = 4 * nch
                        iu[i] = max_bits - fmt.BLKSZBITS
                    layouts[i] = chunk
                elif size < 0:
                    raise _InodeError(i, f"negative file size {size}")
            ftypes[i] = 1
        elif t == S_IFDIR:
            names = dnames[i]
            starts, nb, tail = _dir_blocks(names)
            dstarts[i] = starts
            nblk[i] = nb
            tails[i] = tail
            layouts[i] = _INLINE if tail else _PLAIN
            size = nb * BLKSZ + tail
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
            ftypes[i] = 2
        elif t == S_IFLNK:
            target = node.target
            if not target:
                raise _InodeError(i, "symlink without a target")
            size = len(target)
            if size >= fmt.PATH_MAX:
                raise _InodeError(i, f"symlink target too long ({size} bytes)")
            tails[i] = size
            layouts[i] = _INLINE
            ftypes[i] = 7
        elif t == S_IFCHR or t == S_IFBLK:
            size = 0
            rdev = node.rdev
            if t == S_IFCHR and rdev == 0 and id(node) not in raw:
                mode = S_IFREG | (mode & ~S_IFMT)
                if d is None:
                    d = {}
                d[fmt.OVERLAY_ESCAPED_WHITEOUT] = b""
                d[fmt.USER_OVERLAY_WHITEOUT] = b""
                ftypes[i] = 1
            else:
                if not 0 <= rdev <= U32:
                    raise _InodeError(i, f"device number {rdev:#x} does not fit 32 bits")
                iu[i] = rdev
                ftypes[i] = 3 if t == S_IFCHR else 4
        elif t == S_IFIFO:
            size = 0
            ftypes[i] = 5
        elif t == S_IFSOCK:
            size = 0
            ftypes[i] = 6
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
    uids = list(map(_UID, nodes))
    gids = list(map(_GID, nodes))
    if (n and (max(uids) > U16 or max(gids) > U16 or max(nlink) > U16 or max(sizes) > U32
               or min(uids) < 0 or min(gids) < 0)):
        for i, uid, gid in zip(range(n), uids, gids, strict=True):
            if uid > U16 or gid > U16 or nlink[i] > U16 or sizes[i] > U32:
                isz[i] = 64
            if not (0 <= uid <= (U32 if isz[i] == 64 else U16) and 0 <= gid <= (U32 if isz[i] == 64 else U16)):
                raise _InodeError(i, f"uid/gid {uid}/{gid} does not fit 32 bits" if uid >= 0 and gid >= 0
                                  else f"negative uid/gid {uid}/{gid}")

    # ---- shared xattrs: every (name, value) used more than once ----------------------------------
    counts = Counter(allitems)
    if rditems:
        counts.update(rditems)
        counts[mc0] += len(rditems)
    if dgs:   # the digest-only files' items, where they may be shared (more than one use)
        per_digest = Counter(dgs)
        many = {dg for dg, c in per_digest.items() if c > 1}
        many.update(filter(per_digest.__contains__, map(_digest_of_item, list(counts))))
        for dg in many:
            it_m, it_r = _digest_items(dg)
            counts[it_m] += per_digest[dg]
            counts[it_r] += per_digest[dg]
    keyinfo: dict[bytes, tuple[int, bytes, int, int]] = {}
    shared = _shared_order([it for it, c in counts.items() if c > 1])
    shared_off: dict[tuple[bytes, bytes], int] = {}
    off = 0
    for it in shared:
        shared_off[it] = off
        off += (4 + _keyinfo(it[0])[3] + len(it[1]) + 3) & ~3
    shared_size = off
    for k in set(map(itemgetter(0), allitems)) | ({MC, RD} if rditems or dgs else set()):
        keyinfo[k] = _keyinfo(k)
    if counts and max(map(len, map(itemgetter(1), counts))) > U16:
        k, v = next(kv for kv in counts if len(kv[1]) > U16)
        raise FormatError(f"xattr {k[:64]!r} value too long ({len(v)} bytes)")
    has_acl = fmt.POSIX_ACL_ACCESS in keyinfo or fmt.POSIX_ACL_DEFAULT in keyinfo

    # ---- pass 2: xattr sizes and placement ----------------------------------------------------------
    xsizes = [0] * n
    nids = [0] * n
    forms = [0] * n        # external file: 1 metacopy and redirect inline, 2 metacopy shared, 3 both shared
    pos = fmt.SUPER_OFFSET + fmt.SUPERBLOCK.size
    MAXSH = fmt.MAX_SHARED_PER_INODE
    mc_suffix = 7 + keyinfo[MC][3] if MC in keyinfo else 0
    rd_suffix = 7 + keyinfo[RD][3] if RD in keyinfo else 0
    mc0_shared = mc0 in shared_off
    shared_rd = {v for k, v in shared_off if k == RD}   # the values of the shared redirects
    # the digests whose derived metacopy / redirect is shared, and the sizes of the inline ones
    mc_sh = set(filter(None, [_digest_of_item(it) for it in shared_off if it[0] == MC]))
    rd_sh = set(filter(None, [_digest_of_item(it) for it in shared_off if it[0] == RD]))
    dg_mc_size = 12 + ((mc_suffix + fmt.METACOPY_SIZE) & ~3)
    dg_rd_size = (rd_suffix + _RD_SIZE) & ~3
    dg_shared = bool(mc_sh or rd_sh)
    for i, items, base, tail, fst in zip(range(n), xitems, isz, tails, fast, strict=True):
        if items:
            if fst:
                it_m, it_r = items
                m_sh = mc0_shared if it_m is mc0 else it_m in shared_off
                xsize = 16 if m_sh else 12 + ((mc_suffix + len(it_m[1])) & ~3)
                if it_r[1] in shared_rd and it_r[0] == RD:   # it_r in shared_off, hashing bytes only
                    xsize += 4
                    forms[i] = 3 if xsize == 20 else 0
                else:
                    xsize += (rd_suffix + len(it_r[1])) & ~3
                    forms[i] = 2 if m_sh else 1
            else:
                nsh = 0
                xsize = 12
                for it in items:
                    if nsh < MAXSH and it in shared_off:
                        nsh += 1
                        xsize += 4
                    else:
                        xsize += (7 + keyinfo[it[0]][3] + len(it[1])) & ~3
                if xsize > 12 + 4 * (U16 - 1):
                    raise _InodeError(i, "too many xattrs on one inode")
            xsizes[i] = xsize
            base += xsize
        elif fst:   # metacopy and redirect from the digest `fst`
            if dg_shared and (fst in mc_sh or fst in rd_sh):
                m_sh = fst in mc_sh
                xsize = 16 if m_sh else dg_mc_size
                if fst in rd_sh:
                    xsize += 4
                    forms[i] = 3 if xsize == 20 else 0
                else:
                    xsize += dg_rd_size
                    forms[i] = 2
                xitems[i] = _digest_items(fst)   # the rare forms take the general paths below
            else:
                xsize = dg_mc_size + dg_rd_size
                forms[i] = 1
            xsizes[i] = xsize
            base += xsize
        pos = (pos + 31) & ~31
        if tail:
            if not fst and modes[i] & S_IFMT == S_IFLNK:   # (fst: an external regular file)
                total = base + tail
                if total >= BLKSZ:  # inode + xattrs + target do not fit one block: target in a block
                    nblk[i] = 1
                    tails[i] = tail = 0
                    layouts[i] = _PLAIN
                if pos // BLKSZ != (pos + total - 1) // BLKSZ:
                    pos = (pos + BLKSZ - 1) & ~(BLKSZ - 1)
            else:
                rem = BLKSZ - (pos + base) % BLKSZ
                if rem < tail:
                    extra = (rem + 31) & ~31
                    if tail <= BLKSZ - (pos + base + extra) % BLKSZ:
                        pos += extra
                    else:  # no inline tail after all: a full block, and the inode starts a block
                        nblk[i] += 1
                        if fst and not xitems[i]:   # (the general path writes this one)
                            xitems[i] = _digest_items(fst)
                        tails[i] = tail = 0
                        if layouts[i] != _CHUNK:
                            layouts[i] = _PLAIN
                        if modes[i] & S_IFMT == S_IFDIR:
                            sizes[i] = nblk[i] * BLKSZ
                        pos = (pos + BLKSZ - 1) & ~(BLKSZ - 1)
        nids[i] = pos >> 5
        pos += base + tail
    inodes_end = (pos + 31) & ~31
    if nids[0] > U16:
        raise FormatError("root inode beyond the 16-bit root_nid range")

    xattr_blkaddr = inodes_end // BLKSZ
    id_base = inodes_end % BLKSZ
    shared_ids = {it: (id_base + o) >> 2 for it, o in shared_off.items()}
    data_start = (inodes_end + shared_size + BLKSZ - 1) & ~(BLKSZ - 1)
    total_blocks = data_start // BLKSZ + sum(nblk)
    if total_blocks > U32:
        raise FormatError("image too large")
    if layout_hook is None:
        buf, lo, hi = bytearray(total_blocks * BLKSZ), 0, n
    else:
        import xxhash

        layout = (struct.pack("<QQQQ", n, total_blocks, inodes_end, shared_size)
                  + xxhash.xxh3_128_digest(array("q", nids)))
        buf, lo, hi = layout_hook(n, layout, total_blocks * BLKSZ)
    if not lo:   # the header, superblock and shared xattrs go with the first inodes
        _emit_head(buf, has_acl, version, nids[0], n, build_sec, build_nsec, total_blocks, xattr_blkaddr,
                   shared, keyinfo, inodes_end)
    # ---- inodes, inline tails and data blocks -------------------------------------------------------
    _emit(buf, lo, hi, nodes, modes, nids, nblk, iu, layouts, xsizes, sizes, nlink, isz, forms, xitems,
          uids, gids, fast, tails, dnames, dkids, dstarts, ftypes, shared_ids, keyinfo, mc0,
          data_start // BLKSZ + sum(nblk[:lo]))
    return buf


def _emit_head(buf, has_acl: bool, version: int, root_nid: int, n: int, build_sec: int, build_nsec: int,
               total_blocks: int, xattr_blkaddr: int, shared: list, keyinfo: dict, inodes_end: int) -> None:
    """The composefs header, the superblock and the shared xattr entries (after the inodes)."""
    # ---- header and superblock -----------------------------------------------------------------------
    fmt.COMPOSEFS_HEADER.pack_into(buf, 0, fmt.COMPOSEFS_MAGIC, fmt.COMPOSEFS_HEADER_VERSION,
                                   fmt.ComposefsFlags.HAS_ACL if has_acl else 0, version, b"")
    sb = fmt.Superblock(
        feature_compat=fmt.FeatureCompat.MTIME | fmt.FeatureCompat.XATTR_FILTER,
        root_nid=root_nid, inos=n, build_time=build_sec, build_time_nsec=build_nsec,
        blocks=total_blocks, meta_blkaddr=0, xattr_blkaddr=xattr_blkaddr)
    try:
        fmt.SUPERBLOCK.pack_into(buf, fmt.SUPER_OFFSET, *sb)
    except Exception as e:
        raise FormatError(f"superblock field out of range: {e}") from None

    # ---- shared xattr entries ----------------------------------------------------------------------
    p = inodes_end
    entry_pack = fmt.XATTR_ENTRY.pack_into
    for k, v in shared:
        index, suffix, _bit, nlen = keyinfo[k]
        entry_pack(buf, p, nlen, index, len(v))
        q = p + 4
        buf[q:q + nlen] = suffix
        q += nlen
        buf[q:q + len(v)] = v
        p += (4 + nlen + len(v) + 3) & ~3


def _emit(buf, lo: int, hi: int, nodes: list[Inode], modes: list[int], nids: list[int], nblk: list[int],
          iu: list[int], layouts: list[int], xsizes: list[int], sizes: list[int], nlink: list[int],
          isz: list[int], forms: list[int], xitems: list, uids: list[int], gids: list[int], fast: list,
          tails: list[int], dnames: dict, dkids: dict, dstarts: dict, ftypes: list[int], shared_ids: dict,
          keyinfo: dict, mc0: tuple, cur_blk: int) -> None:
    """Inodes [lo, hi) of the laid-out image (queue order), their inline tails and data blocks (the
    first at block `cur_blk`), into `buf`."""
    MC, RD = _MC, _RD
    mc_header = fmt.METACOPY_HEADER
    DIGEST_SIZE = fmt.DIGEST_SIZE
    cpack = fmt.INODE_COMPACT.pack_into
    epack = fmt.INODE_EXTENDED.pack_into
    null_map = b"\xff\xff\xff\xff"
    body_cache: dict = {}
    heads: dict = {}
    nulls = {4: null_map}
    dirent_structs: dict[int, struct.Struct] = {}

    def pack_block(off: int, bnames: list[bytes], bkids: list[int]) -> None:
        """One directory block at `off`: every (nid, name offset, file type) in one pack, then names."""
        cnt = len(bnames)
        st = dirent_structs.get(cnt)
        if st is None:
            st = dirent_structs[cnt] = struct.Struct("<" + "QHBx" * cnt)
        st.pack_into(buf, off, *chain.from_iterable(zip(
            map(nids.__getitem__, bkids), accumulate(map(len, bnames[:-1]), initial=12 * cnt),
            map(ftypes.__getitem__, bkids), strict=True)))
        off += 12 * cnt
        blob = b"".join(bnames)
        buf[off:off + len(blob)] = blob

    packs: dict[tuple, struct.Struct] = {}
    fcache: dict[tuple, tuple] = {}
    f1cache: dict[object, tuple] = {}
    hexlify = _hexlify
    mc_len = keyinfo[MC][3] if MC in keyinfo else 0
    rd_len = keyinfo[RD][3] if RD in keyinfo else 0
    columns = [nodes, modes, nids, nblk, iu, layouts, xsizes, sizes, nlink, isz, forms, xitems, uids, gids, fast]
    if (lo, hi) != (0, len(nodes)):
        columns = [c[lo:hi] for c in columns]
    for i, node, mode, nid, nb, u, layout, xsize, size, nl, isize, form, items, uid, gid, fst in zip(
            range(lo, hi), *columns, strict=True):
        t = mode & S_IFMT
        pos = nid << 5
        if nb:
            # a chunk map moved to a block keeps its format in the low half of i_u (libcomposefs
            # writes blkaddr, then the chunk format over it in the same union)
            u = (cur_blk & 0xFFFF0000) | u if layout == _CHUNK else cur_blk
        icount = ((xsize - 12) >> 2) + 1 if xsize else 0
        if form == 1 and not nb:
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
                    fc = f1cache[fk] = (_external_struct(isize, [len(h0), len(mv), len(h1), len(rv)], xsize,
                                                         tail).pack_into, h0, h1, null_map * (tail >> 2))
            else:
                # the most common inode of all: both made from the digest (pass 1), so the value
                # lengths and xsize are the same for all; the metacopy header goes with the head
                # before the digest, the redirect's leading "/" with the one before "XX/<62 hex>"
                mv = fst
                rv = hexlify(mv, b"/", 31)
                fk = isize << 16 | tail
                fc = f1cache.get(fk)
                if fc is None:
                    h0, _, h1 = _inline_heads(_digest_items(mv), shared_ids, xsize, keyinfo, mc_len, rd_len)
                    fc = f1cache[fk] = (_external_struct(isize, [len(h0) + len(mc_header), DIGEST_SIZE,
                                                                 len(h1) + 1, _RD_SIZE - 1], xsize,
                                                         tail).pack_into,
                                        h0 + mc_header, h1 + b"/", null_map * (tail >> 2))
            pk, h0, h1, nm = fc
            try:
                if isize == 32:
                    pk(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0, h0, mv, h1, rv, nm)
                else:
                    sec, nsec = divmod(node.mtime_ns, NS)
                    pk(buf, pos, layout | 1, icount, mode, 0, size, u, i, uid, gid, sec, nsec, nl,
                       h0, mv, h1, rv, nm)
            except struct.error as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
            continue
        if form == 2 and not nb:
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
                head = _xattr_body(items, shared_ids, xsize, keyinfo)[:xsize - ((len(rv) + 3) & ~3)]
                fc = fcache[fk] = (_external_struct(isize, [len(head), len(rv)], xsize, tail).pack_into,
                                   head, null_map * (tail >> 2))
            pk, head, nm = fc
            try:
                if isize == 32:
                    pk(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0, head, rv, nm)
                else:
                    sec, nsec = divmod(node.mtime_ns, NS)
                    pk(buf, pos, layout | 1, icount, mode, 0, size, u, i, uid, gid, sec, nsec, nl,
                       head, rv, nm)
            except struct.error as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
            continue
        if form and not nb:
            # an external file in its other forms (2, 3): inode, xattrs and chunk map in one pack
            tail = tails[i]
            if form == 2:  # shared metacopy: cached head (header, its id, redirect entry head) + value
                rv = items[1][1]
                hk = (items[0], len(rv))
                head = heads.get(hk)
                if head is None:
                    head = heads[hk] = _xattr_body(items, shared_ids, xsize, keyinfo)[:xsize - ((len(rv) + 3) & ~3)]
                parts: tuple = (head, rv)
                sk: tuple = (isize, len(head), len(rv), tail)
            else:  # both shared: the body is the header and two ids (form 1 is handled above)
                body = body_cache.get(items)
                if body is None:
                    body = body_cache[items] = _xattr_body(items, shared_ids, xsize, keyinfo)
                parts = (body,)
                sk = (isize, tail)
            st = packs.get(sk)
            if st is None:
                st = packs[sk] = _external_struct(isize, [len(x) for x in parts], xsize, tail)
            nm = nulls.get(tail)
            if nm is None:
                nm = nulls[tail] = null_map * (tail >> 2)
            try:
                if isize == 32:
                    st.pack_into(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0,
                                 *parts, nm)
                else:
                    sec, nsec = divmod(node.mtime_ns, NS)
                    st.pack_into(buf, pos, layout | 1, icount, mode, 0, size, u, i, uid, gid,
                                 sec, nsec, nl, *parts, nm)
            except struct.error as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
            continue
        if isize == 32:
            cpack(buf, pos, layout, icount, mode, nl, size, 0, u, i, uid, gid, 0)
            p = pos + 32
        else:
            sec, nsec = divmod(node.mtime_ns, NS)
            try:
                epack(buf, pos, layout | 1, icount, mode, 0, size, u, i, uid, gid,
                      sec, nsec, nl, b"")
            except Exception as e:
                raise _InodeError(i, _bad_field(node, isize, mode, nl, size, u, uid, gid, e)) from None
            p = pos + 64
        if xsize:
            # the common forms of an external file first (the buffer is zeroed: no padding to write)
            if form == 2:  # shared metacopy: cached head (header, its id, redirect entry head) + value
                rv = items[1][1]
                hk = (items[0], len(rv))
                head = heads.get(hk)
                if head is None:
                    head = heads[hk] = _xattr_body(items, shared_ids, xsize, keyinfo)[:xsize - ((len(rv) + 3) & ~3)]
                q = p + len(head)
                buf[p:q] = head
                buf[q:q + len(rv)] = rv
            elif form == 1:  # both inline: cached entry heads (by value lengths) around the two values
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
                    if layout != _CHUNK or form == 3:  # an external file's body is unique unless all shared
                        body_cache[key] = body
                buf[p:p + xsize] = body
            p += xsize
        tail = tails[i]
        if t == S_IFDIR:
            names = dnames[i]
            kids = dkids[i]
            starts = dstarts[i]
            if len(starts) == 1:   # one block (most directories): no slicing
                pack_block(cur_blk * BLKSZ if nb else p, names, kids)
                cur_blk += nb
                continue
            starts = [*starts, len(names)]
            q = cur_blk * BLKSZ
            for b in range(len(starts) - 1):
                a, e = starts[b], starts[b + 1]
                pack_block(q if b < nb else p, names[a:e], kids[a:e])
                q += BLKSZ
        else:
            if tail:
                if layout == _CHUNK:
                    nm = nulls.get(tail)
                    if nm is None:
                        nm = nulls[tail] = null_map * (tail >> 2)
                    buf[p:p + tail] = nm
                elif t == S_IFLNK:
                    buf[p:p + tail] = node.target
                else:
                    content = node.content
                    buf[p:p + tail] = content[len(content) - tail:]
            if nb:
                if layout == _CHUNK:
                    data = null_map * (BLKSZ >> 2)
                else:
                    data = node.target if t == S_IFLNK else node.content
                q = cur_blk * BLKSZ
                ln = min(len(data), nb * BLKSZ)
                buf[q:q + ln] = data[:ln]
        cur_blk += nb


def _digest_items(dg: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """The (metacopy, redirect) items of an external file known only by its digest."""
    return (_MC, fmt.METACOPY_HEADER + dg), (_RD, b"/" + _hexlify(dg, b"/", 31))


def _digest_of_item(item: tuple[bytes, bytes]) -> bytes | None:
    """The digest whose `_digest_items` include `item`, or None."""
    k, v = item
    if k == _MC:
        if len(v) == fmt.METACOPY_SIZE and v[:4] == fmt.METACOPY_HEADER:
            return v[4:]
    elif k == _RD and len(v) == _RD_SIZE and v[0] == 0x2F and v[3] == 0x2F:
        try:
            dg = bytes.fromhex((v[1:3] + v[4:]).decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        if b"/" + _hexlify(dg, b"/", 31) == v:
            return dg
    return None


def _external_struct(isize: int, parts: list[int], xsize: int, tail: int) -> struct.Struct:
    """One struct for an external file's inode (compact or extended), its xattr body given as byte
    strings of the lengths `parts` (metacopy entry head, value, redirect entry head, value; or head
    and redirect value; or the whole body), padded as in the body, then its NULL chunk map (`tail`
    bytes)."""
    f = ["<HHHHIIIIHHI" if isize == 32 else "<HHHHQIIIIqII16x"]
    if len(parts) == 4:   # both inline: metacopy head + value (padded), redirect head + value
        f += [f"{parts[0]}s{parts[1]}s{-(parts[0] + parts[1]) & 3}x", f"{parts[2]}s{parts[3]}s"]
        used = 12 + ((parts[0] - 12 + parts[1] + 3) & ~3) + parts[2] + parts[3]
    else:
        f += [f"{n}s" for n in parts]
        used = sum(parts)
    f.append(f"{xsize - used}x")
    f.append(f"{tail}s")
    st = struct.Struct("".join(f))
    assert st.size == isize + xsize + tail
    return st


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
    r0 = 12 + ((7 + mc_len + len(items[0][1])) & ~3)
    return body[:16 + mc_len], r0, body[r0:r0 + 4 + rd_len]


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
            inline.append(e + b"\0" * (-len(e) & 3))
    body = b"".join([fmt.XATTR_IBODY_HEADER.pack(fmt.XATTR_FILTER_DEFAULT & ~used, len(ids), b""),
                     *[fmt.XATTR_SHARED_ID.pack(x) for x in ids], *inline])
    assert len(body) == xsize
    return body


def image_buffer(root: Inode, *, root_whiteouts: bool = True, layout_hook: LayoutHook | None = None):
    """`image_bytes` without the copy into a bytes object (for a caller that only writes and hashes
    it): a bytearray, or with `layout_hook` (see LayoutHook) the buffer it gave, written in part."""
    return _build(root, root_whiteouts, layout_hook)


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
