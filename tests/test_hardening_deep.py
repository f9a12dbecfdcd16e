"""Issue 13 item 13: trees thousands of directories deep import, flatten, mount, read, diff, export and
dump without RecursionError (every tree walk is iterative)."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from conftest import require_root
from tarbuild import make_oci

from flatmount.cli import main


def _tar(entries: list[tuple[str, bytes, bytes | None]]) -> bytes:
    """(name, type, content) entries as a PAX tar (names longer than PATH_MAX are fine in a tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, type_, data in entries:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = type_, 0o755 if type_ == tarfile.DIRTYPE else 0o644, 1000
            ti.size = len(data or b"")
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _layers(depth: int) -> tuple[bytes, bytes]:
    """Base: `depth` nested dirs `d`, at the bottom files `f`, `gone` and a dir `opq/old`; top: `f`
    changed (external object), `gone` whited out, `opq` opaque with a new child, `new` added."""
    chain = "/".join(["d"] * depth)
    base = [("/".join(["d"] * (i + 1)), tarfile.DIRTYPE, None) for i in range(depth)]
    base += [(f"{chain}/f", tarfile.REGTYPE, b"bottom"), (f"{chain}/gone", tarfile.REGTYPE, b"x"),
             (f"{chain}/opq", tarfile.DIRTYPE, None), (f"{chain}/opq/old", tarfile.REGTYPE, b"o")]
    top = [*base[:depth], (f"{chain}/f", tarfile.REGTYPE, b"bottom, changed " * 10),
           (f"{chain}/.wh.gone", tarfile.REGTYPE, None), (f"{chain}/opq", tarfile.DIRTYPE, None),
           (f"{chain}/opq/.wh..wh..opq", tarfile.REGTYPE, None), (f"{chain}/opq/n", tarfile.REGTYPE, b"n"),
           (f"{chain}/new", tarfile.REGTYPE, b"new")]
    return _tar(base), _tar(top)


def _remove_tree(top: str) -> None:
    """rm -r without recursion (shutil.rmtree, and so pytest's cleanup, recurse per level)."""
    stack = [(top, False)]
    while stack:
        path, listed = stack.pop()
        if listed:
            os.rmdir(path)
            continue
        stack.append((path, True))
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, False))
                else:
                    os.unlink(e.path)


def _same(got: list[str], want: list[str]) -> None:
    """Equal, without pytest printing thousands of path bytes."""
    if got != want:
        short = [line if len(line) < 80 else line[:10] + "..." + line[-40:] for line in got]
        raise AssertionError(f"diff output differs: {short}")


def _read_at_bottom(top: str, depth: int, name: str) -> bytes:
    """Walk down with openat(): paths longer than PATH_MAX cannot be opened in one go."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        f = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        try:
            return os.read(f, 4096)
        finally:
            os.close(f)
    finally:
        os.close(fd)


@pytest.mark.parametrize("depth", [1100, 3000])
def test_deep_tree_imports_flattens_mounts_diffs_and_dumps(tmp_path, capsysbinary, depth):
    require_root()
    base, top = _layers(depth)
    make_oci(tmp_path / "oci", [(base, "none")], tag="base")
    make_oci(tmp_path / "oci2", [(base, "gzip"), (top, "zstd")], tag="top")
    st = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    assert main([*st, "pull", f"oci:{tmp_path / 'oci'}:base"]) == 0
    assert main([*st, "pull", f"oci:{tmp_path / 'oci2'}:top"]) == 0
    capsysbinary.readouterr()
    assert main([*st, "flatten", "top"]) == 0
    image = capsysbinary.readouterr().out.split()[1].decode()

    chain = "/" + "/".join(["d"] * depth)
    assert main([*st, "diff", "base:latest", "top:latest"]) == 0
    out = capsysbinary.readouterr().out.decode().splitlines()
    _same(sorted(out), sorted([f"C {chain}/f", f"D {chain}/gone", f"C {chain}/opq", f"D {chain}/opq/old",
                                  f"A {chain}/opq/n", f"A {chain}/new"] +
                               ["C " + "/d" * (i + 1) for i in range(depth)]))   # podman: every ancestor
    assert main([*st, "diff", "--strict", "top:latest", "base:latest", "-o", str(tmp_path / "l.tar")]) == 0
    capsysbinary.readouterr()
    with tarfile.open(tmp_path / "l.tar") as tf:
        names = tf.getnames()
    leaves = sorted(n.rpartition("/")[2] for n in names if n.rpartition("/")[2] != "d")
    # (the exporter makes the bottom dir opaque and lists it again rather than whiting out `new`)
    assert len(names) == depth + 5 and leaves == [".wh..wh..opq", "f", "gone", "old", "opq"], leaves

    assert main(["dump", image]) == 0
    dump = capsysbinary.readouterr().out
    assert dump.count(b"\n") == depth + 5      # root, depth dirs, f, new, opq, opq/n
    (tmp_path / "t.dump").write_bytes(dump)
    assert main(["mkimage", "--from-dump", str(tmp_path / "t.dump"), str(tmp_path / "again.erofs")]) == 0
    assert (tmp_path / "again.erofs").read_bytes() == open(image, "rb").read()

    assert main([*st, "fsck"]) == 0
    assert main([*st, "gc", "--dry-run"]) == 0
    assert main([*st, "objects", "usage"]) == 0
    capsysbinary.readouterr()

    assert main([*st, "mount", "top"]) == 0
    merged = capsysbinary.readouterr().out.decode().strip()
    try:
        assert _read_at_bottom(merged, depth, "f") == b"bottom, changed " * 10
        assert _read_at_bottom(merged, depth, "new") == b"new"
        with pytest.raises(FileNotFoundError):
            _read_at_bottom(merged, depth, "gone")
    finally:
        assert main([*st, "umount", merged]) == 0


def test_deep_directory_scans(tmp_path, capsysbinary):
    """`mkimage DIR` and `pull dir:` of a directory 1,100 levels deep (built with mkdirat)."""
    src = tmp_path / "src"
    src.mkdir()
    try:
        _scan_deep(tmp_path, src, capsysbinary)
    finally:
        _remove_tree(str(src))


def _scan_deep(tmp_path, src, capsysbinary) -> None:
    fd = os.open(src, os.O_RDONLY)
    for _ in range(1100):
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(b"z" * 100)
    os.close(fd)
    assert main(["mkimage", str(src), str(tmp_path / "s.erofs")]) == 0
    assert main(["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run"), "pull", f"dir:{src}",
                 "--name", "s"]) == 0
    capsysbinary.readouterr()
    assert main(["dump", str(tmp_path / "s.erofs")]) == 0
    assert capsysbinary.readouterr().out.count(b"\n") == 1102


def test_private_runtime_dirs_of_any_depth(tmp_path):
    """mount's `mkdir -p` (0700 components) is iterative too: 1,500 levels (within PATH_MAX)."""
    from flatmount.mount import _mkdir_private

    deep = os.path.join(str(tmp_path), *["r"] * 1500)
    try:
        _mkdir_private(deep)
        assert os.path.isdir(deep)
        assert oct(os.stat(deep).st_mode & 0o777) == oct(0o700)
        assert oct(os.stat(os.path.join(str(tmp_path), "r")).st_mode & 0o777) == oct(0o700)
    finally:
        _remove_tree(os.path.join(str(tmp_path), "r"))
