"""The tar reader's own path for plain members (flatmount.sources.tarreader._fast_member): used, and equal to tarfile's.

Each tar is read twice, with the fast path and with it switched off (every member through tarfile
and `_add_member`, the code it replaces): trees (as composefs dumps), digests, entry counts and
errors must be the same, on plain tars, on the header forms the fast path hands back to tarfile,
and on every broken tar of the layer tests.
"""

from __future__ import annotations

import io
import os
import random
import tarfile

import pytest

from flatmount.errors import LayerError
from flatmount.image.dump import dump_bytes
from flatmount.sources import tarreader
from flatmount.sources.layers import read_tar
from objects import ObjectStore
from tests.tarbuild import bad_tars, compress


def _ti(name: str, type_: bytes = tarfile.REGTYPE, size: int = 0, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime = type_, size, kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.USTAR_FORMAT, **kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _plain_entries(n: int, seed: int = 1) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Every member type the fast path takes: files inline and not, empty, dirs, links, devices, fifos."""
    rng = random.Random(seed)
    out: list[tuple[tarfile.TarInfo, bytes | None]] = [(_ti("./", tarfile.DIRTYPE, mode=0o755), None)]
    for i in range(n):
        d = f"d{i % 7}"
        k = i % 9
        if k in (0, 1, 2):
            size = rng.choice([0, 1, 64, 65, 4095, 4096, 4097, 9000, 200_000])
            out.append((_ti(f"{d}/f{i}", size=size, mode=0o640, uid=i, gid=2 * i),
                        rng.randbytes(size)))
        elif k == 3:
            out.append((_ti(f"{d}/sub{i}", tarfile.DIRTYPE, mode=0o711, mtime=5 + i), None))
        elif k == 4:
            out.append((_ti(f"{d}/l{i}", tarfile.SYMTYPE, linkname=f"../t{i}"), None))
        elif k == 5 and i > 9:
            out.append((_ti(f"{d}/h{i}", tarfile.LNKTYPE, linkname=f"d{(i - 5) % 7}/f{i - 5}"), None))
        elif k == 6:
            out.append((_ti(f"{d}/c{i}", tarfile.CHRTYPE, devmajor=1, devminor=i % 5, mode=0o600), None))
        elif k == 7:
            out.append((_ti(f"{d}/p{i}", tarfile.FIFOTYPE, mode=0o644), None))
        else:
            out.append((_ti(f"{d}/.wh.gone{i}"), b""))
    out.append((_ti("d1/.wh..wh..opq"), b""))
    out.append((_ti("b/blk", tarfile.BLKTYPE, devmajor=8, devminor=1), None))
    out.append((_ti("w/c00", tarfile.CHRTYPE, devmajor=0, devminor=0), None))  # a whiteout
    return out


def _read(data: bytes, store_dir: str, fast: bool, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[str, bytes | str, str, int] | tuple[str, str]:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(tarreader, "_fast_member", lambda *a: False)
        with ObjectStore(store_dir) as objects:
            try:
                layer = read_tar(io.BytesIO(data), objects, label="L")
            except LayerError as e:
                return "error", str(e)
    return "ok", dump_bytes(layer.tree), layer.diff_id, layer.entries


def _same_both_ways(data: bytes, tmp_path, monkeypatch) -> tuple:
    fast = _read(data, str(tmp_path / "fast"), True, monkeypatch)
    slow = _read(data, str(tmp_path / "slow"), False, monkeypatch)
    assert fast == slow
    return fast


def _v7_dir_tar() -> bytes:
    """An old-style directory: a regular-file header (type NUL) whose name ends in '/'."""
    ti = _ti("olddir/", tarfile.AREGTYPE, mode=0o750)
    return _tar([(ti, None), (_ti("olddir/f", size=70), b"x" * 70)])


def _dir_with_size_tar() -> bytes:
    """A directory header with a nonzero size: tarfile reads no payload for it (nor may we)."""
    raw = bytearray(_tar([(_ti("dd", tarfile.DIRTYPE), None), (_ti("dd/f", size=3), b"abc")]))
    hdr = raw[:512]
    hdr[124:136] = b"%011o\0" % 5
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    raw[:512] = hdr
    return bytes(raw)


FORMS = {
    "ustar": lambda: _tar(_plain_entries(120)),
    "gnu": lambda: _tar(_plain_entries(120, 2), tarfile.GNU_FORMAT),
    "pax": lambda: _tar(_plain_entries(120, 3), tarfile.PAX_FORMAT),
    "ustar-prefix": lambda: _tar([(_ti("p" * 90 + "/" + "q" * 80 + "/file", size=100), b"y" * 100),
                                  (_ti("p" * 90 + "/" + "q" * 80 + "/dir", tarfile.DIRTYPE), None)]),
    "gnu-longnames": lambda: _tar([(_ti("n" * 150, size=80), b"z" * 80),
                                   (_ti("k", tarfile.SYMTYPE, linkname="t" * 150), None),
                                   (_ti("m", size=90), b"m" * 90)], tarfile.GNU_FORMAT),
    "pax-mixed": lambda: _tar([(_ti("a", size=70), b"a" * 70),
                               (_ti("b", size=70, pax_headers={"mtime": "12.5"}), b"b" * 70),
                               (_ti("c", size=70, pax_headers={"SCHILY.xattr.user.k": "v"}), b"c" * 70),
                               (_ti("e", size=70), b"e" * 70)], tarfile.PAX_FORMAT),
    "pax-global": lambda: _tar([(_ti("a", size=70), b"a" * 70), (_ti("b", size=70), b"b" * 70)],
                               tarfile.PAX_FORMAT, pax_headers={"mtime": "7.25", "uid": "9"}),
    "v7-dir": _v7_dir_tar,
    "dir-with-size": _dir_with_size_tar,
    "big-between-small": lambda: _tar([(_ti("s1", size=100), b"1" * 100),
                                       (_ti("big", size=(1 << 20) + 5), os.urandom((1 << 20) + 5)),
                                       (_ti("s2", size=100), b"2" * 100)]),
    "gzip": lambda: compress(_tar(_plain_entries(60, 4)), "gzip"),
    "zstd": lambda: compress(_tar(_plain_entries(60, 5)), "zstd"),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_fast_path_gives_what_tarfile_gives(form, tmp_path, monkeypatch):
    result = _same_both_ways(FORMS[form](), tmp_path, monkeypatch)
    assert result[0] == "ok"


@pytest.mark.parametrize("case", bad_tars(), ids=lambda c: c[0])
def test_broken_tars_fail_the_same_way(case, tmp_path, monkeypatch):
    _name, data, pattern = case
    result = _same_both_ways(data, tmp_path, monkeypatch)
    assert result[0] == "error"


@pytest.mark.parametrize("cut", [512 + 100, 512 + 4096 + 7, 3 * 512 + 20])
def test_truncated_plain_tars_fail_the_same_way(cut, tmp_path, monkeypatch):
    data = _tar([(_ti("f", size=4100), b"f" * 4100), (_ti("g", size=70), b"g" * 70)])
    assert _same_both_ways(data[:cut], tmp_path, monkeypatch)[0] == "error"


def test_bad_checksum_or_number_goes_to_tarfile(tmp_path, monkeypatch):
    data = bytearray(_tar([(_ti("a", size=70), b"a" * 70), (_ti("b", size=70), b"b" * 70)]))
    second = 512 + 512
    data[second + 100:second + 108] = b"09999999"  # not octal: tarfile's error
    assert _same_both_ways(bytes(data), tmp_path, monkeypatch)[0] == "error"


def test_plain_members_do_not_go_through_tarfile(tmp_path, monkeypatch):
    """The speed of many-small-file layers: tarfile decodes only the first header and the end."""
    calls = []
    real = tarreader._TarInfo.frombuf.__func__

    def counting(cls, buf, encoding, errors):
        calls.append(1)
        return real(cls, buf, encoding, errors)

    monkeypatch.setattr(tarreader._TarInfo, "frombuf", classmethod(counting))
    data = _tar(_plain_entries(300))
    with ObjectStore(str(tmp_path / "o")) as objects:
        layer = read_tar(io.BytesIO(data), objects)
    assert layer.entries > 300
    assert len(calls) <= 3
