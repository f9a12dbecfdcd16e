"""fs-verity digests: known answers, the real `fsverity digest` tool, and a naive reference."""

from __future__ import annotations

import array
import hashlib
import io
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_native, require_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import objects.digest as digest_mod
from objects import (
    FsVerityHasher,
    InvalidDigestError,
    digest_file,
    digest_stream,
    fsverity_digest,
    parse_digest,
)
from objects.digest import BLOCK_SIZE

MIB = 1 << 20

# spec/EROFS.md section 9 (fsverity-utils 1.5) and STYLE.md's hello world
VECTORS = [
    ("empty", b"", "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"),
    ("a", b"a", "bce75948b9e7510293f8f2720412af9697c1479281323f3f220623fb8e94b557"),
    ("4096 mod 251", bytes(i % 251 for i in range(4096)),
     "13e9b8848ae484a36acb3f3cac0ceb2f7601e96633d15c92f9bd3dd44e492157"),
    ("5000 mod 251", bytes(i % 251 for i in range(5000)),
     "219c2df1dc52c12b7f666570d48b3f57c2e1ef58aa4734111f36773c8e731829"),
    ("1 MiB zeros", bytes(MIB), "feb19a23e72cb1b8f935d668a09ecaad0bf7c5b9cdfa6dbba7c88a9998ed2b87"),
    ("600000 7i", bytes(7 * i % 256 for i in range(600000)),
     "c8be0edef35bb9299173355ceda2b77f99f569725b260ef9fab9809475dd8a38"),
    ("10000 7i", bytes(7 * i % 256 for i in range(10000)),
     "5f1b8e28e484d113bf12751f211c8d69c4dabee21d86cce5e2b53befca6f18fc"),
    ("hello world", b"hello world", "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"),
]

# sizes around every boundary of a 1-, 2- and 3-block tree level
BOUNDARY_SIZES = [1, 31, 32, 33, 4095, 4096, 4097, 8192, 127 * 4096, 128 * 4096 - 1, 128 * 4096,
                  128 * 4096 + 1, 129 * 4096, 256 * 4096, 256 * 4096 + 7, 1000 * 4096 + 123]


def reference_digest(data: bytes) -> bytes:
    """Straight from the definition: whole levels in memory, no streaming."""
    if not data:
        root = bytes(32)
    else:
        level = [hashlib.sha256(data[i : i + 4096].ljust(4096, b"\0")).digest() for i in range(0, len(data), 4096)]
        while len(level) > 1:
            cat = b"".join(level)
            level = [hashlib.sha256(cat[i : i + 4096].ljust(4096, b"\0")).digest() for i in range(0, len(cat), 4096)]
        root = level[0]
    return hashlib.sha256(struct.pack("<BBBBIQ64s32s144s", 1, 1, 12, 0, 0, len(data), root, b"", b"")).digest()


