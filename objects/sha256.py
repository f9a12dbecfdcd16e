"""SHA-256 for an image's name and a layer image's check, without importing hashlib where the compiled
stream can: `sha256()`, and `StreamSha256` (a stream that can give fs-verity block hashes in the same
pass).

Why: `import hashlib` loads OpenSSL's libcrypto, 4-5 ms of a new process (`python3 -X importtime`),
paid by the first flatten of an image (its sha256 is its name) and so by a first mount.  The SHA-NI
stream of objects/_fsverity.c gives the same digests with the GIL released, and its module loads in
0.6 ms.  Without it (no SHA-NI, not built, FLATMOUNT_PURE) `sha256()` is hashlib's, the reference.
"""

from __future__ import annotations

from .compiled import load

_fsverity = load("objects._fsverity")
STREAM = bool(getattr(_fsverity, "STREAM", 0))  # the compiled SHA-256 stream is usable (SHA-NI)
_SHA256_IV = bytes.fromhex("6a09e667bb67ae853c6ef372a54ff53a510e527f9b05688c1f83d9ab5be0cd19")


def sha256(data: bytes | bytearray | memoryview = b""):
    """A new SHA-256 (update / digest / hexdigest), fed `data`: the compiled stream where it is usable,
    else hashlib's."""
    if STREAM:
        h = StreamSha256()
    else:
        import hashlib

        h = hashlib.sha256()
    if data:
        h.update(data)
    return h


class StreamSha256:
    """SHA-256 of a stream (hashlib's update / digest / hexdigest / name) that can also give the
    fs-verity block hashes of whole 4096-byte blocks it is fed (`update_blocks`), in the same pass.

    Why: an uncompressed layer's bytes are hashed twice, for its diff_id and for the objects' fs-verity
    digests.  One SHA-256 stream keeps the CPU's SHA unit half idle (each round waits for the previous
    one), so hashing the same bytes as independent blocks beside it costs almost nothing: on the
    development VM both took 0.57 ns a byte, against 0.56 for the stream alone and 0.87 for the two
    apart (objects/_fsverity.c, SHA-NI).  Only where `STREAM`; results equal hashlib's sha256 and
    objects.digest's `hash_full_blocks` (which stay the reference, used without the compiled code).
    """

    __slots__ = ("_state", "_buf", "_length")
    name = "sha256"
    digest_size = 32
    block_size = 64

    def __init__(self) -> None:
        if not STREAM:
            raise RuntimeError("StreamSha256 needs the compiled objects._fsverity with SHA-NI")
        self._state = bytearray(_SHA256_IV)  # chaining value after the whole 64-byte blocks so far
        self._buf = bytearray()  # the bytes after them (< 64)
        self._length = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data)
        if mv.itemsize != 1 or mv.ndim != 1:
            mv = mv.cast("B")
        self._length += len(mv)
        buf = self._buf
        if buf:
            take = min(64 - len(buf), len(mv))
            buf += mv[:take]
            mv = mv[take:]
            if len(buf) < 64:
                return
            _fsverity.stream_update(self._state, buf)
            buf.clear()
        whole = len(mv) - len(mv) % 64
        if whole:
            _fsverity.stream_update(self._state, mv[:whole])
        if whole < len(mv):
            buf += mv[whole:]

    def update_blocks(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """`update(data)` (its length a multiple of 4096) and return `hash_full_blocks(data)`; None
        (and nothing done) if the stream is not at a 64-byte boundary, where they cannot share a pass."""
        if self._buf:
            return None
        hashes = _fsverity.stream_blocks(self._state, data)
        self._length += len(data)
        return hashes

    def digest(self) -> bytes:
        n = len(self._buf)
        tail = bytes(self._buf) + b"\x80" + bytes((55 - n) % 64) + (self._length * 8).to_bytes(8, "big")
        state = bytearray(self._state)
        _fsverity.stream_update(state, tail)
        return bytes(state)

    def hexdigest(self) -> str:
        return self.digest().hex()
