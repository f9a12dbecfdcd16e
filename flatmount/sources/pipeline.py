"""The byte pipeline under a layer import: compressed input in, hashed and decompressed tar bytes out.

Why streaming: layers can be many GB.  The compressed input is read in 1 MiB chunks, decompressed
with bounded output, hashed (the diff_id is the sha256 of the uncompressed tar, computed while reading,
including the padding after the end-of-archive blocks) and handed to the tar reader
(flatmount.sources.tarreader) through a forward-only reader, so memory does not grow with layer or
file size.  `verify` then checks what was read against what it was promised to be.

Compression is recognised by magic (gzip 1f8b, zstd 28b52ffd; anything else is read as tar), not by
media type.  zstandard is imported only for zstd input.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import zlib
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from flatmount.errors import DigestMismatchError, LayerError

CHUNK = 1 << 20
PLAIN_CHUNK = 64 << 10  # reads of an uncompressed tar outside big payloads (see _plain_chunks)
CLAIM_WAIT = 0.05  # seconds a chunk's settle_blocks waits for an earlier claimed chunk's (see there)
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class HashingReader:
    """Reads a binary file, hashing (sha256 or sha512) and counting everything it hands out.

    Deferred hashing: while an object store pipeline reads from it (`defer_work()`, see
    `ObjectStore.put_async`), what it hands out is only noted, in order, and hashed by whichever
    thread calls `settle()`: the pipeline's worker that read a chunk settles up to that chunk's mark,
    in chunk order, after hashing the chunk for fs-verity.  Each chunk is then read and hashed twice
    on one core while in its cache, and two workers read and hash alternate chunks on two cores.
    Where the compiled SHA-256 stream is (objects.digest.StreamSha256), a worker settling a chunk it
    read hashes it for both in one pass instead (`settle_blocks`): the fs-verity block hashes then
    cost almost nothing beside the stream's sha256.
    """

    def __init__(self, f: BinaryIO, algorithm: str = "sha256"):
        self._f = f
        self.algorithm = algorithm
        self._hash = _stream_hash() if algorithm == "sha256" else hashlib.new(algorithm)
        self.size = 0
        self._pending = b""
        self._deferrals = 0  # pipelines reading from us now
        self._waiting: collections.deque = collections.deque()  # handed out, not yet hashed (in order)
        self._noted = 0  # items ever put in _waiting
        self._settled = 0  # items ever taken from it and hashed
        self._settle_lock = threading.Lock()
        # (its own lock, never held long: a reading worker claims while another hashes)
        self._claims_done = threading.Condition()  # guards _claims; notified when a claim is dropped
        self._claims: collections.deque = collections.deque()  # marks `claim()`ed, not settled yet, in order
        # (not _settle_lock: that one is held while a chunk is hashed, so a caller starting the next
        # file's put waited for the previous file's hashing, 0.3 ms a file on average)
        self._count_lock = threading.Lock()

    def defer_work(self) -> HashingReader:
        """Hash what is handed out from now on in `settle()` calls, until a matching `end()` (the
        DeferredWork protocol of `ObjectStore.put_async`: this reader is its own handle)."""
        with self._count_lock:
            self._deferrals += 1
        return self

    def mark(self) -> int:
        """A mark for `settle()`: everything handed out so far."""
        return self._noted

    def claim(self) -> int:
        """`mark()`, and a promise that `settle_blocks` (or `unclaim`) follows for it: a later
        `settle_blocks` waits for it rather than hash the chunk before it apart (see there)."""
        m = self._noted
        with self._claims_done:
            self._claims.append(m)
        return m

    def unclaim(self, upto: int) -> None:
        """Drop a claim whose `settle_blocks` will not come (its pipeline stopped)."""
        with self._claims_done:
            try:
                self._claims.remove(upto)
            except ValueError:
                return
            self._claims_done.notify_all()

    def settle(self, upto: int | None = None) -> None:
        """Hash what was handed out up to `upto` (a `mark()`; default: everything), in order."""
        if upto is not None and self._settled >= upto:  # (only grows: nothing to do, no lock to wait for)
            return
        with self._settle_lock:
            self._settle_locked(upto)

    def _settle_locked(self, upto: int | None) -> None:
        waiting, update = self._waiting, self._hash.update
        while waiting and (upto is None or self._settled < upto):
            update(waiting.popleft())
            self._settled += 1

    def settle_blocks(self, upto: int, chunk: memoryview) -> bytes | None:
        """`settle(upto)` where `chunk` (a buffer of the object store's) is what was last read before
        that mark; where this hash can, the chunk's whole 4096-byte blocks are hashed for fs-verity
        in the same pass, and their hashes (`hash_full_blocks` of them) returned; else None.

        The last item noted before the mark, if it is a view of the chunk's buffer, holds the chunk's
        last bytes (the readinto that filled it); bytes before them came from buffered input hashed
        earlier in stream order.  Blocks wholly inside that item share the pass; the others (the
        first one or two of a tar member's first chunk) are hashed apart.

        A chunk claimed earlier (`claim`, by the pipeline of the previous file) is waited for, up to
        CLAIM_WAIT seconds: settling its bytes here would hash them apart, and its worker then again
        for fs-verity (a fifth of a layer of 5 MB files, the last chunk of each); the stream is
        hashed in order anyway, so the wait costs nothing."""
        with self._claims_done:
            if not self._claims_done.wait_for(lambda: not self._claims or self._claims[0] >= upto, CLAIM_WAIT):
                while self._claims and self._claims[0] < upto:  # (late, or left by a stopped pipeline:
                    self._claims.popleft()                       # not waited for again)
        try:
            with self._settle_lock:
                return self._settle_blocks_locked(upto, chunk)
        finally:
            self.unclaim(upto)

    def _settle_blocks_locked(self, upto: int, chunk: memoryview) -> bytes | None:
        update_blocks = getattr(self._hash, "update_blocks", None)
        n = len(chunk)
        full = n - n % 4096
        if update_blocks is None or not full or self._settled >= upto:
            self._settle_locked(upto)
            return None
        if self._settled < upto - 1:
            self._settle_locked(upto - 2)
            if self._settled == upto - 2:
                shared = self._settle_head(chunk, full, update_blocks)
                if shared is not False:
                    return shared
            self._settle_locked(upto - 1)
        item = self._waiting[0] if self._waiting else None
        if not (isinstance(item, memoryview) and item.obj is chunk.obj and len(item) <= n):
            self._settle_locked(upto)
            return None
        self._waiting.popleft()
        self._settled += 1
        update = self._hash.update
        start = n - len(item)
        first = -(-start // 4096) * 4096  # the first block boundary in the item
        if first >= full:
            update(item)
            return None
        if first > start:
            update(chunk[start:first])
        shared = update_blocks(chunk[first:full])
        if shared is None:  # (the stream not at a 64-byte boundary: no shared pass)
            update(chunk[first:])
            return None
        if full < n:
            update(chunk[full:])
        if first:
            from objects.digest import hash_full_blocks

            return hash_full_blocks(chunk[:first]) + shared
        return shared

    def _settle_head(self, chunk: memoryview, full: int, update_blocks: object) -> bytes | None | bool:
        """`_settle_blocks_locked` for a chunk that begins with the tail of the item before its own
        (a tar member's first chunk: its head was read along with the member's header, 64 KiB at a
        time, and copied from there): that item's bytes before the head, then the whole chunk in
        the shared pass (the head's bytes are the same, so the stream is the same); False (nothing
        settled) unless the two items are exactly that.

        Why: hashing the head apart (sha256, then its fs-verity blocks again) cost the serial lane
        about 0.1 ms a member, 10 ms of a layer of 100 files of 5 MB."""
        waiting = self._waiting
        if len(waiting) < 2:
            return False
        prev, item = waiting[0], waiting[1]
        start = len(chunk) - len(item) if isinstance(item, memoryview) else -1
        if (start <= 0 or item.obj is not chunk.obj or not isinstance(prev, bytes) or len(prev) < start
                or not prev.endswith(chunk[:start])):
            return False
        waiting.popleft()
        waiting.popleft()
        self._settled += 2
        update = self._hash.update
        if len(prev) > start:
            update(memoryview(prev)[: len(prev) - start])
        shared = update_blocks(chunk[:full])  # type: ignore[operator]
        if shared is None:  # (the stream not at a 64-byte boundary: no shared pass)
            update(chunk)
            return None
        if full < len(chunk):
            update(chunk[full:])
        return shared

    def end(self, upto: int | None = None) -> None:
        """End one `defer_work()`: settle what the ending pipeline read, and hash inline again once
        no other pipeline defers.

        `upto`: the mark after the pipeline's last read (None: everything).  What was handed out
        after it is the next pipeline's: its first chunk, read ahead into its buffer before its
        worker claims it, is settled there with its block hashes; settled here it was hashed apart,
        and again for fs-verity (8% of a layer of 2 MiB files).  Never past the first chunk another
        pipeline has claimed either (whose worker settles it).  The ending pipeline settled its
        taken chunks before (ObjectStore._put_large settles up to its last mark); this settles the
        rest of what it read (a chunk read after it stopped) before its buffers are reused."""
        with self._count_lock:
            self._deferrals -= 1
        with self._claims_done:
            if self._claims and (upto is None or self._claims[0] <= upto):
                upto = self._claims[0] - 1
        self.settle(upto)

    def _hashed(self, data: bytes | memoryview) -> None:
        """Hash `data` now, or note it if a pipeline settles for us (it then must not change till settled)."""
        if self._deferrals:
            self._waiting.append(data)
            self._noted += 1
            return
        with self._settle_lock:  # (a pipeline that just ended may still be settling)
            self._settle_locked(None)
            self._hash.update(data)

    def peek(self, n: int) -> bytes:
        while len(self._pending) < n:
            b = self._f.read(n - len(self._pending))
            if not b:
                break
            self._pending += b
        return self._pending[:n]

    def read(self, n: int = -1) -> bytes:
        if self._pending:
            if n is None or n < 0 or n >= len(self._pending):
                b, self._pending = self._pending, b""
            else:
                b, self._pending = self._pending[:n], self._pending[n:]
        else:
            b = self._f.read(CHUNK if n is None or n < 0 else n)
        if b:
            self._hashed(b)
            self.size += len(b)
        return b

    def readinto(self, b: bytearray | memoryview) -> int:
        """Fill (part of) `b` straight from the file: one read, no intermediate bytes object."""
        mv = memoryview(b).cast("B")
        n = 0
        if self._pending:
            n = min(len(self._pending), len(mv))
            mv[:n] = self._pending[:n]
            self._pending = self._pending[n:]
        if n < len(mv):
            readinto = getattr(self._f, "readinto", None)
            if readinto is not None:
                n += readinto(mv[n:]) or 0
            else:
                data = self._f.read(len(mv) - n)
                mv[n:n + len(data)] = data
                n += len(data)
        if n:
            self._hashed(mv[:n])
            self.size += n
        return n

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def hexdigest(self) -> str:
        self.settle()
        return self._hash.hexdigest()

    @property
    def digest(self) -> str:
        return f"{self.algorithm}:{self.hexdigest()}"


def _stream_hash() -> object:
    """sha256 for a HashingReader: the compiled stream that can share its pass with the fs-verity
    block hashes (objects.digest.StreamSha256) where there is one, else hashlib's."""
    from objects.digest import STREAM_BLOCKS, StreamSha256

    return StreamSha256() if STREAM_BLOCKS else hashlib.sha256()


def _plain_chunks(raw: HashingReader) -> Iterator[bytes]:
    """An uncompressed stream in small reads: they only serve headers and small payloads; a big
    payload is read straight into the object store's buffers (`ForwardReader.readinto`), by its
    reader thread, so the less of it goes through here, the more of the import runs in parallel."""
    while b := raw.read(PLAIN_CHUNK):
        yield b


def _gzip_chunks(raw: HashingReader, where: str) -> Iterator[bytes]:
    """Decompressed output of one or more concatenated gzip members (zero padding after them is ok)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    in_member = False
    try:
        while data := raw.read(CHUNK):
            while data:
                if not in_member:
                    data = data.lstrip(b"\0")
                    if not data:
                        break
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    in_member = True
                out = d.decompress(data, CHUNK)
                if out:
                    yield out
                if d.eof:
                    in_member = False
                    data = d.unused_data
                else:
                    data = d.unconsumed_tail
        if in_member:
            out = d.flush()
            if out:
                yield out
            if not d.eof:
                raise LayerError(f"{where}: gzip stream is truncated")
    except zlib.error as e:
        raise LayerError(f"{where}: corrupt gzip stream ({e})") from None


def _zstd_chunks(raw: HashingReader, where: str) -> Iterator[bytes]:
    """Decompressed output of one or more zstd frames; a stream that ends inside a frame is an error.

    (zstandard's reader ends quietly where its input does, even in the middle of a frame without a
    checksum: `_ZstdFrames` follows the frame structure to tell, as gzip's end-of-member check does.)
    """
    import zstandard

    frames = _ZstdFrames(raw)
    reader = zstandard.ZstdDecompressor().stream_reader(frames, read_size=CHUNK, read_across_frames=True,
                                                        closefd=False)
    try:
        while b := reader.read(CHUNK):
            yield b
    except zstandard.ZstdError as e:
        raise LayerError(f"{where}: corrupt zstd stream ({e})") from None
    while frames.read(CHUNK):  # (the reader may stop before the input's end: follow it to there)
        pass
    if not frames.complete:
        raise LayerError(f"{where}: zstd stream is truncated (it ends inside a frame)")


class _ZstdFrames:
    """A reader over a zstd stream that follows its frames (headers only, RFC 8878) as they pass.

    `complete` is False while the input read so far ends inside a frame.  Bytes that are not a frame
    (which zstandard refuses itself) stop the following, so they never make a stream "truncated".
    """

    _ZSTD, _SKIPPABLE = 0xFD2FB528, 0x184D2A50  # frame magic; skippable frames: 0x184D2A5? (any ?)

    def __init__(self, raw: HashingReader):
        self._raw = raw
        self._skip = 0         # payload bytes to pass before the next header
        self._head = b""       # the header being collected
        self._want = 4         # its size
        self._state = "magic"  # magic | frame | block | skippable | lost
        self._checksum = False

    @property
    def complete(self) -> bool:
        return self._state == "lost" or (self._state == "magic" and not self._skip and not self._head)

    def read(self, n: int = -1) -> bytes:
        b = self._raw.read(n)
        if b and self._state != "lost":
            self._follow(b)
        return b

    def readable(self) -> bool:
        return True

    def _follow(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                k = min(self._skip, end - pos)
                pos += k
                self._skip -= k
                continue
            take = min(self._want - len(self._head), end - pos)
            self._head += data[pos:pos + take]
            pos += take
            if len(self._head) < self._want:
                return
            head, self._head = self._head, b""
            self._header(head)
            if self._state == "lost":
                return

    def _header(self, head: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(head, "little")
            if magic == self._ZSTD:
                self._state, self._want = "frame", 1
            elif magic & ~0xF == self._SKIPPABLE:
                self._state, self._want = "skippable", 4
            else:
                self._state = "lost"
        elif state == "frame":
            d = head[0]
            single = d >> 5 & 1
            if d >> 3 & 1:  # reserved bit
                self._state = "lost"
                return
            self._checksum = bool(d >> 2 & 1)
            self._skip = (0 if single else 1) + (0, 1, 2, 4)[d & 3] + (single, 2, 4, 8)[d >> 6]
            self._state, self._want = "block", 3
        elif state == "block":
            h = int.from_bytes(head, "little")
            kind, size = h >> 1 & 3, h >> 3
            if kind == 3:  # reserved block type
                self._state = "lost"
                return
            self._skip = 1 if kind == 1 else size  # RLE: one byte; raw and compressed: `size` bytes
            if h & 1:  # the last block, then the optional checksum
                self._skip += 4 if self._checksum else 0
                self._state, self._want = "magic", 4
        else:  # skippable frame: its size, then that many bytes
            self._skip = int.from_bytes(head, "little")
            self._state, self._want = "magic", 4


def detect_compression(raw: HashingReader, where: str) -> str:
    magic = raw.peek(6)
    if not magic:
        raise LayerError(f"{where}: empty input (not a tar archive)")
    if magic.startswith(GZIP_MAGIC):
        return "gzip"
    if magic.startswith(ZSTD_MAGIC):
        return "zstd"
    if magic.startswith(b"BZh") or magic.startswith(b"\xfd7zXZ\x00"):
        raise LayerError(f"{where}: bzip2/xz compressed layers are not supported (only gzip and zstd)")
    return "none"


class ForwardReader:
    """A file object over a chunk iterator that can only move forward, hashing every byte.

    `tarfile` in normal ("r:") mode only ever seeks forward when reading sequentially, so it can read
    a stream this way without `r|`'s re-buffering; member file objects read straight from here.
    """

    def __init__(self, chunks: Iterator[bytes], where: str, same_as: HashingReader | None = None,
                 direct: HashingReader | None = None):
        self._chunks = chunks
        self._buf = b""
        self._off = 0
        self._pos = 0
        # uncompressed input already hashed with sha256 by `same_as`: do not hash it twice
        self._same_as = same_as
        self._hash = hashlib.sha256() if same_as is None else None
        # uncompressed input: `chunks` are plain reads of `direct`, so `readinto` may read it directly
        self._direct = direct
        self.where = where

    def _next_chunk(self) -> bytes:
        b = next(self._chunks, b"")
        if b and self._hash is not None:
            self._hash.update(b)
        return b

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = [self._buf[self._off:]]
            while b := self._next_chunk():
                parts.append(b)
            self._buf, self._off = b"", 0
            out = b"".join(parts)
            self._pos += len(out)
            return out
        avail = len(self._buf) - self._off
        if avail >= n:
            out = self._buf[self._off:self._off + n]
            self._off += n
            self._pos += n
            return out
        parts = [self._buf[self._off:]] if avail else []
        got = avail
        self._buf, self._off = b"", 0
        while got < n:
            b = self._next_chunk()
            if not b:
                break
            need = n - got
            if len(b) > need:
                parts.append(b[:need])
                self._buf, self._off = b, need
                got = n
                break
            parts.append(b)
            got += len(b)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(out)
        return out

    def peek(self, n: int) -> bytes:
        """The next `n` bytes without consuming them (fewer at the end of the stream)."""
        avail = len(self._buf) - self._off
        while avail < n:
            b = self._next_chunk()
            if not b:
                break
            self._buf, self._off = self._buf[self._off:] + b, 0
            avail = len(self._buf)
        return self._buf[self._off:self._off + n]

    def readinto(self, b: bytearray | memoryview) -> int:
        """Fill (part of) `b`: buffered bytes first, then for uncompressed input straight from the file.

        This is how big file payloads reach `ObjectStore.put`'s aligned buffers with one copy (the
        kernel's) and the diff_id hashed over the same memory.
        """
        mv = memoryview(b).cast("B")
        want = len(mv)
        if not want:
            return 0
        avail = len(self._buf) - self._off
        if not avail:
            if self._direct is not None:
                n = self._direct.readinto(mv)
                if n and self._hash is not None:
                    self._hash.update(mv[:n])
                self._pos += n
                return n
            self._buf, self._off = self._next_chunk(), 0
            avail = len(self._buf)
            if not avail:
                return 0
        n = min(avail, want)
        mv[:n] = memoryview(self._buf)[self._off:self._off + n]
        self._off += n
        self._pos += n
        if self._off == len(self._buf):
            self._buf, self._off = b"", 0
        return n

    def buffered(self) -> tuple[bytes, int]:
        """The chunk held and the offset of the next byte in it (what `read` would return first),
        for a caller that decodes it in place (tarreader's batches of small members)."""
        return self._buf, self._off

    def skip_buffered(self, n: int) -> None:
        """Consume `n` bytes of what `buffered` showed (at most all of it), without a copy."""
        if not 0 <= n <= len(self._buf) - self._off:
            raise ValueError(f"cannot skip {n} of {len(self._buf) - self._off} buffered bytes")
        self._off += n
        self._pos += n

    def defer_work(self) -> HashingReader | None:
        """For `ObjectStore.put_async`: uncompressed input read straight from the file is hashed by
        whoever settles (see HashingReader)."""
        return self._direct.defer_work() if self._direct is not None else None

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence != 0:
            raise OSError("ForwardReader cannot seek from the end")
        if pos < self._pos:
            raise LayerError(f"{self.where}: internal error: backward seek in a stream")
        skip = pos - self._pos
        while skip > 0:
            b = self.read(min(skip, CHUNK))
            if not b:
                break
            skip -= len(b)
        return self._pos

    def drain(self) -> None:
        """Read (and hash) everything left, e.g. the zero padding after the end-of-archive blocks."""
        self._pos += len(self._buf) - self._off
        self._buf, self._off = b"", 0
        while b := self._next_chunk():
            self._pos += len(b)

    @property
    def digest(self) -> str:
        if self._hash is None:
            assert self._same_as is not None
            return self._same_as.digest
        return "sha256:" + self._hash.hexdigest()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class ReadDigests(Protocol):
    """What a read measured (a `flatmount.sources.tarreader.TarLayer`)."""

    compressed_size: int
    compressed_digest: str
    diff_id: str


def verify(layer: ReadDigests, *, blob_digest: str | None = None, blob_size: int | None = None,
           diff_id: str | None = None, label: str = "layer") -> None:
    """DigestMismatchError unless the stream matched what it was promised to be."""
    if blob_size is not None and layer.compressed_size != blob_size:
        raise DigestMismatchError(f"{label}: blob is {layer.compressed_size} bytes, the manifest says "
                                  f"{blob_size}")
    if blob_digest is not None and layer.compressed_digest != blob_digest:
        raise DigestMismatchError(f"{label}: blob digest is {layer.compressed_digest}, expected {blob_digest}")
    if diff_id is not None and layer.diff_id != diff_id:
        raise DigestMismatchError(f"{label}: uncompressed digest (diff_id) is {layer.diff_id}, the "
                                  f"config says {diff_id}")
