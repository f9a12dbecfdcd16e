"""fs-verity SHA-256 digests (4096-byte blocks, no salt), equal to `fsverity digest`.

Objects are addressed by the digest the kernel would report for them with fs-verity enabled, so an
image's metacopy xattr can be checked by overlayfs.  Algorithm (spec/EROFS.md section 9): SHA-256 of
each 4096-byte block (the last one zero-padded); hashes are concatenated, cut into 4096-byte blocks
(128 hashes each) and hashed again until one hash is left, the root; the digest is the SHA-256 of a
256-byte descriptor holding the file size and the root.  An empty file has an all-zero root.

`FsVerityHasher` streams: it keeps less than one block of data plus less than one block of hashes
per tree level, so memory is O(depth) whatever the input size.  The per-block hashes come from one
call into a compiled loop where it was built (objects/_fsverity.c: AVX-512 sixteen blocks at a time,
SHA-NI two at a time, or libcrypto; the GIL released), from one hashlib call per block otherwise:
same digests.
"""

from __future__ import annotations

import os
import struct
import sys
from hashlib import sha256
from typing import TYPE_CHECKING, BinaryIO

from .compiled import load
from .errors import InvalidDigestError
from .sha256 import STREAM, StreamSha256  # noqa: F401 - StreamSha256: its old home, still imported from here

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Sequence

BLOCK_SIZE = 4096
HASH_SIZE = 32
DIGEST_SIZE = 32
HEX_SIZE = 2 * DIGEST_SIZE
HASH_ALG_SHA256 = 1
LOG_BLOCKSIZE = 12
READ_CHUNK = 1 << 20  # 256 blocks: big enough that per-call overhead vanishes, small enough for cache

# struct fsverity_descriptor (256 bytes, little-endian)
#   0 version u8, hash_algorithm u8, log_blocksize u8, salt_size u8, reserved u32, data_size le64
#  16 root_hash[64]
#  80 salt[32]
# 112 reserved[144]
DESCRIPTOR = struct.Struct("<BBBBIQ64s32s144s")
assert DESCRIPTOR.size == 256

_ZERO_ROOT = bytes(HASH_SIZE)
_ZERO_BLOCK = bytes(BLOCK_SIZE)


def descriptor_digest(size: int, root_hash: bytes) -> bytes:
    """SHA-256 of the fs-verity descriptor for a file of `size` bytes with Merkle root `root_hash`."""
    return sha256(DESCRIPTOR.pack(1, HASH_ALG_SHA256, LOG_BLOCKSIZE, 0, 0, size, root_hash, b"", b"")).digest()


def _hash_full_blocks_py(mv: memoryview) -> bytes:
    """Concatenated SHA-256 of each 4096-byte block of `mv` (its length a multiple of 4096)."""
    h = sha256
    return b"".join([h(mv[i : i + BLOCK_SIZE]).digest() for i in range(0, len(mv), BLOCK_SIZE)])


# the same in one compiled loop, without the GIL (objects/_fsverity.c; optional at install)
_fsverity = load("objects._fsverity")
hash_full_blocks = _hash_full_blocks_py if _fsverity is None else _fsverity.hash_blocks

NATIVE = hash_full_blocks is not _hash_full_blocks_py  # whether the compiled loop is in use
STREAM_BLOCKS = NATIVE and STREAM  # StreamSha256 (objects.sha256) can do block hashes too


def implementation() -> str:
    """Which per-block SHA-256 the digests use: the compiled loop's path (e.g. `avx512`, `sha-ni`,
    `libcrypto`) or `hashlib` when the extension was not built."""
    if not NATIVE:
        return "hashlib (objects/_fsverity.c not built, or FLATMOUNT_PURE set)"
    return f"compiled loop, {_fsverity.IMPLEMENTATION}"


if (_logging := sys.modules.get("logging")) is not None:  # `flatmount -v`: say which one was chosen
    _logging.getLogger("objects").debug("fs-verity hashing: %s", implementation())


