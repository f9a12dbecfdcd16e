"""Many small fs-verity digests at once (`_fsverity.digests`, `objects.digest.fsverity_digests`) and the
bulk writer's `put_many`: the same digests and objects as one buffer at a time, on every hashing path."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_native
from hypothesis import given, settings
from hypothesis import strategies as st

import objects.digest as digest_mod
from objects import ObjectStore, fsverity_digest
from objects.bulk import START_AFTER
from objects.digest import BLOCK_SIZE, _fsverity_digest_py, _hash_full_blocks_py

ROOT = Path(__file__).resolve().parent.parent
SIZES = [0, 1, 64, 65, 4095, 4096, 4097, 8191, 8192, 8193, 127 * BLOCK_SIZE, 128 * BLOCK_SIZE,
         128 * BLOCK_SIZE + 1, 129 * BLOCK_SIZE, 300 * BLOCK_SIZE + 5, 1 << 20]


def _reference(datas, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The specification: the Python digest with hashlib's block hashes."""
    monkeypatch.setattr(digest_mod, "hash_full_blocks", _hash_full_blocks_py)
    return [_fsverity_digest_py(d) for d in datas]


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.one_of(st.sampled_from(SIZES), st.integers(0, 3 * BLOCK_SIZE),
                                st.integers(0, 140 * BLOCK_SIZE)), max_size=60),
       seed=st.integers(0, 2**32))
def test_digests_equal_one_at_a_time(sizes: list[int], seed: int) -> None:
    """Runs of files of every size around the block and tree-level boundaries (one block, two, 128:
    one tree block, 129: two levels, hashed apart), in any order, split into runs anywhere."""
    require_native()
    rng = random.Random(seed)
    chunk = rng.randbytes(sum(sizes) + 3)
    datas, at = [], 0
    for i, n in enumerate(sizes):  # views into one buffer (as the tar reader hands them), bytes, bytearray
        form = i % 3
        datas.append(memoryview(chunk)[at:at + n] if form == 0 else bytes(chunk[at:at + n]) if form == 1
                     else bytearray(chunk[at:at + n]))
        at += n
    got = digest_mod._fsverity.digests(datas)
    assert got == b"".join(fsverity_digest(d) for d in datas)
    assert digest_mod.fsverity_digests(datas) == [fsverity_digest(d) for d in datas]


def test_digests_equal_the_specification(monkeypatch: pytest.MonkeyPatch) -> None:
    require_native()
    rng = random.Random(3)
    datas = [rng.randbytes(n) for n in SIZES + [rng.randrange(9000) for _ in range(200)]]
    rng.shuffle(datas)
    native = digest_mod.fsverity_digests(datas)
    assert native == _reference(datas, monkeypatch)
    assert digest_mod._fsverity_digests_py(datas) == native


def test_digests_refuse_what_is_not_a_buffer() -> None:
    require_native()
    fn = digest_mod._fsverity.digests
    assert fn([]) == b""
    with pytest.raises(TypeError):
        fn(5)
    with pytest.raises(TypeError):
        fn([b"abc", "text"])
    with pytest.raises(TypeError):
        fn([b"abc", None])


@pytest.mark.parametrize("impl", ["avx512", "sha-ni", "libcrypto"])
def test_digests_on_every_hashing_path(impl: str) -> None:
    """Each block-hashing path the compiled module has (sixteen at a time, two at a time, libcrypto)
    gives the Python digests through `digests`; a path this CPU lacks refuses to load."""
    require_native()
    code = (
        "import random, sys\n"
        "import objects._fsverity\n"   # (directly: objects.digest would fall back to Python quietly)
        "import objects.digest as d\n"
        "from objects.digest import _fsverity_digest_py, _hash_full_blocks_py\n"
        f"sizes = {SIZES!r} + [random.Random(1).randrange(20000) for _ in range(100)]\n"
        "datas = [random.Random(n).randbytes(n) for n in sizes]\n"
        "got = d._fsverity.digests(datas)\n"
        "d.hash_full_blocks = _hash_full_blocks_py\n"
        "assert got == b''.join(_fsverity_digest_py(x) for x in datas)\n"
        "print(d._fsverity.IMPLEMENTATION)\n"
    )
    env = dict(os.environ, OBJECTS_FSVERITY_IMPL=impl)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    has = {"avx512": {"avx512f", "avx512bw"} <= flags, "sha-ni": "sha_ni" in flags, "libcrypto": True}
    if not has[impl]:
        assert out.returncode != 0 and "no usable SHA-256" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == impl


@pytest.mark.parametrize("helper", [True, False], ids=["helpers", "in-process"])
def test_put_many_stores_what_put_bytes_stores(tmp_path: Path, helper: bool) -> None:
    """put_many: the digests and objects of put_bytes one by one, duplicates and contents stored
    before included, before and after the helpers start."""
    rng = random.Random(9)
    contents = [rng.randbytes(rng.choice([65, 300, 4096, 5000, 9000])) for _ in range(START_AFTER + 300)]
    contents += contents[:20]
    runs = [contents[i:i + 13] for i in range(0, len(contents), 13)]
    with ObjectStore(tmp_path / "many") as a, ObjectStore(tmp_path / "one") as b:
        a.put_bytes(contents[5])
        b.put_bytes(contents[5])
        with a.bulk(helper=helper) as bulk:
            got = [d for run in runs for d in bulk.put_many([memoryview(c) for c in run])]
        with b.bulk(helper=helper) as bulk:
            want = [bulk.put_bytes(c) for c in contents]
        assert got == want == [fsverity_digest(c) for c in contents]
        assert list(a) == list(b)
        for d, c in zip(got, contents, strict=True):
            assert Path(a.path(d)).read_bytes() == c
