"""`umount-image` unmounts only what flatmount mounts, unless --force (real tmpfs, overlay, erofs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, require_root, require_tool
from test_kmount import _build_mkfs, _build_writer, _make_objdirs

from flatmount.kernel import kmount


@pytest.fixture
def area(tmp_path: Path):
    require_root()
    try:
        yield tmp_path
    finally:
        for m in reversed(kmount.mounts()):
            if m.mountpoint.startswith(str(tmp_path) + "/"):
                subprocess.run(["umount", "-l", m.mountpoint], check=False)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flatmount", *args], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=60)


def mkdir(p: Path) -> str:
    p.mkdir()
    return str(p)


def test_tmpfs_is_refused_unless_forced(area: Path):
    mnt = mkdir(area / "tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "scratch", mnt], check=True)
    (Path(mnt) / "precious").write_text("data")
    r = cli("umount-image", mnt)
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert "not a flatmount mount (a tmpfs mount)" in r.stderr and "--force" in r.stderr
    assert kmount.is_mountpoint(mnt) and (Path(mnt) / "precious").read_text() == "data"
    r = cli("umount-image", "--force", mnt)
    assert r.returncode == 0, r.stderr
    assert not kmount.is_mountpoint(mnt)


def test_lookalikes_are_refused(area: Path):
    """A tmpfs named after an image, and a read-only overlay of plain dirs with an image as source."""
    image = area / "image.erofs"
    _build_writer(image)
    mnt = mkdir(area / "named")
    subprocess.run(["mount", "-t", "tmpfs", str(image), mnt], check=True)
    r = cli("umount-image", mnt)
    assert r.returncode == 3 and "a tmpfs mount" in r.stderr, r.stderr
    assert kmount.is_mountpoint(mnt)
    low1, low2, ov = mkdir(area / "l1"), mkdir(area / "l2"), mkdir(area / "ov")
    subprocess.run(["mount", "-t", "overlay", "-o", f"ro,lowerdir={low1}:{low2}", str(image), ov], check=True)
    r = cli("umount-image", ov)
    assert r.returncode == 3 and "without metacopy" in r.stderr, r.stderr
    assert kmount.is_mountpoint(ov)
    # the same options as ours, but its source is no EROFS image
    fake = area / "fake.erofs"
    fake.write_bytes(b"\0" * 4096)
    ov2 = mkdir(area / "ov2")
    subprocess.run(["mount", "-t", "overlay", "-o",
                    f"ro,lowerdir={low1}::{low2},metacopy=on,redirect_dir=on", str(fake), ov2], check=True)
    r = cli("umount-image", ov2)
    assert r.returncode == 3 and "is not an EROFS image" in r.stderr, r.stderr
    assert kmount.is_mountpoint(ov2)


@pytest.mark.parametrize("build", ["writer", "mkfs"])
@pytest.mark.parametrize("loop", [False, True])
def test_mount_image_is_unmounted(area: Path, build: str, loop: bool):
    image = area / "image.erofs"
    _build_writer(image) if build == "writer" else _build_mkfs(image, area / "staging")
    objdirs = _make_objdirs(area)
    mnt = mkdir(area / "mnt")
    args = ["mount-image", str(image), mnt, *[a for d in objdirs for a in ("--objects", str(d))]]
    r = cli(*args, *(["--loop"] if loop else []))
    assert r.returncode == 0, r.stderr
    assert kmount.not_ours_reason(kmount.find_mount(mnt)) is None
    r = cli("umount-image", mnt)
    assert r.returncode == 0, r.stderr
    assert not kmount.is_mountpoint(mnt)
    # every API the kernel offers, through the library
    for api in ("fd", "path", "mount2", "legacy"):
        kmount.mount_image(str(image), mnt, [str(d) for d in objdirs], api=api)
        kmount.umount_image(mnt, only_ours=True)
        assert not kmount.is_mountpoint(mnt), api


def test_erofs_of_a_composefs_image_is_ours_plain_erofs_is_not(area: Path):
    require_tool("mkfs.erofs")
    cfs, plain = area / "cfs.erofs", area / "plain.erofs"
    _build_writer(cfs)
    _build_mkfs(plain, area / "staging")
    for image, ours in ((cfs, True), (plain, False)):
        mnt = mkdir(area / f"e-{image.stem}")
        subprocess.run(["mount", "-t", "erofs", "-o", "ro,loop", str(image), mnt], check=True)
        r = cli("umount-image", mnt)
        assert (r.returncode == 0) == ours, r.stderr
        assert kmount.is_mountpoint(mnt) != ours
        if not ours:
            assert "not a composefs-layout image" in r.stderr


def test_image_removed_while_mounted_is_still_ours(area: Path):
    image = area / "image.erofs"
    _build_writer(image)
    objdirs = _make_objdirs(area)
    mnt = mkdir(area / "mnt")
    kmount.mount_image(str(image), mnt, [str(d) for d in objdirs])
    os.unlink(image)
    r = cli("umount-image", mnt)
    assert r.returncode == 0, r.stderr
    assert not kmount.is_mountpoint(mnt)


def test_nothing_mounted(area: Path):
    r = cli("umount-image", str(area))
    assert r.returncode == 3 and "is not a mount point" in r.stderr, r.stderr