def _hash_blocks(data: bytes | bytearray | memoryview) -> bytes:
    """Concatenated SHA-256 of each 4096-byte block of `data` (the last block zero-padded)."""
    mv = memoryview(data)
    n = len(mv)
    full = n - n % BLOCK_SIZE
    out = hash_full_blocks(mv[:full]) if full else b""
    if full < n:
        out += sha256(bytes(mv[full:]) + _ZERO_BLOCK[: BLOCK_SIZE - (n - full)]).digest()
    return out


class FsVerityHasher:
    """Incremental fs-verity digest: `update()` with chunks of any size, then `digest()`.

    Chunks that are whole multiples of 4096 bytes (e.g. 1 MiB reads) avoid an internal copy.
    `digest()` does not consume the state: more data may follow, like hashlib objects.
    """

    __slots__ = ("size", "_partial", "_levels")

    def __init__(self, data: bytes | bytearray | memoryview = b"") -> None:
        self.size = 0  # bytes hashed so far
        self._partial = bytearray()  # data not yet making up a whole block (< 4096 bytes)
        self._levels: list[bytearray] = [bytearray()]  # per tree level, hashes not yet filling a block
        if data:
            self.update(data)

    def update(self, data: bytes | bytearray | memoryview, head_hashes: bytes | None = None) -> None:
        """Hash more data.

        `head_hashes`: the SHA-256 of each of the first whole blocks of `data`, already computed
        (e.g. by another thread, `hash_full_blocks`); only where `data` starts on a block boundary.
        """
        mv = memoryview(data)
        if mv.itemsize != 1 or mv.ndim != 1:
            mv = mv.cast("B")
        n = len(mv)
        if not n:
            return
        if head_hashes:
            done = len(head_hashes) // HASH_SIZE * BLOCK_SIZE
            if self._partial or done > n or len(head_hashes) % HASH_SIZE:
                raise ValueError("head_hashes given for data that does not start on a block boundary, or too many")
            self.size += done
            self._push(0, head_hashes)
            mv = mv[done:]
            n -= done
            if not n:
                return
        self.size += n
        pos = 0
        partial = self._partial
        if partial:
            pos = min(BLOCK_SIZE - len(partial), n)
            partial += mv[:pos]
            if len(partial) < BLOCK_SIZE:
                return
            self._push(0, sha256(partial).digest())
            partial.clear()
        end = n - (n - pos) % BLOCK_SIZE
        if end > pos:
            self._push(0, hash_full_blocks(mv[pos:end]))
        if end < n:
            partial += mv[end:]

    def _push(self, level: int, hashes: bytes) -> None:
        """Append hashes to a level; each block of 128 hashes it completes goes up one level."""
        levels = self._levels
        buf = levels[level]
        buf += hashes
        if len(buf) < BLOCK_SIZE:
            return
        full = len(buf) - len(buf) % BLOCK_SIZE
        up = _hash_blocks(bytes(buf[:full]))
        del buf[:full]
        if level + 1 == len(levels):
            levels.append(bytearray())
        self._push(level + 1, up)

    def root_hash(self) -> bytes:
        """Merkle tree root of the data so far (32 zero bytes for no data)."""
        if not self.size:
            return _ZERO_ROOT
        pending = [bytes(b) for b in self._levels]
        if self._partial:
            pending[0] += sha256(bytes(self._partial) + _ZERO_BLOCK[len(self._partial) :]).digest()
        level = 0
        while True:
            hashes = pending[level]
            if level == len(pending) - 1:
                if len(hashes) == HASH_SIZE:
                    return hashes
                pending.append(b"")
            if hashes:
                pending[level + 1] += _hash_blocks(hashes)
            level += 1

    def digest(self) -> bytes:
        """fs-verity digest (32 raw bytes) of the data so far."""
        return descriptor_digest(self.size, self.root_hash())

    def hexdigest(self) -> str:
        """`digest()` as 64 lowercase hex digits (what `fsverity digest` prints after `sha256:`)."""
        return self.digest().hex()