def tool_digest(path: Path) -> str:
    tool = require_tool("fsverity")
    out = subprocess.run([tool, "digest", "--compact", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def chunked(data: bytes, sizes: list[int]) -> FsVerityHasher:
    """Feed `data` to a hasher in chunks of the given sizes (cycled)."""
    h = FsVerityHasher()
    pos, i = 0, 0
    while pos < len(data):
        step = sizes[i % len(sizes)]
        h.update(data[pos : pos + step])
        pos += step
        i += 1
    return h


def pseudo_random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.mark.parametrize(("name", "data", "expected"), VECTORS, ids=[v[0] for v in VECTORS])
def test_known_answers(name: str, data: bytes, expected: str) -> None:
    assert fsverity_digest(data).hex() == expected
    assert FsVerityHasher(data).hexdigest() == expected
    assert chunked(data, [1, 4095, 4096, 4097, 100000]).hexdigest() == expected
    assert reference_digest(data).hex() == expected


@pytest.mark.parametrize(("name", "data", "expected"), VECTORS, ids=[v[0] for v in VECTORS])
def test_known_answers_match_tool(tmp_path: Path, name: str, data: bytes, expected: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(data)
    assert tool_digest(path) == expected
    assert digest_file(path).hex() == expected


@pytest.mark.parametrize("size", BOUNDARY_SIZES)
def test_boundary_sizes_match_tool(tmp_path: Path, size: int) -> None:
    data = pseudo_random(size, size)
    path = tmp_path / "f"
    path.write_bytes(data)
    expected = tool_digest(path)
    assert fsverity_digest(data).hex() == expected
    assert chunked(data, [4096 * 3 + 5, 17]).hexdigest() == expected
    assert reference_digest(data).hex() == expected


def test_three_level_tree_matches_tool(tmp_path: Path, block_hasher: str) -> None:
    """More than 128*128 blocks (64 MiB) needs a third tree level."""
    size = 128 * 128 * BLOCK_SIZE + 5000
    block = pseudo_random(MIB, 3)
    path = tmp_path / "big"
    with open(path, "wb") as f:
        for i in range(size // MIB):
            f.write(i.to_bytes(4, "little") + block[4:])
        f.write(block[: size % MIB])
    expected = tool_digest(path)
    assert digest_file(path).hex() == expected
    data = path.read_bytes()
    assert reference_digest(data).hex() == expected
    assert fsverity_digest(data).hex() == expected


@pytest.fixture(params=["native", "hashlib"])
def block_hasher(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the compiled block loop, then with the hashlib one it stands in for."""
    if request.param == "native":
        require_native()
    else:
        monkeypatch.setattr(digest_mod, "hash_full_blocks", digest_mod._hash_full_blocks_py)
        # the whole-digest function too: the Python one, on the hashlib block loop
        monkeypatch.setattr(digest_mod, "fsverity_digest", digest_mod._fsverity_digest_py)
        monkeypatch.setitem(globals(), "fsverity_digest", digest_mod._fsverity_digest_py)
    return request.param


def test_native_block_hashes_equal_hashlib() -> None:
    require_native()
    from objects._fsverity import hash_blocks

    data = pseudo_random(300 * BLOCK_SIZE, 5)
    for blocks in (0, 1, 7, 8, 9, 128, 300):
        part = data[: blocks * BLOCK_SIZE]
        expected = b"".join(hashlib.sha256(part[i : i + BLOCK_SIZE]).digest() for i in range(0, len(part), BLOCK_SIZE))
        assert hash_blocks(part) == expected
        assert hash_blocks(bytearray(part)) == expected
        assert hash_blocks(memoryview(data)[: blocks * BLOCK_SIZE]) == expected
    with pytest.raises(ValueError, match="multiple of 4096"):
        hash_blocks(data[:5000])
    with pytest.raises(BufferError):
        hash_blocks(memoryview(data)[::2])  # not contiguous
    with pytest.raises(TypeError):
        hash_blocks("text")


def test_native_whole_digest_equals_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """objects._fsverity.digest (tree and descriptor in C) against the Python specification on the
    hashlib block loop, at every tree-level boundary, for each kind of buffer; bad buffers raise as
    hash_blocks does."""
    require_native()
    from objects._fsverity import digest

    assert digest_mod.fsverity_digest is digest  # the compiled one is what callers get
    monkeypatch.setattr(digest_mod, "hash_full_blocks", digest_mod._hash_full_blocks_py)
    data = pseudo_random(1000 * BLOCK_SIZE + 123, 11)
    for size in [0, *BOUNDARY_SIZES, 7 * BLOCK_SIZE, 8 * BLOCK_SIZE + 1]:
        part = data[:size]
        expected = digest_mod._fsverity_digest_py(part)
        assert expected == reference_digest(part)
        assert digest(part) == expected, size
        assert digest(bytearray(part)) == expected
        assert digest(memoryview(data)[:size]) == expected
    assert digest(array.array("I", [1, 2, 3])) == reference_digest(array.array("I", [1, 2, 3]).tobytes())
    for name, vector, hexdigest in VECTORS:
        assert digest(vector).hex() == hexdigest, name
    with pytest.raises(BufferError):
        digest(memoryview(data)[::2])  # not contiguous
    with pytest.raises(TypeError):
        digest("text")


@settings(max_examples=80, deadline=None)
@given(size=st.one_of(st.integers(0, 3 * BLOCK_SIZE), st.integers(0, 300 * BLOCK_SIZE)), seed=st.integers(0, 2**32))
def test_native_whole_digest_matches_reference(size: int, seed: int) -> None:
    require_native()
    from objects._fsverity import digest

    data = pseudo_random(size, seed)
    assert digest(data) == reference_digest(data)


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("impl", ["avx512", "sha-ni", "libcrypto", "default"])
def test_native_implementations_equal_hashlib(impl: str) -> None:
    """Each path of the compiled loop (AVX-512 sixteen blocks at a time, with its last blocks padded
    when forced alone; SHA-NI two at a time; libcrypto), in a fresh interpreter, against hashlib on
    block counts around the multiples of two and sixteen, and the whole digest (descriptor hashed with
    SHA-NI or portable C) against Python's.  A path this CPU lacks must refuse to load."""
    require_native()
    code = (
        "import hashlib, os, random, sys\n"
        "from objects._fsverity import IMPLEMENTATION, hash_blocks\n"
        "data = random.Random(7).randbytes(67 * 4096)\n"
        "for n in (1, 2, 3, 15, 16, 17, 31, 32, 33, 67):\n"
        "    part = data[: n * 4096]\n"
        "    ref = b''.join(hashlib.sha256(part[i : i + 4096]).digest() for i in range(0, len(part), 4096))\n"
        "    assert hash_blocks(part) == ref, (IMPLEMENTATION, n)\n"
        "from objects._fsverity import digest\n"  # the whole digest: its descriptor hash follows the path
        "from objects.digest import _fsverity_digest_py, _hash_full_blocks_py\n"
        "import objects.digest as d\n"
        "d.hash_full_blocks = _hash_full_blocks_py\n"
        "for n in (0, 1, 4095, 4096, 5000, 17 * 4096 + 3, 67 * 4096):\n"
        "    assert digest(data[:n]) == _fsverity_digest_py(data[:n]), (IMPLEMENTATION, n)\n"
        "print(IMPLEMENTATION)\n"
    )
    env = dict(os.environ)
    env.pop("OBJECTS_FSVERITY_IMPL", None)
    if impl != "default":
        env["OBJECTS_FSVERITY_IMPL"] = impl
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    flags = _cpu_flags()
    has = {"avx512": {"avx512f", "avx512bw"} <= flags, "sha-ni": "sha_ni" in flags, "libcrypto": True}
    if impl != "default" and not has[impl]:
        assert out.returncode != 0 and "no usable SHA-256" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    expected = {impl}
    if impl == "default":  # the fastest this CPU has (AVX-512 only where it measured faster)
        rest = "sha-ni" if has["sha-ni"] else "libcrypto"
        expected = {f"avx512+{rest}", rest} if has["avx512"] else {rest}
    assert out.stdout.strip() in expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.one_of(st.integers(0, 3 * BLOCK_SIZE), st.integers(0, 300 * BLOCK_SIZE)),
    seed=st.integers(0, 2**32),
    chunks=st.lists(st.integers(1, 3 * BLOCK_SIZE), min_size=1, max_size=6),
)
def test_streaming_matches_reference(block_hasher: str, size: int, seed: int, chunks: list[int]) -> None:
    data = pseudo_random(size, seed)
    expected = reference_digest(data)
    assert chunked(data, chunks).digest() == expected
    assert fsverity_digest(data) == expected


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.one_of(st.integers(0, 2 * BLOCK_SIZE), st.integers(0, 260 * BLOCK_SIZE)),
    seed=st.integers(0, 2**32),
    chunks=st.lists(st.integers(1, 70000), min_size=1, max_size=4),
)
def test_streaming_matches_tool(tmp_path: Path, size: int, seed: int, chunks: list[int]) -> None:
    data = pseudo_random(size, seed)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert chunked(data, chunks).hexdigest() == tool_digest(path)


def test_digest_does_not_consume_state() -> None:
    data = pseudo_random(200000, 1)
    h = FsVerityHasher()
    h.update(data[:70000])
    assert h.digest() == fsverity_digest(data[:70000])
    assert h.size == 70000
    h.update(data[70000:])
    assert h.digest() == h.digest() == fsverity_digest(data)
    assert h.size == len(data)


def test_update_accepts_any_buffer() -> None:
    words = array.array("I", range(5000))
    expected = fsverity_digest(words.tobytes())
    h = FsVerityHasher()
    h.update(words)
    assert h.digest() == expected
    h = FsVerityHasher()
    h.update(bytearray(words.tobytes()))
    h.update(memoryview(b""))
    assert h.digest() == expected
    assert fsverity_digest(memoryview(words)) == expected


class ReadOnlyStream:
    """A stream with read() only (no readinto), returning short reads."""

    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(min(n, 777) if n > 0 else n)


def test_digest_stream_and_file(tmp_path: Path) -> None:
    data = pseudo_random(3 * MIB + 11, 2)
    expected = reference_digest(data)
    assert digest_stream(io.BytesIO(data)) == expected
    assert digest_stream(ReadOnlyStream(data)) == expected
    path = tmp_path / "f"
    path.write_bytes(data)
    assert digest_file(path) == expected
    assert digest_file(str(path)) == expected


def test_parse_digest_forms() -> None:
    raw = fsverity_digest(b"x" * 100)
    h = raw.hex()
    for form in (raw, bytearray(raw), h, h.upper(), h.encode(), f"sha256:{h}", f"{h[:2]}/{h[2:]}"):
        assert parse_digest(form) == raw


@pytest.mark.parametrize("bad", ["", "zz" * 32, "a" * 63, "a" * 65, "ab/" + "c" * 61, "aa " * 21 + "a", b"\xff" * 31,
                                 b"\xff" * 64, 42])
def test_parse_digest_rejects(bad: object) -> None:
    with pytest.raises(InvalidDigestError) as exc:
        parse_digest(bad)  # type: ignore[arg-type]
    assert isinstance(exc.value, ValueError)


def test_flatmount_pure_turns_the_compiled_loop_off() -> None:
    """FLATMOUNT_PURE=1 (objects/compiled.py) turns the fs-verity loop off like every compiled loop."""
    root = Path(__file__).resolve().parent.parent
    code = ("import objects.digest as d; "
            "print(d.NATIVE, d.fsverity_digest is not d._fsverity_digest_py, d.implementation())")
    for pure, native in (("1", "False"), ("", "True")):
        env = {**os.environ, "PYTHONPATH": str(root), "FLATMOUNT_PURE": pure}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                             text=True, check=True).stdout
        assert out.split()[:2] == [native, native], out


# --- the compiled SHA-256 stream that shares its pass with the block hashes (StreamSha256) ---------

def require_stream() -> None:
    """StreamSha256 needs the compiled loop and SHA-NI: where the CPU has SHA-NI, its absence is a
    failure under CI (a broken build), elsewhere the hardware lacks it."""
    require_native()
    with open("/proc/cpuinfo") as f:
        has_shani = " sha_ni" in f.read()
    if not digest_mod.STREAM_BLOCKS:
        if has_shani:
            pytest.fail("objects._fsverity has no SHA-256 stream functions on a CPU with SHA-NI")
        pytest.skip("no SHA-NI on this CPU")


@settings(max_examples=120, deadline=None)
@given(size=st.one_of(st.integers(0, 200), st.integers(0, 40 * BLOCK_SIZE)), seed=st.integers(0, 2**32),
       cuts=st.lists(st.integers(0, 40 * BLOCK_SIZE), max_size=6), blocks_at=st.lists(st.booleans(), max_size=7))
def test_stream_sha256_equals_hashlib_and_block_hashes(size: int, seed: int, cuts: list[int],
                                                       blocks_at: list[bool]) -> None:
    """Fed in pieces (some through `update_blocks`), the compiled stream gives hashlib's sha256, and
    `update_blocks` gives the pure-Python block hashes (the reference) or declines (None, nothing
    done) where the stream is not at a 64-byte boundary."""
    require_stream()
    data = random.Random(seed).randbytes(size)
    h = digest_mod.StreamSha256()
    bounds = sorted({min(c, size) for c in cuts} | {0, size})
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        piece = memoryview(data)[a:b]
        full = len(piece) - len(piece) % BLOCK_SIZE
        if i < len(blocks_at) and blocks_at[i] and full:
            hashes = h.update_blocks(piece[:full])
            if hashes is None:
                assert a % 64
                h.update(piece)
                continue
            assert hashes == digest_mod._hash_full_blocks_py(piece[:full])
            h.update(piece[full:])
        else:
            h.update(piece)
        assert h.digest() == hashlib.sha256(data[:b]).digest()  # (digest() does not consume)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_stream_functions_refuse_bad_arguments() -> None:
    """The C stream functions check their arguments: an exception, never a crash or a write past the
    32-byte state."""
    require_stream()
    from objects import _fsverity

    state = bytearray(32)
    for fn, args, err in [
        (_fsverity.stream_update, (bytearray(31), b""), ValueError),
        (_fsverity.stream_update, (bytearray(33), b""), ValueError),
        (_fsverity.stream_update, (bytes(32), b""), (BufferError, TypeError)),
        (_fsverity.stream_update, (state, b"x" * 65), ValueError),
        (_fsverity.stream_blocks, (state, b"x" * 64), ValueError),
        (_fsverity.stream_blocks, (state, "text"), TypeError),
        (_fsverity.stream_blocks, (state,), TypeError),
    ]:
        with pytest.raises(err):
            fn(*args)
    assert state == bytearray(32)  # untouched by the refused calls
    assert _fsverity.stream_blocks(state, b"") == b""


def test_flatmount_pure_turns_the_stream_off() -> None:
    """FLATMOUNT_PURE=1: no compiled stream; a layer's sha256 and `objects.sha256.sha256` (an image's
    name) are hashlib's (the reference), with the same digest."""
    code = ("from objects.digest import STREAM_BLOCKS\n"
            "from objects.sha256 import STREAM, sha256\n"
            "from flatmount.sources.pipeline import _stream_hash\n"
            "h = sha256(b'abc')\n"
            "print(STREAM_BLOCKS, _stream_hash().name, type(_stream_hash()).__module__,\n"
            "      STREAM, type(h).__module__, h.hexdigest())")
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root, "FLATMOUNT_PURE": "1"}).stdout.split()
    assert out == ["False", "sha256", "_hashlib", "False", "_hashlib", hashlib.sha256(b"abc").hexdigest()]


# --- objects.sha256: an image's name without hashlib's import -------------------------------------

@settings(max_examples=60, deadline=None)
@given(size=st.one_of(st.integers(0, 200), st.integers(0, 3 * 8 * BLOCK_SIZE + 100)), seed=st.integers(0, 2**32))
def test_sha256_is_hashlibs(size: int, seed: int) -> None:
    """`objects.sha256.sha256` (the compiled stream where the CPU has SHA-NI) gives hashlib's digest,
    for data given at once or in pieces, big ones included (those hash with the GIL released)."""
    require_stream()
    from objects.sha256 import StreamSha256, sha256

    data = random.Random(seed).randbytes(size)
    h = sha256(data)
    assert isinstance(h, StreamSha256)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    h = sha256()
    for a in range(0, size, 10_007):
        h.update(memoryview(data)[a:a + 10_007])
    assert h.digest() == hashlib.sha256(data).digest()

