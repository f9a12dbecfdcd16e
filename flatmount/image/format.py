"""EROFS and composefs on-disk records: every struct layout and constant the writer and reader share.

Layouts follow torvalds/linux `fs/erofs/erofs_fs.h` (6.15+ field names in comments) and composefs
`libcomposefs/lcfs-erofs.h`; /work/shared/spec/EROFS.md has the byte tables.  All integers are
little-endian.  Each record is a `struct.Struct` (format string grouped by 16 bytes) plus a
`_Fields` class (a named tuple) with the fields in on-disk order, reserved fields included, so that
`Superblock._make(SUPERBLOCK.unpack_from(buf, off))` reads and `SUPERBLOCK.pack(*sb)` writes.
"""

from __future__ import annotations

import struct
from operator import itemgetter

import xxhash

# --- geometry ------------------------------------------------------------------------------------
BLKSZBITS = 12
BLKSZ = 1 << BLKSZBITS
MIN_BLKSZBITS = 9             # the reader takes 512..4096-byte blocks (the kernel: 512..PAGE_SIZE)
SLOTSIZE = 32                 # inodes start on 32-byte slots; nid = byte offset / 32
ISLOTBITS = 5
SUPER_OFFSET = 1024           # bytes 0..1023 are ignored by the kernel (composefs header lives there)
NAME_LEN = 255                # longest directory entry name
NULL_ADDR = 0xFFFFFFFF        # unmapped block / chunk: reads as zeros
PATH_MAX = 4096               # symlink targets must be shorter than this

# composefs writer choices (libcomposefs/lcfs-writer-erofs.c)
DIR_INLINE_MAX = BLKSZ // 2   # a directory tail (or inline-content tail) above this gets a full block
MAX_SHARED_PER_INODE = 128    # at most this many shared xattr ids per inode; the rest stay inline
MAX_NONINLINE_CHUNKS = 1024   # composefs caps the NULL chunk map at one block


class _Constants:
    """A namespace of named on-disk values, plain ints (flags combine with `|`).  Not `enum`: its
    classes cost 0.3-0.5 ms each to create, and every process that writes or reads an image paid
    for six of them (~2 ms of a `flatmount flatten` or `mkimage`)."""


