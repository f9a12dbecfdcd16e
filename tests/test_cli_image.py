"""`flatmount dump` / `flatmount mkimage` through flatmount.cli.main: round trips, exit codes, messages."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from conftest import shared_data

from flatmount.cli import main
from flatmount.image.dump import dump_bytes, parse_dump
from flatmount.image.tree import Inode

CS9_NAME = "cs9-x86_64-developer.dump.gz"
D1 = bytes.fromhex("1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64")


def run(capsysbinary, *argv: str) -> tuple[int, bytes, str]:
    rc = main(list(argv))
    out, err = capsysbinary.readouterr()
    return rc, out, err.decode()


def sample_tree() -> Inode:
    """A layer-like tree: every file type, hardlinks, escaped names, xattrs incl. trusted.overlay.*."""
    root = Inode.directory(0o755, mtime_ns=1_700_000_000_000_000_001, xattrs={b"user.root": b"1"})
    etc = root.entries[b"etc"] = Inode.directory(0o755, uid=0, gid=0, mtime_ns=5)
    etc.entries[b"hostname"] = Inode.file(b"box\n", 0o644, mtime_ns=-1_500_000_000)
    big = Inode(stat.S_IFREG | 0o755, uid=1000, gid=100, size=123456, digest=D1,
                xattrs={b"security.capability": b"\x01\x00\x00\x02 =\x00", b"user.k=": b"v"})
    usr = root.entries[b"usr"] = Inode.directory(0o755)
    usr.entries[b"tool"] = big
    usr.entries[b"tool-hardlink"] = big
    usr.entries[b"sym"] = Inode.symlink(b"../etc/hostname")
    usr.entries[b"odd name \xff\\\n"] = Inode.file(b"-", 0o600)
    usr.entries[b"obj"] = Inode(stat.S_IFREG | 0o644, size=65, payload="ab/" + "c" * 62)
    dev = root.entries[b"dev"] = Inode.directory(0o755)
    dev.entries[b"null"] = Inode(stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3))
    dev.entries[b"sda"] = Inode(stat.S_IFBLK | 0o660, rdev=os.makedev(8, 0))
    dev.entries[b"fifo"] = Inode(stat.S_IFIFO | 0o600)
    dev.entries[b"sock"] = Inode(stat.S_IFSOCK | 0o755)
    layer = root.entries[b"layer"] = Inode.directory(0o755)
    layer.entries[b"deleted"] = Inode.whiteout()
    layer.entries[b"opaque"] = Inode.directory(0o700, xattrs={b"trusted.overlay.opaque": b"y"})
    layer.entries[b"redirected"] = Inode.directory(0o755, xattrs={b"trusted.overlay.redirect": b"/x"})
    root.entries[b"empty"] = Inode.directory(0o1777)
    root.entries[b"00"] = Inode.file(b"a real file named like a root whiteout")
    return root


@pytest.fixture
def dump_file(tmp_path) -> tuple[Path, bytes]:
    text = dump_bytes(sample_tree())
    p = tmp_path / "sample.dump"
    p.write_bytes(text)
    return p, text


def test_dump_mkimage_dump_is_identity(dump_file, tmp_path, capsysbinary):
    path, text = dump_file
    img = tmp_path / "img.erofs"
    assert run(capsysbinary, "mkimage", "--from-dump", str(path), str(img)) == (0, b"", "")
    rc, out, err = run(capsysbinary, "dump", str(img))
    assert (rc, err) == (0, "")
    assert out == text
    back = parse_dump(out)
    assert back == sample_tree()
    assert back.entries[b"usr"].entries[b"tool"] is back.entries[b"usr"].entries[b"tool-hardlink"]


def test_image_dump_mkimage_same_bytes(dump_file, tmp_path, capsysbinary):
    path, _ = dump_file
    img1, img2 = tmp_path / "1.erofs", tmp_path / "2.erofs"
    assert run(capsysbinary, "mkimage", "--from-dump", str(path), str(img1))[0] == 0
    rc, out, _ = run(capsysbinary, "dump", str(img1))
    assert rc == 0
    redump = tmp_path / "re.dump.gz"
    redump.write_bytes(gzip.compress(out))                 # gzip input detected by magic
    assert run(capsysbinary, "mkimage", "--from-dump", str(redump), str(img2))[0] == 0
    assert img1.read_bytes() == img2.read_bytes()


def test_mkimage_from_stdin_to_stdout(dump_file, tmp_path, capsysbinary, monkeypatch):
    path, text = dump_file
    img = tmp_path / "img.erofs"
    assert run(capsysbinary, "mkimage", "--from-dump", str(path), str(img))[0] == 0

    class Stdin:
        buffer = io.BytesIO(text)

    monkeypatch.setattr(sys, "stdin", Stdin())
    rc, out, err = run(capsysbinary, "mkimage", "--from-dump", "-", "-")
    assert (rc, err) == (0, "")
    assert out == img.read_bytes()


def test_mkimage_json(dump_file, tmp_path, capsys):
    path, _ = dump_file
    img = tmp_path / "img.erofs"
    assert main(["mkimage", "--json", "--from-dump", str(path), str(img)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info == {"output": str(img), "size": img.stat().st_size, "inodes": 19}


def test_mkimage_from_directory(tmp_path, capsysbinary):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "small").write_bytes(b"tiny")
    big = bytes(range(256)) * 40
    (src / "big").write_bytes(big)
    os.link(src / "big", src / "d" / "big-again")
    os.symlink("d/small", src / "link")
    objdir = tmp_path / "objects"
    img = tmp_path / "img.erofs"
    assert run(capsysbinary, "mkimage", str(src), str(img), "--digest-store", str(objdir)) == (0, b"", "")
    from objects import ObjectStore, fsverity_digest

    digest = fsverity_digest(big)
    store = ObjectStore(str(objdir))
    assert list(store) == [digest]
    rc, out, _ = run(capsysbinary, "dump", str(img))
    assert rc == 0
    lines = {ln.split(b" ")[0]: ln.split(b" ") for ln in out.splitlines()}
    assert lines[b"/big"][8] == (digest.hex()[:2] + "/" + digest.hex()[2:]).encode()
    assert lines[b"/big"][10] == digest.hex().encode() and lines[b"/big"][3] == b"2"
    assert lines[b"/d/big-again"][2] == b"@100644" and lines[b"/d/big-again"][8] == b"/big"
    assert lines[b"/d/small"][9] == b"tiny"
    assert lines[b"/link"][8] == b"d/small"
    # without a store: same image, nothing stored
    img2 = tmp_path / "img2.erofs"
    assert run(capsysbinary, "mkimage", str(src), str(img2))[0] == 0
    assert img2.read_bytes() == img.read_bytes()


def test_cs9_through_an_image(tmp_path, capsysbinary):
    """64,246 inodes: composefs' own dump -> image -> dump gives composefs' dump back, byte for byte."""
    img = tmp_path / "cs9.erofs"
    CS9 = shared_data(CS9_NAME)  # noqa: N806
    assert run(capsysbinary, "mkimage", "--from-dump", str(CS9), str(img))[0] == 0
    rc, out, _ = run(capsysbinary, "dump", str(img))
    assert rc == 0
    assert out == gzip.decompress(CS9.read_bytes())


@pytest.mark.parametrize("argv", [
    ["mkimage", "--from-dump", "x.dump"],
    ["mkimage", "--from-dump", "x.dump", "a", "b"],
    ["mkimage", "dir"],
    ["mkimage", "a", "b", "c"],
    ["mkimage", "--from-dump", "x.dump", "out", "--digest-store", "objs"],
    ["mkimage"],
    ["dump"],
])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_errors_exit_3(tmp_path, capsysbinary):
    missing = str(tmp_path / "missing")
    out = str(tmp_path / "out.erofs")
    rc, _, err = run(capsysbinary, "mkimage", "--from-dump", missing, out)
    assert rc == 3 and "cannot read dump" in err and "Traceback" not in err
    bad = tmp_path / "bad.dump"
    bad.write_bytes(b"/ 0 40755 2 0 0 0 0.0 - - -\n/a 0 100644 1 0 0 0 zero - - -\n")
    rc, _, err = run(capsysbinary, "mkimage", "--from-dump", str(bad), out)
    assert rc == 3 and "DumpSyntaxError" in err and "line 2" in err and "MTIME" in err
    assert not os.path.exists(out)
    rc, _, err = run(capsysbinary, "mkimage", missing, out)
    assert rc == 3 and "LayerError" in err
    rc, _, err = run(capsysbinary, "dump", missing)
    assert rc == 3 and "cannot read image" in err
    junk = tmp_path / "junk.erofs"
    junk.write_bytes(os.urandom(8192))
    rc, _, err = run(capsysbinary, "dump", str(junk))
    assert rc == 3 and "CorruptImageError" in err
    assert not os.path.exists(out)
