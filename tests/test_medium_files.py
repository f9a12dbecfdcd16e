"""Layers of many files of a few MiB (issue 17, target 2): a member's head, read with its header,
shares the one pass of the diff_id's sha256 and the fs-verity block hashes (HashingReader)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import sys

import pytest

import objects.digest as digest_mod
from flatmount.sources.layers import HashingReader, read_tar
from objects import ObjectStore
from objects.digest import _hash_full_blocks_py
from tests.tarbuild import Tar

MIB = 1 << 20


@pytest.fixture
def objects(tmp_path):
    with ObjectStore(tmp_path / "objects") as store:
        yield store


def _native() -> None:
    from conftest import require_native

    require_native()
    assert digest_mod.STREAM_BLOCKS, "objects._fsverity has no SHA-256 stream (this CPU has SHA-NI)"


def test_member_heads_share_the_pass(objects, tmp_path, monkeypatch):
    """A member's head (the bytes read along with its header) is not hashed apart for fs-verity: the
    whole blocks of the big members go through the shared pass; the digests are hashlib's and the
    objects hold the members' bytes."""
    _native()
    apart: list[int] = []
    shared: list[int] = []
    real_blocks, real_update_blocks = digest_mod.hash_full_blocks, digest_mod.StreamSha256.update_blocks

    def spy_apart(data):  # (the pipeline imports it from objects.digest when it hashes a head apart)
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("sources", "pipeline.py")):
            apart.append(len(data))
        return real_blocks(data)

    def spy_shared(self, data):  # (the pipeline's calls only: not the write-mode probe's, say)
        hashes = real_update_blocks(self, data)
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("sources", "pipeline.py")):
            shared.append(len(data) if hashes is not None else 0)
        return hashes

    t = Tar()
    sizes = [2 * MIB + 4096 * i + (i % 3) * 1000 for i in range(12)]
    rng = random.Random(7)
    for i, size in enumerate(sizes):
        t.file(f"m/{i}", rng.randbytes(size))
    data = t.bytes()
    path = tmp_path / "layer.tar"
    path.write_bytes(data)
    monkeypatch.setattr(digest_mod, "hash_full_blocks", spy_apart)
    monkeypatch.setattr(digest_mod.StreamSha256, "update_blocks", spy_shared)
    with open(path, "rb") as src:
        layer = read_tar(src, objects)
    monkeypatch.undo()
    assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    for digest, blob in t.blobs.items():
        with objects.open(digest) as f:
            assert f.read() == blob
    # (the first member's head was hashed before any pipeline ran; a header read after the put
    # before had ended is hashed at once, by the reader: a few of them; all of them before)
    assert len(apart) <= len(sizes) // 2, apart
    assert sum(shared) >= 0.95 * sum(s - s % 4096 for s in sizes), (sum(shared), sum(sizes))


def _head_chunk(data: bytes, reads: list[int], start: int, tamper: bool
                ) -> tuple[HashingReader, int, memoryview, bytes]:
    """A reader that handed out reads of `reads` bytes (a header read) and then, read straight into a
    chunk buffer, the rest of a 1 MiB chunk whose first `start` bytes are copied from those reads
    (or, `tamper`, are other bytes); its claim mark, the chunk, and the bytes the stream handed out."""
    r = HashingReader(io.BytesIO(data))
    r.defer_work()
    head = b"".join(r.read(n) for n in reads)
    buf = bytearray(MIB)
    buf[:start] = head[len(head) - start:] if not tamper else bytes(start)
    n = r.readinto(memoryview(buf)[start:])
    mark = r.claim()
    return r, mark, memoryview(buf)[: start + n], head + bytes(buf[start : start + n])


@pytest.mark.parametrize("reads, start, tamper", [
    ([64 << 10], (64 << 10) - 1536, False),  # a header of 1536 bytes then the member
    ([64 << 10], 64 << 10, False),           # the read was all member (a header before it)
    ([64 << 10], 5000, False),               # a head not a whole number of blocks
    ([64 << 10], (64 << 10) - 1536, True),   # the chunk's head is not what the stream handed out
    ([4096, 4096], 6000, False),             # the head spans two items
    ([4000], 1000, False),                   # the stream not at a 64-byte boundary at the head
])
def test_settle_blocks_with_a_head_equals_the_reference(reads, start, tamper):
    """settle_blocks of a chunk that begins with bytes of the item before its own: the stream's
    sha256 is hashlib's of what was handed out, the block hashes the pure-Python ones of the chunk,
    whether the head shares the pass or (not the same bytes, not one item) is hashed apart."""
    _native()
    data = random.Random(start).randbytes(3 * MIB)
    r, mark, chunk, handed = _head_chunk(data, reads, start, tamper)
    hashes = r.settle_blocks(mark, chunk)
    r.end()
    full = len(chunk) - len(chunk) % 4096
    assert hashes is None or hashes == _hash_full_blocks_py(chunk[:full])
    assert r.hexdigest() == hashlib.sha256(handed).hexdigest()


def test_end_leaves_the_next_pipeline_s_read_ahead_chunk_to_it():
    """A pipeline ending while the next one has read its first chunk ahead (into its own buffer),
    not yet claimed: `end(upto)` settles only up to its own last read, so that chunk still shares
    the next pipeline's pass (stream sha256 and block hashes); the stream's sha256 stays hashlib's."""
    _native()
    data = random.Random(3).randbytes(3 * MIB)
    r = HashingReader(io.BytesIO(data))
    r.defer_work()                                  # pipeline A
    a = memoryview(bytearray(MIB))
    r.readinto(a)
    a_mark = r.claim()
    assert r.settle_blocks(a_mark, a) is not None   # A's chunk, in its turn
    header = r.read(512)                            # the next header, read by the caller
    r.defer_work()                                  # pipeline B ...
    b = memoryview(bytearray(MIB))
    r.readinto(b)                                   # ... reads its first chunk ahead
    r.end(a_mark)                                   # A ends before B's worker claims it
    b_mark = r.claim()
    hashes = r.settle_blocks(b_mark, b)
    assert hashes == _hash_full_blocks_py(b)
    r.end(b_mark)
    assert r.hexdigest() == hashlib.sha256(bytes(a) + header + bytes(b)).hexdigest()
