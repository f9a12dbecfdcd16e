"""Issue acceptance for the image layer: a real directory through `flatmount mkimage --digest-store`
and `flatmount mount-image` shows a merged view equal to the source (listing, modes, owners, ns mtimes,
sizes, symlink targets, xattrs, hardlink groups, sha256 of every file); a missing object is a clean
ENOENT on open."""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import stat
import sysconfig
from pathlib import Path

import pytest
from conftest import require_root

from flatmount.cli import main
from flatmount.image.dump import dump_bytes
from flatmount.sources.directory import scan_directory


def _python_lib_dir() -> Path:
    """A real, sizeable directory tree: the system Python's lib dir (the running one's as fallback)."""
    for cand in sorted(glob.glob("/usr/lib/python3.*")):
        if os.path.isfile(os.path.join(cand, "os.py")):
            return Path(cand)
    return Path(sysconfig.get_paths()["stdlib"]) / "email"


def _crafted(root: Path) -> Path:
    """What a lib dir lacks: hardlink groups, xattrs in three namespaces, ns and pre-1970 mtimes,
    devices, a fifo, owners above 65535, a setuid file, odd names."""
    src = root / "crafted"
    (src / "sub" / "deeper").mkdir(parents=True)
    big = os.urandom(70_000)
    (src / "big").write_bytes(big)
    os.link(src / "big", src / "sub" / "big.link")
    os.link(src / "big", src / "sub" / "deeper" / "big.link2")
    (src / "small").write_bytes(b"inline\n")
    os.link(src / "small", src / "small.link")
    (src / "name with spaces -+").write_bytes(b"x" * 100)
    (src / b"non-utf8-\xff".decode("utf-8", "surrogateescape")).write_bytes(b"y" * 65)
    os.symlink("sub/deeper", src / "dirlink")
    os.symlink("/absolute/dangling", src / "dangling")
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(src / "blk", stat.S_IFBLK | 0o600, os.makedev(259, 300))
    os.mkfifo(src / "fifo", 0o640)
    (src / "suid").write_bytes(b"#!/bin/sh\necho hi\n" * 5)
    os.chmod(src / "suid", 0o4755)
    os.chown(src / "suid", 100_000, 200_000)
    os.setxattr(src / "big", "user.origin", b"test")
    os.setxattr(src / "big", "security.capability", b"\x01\x00\x00\x02" + b"\x00" * 16)
    os.setxattr(src / "small", "trusted.note", b"shared-value")
    os.setxattr(src / "sub", "trusted.note", b"shared-value")
    os.setxattr(src / "sub", "user.mime", b"inode/directory")
    os.utime(src / "small", ns=(0, 1_700_000_000_123_456_789))
    os.utime(src / "name with spaces -+", ns=(0, -86_400_000_000_001))
    for d in (src / "sub" / "deeper", src / "sub", src):
        os.utime(d, ns=(0, 1_600_000_000_000_000_007))
    return src


def _sha256s(top: Path) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(top):
        for f in files:
            p = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(p).st_mode):
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, top)] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def _mounted(image: Path, objects: Path, mnt: Path):
    assert main(["mount-image", str(image), str(mnt), "--objects", str(objects)]) == 0


@pytest.mark.parametrize("which", ["python-lib", "crafted"])
def test_real_directory_through_mkimage_and_mount_image(tmp_path, which):
    require_root()
    src = _python_lib_dir() if which == "python-lib" else _crafted(tmp_path)
    image, objects, mnt = tmp_path / "img.erofs", tmp_path / "objects", tmp_path / "mnt"
    mnt.mkdir()
    assert main(["mkimage", str(src), str(image), "--digest-store", str(objects)]) == 0
    expected = scan_directory(src)
    _mounted(image, objects, mnt)
    try:
        seen = scan_directory(mnt)
        # attributes of the mount point's root come from the image root = the source dir
        assert seen == expected
        # hardlink groups, nlink and every field the dump carries, byte for byte
        assert dump_bytes(seen) == dump_bytes(expected)
        assert _sha256s(mnt) == _sha256s(src)
        if which == "crafted":
            st = os.stat(mnt / "sub" / "big.link")
            assert st.st_nlink == 3 and st.st_ino == os.stat(mnt / "big").st_ino
            assert os.getxattr(mnt / "big", "security.capability")[:4] == b"\x01\x00\x00\x02"
            assert os.stat(mnt / "name with spaces -+").st_mtime_ns == -86_400_000_000_001
            assert os.stat(mnt / "suid").st_uid == 100_000
    finally:
        assert main(["umount-image", str(mnt)]) == 0


def test_missing_object_is_a_clean_enoent(tmp_path):
    require_root()
    src = _crafted(tmp_path)
    image, objects, mnt = tmp_path / "img.erofs", tmp_path / "objects", tmp_path / "mnt"
    mnt.mkdir()
    assert main(["mkimage", str(src), str(image), "--digest-store", str(objects)]) == 0
    victim = objects / scan_directory(src).entries[b"big"].object_path
    victim.unlink()
    _mounted(image, objects, mnt)
    try:
        assert os.stat(mnt / "big").st_size == 70_000           # metadata still there
        with pytest.raises(OSError) as e:
            open(mnt / "big", "rb").close()
        assert e.value.errno == errno.ENOENT
        assert (mnt / "name with spaces -+").read_bytes() == b"x" * 100   # the rest still reads
    finally:
        assert main(["umount-image", str(mnt)]) == 0
