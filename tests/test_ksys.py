"""The compiled raw kernel calls (flatmount/kernel/_ksys.c) against their ctypes specification in
flatmount.kernel.kmount: the same calls give the same results and the same errors, and real mounts
made through either are the same mounts."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from flatmount.kernel import kmount
from tests.conftest import require_compiled, require_root

ROOT = Path(__file__).resolve().parent.parent


def _compiled():
    return require_compiled("flatmount.kernel._ksys")


def _paths():
    """(syscall, mount, umount2, statx) of each implementation."""
    k = _compiled()
    return {"compiled": (k.syscall, k.mount, k.umount2, k.statx),
            "ctypes": (kmount._sys_ctypes, kmount._mount2_ctypes, kmount._umount2_ctypes, kmount._statx_ctypes)}


def test_kmount_uses_the_compiled_calls_unless_told_not_to():
    from objects.compiled import PURE

    k = _compiled()
    if PURE:
        assert kmount._sys_raw is kmount._sys_ctypes and kmount._statx_raw is kmount._statx_ctypes
    else:
        assert kmount._sys_raw is k.syscall and kmount._statx_raw is k.statx
    code = ("import sys; from flatmount.kernel import kmount; "
            "print(kmount._sys_raw.__name__, 'ctypes' in sys.modules)")
    for pure, want in (("1", "_sys_ctypes True"), ("", "syscall False")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT),
                           env={**os.environ, "FLATMOUNT_PURE": pure, "PYTHONPATH": str(ROOT)}, check=True)
        got = r.stdout.split()
        assert got[0] == want.split()[0]
        if not pure:   # the compiled path never loads ctypes: its start-up cost is the point
            assert got[1] == "False"


def _statx_fields(buf: bytes) -> tuple:
    # stx_mask, stx_blksize, stx_attributes, stx_nlink, stx_uid, stx_gid, stx_mode, stx_ino, stx_size
    head = struct.unpack_from("=IIQIIIH", buf, 0)
    ino, size = struct.unpack_from("=QQ", buf, 32)
    return (*head, ino, size)


def test_statx_gives_the_same_struct_and_the_same_errors(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x" * 12345)
    link = tmp_path / "link"
    link.symlink_to("file")
    results = {}
    for name, (_s, _m, _u, statx) in _paths().items():
        got = []
        for p in (f, link, tmp_path, Path("/")):
            buf = statx(kmount.AT_FDCWD, os.fsencode(p), kmount.AT_NO_AUTOMOUNT, kmount.STATX_BASIC_STATS)
            assert isinstance(buf, bytes) and len(buf) == 256
            got.append(_statx_fields(buf))
        for bad in (tmp_path / "missing", f / "below-a-file"):
            with pytest.raises(OSError) as e:
                statx(kmount.AT_FDCWD, os.fsencode(bad), kmount.AT_NO_AUTOMOUNT, kmount.STATX_BASIC_STATS)
            got.append((e.value.errno, e.value.strerror, e.value.filename))
        results[name] = got
    assert results["compiled"] == results["ctypes"]
    st = os.stat(f)
    assert results["compiled"][0][-2:] == (st.st_ino, 12345)
    assert results["compiled"][4][:1] == (errno.ENOENT,) and results["compiled"][5][:1] == (errno.ENOTDIR,)


def test_syscall_arguments_and_errors_agree():
    # getpid (39 on x86_64, 172 on arm64 and the unified table): no arguments, a result
    nr = 39 if os.uname().machine == "x86_64" else 172
    errors = {}
    for name, (sys_call, _m, _u, _st) in _paths().items():
        assert sys_call(nr) == os.getpid()
        # fsopen of a file system type that does not exist: ENODEV, as OSError(errno, strerror)
        with pytest.raises(OSError) as e:
            sys_call(kmount.SYS_FSOPEN, b"no-such-fs-type", kmount.FSOPEN_CLOEXEC)
        assert (e.value.errno, e.value.strerror) == (errno.ENODEV, os.strerror(errno.ENODEV))
        got = []
        for fd in (-1, 999_999):   # a negative argument (sign-extended the same) and a closed fd
            with pytest.raises(OSError) as e:
                sys_call(kmount.SYS_FSCONFIG, fd, kmount.FSCONFIG_CMD_CREATE, None, None, 0)
            got.append(e.value.errno)
        errors[name] = got
    assert errors["compiled"] == errors["ctypes"] and errors["ctypes"][1] == errno.EBADF
    k = _compiled()
    with pytest.raises(TypeError):
        k.syscall()
    with pytest.raises(TypeError):
        k.syscall(nr, 1, 2, 3, 4, 5, 6, 7)
    with pytest.raises(TypeError):
        k.syscall(nr, 1.5)
    with pytest.raises(TypeError):
        k.mount(None, "not-bytes", None, 0, None)
    with pytest.raises(ValueError):
        k.umount2(b"a\0b", 0)


def test_a_bytearray_is_written_by_the_kernel():
    """What mntns's statmount/listmount rely on: an output buffer passed as a bytearray."""
    # getcwd (79 on x86_64, 17 on arm64/unified) writes the cwd into the buffer
    nr = 79 if os.uname().machine == "x86_64" else 17
    for _name, (sys_call, _m, _u, _st) in _paths().items():
        buf = bytearray(4096)
        n = sys_call(nr, buf, len(buf))
        assert bytes(buf[: n - 1]) == os.fsencode(os.getcwd())