class _Fields(tuple):
    """The fields of one on-disk struct, in layout order, each declared with its default: a named
    tuple as `typing.NamedTuple` makes one (fields by name and by position, `_fields`, `_make`,
    keyword construction), without its class creation, which compiles a `__new__` for every class
    (0.2-0.3 ms each: the eight records here were half of this module's import, paid by every
    process that writes or reads an image)."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _field_defaults: dict[str, object] = {}

    def __init_subclass__(cls) -> None:
        names = tuple(cls.__annotations__)
        cls._field_defaults = {name: cls.__dict__[name] for name in names}
        cls._fields = names
        for i, name in enumerate(names):
            setattr(cls, name, property(itemgetter(i)))

    def __new__(cls, *args: object, **kwargs: object):
        names = cls._fields
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__} takes {len(names)} fields, got {len(args)}")
        values = list(args)
        for name in names[len(args):]:
            values.append(kwargs.pop(name) if name in kwargs else cls._field_defaults[name])
        if kwargs:
            raise TypeError(f"{cls.__name__}: unexpected or repeated fields {sorted(kwargs)}")
        return tuple.__new__(cls, values)

    @classmethod
    def _make(cls, values):
        """The record of `values` (one per field, in order), as a struct's unpack gives them."""
        record = tuple.__new__(cls, values)
        if len(record) != len(cls._fields):
            raise TypeError(f"{cls.__name__} takes {len(cls._fields)} fields, got {len(record)}")
        return record

    def __getnewargs__(self) -> tuple:
        return tuple(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={v!r}' for n, v in zip(self._fields, self, strict=True))})"


# --- composefs header (bytes 0..31) --------------------------------------------------------------
COMPOSEFS_MAGIC = 0xD078629A
COMPOSEFS_HEADER_VERSION = 1   # lcfs_erofs_header_s.version (LCFS_EROFS_VERSION)


class ComposefsFlags(_Constants):
    HAS_ACL = 0x1


COMPOSEFS_HEADER = struct.Struct(
    "<IIII"     # 00 magic, version, flags, composefs_version
    "16s"       # 10 unused[4]
)


class ComposefsHeader(_Fields):
    magic: int = COMPOSEFS_MAGIC
    version: int = COMPOSEFS_HEADER_VERSION
    flags: int = 0
    composefs_version: int = 0
    unused: bytes = bytes(16)


# --- superblock (absolute offset 1024) ------------------------------------------------------------
SUPER_MAGIC = 0xE0F5E1E2


class FeatureCompat(_Constants):
    SB_CHKSUM = 0x1
    MTIME = 0x2
    XATTR_FILTER = 0x4
    SHARED_EA_IN_METABOX = 0x8
    PLAIN_XATTR_PFX = 0x10


class FeatureIncompat(_Constants):
    ZERO_PADDING = 0x1
    COMPR_CFGS = 0x2          # also BIG_PCLUSTER
    CHUNKED_FILE = 0x4
    DEVICE_TABLE = 0x8        # also COMPR_HEAD2
    ZTAILPACKING = 0x10
    FRAGMENTS = 0x20          # also DEDUPE
    XATTR_PREFIXES = 0x40
    BLOCKS_48BIT = 0x80
    METABOX = 0x100


SUPERBLOCK = struct.Struct(
    "<IIIBBHQ"  # 00 magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos
    "qII"       # 10 (inos) build_time (epoch, s64), build_time_nsec (fixed_nsec), blocks
    "II16s"     # 20 (..) meta_blkaddr, xattr_blkaddr, uuid
    "16s"       # 40 volume_name
    "IHHHBBI"   # 50 feature_incompat, available_compr_algs, extra_devices, devt_slotoff, dirblkbits,
                #    xattr_prefix_count, xattr_prefix_start
    "QB3sI"     # 60 packed_nid, xattr_filter_reserved, reserved, build_time_u32 (6.15+)
    "Q8s"       # 70 rootnid_8b (48BIT only), reserved2
)


class Superblock(_Fields):
    magic: int = SUPER_MAGIC
    checksum: int = 0
    feature_compat: int = 0
    blkszbits: int = BLKSZBITS
    sb_extslots: int = 0
    root_nid: int = 0
    inos: int = 0
    build_time: int = 0
    build_time_nsec: int = 0
    blocks: int = 0
    meta_blkaddr: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    feature_incompat: int = 0
    available_compr_algs: int = 0
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    packed_nid: int = 0
    xattr_filter_reserved: int = 0
    reserved: bytes = bytes(3)
    build_time_u32: int = 0
    rootnid_8b: int = 0
    reserved2: bytes = bytes(8)


# --- inodes -------------------------------------------------------------------------------------
I_VERSION_MASK = 0x1          # i_format bit 0: 0 compact, 1 extended
I_FORMAT_COMPACT = 0
I_FORMAT_EXTENDED = 1
I_DATALAYOUT_BIT = 1
I_DATALAYOUT_MASK = 0x7
I_FORMAT_KNOWN = 0xF          # bits >= 4 (6.15 NLINK_1 / DOT_OMITTED) are rejected by older kernels
INODE_COMPACT_SIZE = 32       # one slot
INODE_EXTENDED_SIZE = 64      # two slots


class DataLayout(_Constants):
    FLAT_PLAIN = 0
    COMPRESSED_FULL = 1
    FLAT_INLINE = 2
    COMPRESSED_COMPACT = 3
    CHUNK_BASED = 4


CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_48BIT = 0x40
CHUNK_FORMAT_KNOWN = 0x7F     # bits above are unknown to every kernel
CHUNK_FORMAT_MASK = 0xFFFF    # the chunk format is the low half of i_u; libcomposefs may leave a block
                              # address in the high half (a chunk map moved to a block)
CHUNK_ADDR_SIZE = 4           # a block map entry (no INDEXES bit): what composefs writes
CHUNK_INDEX_SIZE = 8          # a chunk index entry (INDEXES bit)
NULL_CHUNK = b"\xff\xff\xff\xff"   # a block map entry of NULL_ADDR: a chunk that reads as zeros

INODE_COMPACT = struct.Struct(
    "<HHHHIIIIHHI"  # 00 i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_mtime, i_u, i_ino,
                    #    i_uid, i_gid, i_reserved
)


class InodeCompact(_Fields):
    i_format: int = 0
    i_xattr_icount: int = 0
    i_mode: int = 0
    i_nlink: int = 0
    i_size: int = 0
    i_mtime: int = 0          # 6.15+: seconds added to the superblock epoch; older kernels ignore it
    i_u: int = 0              # raw_blkaddr / rdev / chunk format (le16) + reserved (le16)
    i_ino: int = 0
    i_uid: int = 0
    i_gid: int = 0
    i_reserved: int = 0


INODE_EXTENDED = struct.Struct(
    "<HHHHQII"  # 00 i_format, i_xattr_icount, i_mode, i_reserved (startblk_hi), i_size, i_u, i_ino
    "IIqII"     # 18 i_uid, i_gid, i_mtime (s64), i_mtime_nsec, i_nlink
    "16s"       # 30 i_reserved2
)
# the same inodes for the hot loops: without the trailing reserved field (read), or with it as padding
# (written, into a zeroed buffer: one argument less per inode)
INODE_COMPACT_HEAD = struct.Struct(INODE_COMPACT.format[:-1])
INODE_EXTENDED_HEAD = struct.Struct(INODE_EXTENDED.format[:-3])
INODE_EXTENDED_PADDED = struct.Struct(INODE_EXTENDED.format[:-3] + "16x")


class InodeExtended(_Fields):
    i_format: int = 1
    i_xattr_icount: int = 0
    i_mode: int = 0
    i_reserved: int = 0
    i_size: int = 0
    i_u: int = 0
    i_ino: int = 0
    i_uid: int = 0
    i_gid: int = 0
    i_mtime: int = 0
    i_mtime_nsec: int = 0
    i_nlink: int = 0
    i_reserved2: bytes = bytes(16)


CHUNK_INDEX = struct.Struct(
    "<HHI"      # 00 startblk_hi, device_id, startblk_lo (8-byte chunk index, INDEXES format)
)


class ChunkIndex(_Fields):
    startblk_hi: int = 0
    device_id: int = 0
    startblk_lo: int = NULL_ADDR


CHUNK_ADDR = struct.Struct("<I")  # 4-byte block map entry (no INDEXES bit)


# --- extended attributes -------------------------------------------------------------------------
class XattrIndex(_Constants):
    NONE = 0                  # composefs writes unknown namespaces with index 0 and the full name
    USER = 1
    POSIX_ACL_ACCESS = 2
    POSIX_ACL_DEFAULT = 3
    TRUSTED = 4
    LUSTRE = 5
    SECURITY = 6


XATTR_LONG_PREFIX = 0x80
XATTR_FILTER_SEED = 0x25BBE08F
XATTR_FILTER_BITS = 32
XATTR_FILTER_DEFAULT = 0xFFFFFFFF

# Prefix matching order used by the composefs writer (lustre. is not in it: written as index 0).
XATTR_WRITE_PREFIXES: tuple[tuple[bytes, int], ...] = (
    (b"user.", XattrIndex.USER),
    (b"system.posix_acl_access", XattrIndex.POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", XattrIndex.POSIX_ACL_DEFAULT),
    (b"trusted.", XattrIndex.TRUSTED),
    (b"security.", XattrIndex.SECURITY),
)
XATTR_READ_PREFIXES: dict[int, bytes] = {
    XattrIndex.NONE: b"",
    XattrIndex.USER: b"user.",
    XattrIndex.POSIX_ACL_ACCESS: b"system.posix_acl_access",
    XattrIndex.POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    XattrIndex.TRUSTED: b"trusted.",
    XattrIndex.LUSTRE: b"lustre.",
    XattrIndex.SECURITY: b"security.",
}

XATTR_IBODY_HEADER = struct.Struct(
    "<IB7s"     # 00 h_name_filter, h_shared_count, h_reserved2
)
XATTR_IBODY_COUNTS = struct.Struct(XATTR_IBODY_HEADER.format[:-2])   # the header without h_reserved2
XATTR_HEADER_SIZE = 12        # the inline xattr body starts with XATTR_IBODY_HEADER
XATTR_ID_SIZE = 4             # then h_shared_count shared xattr ids (le32: offset / 4 in the shared area)
XATTR_ENTRY_SIZE = 4          # then entries: XATTR_ENTRY, suffix, value, padded to XATTR_ALIGN
XATTR_ALIGN = 4
XATTR_ICOUNT_MAX = 0xFFFF     # i_xattr_icount: xattr body = 12 + 4 * (icount - 1) bytes


class XattrIbodyHeader(_Fields):
    h_name_filter: int = XATTR_FILTER_DEFAULT
    h_shared_count: int = 0
    h_reserved2: bytes = bytes(7)


XATTR_ENTRY = struct.Struct(
    "<BBH"      # 00 e_name_len, e_name_index, e_value_size; then suffix, value, pad to 4
)


class XattrEntry(_Fields):
    e_name_len: int = 0
    e_name_index: int = 0
    e_value_size: int = 0


XATTR_SHARED_ID = struct.Struct("<I")
TWO_XATTR_IDS = struct.Struct("<II")
LE16 = struct.Struct("<H")    # one field alone: an entry's e_value_size, an inode's i_format
_XATTR_IDS: dict[int, struct.Struct] = {}


def xattr_ids_struct(count: int) -> struct.Struct:
    """`count` shared xattr ids in one struct (cached; counts are at most 255)."""
    st = _XATTR_IDS.get(count)
    if st is None:
        st = _XATTR_IDS[count] = struct.Struct(f"<{count}I")
    return st

# --- directories ---------------------------------------------------------------------------------
DIRENT = struct.Struct(
    "<QHBB"     # 00 nid, nameoff, file_type, reserved
)


DIRENT_SIZE = 12
_DIRENT_BLOCKS: dict[int, struct.Struct] = {}
_DIRENT_BLOCKS_PADDED: dict[int, struct.Struct] = {}


def dirents_struct(count: int) -> struct.Struct:
    """All `count` dirents of a directory block in one struct (read: every field)."""
    st = _DIRENT_BLOCKS.get(count)
    if st is None:
        st = _DIRENT_BLOCKS[count] = struct.Struct("<" + DIRENT.format[1:] * count)
    return st


def dirents_pack_struct(count: int) -> struct.Struct:
    """The same for writing into a zeroed buffer: nid, nameoff, file_type per dirent, reserved skipped."""
    st = _DIRENT_BLOCKS_PADDED.get(count)
    if st is None:
        st = _DIRENT_BLOCKS_PADDED[count] = struct.Struct("<" + (DIRENT.format[1:-1] + "x") * count)
    return st


class Dirent(_Fields):
    nid: int = 0
    nameoff: int = 0
    file_type: int = 0
    reserved: int = 0


class FileType(_Constants):
    UNKNOWN = 0
    REG_FILE = 1
    DIR = 2
    CHRDEV = 3
    BLKDEV = 4
    FIFO = 5
    SOCK = 6
    SYMLINK = 7


# st_mode file type (S_IFMT bits >> 12) -> dirent file type
FTYPE_BY_IFMT: dict[int, int] = {
    0o100000: FileType.REG_FILE, 0o040000: FileType.DIR, 0o020000: FileType.CHRDEV,
    0o060000: FileType.BLKDEV, 0o010000: FileType.FIFO, 0o140000: FileType.SOCK,
    0o120000: FileType.SYMLINK,
}

# --- overlayfs xattrs (EROFS.md section 8) -------------------------------------------------------
OVERLAY_PREFIX = b"trusted.overlay."
OVERLAY_ESCAPED_PREFIX = b"trusted.overlay.overlay."
OVERLAY_METACOPY = b"trusted.overlay.metacopy"
OVERLAY_REDIRECT = b"trusted.overlay.redirect"
OVERLAY_OPAQUE = b"trusted.overlay.opaque"
OVERLAY_ESCAPED_WHITEOUT = b"trusted.overlay.overlay.whiteout"
OVERLAY_ESCAPED_WHITEOUTS = b"trusted.overlay.overlay.whiteouts"
OVERLAY_ESCAPED_OPAQUE = b"trusted.overlay.overlay.opaque"
USER_OVERLAY_WHITEOUT = b"user.overlay.whiteout"
USER_OVERLAY_WHITEOUTS = b"user.overlay.whiteouts"
USER_OVERLAY_OPAQUE = b"user.overlay.opaque"
SELINUX = b"security.selinux"
POSIX_ACL_ACCESS = b"system.posix_acl_access"
POSIX_ACL_DEFAULT = b"system.posix_acl_default"

METACOPY_HEADER = b"\x00\x24\x00\x01"   # version 0, len 36, flags 0, FS_VERITY_HASH_ALG_SHA256
DIGEST_SIZE = 32
METACOPY_SIZE = len(METACOPY_HEADER) + DIGEST_SIZE   # the whole value: header and fs-verity digest

# --- an external file's inode, xattrs and chunk map in one record (writer and reader hot loops) ----
# The usual xattr body of an external file is a metacopy and a redirect (EROFS.md section 8), each
# inline or shared; these structs cover the body after XATTR_IBODY_HEADER.
def external_inode_struct(isize: int, parts: list[int], xsize: int, tail: int) -> struct.Struct:
    """An external file's inode (compact, or extended with i_reserved2 as padding) followed by its xattr
    body given as byte strings of the lengths `parts` (metacopy entry head, value, redirect entry head,
    value; or head and redirect value; or the whole body), padded as in the body to `xsize`, then its
    NULL chunk map (`tail` bytes)."""
    f = [INODE_COMPACT.format if isize == INODE_COMPACT_SIZE else INODE_EXTENDED_PADDED.format]
    if len(parts) == 4:   # both inline: metacopy head + value (padded), redirect head + value
        f += [f"{parts[0]}s{parts[1]}s{-(parts[0] + parts[1]) % XATTR_ALIGN}x", f"{parts[2]}s{parts[3]}s"]
        used = (XATTR_HEADER_SIZE + round_up(parts[0] - XATTR_HEADER_SIZE + parts[1], XATTR_ALIGN)
                + parts[2] + parts[3])
    else:
        f += [f"{n}s" for n in parts]
        used = sum(parts)
    f.append(f"{xsize - used}x")
    f.append(f"{tail}s")
    st = struct.Struct("".join(f))
    assert st.size == isize + xsize + tail
    return st


def both_inline_struct(redirect_len: int) -> struct.Struct:
    """The body after the header when both are inline: metacopy entry head (with its suffix), metacopy
    header, digest, redirect entry head (with its suffix), `/`, the rest of the redirect."""
    head = XATTR_ENTRY_SIZE + len(b"overlay.metacopy")
    return struct.Struct(f"<{head}s{len(METACOPY_HEADER)}s{DIGEST_SIZE}s{head}s1s{redirect_len - 1}s")


def redirect_inline_struct(redirect_len: int) -> struct.Struct:
    """The same with the metacopy shared: its shared id, then the inline redirect."""
    head = XATTR_ENTRY_SIZE + len(b"overlay.redirect")
    return struct.Struct(f"<I{head}s1s{redirect_len - 1}s")


# What a writer hands its layout hook to compare layouts by (not on disk): inode count, blocks, end of
# the inodes, size of the shared xattrs; a hash of the nids follows.
LAYOUT_FINGERPRINT = struct.Struct("<QQQQ")


def field_offsets(st: struct.Struct, record: type) -> dict[str, int]:
    """Byte offset of each field of a record (`record`: its `_Fields` class), for messages that point at
    the damaged field."""
    offsets = {}
    prefix = st.format[0]
    for name, code in zip(record._fields, _codes(st.format[1:]), strict=True):
        offsets[name] = struct.calcsize(prefix)
        prefix += code
    return offsets


def _codes(layout: str) -> list[str]:
    """The codes of a struct layout with their counts (`"<I16sH"[1:]` -> `["I", "16s", "H"]`); by
    hand, not with `re`, whose import alone costs a process started without it ~14 ms."""
    codes, count = [], ""
    for ch in layout:
        if ch.isdigit():
            count += ch
        elif not ch.isspace():
            codes.append(count + ch)
            count = ""
    return codes


COMPOSEFS_HEADER_AT = field_offsets(COMPOSEFS_HEADER, ComposefsHeader)
SUPERBLOCK_AT = field_offsets(SUPERBLOCK, Superblock)
INODE_COMPACT_AT = field_offsets(INODE_COMPACT, InodeCompact)
INODE_EXTENDED_AT = field_offsets(INODE_EXTENDED, InodeExtended)
XATTR_ENTRY_AT = field_offsets(XATTR_ENTRY, XattrEntry)
DIRENT_AT = field_offsets(DIRENT, Dirent)
SB_CHECKSUM = slice(SUPERBLOCK_AT["checksum"], SUPERBLOCK_AT["checksum"] + 4)   # zeroed while summing


# --- checks on the layouts ------------------------------------------------------------------------
assert COMPOSEFS_HEADER.size == 32
assert SUPERBLOCK.size == 128
assert INODE_COMPACT.size == 32
assert INODE_EXTENDED.size == 64
assert DIRENT.size == 12
assert XATTR_IBODY_HEADER.size == 12
assert XATTR_ENTRY.size == XATTR_ENTRY_SIZE
assert XATTR_SHARED_ID.size == XATTR_ID_SIZE
assert CHUNK_INDEX.size == CHUNK_INDEX_SIZE
assert CHUNK_ADDR.size == CHUNK_ADDR_SIZE == len(NULL_CHUNK)
assert INODE_COMPACT.size == INODE_COMPACT_SIZE == INODE_COMPACT_HEAD.size + 4 == 1 << ISLOTBITS == SLOTSIZE
assert INODE_EXTENDED.size == INODE_EXTENDED_SIZE == INODE_EXTENDED_PADDED.size == INODE_EXTENDED_HEAD.size + 16
assert XATTR_IBODY_HEADER.size == XATTR_HEADER_SIZE
assert DIRENT.size == DIRENT_SIZE
assert (SUPERBLOCK_AT["blkszbits"], SUPERBLOCK_AT["dirblkbits"], INODE_EXTENDED_AT["i_mtime_nsec"],
        INODE_COMPACT_AT["i_u"], DIRENT_AT["nameoff"], XATTR_ENTRY_AT["e_value_size"]) == (0xC, 0x5A, 0x28, 0x10, 8, 2)
assert len(Superblock._fields) == len(SUPERBLOCK.unpack(bytes(SUPERBLOCK.size)))
assert len(InodeCompact._fields) == len(INODE_COMPACT.unpack(bytes(32)))
assert len(InodeExtended._fields) == len(INODE_EXTENDED.unpack(bytes(64)))


# --- small pure helpers shared by writer and reader ----------------------------------------------
MAGIC = struct.Struct("<I")   # the first field of the composefs header and of the superblock
KIND_PROBE = SUPER_OFFSET + MAGIC.size   # bytes `image_kind` needs


def image_kind(head: bytes) -> str:
    """"composefs", "erofs" or "other", from the first KIND_PROBE bytes of a file."""
    if len(head) < KIND_PROBE or MAGIC.unpack_from(head, SUPER_OFFSET)[0] != SUPER_MAGIC:
        return "other"
    return "composefs" if MAGIC.unpack_from(head, 0)[0] == COMPOSEFS_MAGIC else "erofs"


def xattr_split(name: bytes) -> tuple[int, bytes]:
    """(e_name_index, suffix) for a full xattr name, composefs prefix order."""
    for prefix, index in XATTR_WRITE_PREFIXES:
        if name.startswith(prefix):
            return int(index), name[len(prefix):]
    return 0, name


def xattr_filter_bit(index: int, suffix: bytes) -> int:
    """The bloom-filter bit the kernel (6.6+) tests for this xattr name."""
    return xxhash.xxh32_intdigest(suffix, XATTR_FILTER_SEED + index) & (XATTR_FILTER_BITS - 1)


def round_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def chunk_bits(size: int) -> int:
    """composefs chunk size for an external file of `size` (> 0) bytes: one chunk when possible."""
    bits = max((size - 1).bit_length(), BLKSZBITS)
    return min(bits, CHUNK_FORMAT_BLKBITS_MASK + BLKSZBITS)


def crc32c_linux(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """Linux `crc32c()` convention (no final xor), as the superblock checksum uses."""
    table = _crc32c_table()
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


_CRC_TABLE: list[int] = []


def _crc32c_table() -> list[int]:
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            _CRC_TABLE.append(c)
    return _CRC_TABLE
