"""Real kernel mounts through flatmount.kernel.kmount: erofs (file-backed and loop) under overlayfs with
data-only object layers.  Needs root, erofs, overlay and loop; every mount is undone in teardown."""

from __future__ import annotations

import argparse
import ctypes
import errno
import glob
import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flatmount.errors import MountError, PermissionRequiredError
from flatmount.kernel import kmount
from tests.conftest import IN_CI, ROOT, require_root, require_tool

MTIME = 1_700_000_000


# --- the test image ------------------------------------------------------------------------------
@dataclass
class Obj:
    data: bytes
    dirs: tuple[int, ...]  # which object dirs hold it (0 = first, 1 = second)

    @property
    def hex(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def relpath(self) -> str:
        return f"{self.hex[:2]}/{self.hex[2:]}"


BIG = Obj(b"big object\n" * 1000, (0,))
NESTED = Obj(bytes(range(256)) * 20, (0,))
ONLY2 = Obj(b"only in the second object dir\n" * 300, (1,))
MISSING = Obj(b"in no object dir\n" * 200, ())
SHARED = Obj(b"first dir wins\n" * 100, (0, 1))  # the second dir holds a decoy of the same size
SCRIPT = b"#!/bin/sh\necho script-ok\n"

# path -> (kind, mode, payload)
TREE: dict[str, tuple[str, int, object]] = {
    "big": ("obj", 0o640, BIG),
    "dir": ("dir", 0o750, None),
    "dir/nested": ("obj", 0o755, NESTED),
    "dir/only2": ("obj", 0o600, ONLY2),
    "missing": ("obj", 0o644, MISSING),
    "shared": ("obj", 0o444, SHARED),
    "small": ("inline", 0o600, b"hi\n"),
    "script": ("inline", 0o755, SCRIPT),
    "empty": ("inline", 0o644, b""),
    "link": ("symlink", 0o777, b"big"),
}


@dataclass
class Layout:
    image: Path
    objdirs: list[Path]
    mnt: Path
    extra: dict = field(default_factory=dict)


def _make_objdirs(base: Path) -> list[Path]:
    # odd characters exercise overlayfs' option escaping (legacy `lowerdir=a::b` syntax)
    dirs = [base / "objs,1:a b", base / "objs2"]
    for d in dirs:
        d.mkdir()
    for kind, _mode, payload in TREE.values():
        if kind != "obj":
            continue
        for i in payload.dirs:
            p = dirs[i] / payload.relpath
            p.parent.mkdir(exist_ok=True)
            data = payload.data if (i == 0 or 0 not in payload.dirs) else b"X" * len(payload.data)
            p.write_bytes(data)
    return dirs


def _build_mkfs(image: Path, staging: Path) -> None:
    """erofs-utils image from a staging dir carrying composefs-style overlay xattrs."""
    mkfs = require_tool("mkfs.erofs")
    staging.mkdir()
    for rel, (kind, mode, payload) in TREE.items():
        p = staging / rel
        if kind == "dir":
            p.mkdir()
        elif kind == "symlink":
            os.symlink(payload, p)
            continue
        elif kind == "inline":
            p.write_bytes(payload)
        else:
            with open(p, "wb") as f:
                f.truncate(len(payload.data))  # sparse: the content lives in the object dir
            os.setxattr(p, "trusted.overlay.metacopy", b"")
            os.setxattr(p, "trusted.overlay.redirect", ("/" + payload.relpath).encode())
        os.chmod(p, mode)
    for p in [*staging.rglob("*"), staging]:
        os.utime(p, (MTIME, MTIME), follow_symlinks=False)
    subprocess.run([mkfs, "-T", str(MTIME), str(image), str(staging)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _build_writer(image: Path) -> None:
    """flatmount's own EROFS writer (composefs layout) from an Inode tree."""
    try:
        from flatmount.image.writer import write_image
    except ImportError as e:  # another worker's module; skipped only until it lands, never in CI
        if IN_CI:
            pytest.fail(f"flatmount.image.writer.write_image: {e}")
        pytest.skip(f"flatmount.image.writer.write_image not available yet: {e}")
    from flatmount.image.tree import S_IFREG, Inode, lookup

    root = Inode.directory(0o755, mtime_ns=MTIME * 10**9)
    for rel, (kind, mode, payload) in TREE.items():
        parent_path, _, name = rel.rpartition("/")
        parent = lookup(root, parent_path) if parent_path else root
        kw = {"mtime_ns": MTIME * 10**9}
        if kind == "dir":
            node = Inode.directory(mode, **kw)
        elif kind == "symlink":
            node = Inode.symlink(payload, **kw)
        elif kind == "inline":
            node = Inode.file(payload, mode, **kw)
        else:
            node = Inode(S_IFREG | mode, size=len(payload.data), digest=bytes.fromhex(payload.hex), **kw)
        parent.entries[name.encode()] = node
    write_image(root, str(image))


@pytest.fixture(params=["mkfs", "writer"])
def layout(request, tmp_path: Path):
    require_root()
    if "erofs" not in Path("/proc/filesystems").read_text():
        subprocess.run(["modprobe", "erofs"], check=False)
    image = tmp_path / "image.erofs"
    if request.param == "mkfs":
        _build_mkfs(image, tmp_path / "staging")
    else:
        _build_writer(image)
    objdirs = _make_objdirs(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    lay = Layout(image, objdirs, mnt)
    try:
        yield lay
    finally:
        _force_unmount(mnt)


def _force_unmount(mnt: Path) -> None:
    for _ in range(10):
        if not kmount.is_mountpoint(str(mnt)):
            return
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@contextmanager
def mounted(lay: Layout, dirs=None, **kw):
    kmount.mount_image(str(lay.image), str(lay.mnt), [str(d) for d in (lay.objdirs if dirs is None else dirs)],
                       **kw)
    try:
        yield lay.mnt
    finally:
        _force_unmount(lay.mnt)


# --- leak checks ---------------------------------------------------------------------------------
def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _loops_for(image: Path) -> list[str]:
    """Loop devices whose backing file is `image`."""
    out = []
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            if Path(bf).read_text().strip() == str(image):
                out.append(bf.split("/")[3])
        except OSError:
            pass
    return out


def _erofs_mounts_of(image: Path) -> list[kmount.MountEntry]:
    """erofs mounts (attached anywhere in this namespace) of `image` or a loop device on it."""
    sources = {str(image)} | {f"/dev/{n}" for n in _loops_for(image)}
    return [m for m in kmount.mounts() if m.fstype == "erofs" and m.source in sources]


def _temp_erofs_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "flatmount-erofs-*")))


def _wait_no_loops(image: Path) -> list[str]:
    for _ in range(100):
        left = _loops_for(image)
        if not left:
            return left
        time.sleep(0.02)
    return left


# --- the merged view -----------------------------------------------------------------------------
def _check_view(mnt: Path) -> None:
    for rel, (kind, mode, payload) in TREE.items():
        p = mnt / rel
        st = os.lstat(p)
        if kind == "symlink":
            assert stat.S_ISLNK(st.st_mode) and os.readlink(p) == payload.decode()
            continue
        assert stat.S_IMODE(st.st_mode) == mode, rel
        if kind == "dir":
            assert stat.S_ISDIR(st.st_mode)
            continue
        assert stat.S_ISREG(st.st_mode)
        data = payload if kind == "inline" else payload.data
        assert st.st_size == len(data), rel
        if kind == "obj" and payload is MISSING:
            continue
        assert p.read_bytes() == data, rel
    assert sorted(os.listdir(mnt)) == sorted(r for r in TREE if "/" not in r)
    assert sorted(os.listdir(mnt / "dir")) == ["nested", "only2"]
    assert (mnt / "link").read_bytes() == BIG.data


@pytest.mark.parametrize("loop", [None, True], ids=["file", "loop"])
@pytest.mark.parametrize("api", ["auto", "fd", "path", "mount2", "legacy"])
def test_mount_view_and_cleanup(layout: Layout, api: str, loop: bool | None):
    fds, tmpdirs = _fds(), _temp_erofs_dirs()
    kmount.mount_image(str(layout.image), str(layout.mnt), [str(d) for d in layout.objdirs],
                       api=api, loop=loop)
    try:
        assert kmount.is_mountpoint(str(layout.mnt))
        _check_view(layout.mnt)
        ent = kmount.find_mount(str(layout.mnt))
        assert ent is not None and ent.fstype == "overlay"
        assert {"ro", "nosuid", "nodev"} <= ent.options
        assert ent.source == str(layout.image)
        # the erofs layer is alive (through the overlay) but attached nowhere
        assert _erofs_mounts_of(layout.image) == []
        assert bool(_loops_for(layout.image)) == bool(loop)
        assert _temp_erofs_dirs() == tmpdirs
        assert _fds() == fds
    finally:
        kmount.umount_image(str(layout.mnt))
    assert not kmount.is_mountpoint(str(layout.mnt))
    assert os.listdir(layout.mnt) == []
    assert _wait_no_loops(layout.image) == []
    assert _erofs_mounts_of(layout.image) == []
    assert _temp_erofs_dirs() == tmpdirs
    assert _fds() == fds


def test_auto_falls_back_when_lowerdir_fd_refused(layout: Layout, monkeypatch):
    """A pre-6.13 overlay answers EINVAL to `lowerdir+` by fd; auto then passes /proc/self/fd/N."""

    def refuse(self, key, fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(kmount._FsContext, "set_fd", refuse)
    monkeypatch.setattr(kmount, "_learned_api", None)
    with mounted(layout) as mnt:
        assert kmount._learned_api == "path"
        assert any(o.startswith("lowerdir+=/proc/self/fd/") for o in kmount.find_mount(str(mnt)).super_options)
        _check_view(mnt)
    monkeypatch.setattr(kmount, "_learned_api", None)
    with pytest.raises(MountError) as ei:  # forcing the refused way is an error, not a silent switch
        kmount.mount_image(str(layout.image), str(layout.mnt), [str(d) for d in layout.objdirs], api="fd")
    assert ei.value.errno == errno.ENOSYS
    assert not kmount.is_mountpoint(str(layout.mnt))


@pytest.fixture
def image_on_tmpfs(layout: Layout):
    """The image copied to a private tmpfs, where erofs refuses a file-backed mount (ENOTBLK)."""
    fs = layout.mnt.parent / "tmpfs"
    fs.mkdir()
    kmount._mount2("tmpfs", str(fs), "tmpfs", 0, "size=16m,mode=0700")
    try:
        img = fs / "image.erofs"
        img.write_bytes(layout.image.read_bytes())
        yield img
    finally:
        _force_unmount(layout.mnt)
        kmount._umount2(str(fs), kmount.MNT_DETACH)


@pytest.mark.parametrize("api", ["auto", "legacy"])
def test_loop_fallback_when_file_refused(layout: Layout, image_on_tmpfs: Path, api: str):
    layout.image = image_on_tmpfs
    _expect_error(layout, image_on_tmpfs, layout.mnt, layout.objdirs, errno.ENOTBLK, "loop device",
                  loop=False, api=api)
    with mounted(layout, api=api) as mnt:
        assert _loops_for(image_on_tmpfs), "the kernel refused the file, so a loop device is used"
        assert _erofs_mounts_of(image_on_tmpfs) == []
        _check_view(mnt)
    assert _wait_no_loops(image_on_tmpfs) == []


def test_missing_object_is_enoent(layout: Layout):
    with mounted(layout) as mnt:
        st = os.stat(mnt / "missing")
        assert st.st_size == len(MISSING.data)
        with pytest.raises(FileNotFoundError):
            open(mnt / "missing", "rb")
        assert (mnt / "big").read_bytes() == BIG.data  # the mount is still fine


def test_object_dirs_in_order(layout: Layout):
    with mounted(layout) as mnt:
        assert (mnt / "dir/only2").read_bytes() == ONLY2.data   # only the second dir has it
        assert (mnt / "shared").read_bytes() == SHARED.data     # both have it: the first wins
    with mounted(layout, dirs=[layout.objdirs[1]]) as mnt:
        assert (mnt / "dir/only2").read_bytes() == ONLY2.data
        assert (mnt / "shared").read_bytes() == b"X" * len(SHARED.data)
        with pytest.raises(FileNotFoundError):
            open(mnt / "big", "rb")


def test_read_only_nodev_nosuid(layout: Layout):
    with mounted(layout) as mnt:
        line = next(ln for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                    if ln.split(" ")[4] == kmount.find_mount(str(mnt)).mountpoint)
        opts = line.split(" ")[5].split(",")
        assert {"ro", "nosuid", "nodev"} <= set(opts)
        with pytest.raises(OSError) as ei:
            open(mnt / "new", "wb")
        assert ei.value.errno == errno.EROFS
        with pytest.raises(OSError) as ei:
            open(mnt / "small", "r+b")
        assert ei.value.errno == errno.EROFS


def test_other_processes_see_it(layout: Layout):
    with mounted(layout) as mnt:
        out = subprocess.run(["cat", str(mnt / "dir/nested")], check=True, capture_output=True).stdout
        assert out == NESTED.data
        out = subprocess.run([str(mnt / "script")], check=True, capture_output=True).stdout
        assert out == b"script-ok\n"


def test_busy_unmount_then_lazy(layout: Layout):
    with mounted(layout, loop=True) as mnt:
        f = open(mnt / "big", "rb")
        try:
            with pytest.raises(MountError) as ei:
                kmount.umount_image(str(mnt))
            assert ei.value.errno == errno.EBUSY and "lazily" in str(ei.value)
            assert kmount.is_mountpoint(str(mnt))
            kmount.umount_image(str(mnt), lazy=True)
            assert not kmount.is_mountpoint(str(mnt))
            assert f.read() == BIG.data  # still served until the last user goes
            assert _loops_for(layout.image)
        finally:
            f.close()
    assert _wait_no_loops(layout.image) == []


# --- errors --------------------------------------------------------------------------------------
def _expect_error(lay: Layout, image, mnt, dirs, err: int, *words: str, **kw) -> MountError:
    fds = _fds()
    with pytest.raises(MountError) as ei:
        kmount.mount_image(str(image), str(mnt), [str(d) for d in dirs], **kw)
    e = ei.value
    assert e.errno == err, str(e)
    assert errno.errorcode[err] in str(e)
    for w in words:
        assert w in str(e)
    assert not kmount.is_mountpoint(str(lay.mnt))
    assert _fds() == fds
    assert _wait_no_loops(Path(image)) == []
    return e


def test_error_missing_image(layout: Layout):
    _expect_error(layout, layout.image.with_name("nope.erofs"), layout.mnt, layout.objdirs,
                  errno.ENOENT, "nope.erofs", "image")


def test_error_missing_objects_dir(layout: Layout):
    bad = layout.image.parent / "no-objects"
    _expect_error(layout, layout.image, layout.mnt, [layout.objdirs[0], bad], errno.ENOENT,
                  "no-objects", "objects")


def test_error_objects_dir_is_a_file(layout: Layout):
    _expect_error(layout, layout.image, layout.mnt, [layout.image], errno.ENOTDIR, "objects")


@pytest.mark.parametrize("api", ["auto", "legacy"])
def test_error_mountpoint_not_a_directory(layout: Layout, api: str):
    _expect_error(layout, layout.image, layout.image, layout.objdirs, errno.ENOTDIR, "mountpoint",
                  str(layout.image), api=api)
    _expect_error(layout, layout.image, layout.mnt / "absent", layout.objdirs, errno.ENOENT,
                  "mountpoint", api=api)


@pytest.mark.parametrize("api", ["auto", "mount2", "legacy"])
@pytest.mark.parametrize("loop", [None, True], ids=["file", "loop"])
def test_error_not_an_erofs_image(layout: Layout, api: str, loop: bool | None):
    junk = layout.image.with_name("junk.img")
    junk.write_bytes(os.urandom(8192))
    tmpdirs = _temp_erofs_dirs()
    e = _expect_error(layout, junk, layout.mnt, layout.objdirs, errno.EINVAL, "erofs", "fsck.erofs",
                      api=api, loop=loop)
    assert "superblock" in str(e)  # the kernel's own explanation, from the log
    assert _temp_erofs_dirs() == tmpdirs


def test_error_without_cap_sys_admin(layout: Layout):
    """Dropping CAP_SYS_ADMIN from the bounding set before exec leaves root without it."""
    code = (
        "import sys\n"
        "from flatmount.kernel import kmount\n"
        "from flatmount.errors import PermissionRequiredError\n"
        "try:\n"
        f"    kmount.mount_image({str(layout.image)!r}, {str(layout.mnt)!r}, {[str(d) for d in layout.objdirs]!r})\n"
        "except PermissionRequiredError as e:\n"
        "    print(e); sys.exit(7)\n"
    )

    def drop_cap_sys_admin() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_capbset_drop, cap_sys_admin = 24, 21
        if libc.prctl(pr_capbset_drop, cap_sys_admin, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl")

    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=drop_cap_sys_admin)
    assert r.returncode == 7, r.stderr
    assert "EPERM" in r.stdout and "CAP_SYS_ADMIN" in r.stdout
    assert not kmount.is_mountpoint(str(layout.mnt))
    assert issubclass(PermissionRequiredError, MountError) and issubclass(PermissionRequiredError, PermissionError)


def test_umount_errors(tmp_path: Path):
    require_root()
    with pytest.raises(MountError) as ei:
        kmount.umount_image(str(tmp_path))
    assert ei.value.errno == errno.EINVAL and "not a mount point" in str(ei.value)
    with pytest.raises(MountError) as ei:
        kmount.umount_image(str(tmp_path / "absent"))
    assert ei.value.errno == errno.ENOENT and "does not exist" in str(ei.value)


def test_bad_api_name(tmp_path: Path):
    with pytest.raises(ValueError):
        kmount.mount_image(str(tmp_path), str(tmp_path), [], api="nope")


# --- inspection helpers --------------------------------------------------------------------------
def test_is_mountpoint_and_find_mount(tmp_path: Path):
    assert kmount.is_mountpoint("/")
    assert kmount.is_mountpoint("/proc")
    assert not kmount.is_mountpoint(str(tmp_path))
    assert not kmount.is_mountpoint(str(tmp_path / "absent"))
    assert kmount.find_mount("/proc").fstype == "proc"
    assert kmount.find_mount(str(tmp_path)) is None


def test_find_mount_unescapes(layout: Layout):
    odd = layout.mnt.parent / "mnt with\tspace\\x"
    odd.mkdir()
    kmount.mount_image(str(layout.image), str(odd), [str(layout.objdirs[0])])
    try:
        ent = kmount.find_mount(str(odd))
        assert ent is not None and ent.mountpoint == str(odd) and ent.fstype == "overlay"
        assert kmount.is_mountpoint(str(odd))
    finally:
        kmount.umount_image(str(odd))
    assert kmount.find_mount(str(odd)) is None


# --- CLI -----------------------------------------------------------------------------------------
def _cli(argv: list[str]) -> int:
    """Parse with only this area registered (other areas are other workers' modules)."""
    from flatmount.cli import common_parser
    from flatmount.cli import mount as mount_cmds

    common = common_parser()
    parser = argparse.ArgumentParser(prog="flatmount", parents=[common])
    mount_cmds.register(parser.add_subparsers(dest="command", required=True), common)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_mount_and_umount_image(layout: Layout, capsys):
    argv = ["mount-image", str(layout.image), str(layout.mnt)]
    for d in layout.objdirs:
        argv += ["--objects", str(d)]
    try:
        assert _cli(argv + ["--loop"]) == 0
        assert (layout.mnt / "dir/only2").read_bytes() == ONLY2.data
        assert _loops_for(layout.image)
        assert _cli(["umount-image", str(layout.mnt), "--json"]) == 0
        assert '"unmounted": true' in capsys.readouterr().out
        assert not kmount.is_mountpoint(str(layout.mnt))
        with pytest.raises(MountError, match="not a mount point"):
            _cli(["umount-image", str(layout.mnt)])
        with pytest.raises(MountError, match="nope"):
            _cli(["mount-image", str(layout.image) + ".nope", str(layout.mnt)])
    finally:
        _force_unmount(layout.mnt)
    assert _wait_no_loops(layout.image) == []
