"""The compiled tar header decoder (flatmount/sources/_tarscan.c) against its Python specification.

`_tarscan.parse_plain` must give exactly what `tarreader._parse_plain_py` gives wherever it gives
anything (it hands back None, to the Python code, for all that is unusual), on random blocks and on
headers built field by field with every number form `_octal` reads; and whole tars read with the
compiled decoder and with the Python one (as with FLATMOUNT_PURE=1) give the same trees, objects,
digests and errors.  Under CI a missing compiled module is a failure, not a skip.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flatmount.errors import LayerError
from flatmount.image.dump import dump_bytes
from flatmount.sources import tarreader
from flatmount.sources.layers import read_tar
from objects import ObjectStore
from tests.conftest import require_compiled
from tests.tarbuild import bad_tars, compress
from tests.test_layers_fast import FORMS, _plain_entries, _tar, _ti

ROOT = Path(__file__).resolve().parent.parent


def _compiled():
    return require_compiled("flatmount.sources._tarscan").parse_plain


def _compiled_scan():
    _compiled()
    from flatmount.sources._tarscan import scan_plain

    return scan_plain


def _scan_agrees(buf: bytes, off: int, limit: int, max_size: int) -> None:
    """The compiled batch decoder gives what the Python one gives, or stops earlier, and only
    before a header its `parse_plain` leaves to Python."""
    got, got_end = _compiled_scan()(buf, off, limit, max_size)
    want, want_end = tarreader._scan_plain_py(buf, off, limit, max_size)
    assert got == want[:len(got)]
    assert [[type(x) for x in m] for m in got] == [[type(x) for x in m] for m in want[:len(got)]]
    if len(got) == len(want):
        assert got_end == want_end
    else:
        assert _compiled()(buf[got_end:got_end + 512]) is None
        assert got_end == (want[len(got)][-1] - 512)


def _agree(block: bytes) -> None:
    """The compiled decoder says what the Python one says, or leaves the block to it (None)."""
    got = _compiled()(block)
    want = tarreader._parse_plain_py(block)
    if got is not None:
        assert got == want
        assert [type(x) for x in got] == [type(x) for x in want]


# --- header blocks ------------------------------------------------------------------------------

_SPACES = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"


@st.composite
def _number(draw, width: int) -> bytes:
    """An octal field of `width` bytes in one of the forms tar writers (and hostile inputs) use."""
    value = draw(st.integers(0, 8 ** (width - 1) - 1))
    digits = b"%o" % value
    form = draw(st.sampled_from(["nul"] * 6 + ["space"] * 3 + [  # mostly what tar writers write
        "zeros", "lead", "sign", "under", "0o", "junk", "empty", "b256", "inner", "nonascii", "89"]))
    if form == "nul":
        text = digits.rjust(width - 1, b"0") + b"\0"
    elif form == "space":
        text = digits.rjust(width - 2, b"0") + b" \0"
    elif form == "zeros":
        text = digits.rjust(width, b"0")[-width:]
    elif form == "lead":
        pad = "".join(draw(st.lists(st.sampled_from(_SPACES), max_size=2))).encode()
        tail = "".join(draw(st.lists(st.sampled_from(_SPACES), max_size=2))).encode()
        text = pad + digits + tail
    elif form == "sign":
        text = draw(st.sampled_from([b"+", b"-"])) + digits
    elif form == "under":
        text = digits[:1] + b"_" + digits[1:] if len(digits) > 1 else b"_" + digits
    elif form == "0o":
        text = b"0o" + digits
    elif form == "junk":
        text = draw(st.binary(min_size=width, max_size=width))
    elif form == "empty":
        text = draw(st.sampled_from([b"", b" " * width, b"\0" * width]))
    elif form == "b256":
        text = b"\x80" + value.to_bytes(width - 1, "big")
    elif form == "inner":
        text = digits[:1] + b" " + digits[1:]
    elif form == "89":
        at = draw(st.integers(0, len(digits) - 1))
        text = digits[:at] + draw(st.sampled_from([b"8", b"9"])) + digits[at + 1:]
    else:
        text = digits + b"\xc3\xa9"
    text = text[:width]
    return text + draw(st.sampled_from([b"\0", b" "])) * (width - len(text))


_NAME = st.binary(max_size=100).map(lambda b: b.replace(b"\0", b"x")) | st.sampled_from(
    [b"", b"/", b"a/", b"a//", b"./", b"d/e/", b"f"])


@st.composite
def _header(draw) -> bytes:
    b = bytearray(512)
    name = draw(_NAME)
    b[0:len(name)] = name
    for off, width in ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)):
        b[off:off + width] = draw(_number(width))
    b[156] = ord(draw(st.sampled_from(list("0123456789xgLKSV\0A"))))
    link = draw(st.binary(max_size=100))
    b[157:157 + len(link)] = link
    b[257:263] = draw(st.sampled_from([b"ustar\x00", b"ustar ", b"\0" * 6]))
    prefix = draw(st.sampled_from([b"", b"pre", b"p/q/", b"x" * 155]) | st.binary(max_size=155))
    b[345:345 + len(prefix)] = prefix
    b[148:156] = b" " * 8
    total = sum(b)
    form = draw(st.sampled_from(["right", "right", "right", "space", "wrong", "signed", "any"]))
    if form == "right":
        b[148:156] = b"%06o\0 " % total
    elif form == "space":
        b[148:156] = (b" %o" % total).ljust(8, b" ")
    elif form == "wrong":
        b[148:156] = b"%06o\0 " % (total + draw(st.integers(1, 100)))
    elif form == "signed":  # tarfile also accepts the signed sum: only the Python code decides that
        b[148:156] = b"%06o\0 " % (total - 256 * 0)
        b[0] = 0x80 | b[0]
    else:
        b[148:156] = draw(_number(8))
    return bytes(b)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(_header())
def test_compiled_decoder_agrees_on_built_headers(block):
    _agree(block)


@settings(max_examples=500)
@given(st.binary(min_size=512, max_size=512))
def test_compiled_decoder_agrees_on_random_blocks(block):
    _agree(block)


def _block(name: bytes = b"f", kind: bytes = b"0", prefix: bytes = b"", link: bytes = b"",
           numbers: dict[int, bytes] | None = None) -> bytes:
    b = bytearray(512)
    b[0:len(name)] = name
    b[156:157] = kind
    b[157:157 + len(link)] = link
    b[345:345 + len(prefix)] = prefix
    for off, width in ((100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)):
        b[off:off + width] = (numbers or {}).get(off, b"0" * (width - 1) + b"\0")
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


@pytest.mark.parametrize("block", [
    _block(b"olddir/", b"\0"), _block(b"olddir//", b"\0", b"pre/"), _block(b"d///", b"5", b"p//"),
    _block(b"f/", b"0"), _block(b"/", b"\0"), _block(b"", b"5", b"p/"), _block(b"", b"\0", b"p/"),
    _block(b"l", b"1", link=b"t" * 100), _block(b"s", b"2", link=b"t\0u"), _block(b"s", b"3", link=b"t"),
    _block(b"n" * 100, b"0", b"p" * 155), _block(numbers={100: b"00000648"}), _block(numbers={124: b"9" * 11 + b"\0"}),
    _block(numbers={136: b"77777777777\0"}), _block(numbers={136: b"777777777777"}),
    *(_block(numbers={108: ch.encode() + b"17" + ch.encode() + b"\0" * 4}) for ch in _SPACES),
    _block(numbers={108: b"\x1b17\0\0\0\0\0"}), _block(numbers={108: b"\0\x8017\0\0\0\0"}),
    _block(numbers={108: b"1 7\0\0\0\0\0"}), _block(numbers={108: b"+17\0\0\0\0\0"}),
    _block(numbers={329: b"0000012\0", 337: b"0000034\0"}, kind=b"3"),
], ids=lambda b: repr(b[:12]))
def test_compiled_decoder_agrees_on_chosen_headers(block):
    _agree(block)
    assert tarreader._parse_plain_py(block) is not None or block[108:110] in (b"\x1b1", b"1 ", b"+1") \
        or block[100:108] == b"00000648" or block[124:136] == b"9" * 11 + b"\0"


def test_compiled_decoder_takes_the_common_headers():
    """Every header of plain tars (as GNU tar, tarfile and podman write them) is decoded in C."""
    parse = _compiled()
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT):
        data = _tar(_plain_entries(200, 7), fmt)
        off = n = 0
        while off + 512 <= len(data) and any(data[off:off + 512]):
            block = data[off:off + 512]
            got = parse(block)
            assert got is not None, block[:100]
            assert got == tarreader._parse_plain_py(block)
            kind, size = got[0], got[6]
            off += 512 + (-(-size // 512) * 512 if kind in (b"0", b"\0") else 0)
            n += 1
        assert n > 200


def test_compiled_decoder_refuses_a_short_block():
    parse = _compiled()
    for bad in (b"", b"x" * 511, b"x" * 513):
        with pytest.raises(ValueError):
            parse(bad)
        with pytest.raises(ValueError):
            tarreader._parse_plain_py(bad)
    with pytest.raises(TypeError):
        parse("x" * 512)


# --- whole tars ---------------------------------------------------------------------------------

def _read(data: bytes, store_dir: Path, native: bool, monkeypatch: pytest.MonkeyPatch) -> tuple:
    parse = _compiled() if native else tarreader._parse_plain_py
    with monkeypatch.context() as m:
        m.setattr(tarreader, "parse_plain", parse)
        m.setattr(tarreader, "scan_plain", _compiled_scan() if native else tarreader._scan_plain_py)
        m.setattr(tarreader, "NATIVE", native)
        with ObjectStore(str(store_dir)) as objects:
            try:
                layer = read_tar(io.BytesIO(data), objects, label="L")
            except LayerError as e:
                return "error", str(e)
    files = sorted((p.relative_to(store_dir).as_posix(), p.read_bytes())
                   for p in store_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    return "ok", dump_bytes(layer.tree), layer.diff_id, layer.entries, files


def _same_both_ways(data: bytes, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    n = len(list(tmp.glob("c*")))
    compiled = _read(data, tmp / f"c{n}", True, monkeypatch)
    pure = _read(data, tmp / f"p{n}", False, monkeypatch)
    assert compiled == pure
    return compiled


@pytest.mark.parametrize("form", sorted(FORMS))
def test_tars_read_the_same_compiled_and_pure(form, tmp_path, monkeypatch):
    assert _same_both_ways(FORMS[form](), tmp_path, monkeypatch)[0] == "ok"


@pytest.mark.parametrize("case", bad_tars(), ids=lambda c: c[0])
def test_broken_tars_fail_the_same_compiled_and_pure(case, tmp_path, monkeypatch):
    assert _same_both_ways(case[1], tmp_path, monkeypatch)[0] == "error"


def test_odd_numbers_are_left_to_python(tmp_path, monkeypatch):
    """Headers whose numbers only Python's int() reads (sign, underscore, 0o) import as before."""
    data = bytearray(_tar([(_ti("a", size=70), b"a" * 70), (_ti("b", size=70), b"b" * 70)]))
    for field, text in ((100, b"+0000644"), (108, b"0_0000001"[:8]), (116, b"0o000007")):
        data[512 + 512 + field:512 + 512 + field + 8] = text
    hdr = data[1024:1536]
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    data[1024:1536] = hdr
    assert _compiled()(bytes(hdr)) is None
    assert tarreader._parse_plain_py(bytes(hdr)) is not None
    assert _same_both_ways(bytes(data), tmp_path, monkeypatch)[0] == "ok"