def test_mounts_made_through_either_path_are_the_same(tmp_path):
    require_root()
    seen = {}
    for name, (sys_call, mount, umount2, statx) in _paths().items():
        where = tmp_path / name
        where.mkdir()
        # the new mount API: fsopen, fsconfig, fsmount, move_mount of a small tmpfs
        fd = sys_call(kmount.SYS_FSOPEN, b"tmpfs", kmount.FSOPEN_CLOEXEC)
        try:
            sys_call(kmount.SYS_FSCONFIG, fd, kmount.FSCONFIG_SET_STRING, b"size", b"1m", 0)
            sys_call(kmount.SYS_FSCONFIG, fd, kmount.FSCONFIG_CMD_CREATE, None, None, 0)
            mfd = sys_call(kmount.SYS_FSMOUNT, fd, kmount.FSMOUNT_CLOEXEC, kmount.MOUNT_ATTR_RDONLY)
        finally:
            os.close(fd)
        try:
            sys_call(kmount.SYS_MOVE_MOUNT, mfd, b"", kmount.AT_FDCWD, os.fsencode(where),
                     kmount.MOVE_MOUNT_F_EMPTY_PATH)
        finally:
            os.close(mfd)
        try:
            assert kmount.is_mountpoint(str(where))
            entry = kmount.find_mount(str(where))
            buf = statx(kmount.AT_FDCWD, os.fsencode(where), kmount.AT_NO_AUTOMOUNT, kmount.STATX_BASIC_STATS)
            attrs = struct.unpack_from("=Q", buf, 8)[0]
            # the old API too: a read-only bind of it beside it
            bind = tmp_path / f"{name}-bind"
            bind.mkdir()
            mount(os.fsencode(where), os.fsencode(bind), None, kmount.MS_BIND, None)
            try:
                assert kmount.is_mountpoint(str(bind))
            finally:
                umount2(os.fsencode(bind), 0)
            assert not kmount.is_mountpoint(str(bind))
            with pytest.raises(OSError) as e:    # not mounted any more: EINVAL
                umount2(os.fsencode(bind), 0)
            assert e.value.errno == errno.EINVAL
            seen[name] = (entry.fstype, "ro" in entry.options, bool(attrs & kmount.STATX_ATTR_MOUNT_ROOT))
        finally:
            while kmount.is_mountpoint(str(where)):
                umount2(os.fsencode(where), kmount.MNT_DETACH)
    assert seen["compiled"] == seen["ctypes"] == ("tmpfs", True, True)