def _fsverity_digest_py(data: bytes | bytearray | memoryview) -> bytes:
    """fs-verity digest (32 raw bytes) of an in-memory byte string: the specification of the
    compiled `_fsverity.digest` (see `fsverity_digest`)."""
    n = len(data) if isinstance(data, bytes | bytearray) else memoryview(data).nbytes
    if n == 0:
        return descriptor_digest(0, _ZERO_ROOT)
    if n <= BLOCK_SIZE:  # one block: the root is the hash of the padded data (the common small file)
        return descriptor_digest(n, sha256(bytes(data) + _ZERO_BLOCK[n:]).digest())
    if n <= _ONE_LEVEL_MAX:  # two levels: the root hashes the block hashes, zero-padded to one block
        hashes = _hash_blocks(memoryview(data).cast("B"))  # (small files of a few blocks: no hasher object, no tree walk)
        return descriptor_digest(n, sha256(hashes + _ZERO_BLOCK[len(hashes):]).digest())
    return FsVerityHasher(data).digest()


_ONE_LEVEL_MAX = BLOCK_SIZE // HASH_SIZE * BLOCK_SIZE  # 128 blocks: their hashes fill one block

# fs-verity digest (32 raw bytes) of an in-memory byte string.  The compiled one (objects/_fsverity.c,
# the whole tree and the descriptor in one call) where it was built: for the small files of a layer,
# which are hashed one at a time in the importing process, the Python calls around the per-block
# hashes cost several times the hashing itself.  Same digests (tests compare the two).
fsverity_digest = _fsverity_digest_py if _fsverity is None else _fsverity.digest


def _fsverity_digests_py(datas: Sequence[bytes | bytearray | memoryview]) -> list[bytes]:
    """`fsverity_digest` of each buffer: the specification of the compiled `_fsverity.digests`."""
    return [fsverity_digest(d) for d in datas]


def _fsverity_digests_c(datas: Sequence[bytes | bytearray | memoryview]) -> list[bytes]:
    out = _fsverity.digests(datas)
    return [out[i:i + DIGEST_SIZE] for i in range(0, len(out), DIGEST_SIZE)]


# the digests of many small buffers (a layer's small files), their blocks hashed together in one
# compiled loop (SHA-NI pairs blocks of different files: about a third less CPU than one by one)
fsverity_digests = _fsverity_digests_py if _fsverity is None else _fsverity_digests_c


def digest_stream(f: BinaryIO) -> bytes:
    """fs-verity digest of everything read from `f` until EOF."""
    hasher = FsVerityHasher()
    readinto = getattr(f, "readinto", None)
    if readinto is None:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
        return hasher.digest()
    buf = bytearray(READ_CHUNK)
    mv = memoryview(buf)
    while n := readinto(buf):
        hasher.update(mv[:n])
    return hasher.digest()


def digest_file(path: str | os.PathLike[str]) -> bytes:
    """fs-verity digest of a file's content."""
    with open(path, "rb", buffering=0) as f:
        return digest_stream(f)


def parse_digest(digest: bytes | str) -> bytes:
    """Normalise a digest to 32 raw bytes.

    Accepted: 32 raw bytes, 64 hex digits (str or ASCII bytes, any case, optional `sha256:` prefix) or
    an object path `XX/<62 hex>` as found in image redirects.
    """
    if isinstance(digest, bytes | bytearray | memoryview):
        raw = bytes(digest)
        if len(raw) == DIGEST_SIZE:
            return raw
        try:
            digest = raw.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidDigestError(f"invalid digest: {len(raw)} bytes, expected 32 raw bytes or 64 hex") from None
    if isinstance(digest, str):
        text = digest.removeprefix("sha256:")
        if len(text) == HEX_SIZE + 1 and text[2] == "/":
            text = text[:2] + text[3:]
        if len(text) == HEX_SIZE:
            try:
                raw = bytes.fromhex(text)
            except ValueError:
                pass
            else:
                if len(raw) == DIGEST_SIZE:  # fromhex skips spaces
                    return raw
        raise InvalidDigestError(f"invalid digest {digest!r}: expected 64 hex digits or XX/<62 hex>")
    raise InvalidDigestError(f"invalid digest of type {type(digest).__name__}")