_ENTRY = st.tuples(
    st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                     tarfile.CHRTYPE, tarfile.FIFOTYPE]),
    st.lists(st.sampled_from(["a", "b", "c", ".wh.c", "d" * 120, "é"]), min_size=1, max_size=3),
    st.integers(0, 9000), st.integers(0, 0o7777), st.integers(0, 70000), st.integers(0, 2 ** 33 - 1),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(entries=st.lists(_ENTRY, max_size=12),
       fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
       seed=st.integers(0, 2 ** 32))
def test_random_tars_read_the_same_compiled_and_pure(entries, fmt, seed, tmp_path, monkeypatch):
    rng = random.Random(seed)
    members = []
    for type_, parts, size, mode, uid, mtime in entries:
        name = "/".join(parts)
        kw = {"mode": mode, "uid": uid, "gid": uid // 3, "mtime": mtime}
        if type_ in (tarfile.REGTYPE, tarfile.AREGTYPE):
            members.append((_ti(name, type_, size=size, **kw), rng.randbytes(size)))
        elif type_ in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            members.append((_ti(name, type_, linkname=rng.choice(["a", "b/c", "x" * 120]), **kw), None))
        elif type_ == tarfile.CHRTYPE:
            members.append((_ti(name, type_, devmajor=rng.randrange(4), devminor=rng.randrange(3), **kw), None))
        else:
            members.append((_ti(name, type_, **kw), None))
    try:
        data = _tar(members, fmt)
    except ValueError:  # a name or number this format cannot hold
        return
    _same_both_ways(data, tmp_path, monkeypatch)
    _same_both_ways(compress(data, "gzip"), tmp_path, monkeypatch)


def test_flatmount_pure_turns_the_compiled_decoder_off():
    _compiled()
    code = "from flatmount.sources import tarreader as t; print(t.NATIVE, t.parse_plain.__name__, t.scan_plain.__name__)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "FLATMOUNT_PURE": "1"}, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "_parse_plain_py", "_scan_plain_py"]
    env.pop("FLATMOUNT_PURE", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "parse_plain", "scan_plain"]


# --- batches of members (scan_plain) -----------------------------------------------------------

def _small_files_tar(n: int, seed: int, fmt=tarfile.GNU_FORMAT) -> bytes:
    rng = random.Random(seed)
    members = [(_ti(f"d{i // 50}/f{i}", size=(size := rng.choice([0, 1, 64, 65, 511, 512, 513, 3000, 9000]))),
                rng.randbytes(size)) for i in range(n)]
    members.insert(n // 2, (_ti("d0/dev", tarfile.CHRTYPE, devmajor=3, devminor=7), None))
    members.insert(n // 3, (_ti("d0/link", tarfile.SYMTYPE, linkname="f1"), None))
    members.insert(n // 4, (_ti("d0/hard", tarfile.LNKTYPE, linkname="d0/f1"), None))
    return _tar(members, fmt)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_scan_agrees_on_every_form(form):
    data = FORMS[form]()
    for off in range(0, len(data), 512):
        for limit, max_size in ((1000, 1 << 20), (2, 1 << 20), (1000, 100)):
            _scan_agrees(data, off, limit, max_size)
            _scan_agrees(data[:off + 700], off, limit, max_size)  # members cut by the buffer's end


def test_scan_agrees_on_cut_buffers_and_odd_offsets():
    data = _small_files_tar(120, 3)
    for end in range(0, len(data), 97):
        _scan_agrees(data[:end], 0, 1000, 1 << 20)
    for off in (-5, len(data), len(data) + 512, 1, 511):
        _scan_agrees(data, off, 1000, 1 << 20)
    assert _compiled_scan()(data, 0, 0, 1 << 20) == ([], 0)
    with pytest.raises(TypeError):
        _compiled_scan()("x" * 512, 0, 1, 1)


@settings(max_examples=200, deadline=None)
@given(block=st.binary(min_size=512, max_size=512), pos=st.sampled_from([124, 148, 156, 0, 345]),
       text=st.binary(min_size=1, max_size=12))
def test_scan_agrees_on_random_headers(block, pos, text):
    data = bytearray(_small_files_tar(3, 1))
    hdr = bytearray(block)
    hdr[pos:pos + len(text)] = text
    hdr[156:157] = random.Random(len(text)).choice([b"0", b"5", b"2", b"\0", hdr[156:157]])
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    data[512:1024] = hdr
    _scan_agrees(bytes(data), 0, 1000, 1 << 20)


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_many_small_files_read_the_same_compiled_and_pure(fmt, tmp_path, monkeypatch):
    """Hundreds of members over many of the reader's 64 KiB chunks: batches, members cut by a
    chunk's end (read one by one), devices, links."""
    assert _same_both_ways(_small_files_tar(700, 9, fmt), tmp_path, monkeypatch)[0] == "ok"


def test_batches_are_used(tmp_path, monkeypatch):
    """With the compiled scanner most members of a tar of small files are read in batches."""
    _compiled_scan()
    calls = []
    real = tarreader._fast_batch
    monkeypatch.setattr(tarreader, "_fast_batch", lambda *a: calls.append(real(*a)) or calls[-1])
    with ObjectStore(str(tmp_path / "o")) as objects:
        layer = read_tar(io.BytesIO(_small_files_tar(700, 9)), objects)
    assert sum(calls) > 600 and layer.entries == 703
